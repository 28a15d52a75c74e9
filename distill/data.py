"""Dataset specs (`datasets/*.yaml`) and problem loading through `datasets.load_dataset`.

A spec says where a source lives (hub id + config + split, or a local file), how its columns map onto the
`Problem` record, what kind of answer it has (which picks the verifier and the default prompt), and its license.
A recipe's `data` entry names a spec and may point `path` at a local copy read with the same mapping.
"""

from __future__ import annotations

import glob
import json
import logging
import random
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distill.errors import DataError, RecipeError
from distill.records import Problem, problem_id
from distill.shipped import SPECS
from distill.sources import Columns, DatasetSpec, DataSource, FieldMap, Mixture

__all__ = ["DataSource", "DatasetSpec", "FieldMap", "Loaded", "find_spec", "load_problems", "load_source", "load_spec"]

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """Problems of one source plus every row that was not turned into a problem, counted by reason."""

    spec: DatasetSpec
    source: DataSource  # the recipe entry it was loaded for
    problems: list[Problem]
    dropped: Counter[str] = field(default_factory=Counter)
    location: str = ""

    def summary(self) -> dict[str, Any]:
        """What the manifest records of this source."""
        return {
            "spec": self.spec.name,
            "kind": self.spec.kind,
            "location": self.location,
            "weight": self.source.weight,
            "problems": len(self.problems),
            "dropped": dict(self.dropped),
        }


def find_spec(name_or_path: str) -> Path:
    """Resolve a spec path, or a name (`math500`) in `datasets/` of the cwd, the checkout, then the installed package
    (`distill.shipped`); the error lists the known spec names."""
    path = SPECS.find(name_or_path)
    if path is not None:
        return path
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        raise RecipeError(f"dataset spec {name_or_path}: file not found")
    raise RecipeError(f"unknown dataset spec {name_or_path!r}; known specs: {', '.join(SPECS.names())}")


def load_spec(spec: str | DatasetSpec) -> DatasetSpec:
    """The spec a data source names (or holds inline), validated."""
    from distill.recipe import read_yaml  # recipe imports schema only; keep this edge one-way at import time

    if isinstance(spec, DatasetSpec):
        return spec
    path = find_spec(spec)
    try:
        loaded = DatasetSpec.model_validate(read_yaml(path))
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise RecipeError("\n".join(lines).replace("Value error, ", "")) from None
    if loaded.name != path.stem:
        raise RecipeError(f"{path}: name: {loaded.name!r} must equal the file name {path.stem!r}")
    return loaded


def load_source(source: DataSource) -> Loaded:
    """Load one recipe data source into problems. Order is the file's, or a seeded shuffle, then `limit`."""
    import datasets  # heavy; imported only when data is actually read

    spec = load_spec(source.spec)
    if source.where:
        spec = spec.model_copy(update={"where": {**spec.where, **source.where}})
    where = f"data source {spec.name}"
    local = source.path or spec.path
    try:
        if local:
            data_files = _local_files(local, where=where)
            suffix = Path(data_files[0]).suffix.lstrip(".")
            builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix, "json")
            table = datasets.load_dataset(builder, data_files=data_files, split="train")
            location = local
        elif spec.hub:
            split = source.split or spec.split
            table = datasets.load_dataset(
                spec.hub, spec.config, split=split, revision=spec.revision, data_dir=spec.data_dir
            )
            location = f"{spec.hub}[{spec.config or 'default'}:{split}]"
        else:
            raise RecipeError(f"{where}: the spec has no hub id, so set `path` to a local file")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as exc:
        if isinstance(exc, RecipeError):
            raise
        if local:
            _raise_bad_line(data_files)
        raise DataError(f"{where} ({local or spec.hub}): {exc}") from None
    if source.seed is not None:
        table = table.shuffle(seed=source.seed)
    if source.limit is not None:
        table = table.select(range(min(source.limit, len(table))))
    loaded = Loaded(spec=spec, problems=[], location=location, source=source)
    _check_columns(spec, table.column_names, where=location)
    render = _problem_renderer(spec)
    for index, row in enumerate(table):
        problem, reason = (
            _to_problem(spec, row, render=render) if _selected(spec, row) else (None, "excluded_by_where")
        )
        if problem is None:
            loaded.dropped[reason] += 1
            log.debug("%s row %d dropped: %s", location, index, reason)
        else:
            loaded.problems.append(problem)
    if spec.kind == "code" and not loaded.problems and loaded.dropped.get("missing_tests"):
        raise DataError(
            f"{where} ({location}): kind code needs tests, and none of its {sum(loaded.dropped.values())} rows has "
            f"usable tests in column {' or '.join(map(repr, _columns(spec.fields.tests)))}"
        )
    return loaded


def _local_files(pattern: str, *, where: str) -> list[str]:
    path = Path(pattern)
    found = sorted(str(p) for p in path.glob("*.jsonl")) if path.is_dir() else sorted(glob.glob(pattern))
    if not found:
        raise RecipeError(f"{where}: path {pattern!r} matches no file")
    return found


def _raise_bad_line(data_files: list[str]) -> None:
    """`datasets` reports JSON errors without a line number; find the first bad line ourselves."""
    from distill.files import read_jsonl

    for name in data_files:
        for _ in read_jsonl(name):
            pass
    raise DataError(f"{', '.join(data_files)}: could not be read as a table (mixed types in one column?)")


def _columns(spec_value: Columns | None) -> list[str]:
    return [] if spec_value is None else [spec_value] if isinstance(spec_value, str) else list(spec_value)


def _check_columns(spec: DatasetSpec, columns: list[str], *, where: str) -> None:
    required = {"problem": spec.fields.problem}
    if spec.kind in ("math", "choice"):
        required["answer"] = spec.fields.answer
    if spec.kind == "code":
        required["tests"] = spec.fields.tests
    if spec.kind == "choice" and isinstance(spec.fields.choices, list):
        required.update({f"choices[{i}]": c for i, c in enumerate(spec.fields.choices)})
    for key, value in spec.where.items():
        if value is not None and key not in columns:
            raise DataError(f"{where}: spec {spec.name} filters on column {key!r} (`where`), which the data lacks")
    for key, value in required.items():
        names = _columns(value)  # never empty: the spec's validator requires these fields
        if not any(name in columns for name in names):
            raise DataError(
                f"{where}: spec {spec.name} maps fields.{key} to column {' or '.join(map(repr, names))}, "
                f"which the data lacks; columns are: {', '.join(columns)}"
            )


def _pick(row: dict[str, Any], spec_value: Columns | None) -> Any:
    return next((row[name] for name in _columns(spec_value) if name in row), None)


def _selected(spec: DatasetSpec, row: dict[str, Any]) -> bool:
    """Whether a row passes `where`: equal to a value, or one of a list of values."""
    return all(
        row.get(key) in value if isinstance(value, list) else row.get(key) == value
        for key, value in spec.where.items()
    )


def _problem_renderer(spec: DatasetSpec) -> Callable[[dict[str, Any]], str] | None:
    """The spec's `problem_template` compiled once (Jinja, as chat templates are); None when it has none."""
    if spec.problem_template is None:
        return None
    import jinja2

    try:
        template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False).from_string(
            spec.problem_template
        )
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"spec {spec.name}: problem_template: line {exc.lineno}: {exc.message}") from None

    def render(row: dict[str, Any]) -> str:
        try:
            return template.render(**row)
        except jinja2.UndefinedError as exc:
            raise DataError(f"spec {spec.name}: problem_template: {exc.message}; columns: {', '.join(row)}") from None

    return render


def _to_problem(
    spec: DatasetSpec, row: dict[str, Any], *, render: Callable[[dict[str, Any]], str] | None = None
) -> tuple[Problem | None, str]:
    text = _pick(row, spec.fields.problem)
    if not isinstance(text, str) or not text.strip():
        return None, "empty_problem"
    if render is not None:
        text = render({**row, "problem": text})
    answer = _extract_answer(spec, _pick(row, spec.fields.answer))
    if answer is None and spec.kind in ("math", "choice"):
        return None, "missing_answer"
    pid = problem_id(spec.name, text)
    choices = None
    if spec.kind == "choice":
        choices, answer = _choices(spec, row, answer, seed=pid)
        if answer is None:
            return None, "answer_not_in_choices"
    tests = parse_tests(_pick(row, spec.fields.tests)) if spec.kind == "code" else None
    if spec.kind == "code" and not tests:
        return None, "missing_tests"
    meta = {k: str(row[k]) for k in spec.meta if row.get(k) is not None}
    if (source_id := _pick(row, spec.fields.id)) is not None:
        meta["source_id"] = str(source_id)
    solution = _pick(row, spec.fields.solution)
    return Problem(
        id=pid,
        source=spec.name,
        kind=spec.kind,
        problem=text.strip(),
        answer=answer,
        solution=str(solution) if solution is not None else None,
        choices=choices,
        tests=tests,
        meta=meta,
    ), "ok"


def _extract_answer(spec: DatasetSpec, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip()
    if spec.answer_extract == "last_boxed":
        return last_boxed(text)
    if spec.answer_extract == "regex":
        match = re.search(spec.answer_regex or "", text, flags=re.MULTILINE)
        return match.group(1).strip() if match else None
    return text


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _choices(spec: DatasetSpec, row: dict[str, Any], answer: str | None, *, seed: str) -> tuple[list[str], str | None]:
    """Options in display order and the gold letter. The gold may be given as a letter, an index or the option text."""
    if isinstance(spec.fields.choices, list):
        options = [str(row[c]).strip() for c in spec.fields.choices]
    else:
        options = [str(o).strip() for o in row[spec.fields.choices]]
    letters = string.ascii_uppercase[: len(options)]
    gold = None
    if answer in options:
        gold = options[options.index(answer)]
    elif answer is not None and answer.strip().upper() in letters and len(answer.strip()) == 1:
        gold = options[letters.index(answer.strip().upper())]
    elif answer is not None and answer.strip().isdigit() and int(answer) < len(options):
        gold = options[int(answer)]
    if spec.shuffle_choices:
        random.Random(seed).shuffle(options)
    return options, (letters[options.index(gold)] if gold is not None else None)


def parse_tests(value: Any) -> list[dict[str, str]] | None:
    """Code tests as [{input, output}] from a list of them, an APPS/TACO `{inputs, outputs, fn_name?}` mapping, or
    JSON text of either; None when malformed or empty.

    stdin tests: an input or output given as a list of lines is joined with newlines (as APPS's harness does).
    Call-based tests (`fn_name`): `input` is the JSON array of arguments, `output` the JSON of the return value,
    and each test carries `fn_name` (see `distill.filter.sandbox`)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:
        inputs, outputs, fn_name = value["inputs"], value["outputs"], value.get("fn_name")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
            return None
        if fn_name:
            pairs = zip(inputs, outputs, strict=True)
            return [
                {"input": json.dumps(i), "output": json.dumps(o), "fn_name": str(fn_name)} for i, o in pairs
            ] or None
        value = [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)]
    if isinstance(value, list) and all(isinstance(t, dict) and {"input", "output"} <= t.keys() for t in value):
        return [{"input": _text(t["input"]), "output": _text(t["output"])} for t in value] or None
    return None


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def content_hash(loaded: list[Loaded]) -> str:
    """Hash of the problems a stage reads (what its output depends on besides the recipe's settings)."""
    from distill.manifest import canonical_hash

    return canonical_hash([p.to_dict() for source in loaded for p in source.problems])


def load_problems(sources: list[DataSource], mixture: Mixture | None = None) -> list[Loaded]:
    """Load every source of a recipe, in recipe order. Problem ids repeated across sources are kept once, counted.
    Weighted sources then give their share of the mixture (`distill.mixture`); the rest is counted as
    `over_mixture_share`."""
    from distill import mixture as mixing

    seen: set[str] = set()
    loaded_all = []
    for source in sources:
        loaded = load_source(source)
        unique = []
        for problem in loaded.problems:
            if problem.id in seen:
                loaded.dropped["duplicate_id"] += 1
            else:
                seen.add(problem.id)
                unique.append(problem)
        loaded.problems = unique
        loaded_all.append(loaded)
    if sources and all(source.weight is not None for source in sources):
        counts = mixing.plan(
            [len(loaded.problems) for loaded in loaded_all],
            [float(source.weight or 0) for source in sources],
            total=mixture.total if mixture else None,
            names=[loaded.spec.name for loaded in loaded_all],
        )
        for loaded, count in zip(loaded_all, counts, strict=True):
            if len(loaded.problems) > count:
                loaded.dropped["over_mixture_share"] += len(loaded.problems) - count
                loaded.problems = loaded.problems[:count]
    return loaded_all
