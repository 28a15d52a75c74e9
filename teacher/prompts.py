"""What the teacher sees and how its answer is normalised, whatever the backend.

R1 conventions (overridable in the recipe): no system prompt, the problem inside a prompt template, and an assistant
turn that starts with `teacher.think_prefix` (`<think>\\n`), once, even where the model's chat template writes it
itself (R1's does). The template of a problem is its data source's
`prompt`, else `teacher.prompt`, else the default of its answer kind (`distill.schema.KIND_PROMPTS`: a `\\boxed{}`
answer for math, a boxed letter for choice, a ```python block for code), so each domain asks for the form its
verifier reads. The stored `completion` always carries that prefix, so
inline reasoning (offline vLLM), reasoning returned in a separate field (DeepSeek's API, vLLM's reasoning parser)
and reasoning whose `<think>` was put in the prompt by the server's chat template all end up in one form:
`<think>\\n…\\n</think>\\n\\n<final answer>`.
"""

from __future__ import annotations

import string
from typing import Any

from distill.prompts import Prompts, template_for
from distill.records import THINK_CLOSE, THINK_OPEN, Problem
from distill.schema import Teacher


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


def normalise_completion(content: str, *, reasoning: str | None, think_prefix: str, cut_short: bool = False) -> str:
    """One completion text from an endpoint's answer.

    - reasoning in a separate field → `<think>\\n{reasoning}\\n</think>\\n\\n{content}`; a sample cut short
      (`cut_short`) before any content arrived keeps its block open (`<think>\\n{reasoning}`), since its reasoning
      never ended;
    - content that opens its own `<think>` → kept as is;
    - otherwise the server's chat template forced the prefix into the prompt (R1's template does), so the
      prefix is put back in front, as offline generation stores it.
    """
    if reasoning is not None:
        if cut_short and not content:
            return f"{THINK_OPEN}\n{reasoning.lstrip(chr(10))}"
        return f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n{content.lstrip(chr(10))}"
    if content.lstrip().startswith(THINK_OPEN) or not think_prefix:
        return content
    return think_prefix + content
