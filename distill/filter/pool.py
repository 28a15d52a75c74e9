"""A process pool for the per-trace steps, with a hard deadline per trace and results in input order.

Why not `multiprocessing.Pool`: it cannot stop one stuck task. math-verify's own timeout is `signal.alarm`, which
fails outside the main thread (Math-Verify #50, #55), and no signal handler runs while sympy is inside one long C
call (a huge integer power in GMP, say). So each worker arms its own interval timer per trace (a clean,
cheap timeout for pure-Python stalls) and the parent watches a wall deadline per trace: a worker past it is
killed and replaced, the trace is counted `verify_timeout`, and the task's remaining traces are sent again.

A task is the consecutive traces of one problem, so a worker parses the problem's gold answer once. At most
`workers * WINDOW` traces are in flight or waiting to be yielded in order, so memory does not grow with the input
(only with the window: ~8 MB per worker for 30 KB traces).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from distill.errors import DistillError
from distill.filter.answers import VerifyTimeout

Outcome = tuple[int | None, str]  # (index of the step that dropped the trace or None, reason / "ok" / "unverified")
GRACE_S = 2.0  # parent deadline beyond the worker's own timer, for the timer to fire first when it can
PREFETCH = 2  # tasks sent to a worker ahead: it starts the next at once instead of waiting on the parent
WINDOW = 256  # traces per worker read ahead of the oldest unfinished one: one slow trace must not idle the rest


def _alarm(signum: int, frame: Any) -> None:
    raise VerifyTimeout("answer check ran past its time budget")


def run_steps(item: dict[str, Any], steps: list[Any], *, timeout_s: float) -> Outcome:
    """Run `steps` in order on one trace until one drops it; the last step (answer check) gives the verdict."""
    timed = item["kind"] != "code"  # code runs in a subprocess with its own wall timeout
    if timed:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        for index, step in enumerate(steps):
            reason = step.check(item)
            if reason is not None:
                return index, reason
        return None, steps[-1].verdict(item)
    except VerifyTimeout:
        return len(steps) - 1, "verify_timeout"
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _worker(conn: Connection, steps: list[Any], timeout_s: float) -> None:
    # math-verify warns once per process that its own timeout is off; here that is by design (the worker owns it).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        for step in steps:
            step.setup()
    except Exception:  # e.g. the student tokenizer cannot be loaded: fail the stage, do not respawn forever
        conn.send(("crash", traceback.format_exc()))
        return
    conn.send(("ready",))
    while (task := conn.recv()) is not None:
        key, start, items = task
        for index in range(start, len(items)):
            try:
                outcome = run_steps(items[index], steps, timeout_s=timeout_s)
            except VerifyTimeout:  # the timer fired just as the check returned, before it was disarmed
                outcome = (len(steps) - 1, "verify_timeout")
            except Exception:
                conn.send(("crash", traceback.format_exc()))
                return
            conn.send(("done", key, index, outcome))
    conn.send(("cpu", time.process_time()))  # for the stage report: CPU seconds spent verifying


@dataclass
class _Slot:
    process: Any
    conn: Connection
    ready: bool = False
    tasks: deque[list[Any]] = field(default_factory=deque)  # [key, next index, items], oldest (running) first
    deadline: float = 0.0  # for the running trace


@dataclass
class _Pending:
    items: list[dict[str, Any]]
    outcomes: list[Outcome | None] = field(default_factory=list)


class VerifyPool:
    """`with VerifyPool(steps=..., workers=4, timeout_s=5) as pool: for outcomes in pool.imap(tasks): ...`

    `imap` yields, for each task (a list of trace items), the list of outcomes in item order, tasks in input order.
    """

    def __init__(self, *, steps: list[Any], workers: int, timeout_s: float) -> None:
        self.steps, self.workers, self.timeout_s = steps, workers, timeout_s
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["distill.filter.steps", "distill.filter.warm"])
        self.slots: list[_Slot] = []
        self.killed = 0  # workers replaced after a hard timeout or a crash
        self.worker_cpu_s = 0.0  # CPU seconds of the workers that exited cleanly (summed at exit)
        self.kinds: set[str] = set()  # record kinds sent so far (their steps' `prepare` has run)

    def __enter__(self) -> VerifyPool:
        self.slots = [self._spawn() for _ in range(self.workers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for slot in self.slots:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
        for slot in self.slots:
            with contextlib.suppress(EOFError, OSError):
                while slot.conn.poll(5):
                    message = slot.conn.recv()
                    if message[0] == "cpu":
                        self.worker_cpu_s += message[1]
                        break
            slot.process.join(timeout=5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()

    def _spawn(self) -> _Slot:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(child, self.steps, self.timeout_s), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def _budget(self, item: dict[str, Any]) -> float:
        if item["kind"] == "code":
            return self.timeout_s * max(1, len(item.get("tests") or [])) + 10 * GRACE_S
        return self.timeout_s + GRACE_S

    def imap(self, tasks: Iterable[list[dict[str, Any]]]) -> Iterator[list[Outcome]]:
        source = iter(tasks)
        pending: dict[int, _Pending] = {}
        queue: list[tuple[int, int]] = []  # (key, start) waiting for a free worker
        next_key = next_out = held = 0  # held: traces read but not yet yielded
        exhausted = False
        while True:
            while not exhausted and held < self.workers * WINDOW:
                items = next(source, None)
                if items is None:
                    exhausted = True
                    break
                self._prepare(items)
                pending[next_key] = _Pending(items, [None] * len(items))
                queue.append((next_key, 0))
                next_key += 1
                held += len(items)
            while next_out in pending and None not in pending[next_out].outcomes:
                outcomes = pending.pop(next_out).outcomes
                held -= len(outcomes)
                next_out += 1
                yield outcomes  # type: ignore[misc]
            if exhausted and not pending:
                return
            self._dispatch(queue, pending)
            self._collect(queue, pending)

    def _prepare(self, items: list[dict[str, Any]]) -> None:
        """Each step's `prepare(kind)` for a kind not seen before, in this process, before its items are sent."""
        for kind in {item["kind"] for item in items} - self.kinds:
            for step in self.steps:
                step.prepare(kind)
            self.kinds.add(kind)

    def _dispatch(self, queue: list[tuple[int, int]], pending: dict[int, _Pending]) -> None:
        for slot in self.slots:
            while queue and slot.ready and len(slot.tasks) < PREFETCH:
                key, start = queue.pop(0)
                items = pending[key].items
                slot.conn.send((key, start, items))
                if not slot.tasks:
                    slot.deadline = time.monotonic() + self._budget(items[start])
                slot.tasks.append([key, start, items])

    def _collect(self, queue: list[tuple[int, int]], pending: dict[int, _Pending]) -> None:
        busy = [s for s in self.slots if s.tasks]
        wait_s = max(0.0, min((s.deadline for s in busy), default=time.monotonic() + 1) - time.monotonic())
        for conn in wait([s.conn for s in self.slots], timeout=min(wait_s, 1.0)):
            slot = next(s for s in self.slots if s.conn is conn)
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._replace(slot, queue, pending, reason="verify_error")
                continue
            if message[0] == "ready":
                slot.ready = True
            elif message[0] == "crash":
                raise DistillError(f"filter worker failed:\n{message[1]}")
            else:
                self._record(slot, pending, message[1], message[2], message[3])
        now = time.monotonic()
        for slot in self.slots:
            if slot.tasks and now > slot.deadline:
                self._replace(slot, queue, pending, reason="verify_timeout")

    def _record(self, slot: _Slot, pending: dict[int, _Pending], key: int, index: int, outcome: Outcome) -> None:
        pending[key].outcomes[index] = outcome
        running = slot.tasks[0]
        running[1] = index + 1
        if running[1] == len(running[2]):
            slot.tasks.popleft()
        if slot.tasks:  # the worker moves straight on to the next trace: its clock starts now
            _, start, items = slot.tasks[0]
            slot.deadline = time.monotonic() + self._budget(items[start])

    def _replace(
        self, slot: _Slot, queue: list[tuple[int, int]], pending: dict[int, _Pending], *, reason: str
    ) -> None:
        """Kill a stuck or dead worker; its current trace gets `reason`, everything else it held is queued again."""
        slot.process.kill()
        slot.process.join()
        slot.conn.close()
        self.killed += 1
        if slot.tasks:
            key, index, items = slot.tasks[0]
            pending[key].outcomes[index] = (len(self.steps) - 1, reason)
            retry = [(key, index + 1)] if index + 1 < len(items) else []
            queue[:0] = retry + [(k, start) for k, start, _ in list(slot.tasks)[1:]]
        self.slots[self.slots.index(slot)] = self._spawn()
