"""Which prompt template each problem gets, checked when the recipe loads (before any model does).

A problem's template is its data source's `prompt`, else `teacher.prompt`, else the default of its answer kind
(`distill.schema.KIND_PROMPTS`), so each domain of a mixture asks for the answer form its verifier reads. The teacher
fills it (`teacher.prompts.messages`); evaluation uses the same rule for benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distill.errors import RecipeError
from distill.records import Problem
from distill.schema import KIND_PROMPTS, Teacher
from distill.sources import DataSource

Prompts = Mapping[str, str]  # data source name → its own prompt template


def check_template(template: str, *, where: str = "teacher.prompt") -> None:
    """Fail before any model loads when a prompt template cannot be filled (stray braces, missing `{problem}`)."""
    try:
        filled = template.format(problem="\0")
    except (KeyError, IndexError, ValueError) as exc:
        raise RecipeError(
            f"{where}: cannot fill the template ({type(exc).__name__}: {exc}); use {{problem}} for the "
            "problem text and double any other brace, e.g. \\boxed{{}}"
        ) from None
    if "\0" not in filled:
        raise RecipeError(f"{where}: the template must contain {{problem}}")


def source_prompts(sources: Sequence[DataSource], *, teacher: Teacher | None, where: str = "data") -> dict[str, str]:
    """The sources' own templates by source name, every template in use checked. Two sources of one spec name
    cannot ask for different prompts (their problems are told apart by source name only)."""
    if teacher is not None and teacher.prompt is not None:
        check_template(teacher.prompt)
    prompts: dict[str, str] = {}
    for index, source in enumerate(sources):
        if source.prompt is None:
            continue
        check_template(source.prompt, where=f"{where}.{index}.prompt")
        if prompts.setdefault(source.name, source.prompt) != source.prompt:
            raise RecipeError(f"{where}.{index}.prompt: another {source.name} source has a different prompt")
    return prompts


def resolve_template(own: str | None, *, teacher: Teacher | None, kind: str) -> str:
    """The one precedence rule: a source's own template, else `teacher.prompt`, else the answer kind's default."""
    return own or (teacher.prompt if teacher else None) or KIND_PROMPTS[kind]


def template_for(problem: Problem, *, teacher: Teacher, prompts: Prompts | None = None) -> str:
    """The prompt template of one problem (`prompts`: the per-source templates of `source_prompts`)."""
    return resolve_template((prompts or {}).get(problem.source), teacher=teacher, kind=problem.kind)
