"""API backend: any OpenAI-compatible chat endpoint (DeepSeek's API, `vllm serve`, SGLang, a router).

One request per sample (n=1 each: not every API honours `n`, and a failed sample is retried alone), at most
`endpoint.max_concurrency` in flight, streamed by default (`endpoint.stream`): a server sends nothing of a
non-streamed answer until it is done, so `timeout_s` would have to outlast the longest sample, while a stream only
has to keep talking. 429, 5xx, timeouts, dropped connections, malformed bodies and the finish reasons in
`endpoint.retry_finish_reasons` are retried with exponential backoff and full jitter (`endpoint.backoff_s`
doubling per try, capped at 60 s), each counted by cause in `stats.retries`. When the retries run out, a sample
that timed out, or ended with a retried finish reason, is kept cut short (finish_reason `timeout` or that reason,
with the text that arrived; the filter drops it as truncated); any other failure stops the run with one error,
and every problem finished before it is already on disk, so a rerun continues from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from distill.errors import DistillError
from distill.prompts import Prompts, messages
from distill.records import CUT_SHORT, Problem, Trace
from distill.schema import Endpoint, Teacher
from teacher.completions import normalise_completion
from teacher.replies import CutOff, Malformed, Reply, fetch
from teacher.traces import GenerationStats, OnDone, make_trace

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
PROBE_TIMEOUT_S = 10.0
# Sampling keys the OpenAI chat API takes as arguments; the rest (top_k, min_p, ...) go in the body as extras,
# which vLLM and SGLang servers read as SamplingParams.
OPENAI_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty")


class PromptTooLong(Exception):
    """The server rejected the prompt for exceeding its context length."""


def generate_endpoint(
    problems: Sequence[Problem],
    *,
    teacher: Teacher,
    stats: GenerationStats,
    on_done: OnDone,
    prompts: Prompts | None = None,
) -> None:
    """Generate `teacher.sampling["n"]` samples per problem over the endpoint, handing problems to `on_done` as
    they finish. Raises DistillError when the endpoint is down at start or a request exhausts its retries (except
    timeouts and `endpoint.retry_finish_reasons`: those samples are kept cut short, counted in `stats.gave_up`)."""
    if teacher.endpoint is None:
        raise DistillError("teacher.endpoint: required when teacher.backend is openai (base_url, api_key_env, ...)")
    if problems:
        chats = {problem.id: messages(problem, teacher=teacher, prompts=prompts) for problem in problems}
        run = _generate(problems, chats, teacher=teacher, endpoint=teacher.endpoint, stats=stats, on_done=on_done)
        asyncio.run(run)
    if stats.gave_up:
        log.warning(
            "%d samples still failed after %d tries each and were kept cut short, by finish reason: %s",
            sum(stats.gave_up.values()),
            teacher.endpoint.max_retries + 1,
            dict(stats.gave_up),
        )


def client_for(endpoint: Endpoint) -> Any:
    """An `openai.AsyncOpenAI` without its own retries (ours are counted), keyed from the named env variable."""
    import openai

    key = os.environ.get(endpoint.api_key_env)
    if key is None:
        raise DistillError(
            f"teacher.endpoint.api_key_env: environment variable {endpoint.api_key_env} is not set "
            "(for a local server without a key, set it to any value, e.g. EMPTY)"
        )
    return openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0, timeout=endpoint.timeout_s)


async def probe(client: Any, endpoint: Endpoint) -> None:
    """Fail fast, naming the URL, when nothing answers there; costs one GET /models."""
    import openai

    try:
        await client.models.list(timeout=min(endpoint.timeout_s, PROBE_TIMEOUT_S))
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        raise DistillError(
            f"teacher endpoint {endpoint.base_url} is not usable: {type(exc).__name__}: {exc}; start the server "
            "or fix teacher.endpoint.base_url / the key in "
            f"{endpoint.api_key_env}"
        ) from None


async def _generate(
    problems: Sequence[Problem],
    chats: Mapping[str, list[dict[str, str]]],
    *,
    teacher: Teacher,
    endpoint: Endpoint,
    stats: GenerationStats,
    on_done: OnDone,
) -> None:
    client = client_for(endpoint)
    await probe(client, endpoint)
    stats.restart_clock()
    n = int(teacher.sampling.get("n", 1))
    queue: asyncio.Queue[Problem] = asyncio.Queue()
    for problem in problems:
        queue.put_nowait(problem)
    slots = asyncio.Semaphore(endpoint.max_concurrency)
    warned: set[str] = set()

    async def worker() -> None:
        while not queue.empty():
            problem = queue.get_nowait()
            traces = await _problem(
                client, problem, chats[problem.id], n=n, teacher=teacher, endpoint=endpoint, stats=stats, slots=slots
            )
            if traces is not None:
                _warn_other_model(traces, teacher=teacher, warned=warned)
                stats.add(traces)
                on_done([traces])

    # Enough problems in flight to fill every slot with their n samples, and no more (memory stays flat).
    workers = [asyncio.ensure_future(worker()) for _ in range(math.ceil(endpoint.max_concurrency / n) + 1)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await client.close()


async def _problem(
    client: Any,
    problem: Problem,
    chat: list[dict[str, str]],
    *,
    n: int,
    teacher: Teacher,
    endpoint: Endpoint,
    stats: GenerationStats,
    slots: asyncio.Semaphore,
) -> list[Trace] | None:
    """All n samples of one problem, or None when the server says the prompt is too long (counted)."""
    try:
        answers = await asyncio.gather(
            *(
                _request(
                    client,
                    _arguments(chat, sample, teacher=teacher, endpoint=endpoint),
                    endpoint=endpoint,
                    stats=stats,
                    slots=slots,
                    what=f"problem {problem.id} sample {sample}",
                )
                for sample in range(n)
            )
        )
    except PromptTooLong:
        log.debug("problem %s: the endpoint rejected the prompt as too long: skipped", problem.id)
        stats.skip(problem, "prompt_too_long")
        return None
    return [
        _trace(problem, sample, chat, reply, latency, teacher=teacher)
        for sample, (reply, latency) in enumerate(answers)
    ]


def _warn_other_model(traces: list[Trace], *, teacher: Teacher, warned: set[str]) -> None:
    """Once per model: an alias (`deepseek-reasoner`) can stand for another model than the recipe names."""
    for trace in traces:
        reported = trace.reported_model
        if reported and reported != teacher.model and reported not in warned:
            warned.add(reported)
            log.warning(
                "teacher.model is %s but the endpoint reports %s: the traces are %s's",
                teacher.model,
                reported,
                reported,
            )


def _arguments(chat: list[dict[str, str]], sample: int, *, teacher: Teacher, endpoint: Endpoint) -> dict[str, Any]:
    sampling = {k: v for k, v in teacher.sampling.items() if k != "n" and v is not None}
    if "seed" in sampling:
        sampling["seed"] += sample  # same seed on every sample would give n copies of one answer
    extra = {k: v for k, v in sampling.items() if k not in OPENAI_KEYS}
    args = {k: v for k, v in sampling.items() if k in OPENAI_KEYS}
    if endpoint.continue_final_message and teacher.think_prefix:
        # The server renders the chat template up to the open assistant turn holding the prefix and continues it
        # (no generation prompt, so an R1 template's own `<think>` is not added again); the reply then lacks the
        # prefix, which normalise_completion puts back, as offline generation stores it.
        chat = [*chat, {"role": "assistant", "content": teacher.think_prefix}]
        extra = {**extra, "continue_final_message": True, "add_generation_prompt": False}
    extra = {**endpoint.extra_body, **extra}  # disjoint (checked by the recipe schema)
    stream = {"stream": True, "stream_options": {"include_usage": True}} if endpoint.stream else {}
    body = {"model": teacher.model, "messages": chat, "n": 1, **args, **stream}
    return {**body, **({"extra_body": extra} if extra else {})}


async def _request(
    client: Any,
    arguments: dict[str, Any],
    *,
    endpoint: Endpoint,
    stats: GenerationStats,
    slots: asyncio.Semaphore,
    what: str,
) -> tuple[Reply, float]:
    """One sample with counted retries; returns (reply, latency of its last try). A sample that times out, or ends
    with a retried finish reason, on every try is returned cut short; other failures that outlast the retries raise."""
    for attempt in range(endpoint.max_retries + 1):
        reply = Reply()
        async with slots:
            started = time.monotonic()
            try:
                await fetch(client, arguments, reply)
                retried = reply.finish_reason in endpoint.retry_finish_reasons
                cause = f"finish_{reply.finish_reason}" if retried else None
            except Exception as exc:  # classified below: retried, skipped, or re-raised as a clear error
                cause = _retry_cause(exc, endpoint=endpoint, what=what)
            latency = time.monotonic() - started
        if cause is None:
            return reply, latency
        stats.retries[cause] += 1
        if attempt == endpoint.max_retries:
            return _given_up(reply, cause, endpoint=endpoint, stats=stats, what=what, tries=attempt + 1), latency
        delay = random.uniform(0, min(MAX_BACKOFF_S, endpoint.backoff_s * 2**attempt))
        log.debug("%s: %s, retry %d in %.2fs", what, cause, attempt + 1, delay)
        await asyncio.sleep(delay)
    raise DistillError(f"teacher.endpoint.max_retries: expected >= 0, got {endpoint.max_retries}")


def _given_up(reply: Reply, cause: str, *, endpoint: Endpoint, stats: GenerationStats, what: str, tries: int) -> Reply:
    """The last try of a sample out of retries: kept cut short when it timed out after text arrived (or, unstreamed,
    at all) or ended with a retried finish reason (a long sample is worth its partial text and must not stop the
    run); any other cause stops it."""
    if cause == "timeout" and endpoint.stream and not (reply.text or reply.reasoning_text):
        # Streamed, a long sample still sends chunks: silence from the first byte on every try is a server that is
        # down or swamped, and keeping the sample as an empty trace would mark its problem done for good.
        raise DistillError(
            f"teacher endpoint {endpoint.base_url}: {what} got nothing in {endpoint.timeout_s:g} s on all {tries} "
            "tries; check the server (or raise teacher.endpoint.timeout_s if it queues requests that long), then "
            "rerun (finished problems are kept)"
        )
    if cause == "timeout":
        reply.finish_reason = "timeout"
    elif not cause.startswith("finish_"):
        raise DistillError(
            f"teacher endpoint {endpoint.base_url}: {what} failed {tries} times, last with {cause}; "
            "raise teacher.endpoint.max_retries or check the server, then rerun (finished problems are kept)"
        )
    stats.gave_up[reply.finish_reason] += 1
    log.debug("%s: %s on all %d tries: kept cut short with %d characters", what, cause, tries, len(reply.text))
    return reply


def _retry_cause(exc: Exception, *, endpoint: Endpoint, what: str) -> str:
    """Name the cause of a retryable failure; raise for failures a retry cannot fix."""
    import openai

    timeouts, transport = _http_errors()
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, (openai.APITimeoutError, *timeouts)):
        return "timeout"
    if isinstance(exc, (openai.APIConnectionError, CutOff, *transport)):
        return "connection"
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return "server_error"
    if isinstance(exc, Malformed | openai.APIResponseValidationError | json.JSONDecodeError):
        return "malformed"
    if isinstance(exc, openai.BadRequestError) and "context length" in str(exc).lower():
        raise PromptTooLong(str(exc)) from None
    if isinstance(exc, openai.APIStatusError):
        raise DistillError(f"teacher endpoint {endpoint.base_url}: {what}: HTTP {exc.status_code}: {exc}") from None
    if isinstance(exc, openai.APIError):  # an error event inside a stream: the server failed mid-answer
        return "server_error"
    raise exc


def _http_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """(timeouts, other request errors) of the HTTP libraries loaded: openai < 3 lets httpx's own exceptions
    (ReadTimeout, RemoteProtocolError, ...) escape while a stream is read; openai 3 runs on httpx2 and wraps them."""
    modules = [sys.modules[name] for name in ("httpx", "httpx2") if name in sys.modules]
    return tuple(m.TimeoutException for m in modules), tuple(m.RequestError for m in modules)


def _trace(
    problem: Problem, sample: int, chat: list[dict[str, str]], reply: Reply, latency: float, *, teacher: Teacher
) -> Trace:
    completion = normalise_completion(
        reply.text,
        reasoning=reply.reasoning_text,
        think_prefix=teacher.think_prefix,
        cut_short=reply.finish_reason in CUT_SHORT,
    )
    return make_trace(
        problem,
        sample=sample,
        prompt=chat,
        completion=completion,
        finish_reason=reply.finish_reason,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        teacher=teacher.model,
        sampling=teacher.sampling,
        latency_s=latency,
        reported_model=reply.model,
        system_fingerprint=reply.system_fingerprint,
    )
