"""The main program of a call-based test, run by the system python3 inside the sandbox (standard library only).

`python3 -I -S call_harness.py FN_NAME` reads stdin whole, a pipe that cannot be read twice: the run's secret on
the first line, then the JSON array of arguments. Only then does it run `solution.py` (the model's code) in a
namespace of its own, call `FN_NAME` (module-level, else a method of `Solution()`), and write one report line,
marker + secret + ":" + JSON result, to a copy of stdout it took before the code ran. The code's own stdout goes
to stderr, so what it prints is never read as a result.

Why the secret: the report is the only line the parent accepts, and the secret is in no file, argument or
environment variable the code can read, nor still on stdin. A program that prints the marker, exits early, writes
to every open descriptor or reads its own source therefore has no result. What it could still do is read the
secret out of this interpreter (its frames or the garbage collector's objects): that takes code written to attack
this harness, which a verifier's other checks cannot stop either (it could as well hard-code the expected value).
"""

import json
import os
import sys

MARKER = b"\x1e__distill_result__:"


def main() -> None:
    name = sys.argv[1]
    secret, _, arguments = sys.stdin.buffer.read().partition(b"\n")
    args = json.loads(arguments)
    report, write, dumps = os.dup(1), os.write, json.dumps  # taken before the code can replace them
    os.dup2(2, 1)
    namespace = {"__name__": "solution", "__file__": "solution.py", "__builtins__": __builtins__}
    with open("solution.py", encoding="utf-8") as source:
        code = compile(source.read(), "solution.py", "exec")
    exec(code, namespace)
    fn = namespace.get(name)
    if not callable(fn) and isinstance(namespace.get("Solution"), type):
        fn = getattr(namespace["Solution"](), name, None)
    if not callable(fn):
        sys.exit(f"no function named {name}")
    result = dumps(fn(*args)).encode()
    write(report, b"\n" + MARKER + secret + b":" + result + b"\n")


main()
