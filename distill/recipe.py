"""Load a recipe: YAML → overrides → schema validation → pass-through checks, all errors reported at once.

    recipe = load_recipe("recipes/demo.yaml", overrides=["student.sft.learning_rate=1e-5"])

Every problem is collected and raised together as one `RecipeError` whose lines read
`recipes/demo.yaml: student.sft.learnig_rate: unknown key for trl.SFTConfig (did you mean learning_rate?)`.
Relative paths inside a recipe are relative to the current directory (where `make` and `distill` run).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distill import passthrough
from distill.errors import RecipeError
from distill.schema import Recipe

# Keys of pass-through sections that distill sets itself, with the field that owns the value.
OWNED = {
    "teacher.engine": {"model": "teacher.model"},
    "teacher.sampling": {},
    "student.sft": {"output_dir": "the run directory (runs/<name>/train)"},
    "student.peft": {},
    "onpolicy.config": {
        "output_dir": "the run directory (runs/<name>/onpolicy)",
        "teacher_model_name_or_path": "onpolicy.teacher",
        "teacher_model_server_url": "onpolicy.teacher_server",
    },
    "onpolicy.peft": {},
    "eval.engine": {"model": "eval.model"},
    "eval.sampling": {},
}
PASSTHROUGH = {
    "teacher.sampling": passthrough.SAMPLING,
    "teacher.engine": passthrough.ENGINE,
    "student.sft": passthrough.SFT,
    "student.peft": passthrough.LORA,
    "onpolicy.config": passthrough.DISTILLATION,  # SERVER_DISTILLATION with onpolicy.teacher_server
    "onpolicy.peft": passthrough.LORA,
    "eval.sampling": passthrough.SAMPLING,
    "eval.engine": passthrough.ENGINE,
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float (YAML 1.2), not as the string PyYAML's 1.1 rules give."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, *, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {exc}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: file not found")
    data = parse_yaml(path.read_text(encoding="utf-8"), where=str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str, *, where: str) -> None:
    """Apply one `a.b.c=value` override in place; list items are addressed by index (`data.0.limit=5`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"{where}: --set {override!r}: expected KEY=VALUE, e.g. student.sft.learning_rate=1e-5")
    value = parse_yaml(raw, where=f"--set {key}") if raw else ""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"{where}: --set {key}: {'.'.join(parts[:i])} has {len(node)} items, no {part!r}")
            index = int(part)
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"{where}: --set {key}: {'.'.join(parts[:i])} is a value, not a section")


def load_recipe(path: str | Path, *, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises one RecipeError listing every problem found."""
    where = str(path)
    data = read_yaml(path)
    if isinstance(data.get("data"), dict | str):  # the one-source shorthand, listed so `--set data.0.limit=5` works
        data["data"] = [data["data"]]
    for override in overrides:
        apply_override(data, override, where=where)
    problems = _check_passthrough(data) + _check_specs(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = _describe(exc) + problems
        recipe = None
    if recipe and recipe.teacher and recipe.teacher.backend == "openai" and recipe.teacher.endpoint is None:
        problems.append("teacher.endpoint: required when teacher.backend is openai (base_url, api_key_env, ...)")
    if recipe:
        problems += _check_prompts(recipe)
    if problems or recipe is None:
        raise RecipeError("\n".join(f"{where}: {line}" for line in problems))
    return recipe


def _check_specs(data: dict[str, Any]) -> list[str]:
    """Every dataset spec the raw recipe names exists and is valid: found at `recipe check` time, with the other
    errors, before any data is read or model loaded."""
    from distill.data import load_spec

    problems = []
    filter_, eval_ = data.get("filter"), data.get("eval")
    named = {
        "data": data.get("data"),
        "filter.decontaminate": filter_.get("decontaminate") if isinstance(filter_, dict) else None,
        "eval.benchmarks": eval_.get("benchmarks") if isinstance(eval_, dict) else None,
    }
    for dotted, sources in named.items():
        for index, source in enumerate(sources if isinstance(sources, list) else []):
            spec = source.get("spec") if isinstance(source, dict) else source
            if isinstance(spec, str):
                try:
                    load_spec(spec)
                except RecipeError as exc:
                    problems.append(f"{dotted}.{index}.spec: {exc}")
    return problems


def _check_prompts(recipe: Recipe) -> list[str]:
    """Every prompt template the recipe's sources use can be filled."""
    from distill.prompts import source_prompts

    named = {"data": recipe.data, "eval.benchmarks": recipe.eval.benchmarks if recipe.eval else []}
    problems = []
    for where, sources in named.items():
        try:
            source_prompts(sources, teacher=recipe.teacher, where=where)
        except RecipeError as exc:
            problems.append(str(exc))
    return problems


def _check_passthrough(data: dict[str, Any]) -> list[str]:
    """Check every pass-through mapping present in the raw recipe against its library class."""
    problems = []
    for dotted, target in PASSTHROUGH.items():
        section_name, _, key = dotted.partition(".")
        parent = data.get(section_name) if isinstance(data.get(section_name), dict) else {}
        values = parent.get(key)
        if dotted == "onpolicy.config" and parent.get("teacher_server"):
            target = passthrough.SERVER_DISTILLATION
        if isinstance(values, dict) and values:
            problems += passthrough.check_section(values, target=target, path=dotted, owned=OWNED[dotted])
    return problems


def _describe(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into `key.path: what was expected` lines, with did-you-mean for unknown keys."""
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            known = _known_keys(error["loc"][:-1])
            close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
            lines.append(f"{loc}: unknown key{hint}")
        elif error["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        elif error["type"] == "value_error":  # our own validators: the message says it all, one problem a line
            lead = f"{loc}: " if loc else ""  # a Recipe-wide rule's message starts with its own key
            lines += [lead + line for line in error["msg"].removeprefix("Value error, ").splitlines()]
        else:
            lines.append(f"{loc}: {error['msg']}, got {error.get('input')!r}")
    return lines


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the schema model found by walking `loc` down from the Recipe."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        model = next((a for a in _model_args(annotation)), model)
    return list(model.model_fields)


def _model_args(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _model_args(arg)]


def check_resources(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(problems, notes) of what `distill recipe check` checks beyond the schema, from the files the recipe names:
    lengths against the models' contexts, and the on-policy teacher's tokenizer against the student's."""
    from distill import lengths, vocab

    problems, notes = lengths.check(recipe)
    return problems + vocab.check_recipe(recipe), notes


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML, in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=119)


def section(recipe: Recipe, dotted: str) -> Any:
    """The JSON value the recipe sets at a dotted path (`student.model`), or None when absent. Values at their
    schema default are left out: this is what stage fingerprints hash, so a field added to the schema later (with a
    default that keeps today's behaviour) changes no fingerprint, and finished outputs stay valid on upgrade."""
    node: Any = recipe.model_dump(mode="json", exclude_defaults=True)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
