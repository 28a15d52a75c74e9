"""Which prompt template each problem gets, checked when the recipe loads (before any model does).

A problem's template is its data source's `prompt`, else `teacher.prompt`, else the default of its answer kind
(`distill.schema.KIND_PROMPTS`), so each domain of a mixture asks for the answer form its verifier reads. The teacher
fills it (`messages`); evaluation and the on-policy stage's student use the same rule and the same rendering
(`generation_prompt`), so every model is prompted the way the teacher was.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

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


def problem_text(problem: Problem) -> str:
    """The problem as shown to the teacher: multiple-choice options are listed under it as `A) …`."""
    if problem.kind != "choice" or not problem.choices:
        return problem.problem
    options = "\n".join(f"{string.ascii_uppercase[i]}) {option}" for i, option in enumerate(problem.choices))
    return f"{problem.problem}\n\n{options}"


def messages(problem: Problem, *, teacher: Teacher, prompts: Prompts | None = None) -> list[dict[str, str]]:
    """The chat messages of one problem: an optional system message, then the filled user prompt."""
    chat = [{"role": "system", "content": teacher.system_prompt}] if teacher.system_prompt else []
    template = template_for(problem, teacher=teacher, prompts=prompts)
    return [*chat, {"role": "user", "content": template.format(problem=problem_text(problem))}]


def with_think_prefix(rendered: str, think_prefix: str) -> str:
    """`rendered` (a chat template's output up to the open assistant turn) followed by `think_prefix`, unless the
    template wrote it already: DeepSeek-R1's and R1-Distill's templates end their generation prompt with `<think>\\n`
    themselves, and a second one would prompt the model with `<think>\\n<think>\\n`. A template that wrote the
    prefix without its trailing whitespace (`<think>` for `<think>\\n`) gets only that whitespace."""
    head = think_prefix.rstrip()
    if head and rendered.rstrip().endswith(head):
        # The template's text after the tag: all or part of the prefix's whitespace (add the rest), or other.
        written = rendered[rendered.rstrip().rindex(head) + len(head) :]
        tail = think_prefix[len(head) :]
        return rendered + tail[len(written) :] if tail.startswith(written) else rendered
    return rendered + think_prefix


def generation_prompt(tokenizer: Any, chat: list[dict[str, str]], *, think_prefix: str) -> str:
    """The text a local model continues: `chat` through the tokenizer's chat template with its generation prompt,
    then `think_prefix` once (see `with_think_prefix`)."""
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return with_think_prefix(rendered, think_prefix)
