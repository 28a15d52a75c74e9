"""API backend: any OpenAI-compatible chat endpoint (DeepSeek's API, `vllm serve`, SGLang, a router).

One request per sample (n=1 each: not every API honours `n`, and a failed sample is retried alone), at most
`endpoint.max_concurrency` in flight. 429, 5xx, timeouts, dropped connections and malformed bodies are retried
with exponential backoff and full jitter (`endpoint.backoff_s` doubling per try, capped at 60 s), each counted by
cause in `stats.retries`. A request that still fails after `endpoint.max_retries` stops the run with one error;
every problem finished before it is already on disk, so a rerun continues from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from distill.errors import DistillError
from distill.records import Problem, Trace
from distill.schema import Endpoint, Teacher
from teacher.prompts import Prompts, messages, normalise_completion
from teacher.traces import GenerationStats, OnDone, make_trace

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
PROBE_TIMEOUT_S = 10.0
# Sampling keys the OpenAI chat API takes as arguments; the rest (top_k, min_p, ...) go in the body as extras,
# which vLLM and SGLang servers read as SamplingParams.
OPENAI_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty")


class Malformed(Exception):
    """A 200 answer without a usable choice (no JSON, no choices, no message)."""


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
    they finish. Raises DistillError when the endpoint is down at start or a request exhausts its retries."""
    if teacher.endpoint is None:
        raise DistillError("teacher.endpoint: required when teacher.backend is openai (base_url, api_key_env, ...)")
    if problems:
        chats = {problem.id: messages(problem, teacher=teacher, prompts=prompts) for problem in problems}
        run = _generate(problems, chats, teacher=teacher, endpoint=teacher.endpoint, stats=stats, on_done=on_done)
        asyncio.run(run)


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

    async def worker() -> None:
        while not queue.empty():
            problem = queue.get_nowait()
            traces = await _problem(
                client, problem, chats[problem.id], n=n, teacher=teacher, endpoint=endpoint, stats=stats, slots=slots
            )
            if traces is not None:
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
                    _arguments(chat, sample, teacher=teacher),
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
        _trace(problem, sample, chat, response, latency, teacher=teacher)
        for sample, (response, latency) in enumerate(answers)
    ]


def _arguments(chat: list[dict[str, str]], sample: int, *, teacher: Teacher) -> dict[str, Any]:
    sampling = {k: v for k, v in teacher.sampling.items() if k != "n" and v is not None}
    if "seed" in sampling:
        sampling["seed"] += sample  # same seed on every sample would give n copies of one answer
    extra = {k: v for k, v in sampling.items() if k not in OPENAI_KEYS}
    args = {k: v for k, v in sampling.items() if k in OPENAI_KEYS}
    if teacher.endpoint is not None and teacher.endpoint.continue_final_message and teacher.think_prefix:
        # The server renders the chat template up to the open assistant turn holding the prefix and continues it;
        # the reply then lacks the prefix, which normalise_completion puts back, as offline generation stores it.
        chat = [*chat, {"role": "assistant", "content": teacher.think_prefix}]
        extra = {**extra, "continue_final_message": True, "add_generation_prompt": False}
    return {"model": teacher.model, "messages": chat, "n": 1, **args, **({"extra_body": extra} if extra else {})}


async def _request(
    client: Any,
    arguments: dict[str, Any],
    *,
    endpoint: Endpoint,
    stats: GenerationStats,
    slots: asyncio.Semaphore,
    what: str,
) -> tuple[Any, float]:
    """One chat completion with counted retries; returns (response, latency of the successful try)."""
    for attempt in range(endpoint.max_retries + 1):
        async with slots:
            started = time.monotonic()
            try:
                return _checked(await client.chat.completions.create(**arguments)), time.monotonic() - started
            except Exception as exc:  # classified below: retried, skipped, or re-raised as a clear error
                cause = _retry_cause(exc, endpoint=endpoint, what=what)
        stats.retries[cause] += 1
        if attempt == endpoint.max_retries:
            raise DistillError(
                f"teacher endpoint {endpoint.base_url}: {what} failed {attempt + 1} times, last with {cause}; "
                "raise teacher.endpoint.max_retries or check the server, then rerun (finished problems are kept)"
            )
        delay = random.uniform(0, min(MAX_BACKOFF_S, endpoint.backoff_s * 2**attempt))
        log.debug("%s: %s, retry %d in %.2fs", what, cause, attempt + 1, delay)
        await asyncio.sleep(delay)
    raise DistillError(f"teacher.endpoint.max_retries: expected >= 0, got {endpoint.max_retries}")


def _retry_cause(exc: Exception, *, endpoint: Endpoint, what: str) -> str:
    """Name the cause of a retryable failure; raise for failures a retry cannot fix."""
    import openai

    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return "server_error"
    if isinstance(exc, Malformed | openai.APIResponseValidationError | json.JSONDecodeError):
        return "malformed"
    if isinstance(exc, openai.BadRequestError) and "context length" in str(exc).lower():
        raise PromptTooLong(str(exc)) from None
    if isinstance(exc, openai.APIStatusError):
        raise DistillError(f"teacher endpoint {endpoint.base_url}: {what}: HTTP {exc.status_code}: {exc}") from None
    raise exc


def _checked(response: Any) -> Any:
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise Malformed(f"no choices in the response: {str(response)[:200]!r}")
    return response


def _trace(
    problem: Problem, sample: int, chat: list[dict[str, str]], response: Any, latency: float, *, teacher: Teacher
) -> Trace:
    choice = response.choices[0]
    message = choice.message
    # DeepSeek's API says `reasoning_content`; vLLM's reasoning parsers say `reasoning` (newer) or the same.
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
    usage = response.usage
    return make_trace(
        problem,
        sample=sample,
        prompt=chat,
        completion=normalise_completion(message.content or "", reasoning=reasoning, think_prefix=teacher.think_prefix),
        finish_reason=choice.finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        teacher=teacher.model,
        sampling=teacher.sampling,
        latency_s=latency,
    )
