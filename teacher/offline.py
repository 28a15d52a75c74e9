"""Offline backend: `vllm.LLM(model=teacher.model, **teacher.engine)` driven request by request.

`LLM.generate` returns only when every prompt is done, so a crash loses the whole call. Instead this backend keeps
the engine's queue topped up (twice what the scheduler can run at once, so continuous batching never starves) and
steps the engine itself, handing each problem over the moment its n samples finish. The prompt is rendered here
(chat template + generation prompt + `think_prefix`, written once even when the template ends with it, as R1's
does) and tokenised once, which also gives the exact prompt length to skip prompts the model cannot take before
the engine rejects the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError
from distill.prompts import Prompts, generation_prompt, messages
from distill.records import Problem, Trace
from distill.schema import Teacher
from teacher.traces import GenerationStats, OnDone, make_trace

log = logging.getLogger(__name__)
QUEUE_FACTOR = 2  # sequences queued per sequence the scheduler can run at once


@dataclass
class _Request:
    problem: Problem
    prompt: list[dict[str, str]]
    submitted: float


def load_engine(teacher: Teacher) -> Any:
    """The `vllm.LLM` for `teacher`: every `teacher.engine` key is passed through unchanged. Refused where GPUs
    were promised but this environment's torch sees none (the CPU build of vLLM would serve for days)."""
    from distill.devices import refuse_cpu_fallback

    refuse_cpu_fallback(what=f"vLLM for {teacher.model}", escape="set CUDA_VISIBLE_DEVICES= (empty)")
    from vllm import LLM

    log.info("loading %s with vllm.LLM(%s)", teacher.model, ", ".join(f"{k}={v!r}" for k, v in teacher.engine.items()))
    return LLM(model=teacher.model, **teacher.engine)


@contextlib.contextmanager
def serving(teacher: Teacher) -> Iterator[Any]:
    """`load_engine(teacher)`, shut down on the way out, error or not. `del llm` + `gc.collect()` leaves the release
    to the collector, and on CUDA the next engine (or the training that follows in `distill run`) can still see its
    memory taken. vLLM 0.32's `LLM` has no shutdown of its own; its engine-core client's `shutdown()` stops the
    executor and frees the distributed state and cached memory."""
    llm = load_engine(teacher)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def generate_offline(
    problems: Sequence[Problem],
    *,
    teacher: Teacher,
    stats: GenerationStats,
    on_done: OnDone,
    llm: Any = None,
    prompts: Prompts | None = None,
) -> None:
    """Generate `teacher.sampling["n"]` samples per problem, calling `on_done` with problems as they finish.

    Problems whose prompt does not fit `max_model_len` are counted in `stats.skipped` (`prompt_too_long`) and never
    sent. `llm` lets a caller reuse a loaded engine; by default one is loaded for this call and released after.
    """
    if not problems:
        return
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if llm is None:
        with serving(teacher) as own:
            return generate_offline(problems, teacher=teacher, stats=stats, on_done=on_done, llm=own, prompts=prompts)
    params = SamplingParams(**teacher.sampling)
    params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, with all n samples
    engine = llm.llm_engine
    config = engine.vllm_config
    capacity = config.scheduler_config.max_num_seqs * config.parallel_config.data_parallel_size
    queue_limit = max(1, QUEUE_FACTOR * capacity // params.n)
    prompts = tokenised(
        problems,
        teacher=teacher,
        tokenizer=llm.get_tokenizer(),
        max_len=engine.model_config.max_model_len,
        stats=stats,
        prompts=prompts,
    )
    in_flight: dict[str, _Request] = {}
    stats.restart_clock()
    submitted = 0  # request ids are positions, so repeated problems in the input stay distinct
    while True:
        for problem, chat, token_ids in take(prompts, queue_limit - len(in_flight)):
            # A plain TokensPrompt works from vLLM 0.11 to 0.32 (0.32 logs that raw prompts are deprecated in favour
            # of its Renderer's outputs); move to the Renderer once the oldest supported vLLM has it.
            engine.add_request(str(submitted), {"prompt_token_ids": token_ids}, params)
            in_flight[str(submitted)] = _Request(problem, chat, time.monotonic())
            submitted += 1
        if not engine.has_unfinished_requests():
            break
        finished = [
            _traces(out, in_flight.pop(out.request_id), teacher=teacher) for out in engine.step() if out.finished
        ]
        if finished:
            for traces in finished:
                stats.add(traces)
            on_done(finished)


def tokenised(
    problems: Sequence[Problem],
    *,
    teacher: Teacher,
    tokenizer: Any,
    max_len: int,
    stats: GenerationStats,
    prompts: Prompts | None,
) -> Iterator[tuple[Problem, list[dict[str, str]], list[int]]]:
    """Render and tokenise lazily, as the queue needs them; too-long prompts are counted and skipped."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DistillError(f"teacher.model {teacher.model}: its tokenizer has no chat template to build the prompt")
    for problem in problems:
        chat = messages(problem, teacher=teacher, prompts=prompts)
        text = generation_prompt(tokenizer, chat, think_prefix=teacher.think_prefix)
        # The template already holds any BOS/special tokens; adding them again would double the BOS.
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if len(token_ids) >= max_len:
            log.debug(
                "problem %s: prompt has %d tokens, max_model_len is %d: skipped", problem.id, len(token_ids), max_len
            )
            stats.skip(problem, "prompt_too_long")
            continue
        yield problem, chat, token_ids


def take(items: Iterator[Any], count: int) -> list[Any]:
    taken: list[Any] = []
    if count <= 0:
        return taken
    for item in items:
        taken.append(item)
        if len(taken) >= count:
            break
    return taken


def _traces(output: Any, request: _Request, *, teacher: Teacher) -> list[Trace]:
    latency = time.monotonic() - request.submitted
    return [
        make_trace(
            request.problem,
            sample=sample.index,
            prompt=request.prompt,
            completion=teacher.think_prefix + sample.text,
            finish_reason=sample.finish_reason,
            prompt_tokens=len(output.prompt_token_ids),
            completion_tokens=len(sample.token_ids),
            teacher=teacher.model,
            sampling=teacher.sampling,
            latency_s=latency,
        )
        for sample in sorted(output.outputs, key=lambda s: s.index)
    ]
