"""Teacher stage: chain-of-thought traces from a reasoning model, offline (vLLM) or over an OpenAI-compatible API.

`teacher.generate.run` is the `distill generate` stage (crash-safe, shardable). Evaluation samples models the way
the teacher does through the two calls below, its only entry into this package: `engine` (the offline `vllm.LLM`,
or None for an endpoint) and `sample` (problems in, traces out, nothing written). Backends: `teacher.offline`
(`vllm.LLM`), `teacher.endpoint` (`openai.AsyncOpenAI`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.prompts import Prompts
    from distill.records import Problem, Trace
    from distill.schema import Teacher


@contextlib.contextmanager
def engine(teacher: Teacher) -> Iterator[Any]:
    """The loaded `vllm.LLM` for `teacher` (None for an endpoint), shut down on the way out, error or not."""
    if teacher.backend != "vllm":
        yield None
        return
    from teacher.offline import serving  # vLLM is imported only when an engine is wanted

    with serving(teacher) as llm:
        yield llm


def sample(
    problems: Sequence[Problem], *, teacher: Teacher, llm: Any = None, prompts: Prompts | None = None
) -> tuple[list[Trace], int]:
    """`teacher.sampling["n"]` traces per problem in input order (see `teacher.generate.generate_traces`), and the
    number of problems skipped because their prompt does not fit the engine's context."""
    from teacher.generate import generate_traces
    from teacher.traces import GenerationStats

    stats = GenerationStats()
    traces = generate_traces(problems, teacher=teacher, stats=stats, llm=llm, prompts=prompts)
    return traces, len(stats.skipped_ids)
