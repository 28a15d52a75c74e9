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

from distill.records import THINK_CLOSE, THINK_OPEN


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
