"""Thinking-budget control (s1's "budget forcing", Muennighoff et al. 2025) for the offline vLLM backend.

A sample may think for at most `teacher.thinking_budget.tokens` tokens. Each sample is generated in phases, every
phase a fresh request that continues the sample from its token ids (prompt + generated + forced), so nothing is
post-processed as text:

1. think: `max_tokens` = the budget left, `</think>` added to the stop strings;
2. wait: a sample that stopped before the budget (at `</think>`, EOS or a stop string of yours) gets `wait_text`
   appended, at most `wait` times, and thinks on within the same budget (its ids count against it);
3. close: the ids of `</think>\\n\\n` are appended, whether the sample closed itself (vLLM strips the stop string
   from the text, and the ids that made it are dropped and replaced by these) or hit the budget;
4. answer: `max_tokens` = `sampling.max_tokens` minus the thinking and close ids (at least 1), so the completion
   stays within `sampling.max_tokens` as without a budget; your stop strings only.

Sampling stays reproducible under the engine seed: per-request seeds fail on vLLM's CPU build (0.32), so phase 1
samples `n` per problem as usual and every later phase sends one `n=1` request per sample, in a fixed order.
Problems go through in chunks, handed to `on_done` chunk by chunk, so memory stays bounded on large runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distill.prompts import Prompts
from distill.records import THINK_CLOSE, Problem, Trace
from distill.schema import Teacher, ThinkingBudget
from teacher.offline import serving, take, tokenised
from teacher.traces import GenerationStats, OnDone, make_trace

CHUNK = 256  # problems in flight at once: n samples each, all phases
CLOSE = THINK_CLOSE + "\n\n"  # what a forced close appends, as R1's own answers continue after </think>


@dataclass
class _Sample:
    """One sample in flight: what it has produced after the prompt, as ids (fed back) and text (kept)."""

    problem: Problem
    chat: list[dict[str, str]]
    prompt_ids: list[int]
    index: int
    started: float
    ids: list[int] = field(default_factory=list)  # generated + forced, after the prompt
    text: str = ""  # the same, as text (without `think_prefix`)
    thinking: int = 0  # ids inside the think block: generated thinking + wait_text
    waits: int = 0
    finish_reason: str = "length"


def generate_budgeted(
    problems: Sequence[Problem],
    *,
    teacher: Teacher,
    stats: GenerationStats,
    on_done: OnDone,
    llm: Any = None,
    prompts: Prompts | None = None,
) -> None:
    """`teacher.offline.generate_offline`'s contract, with each sample's thinking capped by `teacher.thinking_budget`.

    Traces record `thinking_tokens` (generated thinking + wait ids); `completion_tokens` counts every id after the
    prompt (generated and forced) and `finish_reason` is the answer phase's.
    """
    if not problems:
        return
    if teacher.thinking_budget is None:
        raise ValueError("generate_budgeted needs teacher.thinking_budget")
    if llm is None:
        with serving(teacher) as own:
            return generate_budgeted(problems, teacher=teacher, stats=stats, on_done=on_done, llm=own, prompts=prompts)
    tokenizer = llm.get_tokenizer()
    max_len = llm.llm_engine.model_config.max_model_len
    queue = tokenised(problems, teacher=teacher, tokenizer=tokenizer, max_len=max_len, stats=stats, prompts=prompts)
    phases = _Phases(llm, teacher=teacher, budget=teacher.thinking_budget, tokenizer=tokenizer, max_len=max_len)
    stats.restart_clock()
    while chunk := take(queue, CHUNK):
        finished = phases.run(chunk)
        for traces in finished:
            stats.add(traces)
        on_done(finished)


class _Phases:
    """The four phases over one chunk of problems; the forced ids are tokenised once."""

    def __init__(self, llm: Any, *, teacher: Teacher, budget: ThinkingBudget, tokenizer: Any, max_len: int) -> None:
        self.llm, self.teacher, self.budget, self.tokenizer, self.max_len = llm, teacher, budget, tokenizer, max_len
        self.wait_ids = tokenizer.encode(budget.wait_text, add_special_tokens=False)
        self.close_ids = tokenizer.encode(CLOSE, add_special_tokens=False)
        stop = teacher.sampling.get("stop") or []
        self.stop = [stop] if isinstance(stop, str) else list(stop)
        self.max_tokens = teacher.sampling.get("max_tokens")

    def run(self, chunk: list[tuple[Problem, list[dict[str, str]], list[int]]]) -> list[list[Trace]]:
        started = time.monotonic()
        n = int(self.teacher.sampling.get("n", 1))
        first = self._generate([ids for _, _, ids in chunk], self._params(self.budget.tokens, think=True, n=n))
        per_problem: list[list[_Sample]] = []
        for (problem, chat, ids), output in zip(chunk, first, strict=True):
            per_problem.append([_Sample(problem, chat, ids, o.index, started) for o in output.outputs])
            for sample, out in zip(per_problem[-1], output.outputs, strict=True):
                self._thought(sample, out)
        samples = [sample for group in per_problem for sample in group]
        thinking = [s for s in samples if self._wait(s)]
        while thinking:  # only samples that were sent back to think after a `wait_text`
            params = [self._params(self.budget.tokens - s.thinking, think=True) for s in thinking]
            outs = self._generate([s.prompt_ids + s.ids for s in thinking], params)
            for sample, output in zip(thinking, outs, strict=True):
                self._thought(sample, output.outputs[0])
            thinking = [s for s in thinking if self._wait(s)]
        answering = [s for s in samples if self._close(s)]
        # what the budget left of `max_tokens`, so the whole completion stays within it as without a budget
        room = None if self.max_tokens is None else self.max_tokens - len(self.close_ids)
        budgets = [None if room is None else max(1, room - s.thinking) for s in answering]
        outs = self._generate([s.prompt_ids + s.ids for s in answering], [self._params(k) for k in budgets])
        for sample, output in zip(answering, outs, strict=True):
            out = output.outputs[0]
            sample.ids += out.token_ids
            sample.text += out.text
            sample.finish_reason = out.finish_reason or "unknown"
        return [sorted((self._trace(s) for s in group), key=lambda t: t.sample) for group in per_problem]

    def _params(self, max_tokens: int | None, *, think: bool = False, n: int = 1) -> Any:
        """The recipe's sampling with this phase's length, stops and `n` (the recipe's first, then 1 per sample)."""
        from vllm import SamplingParams

        fields = {**self.teacher.sampling, "max_tokens": max_tokens, "stop": self.stop, "n": n}
        if think:  # the stop string must leave the text so its ids can be replaced by the forced close
            fields.update(stop=[*self.stop, THINK_CLOSE], include_stop_str_in_output=False)
        return SamplingParams(**fields)

    def _generate(self, prompts: list[list[int]], params: Any) -> list[Any]:
        if not prompts:
            return []
        return self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)

    def _thought(self, sample: _Sample, out: Any) -> None:
        """Take one thinking phase's output; a sample that stopped loses the ids of what stopped it."""
        ids = list(out.token_ids)
        if out.finish_reason == "stop":
            ids = self._before_stop(ids, out.text, out.stop_reason)
        sample.ids += ids
        sample.text += out.text
        sample.thinking += len(ids)
        sample.finish_reason = out.finish_reason or "unknown"

    def _before_stop(self, ids: list[int], text: str, reason: str | int | None) -> list[int]:
        """The ids before the stop: EOS or a stop token is the last id; a stop string ends inside the last ids,
        whose text vLLM cut, so drop ids until what is left decodes no longer than the text kept."""
        if not isinstance(reason, str):
            return ids[:-1]
        end = len(ids) - 1
        while end > 0 and len(self.tokenizer.decode(ids[:end], skip_special_tokens=True)) > len(text):
            end -= 1
        return ids[:end]

    def _wait(self, sample: _Sample) -> bool:
        """Send a sample that stopped early back to think, with `wait_text`, while waits and budget remain."""
        left = self.budget.tokens - sample.thinking
        if sample.finish_reason != "stop" or sample.waits >= self.budget.wait or left <= len(self.wait_ids):
            return False
        if not self._fits(sample, len(self.wait_ids) + 1):
            return False
        sample.ids += self.wait_ids
        sample.text += self.budget.wait_text
        sample.thinking += len(self.wait_ids)
        sample.waits += 1
        return True

    def _close(self, sample: _Sample) -> bool:
        """Force `</think>`; a sample already at `max_model_len` stays open, cut short (`length`), with no answer."""
        if not self._fits(sample, len(self.close_ids) + 1):
            sample.finish_reason = "length"
            return False
        sample.ids += self.close_ids
        sample.text += CLOSE
        return True

    def _fits(self, sample: _Sample, more: int) -> bool:
        return len(sample.prompt_ids) + len(sample.ids) + more <= self.max_len

    def _trace(self, sample: _Sample) -> Trace:
        return make_trace(
            sample.problem,
            sample=sample.index,
            prompt=sample.chat,
            completion=self.teacher.think_prefix + sample.text,
            finish_reason=sample.finish_reason,
            prompt_tokens=len(sample.prompt_ids),
            completion_tokens=len(sample.ids),
            teacher=self.teacher.model,
            sampling=self.teacher.sampling,
            latency_s=time.monotonic() - sample.started,
            thinking_tokens=sample.thinking,
        )
