"""`teacher.thinking_budget` (s1 budget forcing) with the real vLLM engine (CPU) on the tiny model: the budget is
never exceeded, every sample closes its think block and answers, "Wait" keeps an early-stopping sample thinking,
the engine seed reproduces every phase, and an openai teacher is refused.

The random-init model samples from `ALLOWED`, the tokens that are one ASCII character: its text then re-tokenises
into at most the ids it was generated from (a partial UTF-8 byte decodes to U+FFFD, three bytes), and every thinking
token is exactly one character of the think block. It rarely emits `</think>` by itself, so the wait path runs with
a real `logit_bias` on that token, which makes the model stop thinking early most of the time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import TINY_ENGINE
from distill import files, pipeline
from distill.errors import RecipeError
from distill.recipe import load_recipe
from distill.records import Problem, Trace, problem_id
from distill.schema import Teacher
from teacher.traces import GenerationStats

pytestmark = pytest.mark.slow
BUDGET, MAX_TOKENS, PREFIX = 12, 30, "<think>\n"
WAIT = 2
TEXTS = [f"What is {i} + {2 * i}?" for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def sampling(tokenizer) -> dict:
    """Single-ASCII-character tokens and `</think>`, which plain sampling rarely picks (see the module docstring)."""
    ascii_ids = [i for i in range(len(tokenizer)) if _one_ascii_char(tokenizer.decode([i]))]
    close = tokenizer.convert_tokens_to_ids("</think>")
    assert len(ascii_ids) > 50 and all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for c in "Wait")
    return {"n": 3, "max_tokens": MAX_TOKENS, "temperature": 1.0, "allowed_token_ids": [*ascii_ids, close]}


@pytest.fixture(scope="module")
def early_stop(sampling: dict, tokenizer) -> dict:
    return {**sampling, "logit_bias": {tokenizer.convert_tokens_to_ids("</think>"): 3.0}}


@pytest.fixture(scope="module")
def llm(tiny_model: Path):
    from teacher.offline import serving

    with serving(Teacher(model=str(tiny_model), engine=TINY_ENGINE)) as engine:
        yield engine


def _one_ascii_char(text: str) -> bool:
    return len(text) == 1 and text.isascii() and (text.isprintable() or text in "\n ")


def _problems() -> list[Problem]:
    return [Problem(id=problem_id("t", text), source="t", kind="math", problem=text, answer="1") for text in TEXTS]


def _teacher(model: Path, sampling: dict, wait: int = 0) -> Teacher:
    budget = {"tokens": BUDGET, "wait": wait}
    return Teacher(model=str(model), sampling=sampling, engine=TINY_ENGINE, thinking_budget=budget)


def _check(traces: list[Trace], tokenizer, *, samples: int = 3) -> None:
    """Every sample: within budget (counted and re-tokenised), one closed think block, an answer phase after it."""
    assert [(t.id, t.sample) for t in traces] == [(p.id, s) for p in _problems() for s in range(samples)]
    for trace in traces:
        assert trace.completion.startswith(PREFIX) and "</think>\n\n" in trace.completion
        think, _, answer = trace.completion[len(PREFIX) :].partition("</think>\n\n")
        assert trace.thinking_tokens is not None and trace.thinking_tokens <= BUDGET
        assert len(tokenizer.encode(think, add_special_tokens=False)) <= BUDGET
        assert trace.thinking_tokens == len(think)  # one character per token: the count is exact
        close = len(tokenizer.encode("</think>\n\n", add_special_tokens=False))
        assert trace.completion_tokens > trace.thinking_tokens + close  # the answer phase generated
        assert trace.completion_tokens <= MAX_TOKENS
        assert trace.finish_reason in ("length", "stop") and answer
        if trace.finish_reason == "length":  # the answer phase's max_tokens is what thinking left of max_tokens
            assert trace.completion_tokens == MAX_TOKENS
        assert trace.prompt_tokens > 0 and trace.sampling["n"] == samples


def test_budget_caps_thinking_and_every_sample_answers(llm, tiny_model: Path, sampling: dict, tokenizer):
    from teacher.generate import generate_traces

    stats = GenerationStats()
    traces = generate_traces(_problems(), teacher=_teacher(tiny_model, sampling), stats=stats, llm=llm)
    _check(traces, tokenizer)
    assert sum(t.thinking_tokens == BUDGET for t in traces) > len(traces) // 2  # mostly cut at the budget
    assert all("Wait" not in t.completion for t in traces)  # wait: 0
    assert stats.completion_tokens == sum(t.completion_tokens for t in traces) and stats.problems == len(TEXTS)
    assert len({t.completion for t in traces if t.id == traces[0].id}) == 3  # n samples differ


def test_wait_keeps_an_early_stopping_sample_thinking(llm, tiny_model: Path, early_stop: dict, tokenizer):
    from teacher.generate import generate_traces

    traces = generate_traces(_problems(), teacher=_teacher(tiny_model, early_stop, wait=WAIT), llm=llm)
    _check(traces, tokenizer)
    waits = len(tokenizer.encode("Wait", add_special_tokens=False))
    waited = 0
    for trace in traces:
        think = trace.completion[len(PREFIX) :].partition("</think>")[0]
        count = think.count("Wait")
        assert count <= WAIT
        waited += count > 0
        if trace.thinking_tokens < BUDGET:  # it closed by itself: only once no wait was left, or no room for one
            assert count == WAIT or BUDGET - trace.thinking_tokens <= waits, trace.completion
    assert waited >= len(traces) // 2, "the biased model should stop early and be sent back to think"
    assert any(t.thinking_tokens < BUDGET for t in traces)  # some closed by themselves after their waits
    unbiased = generate_traces(_problems(), teacher=_teacher(tiny_model, early_stop, wait=0), llm=llm)
    _check(unbiased, tokenizer)
    assert all("Wait" not in t.completion for t in unbiased)
    assert sum(t.thinking_tokens for t in unbiased) < sum(t.thinking_tokens for t in traces)  # waits think longer


def test_same_engine_seed_same_completions_and_rows_on_disk(tmp_path: Path, tiny_model: Path, early_stop: dict):
    """A fresh engine per run (the engine seed is set at start-up): the stage and the plain call agree exactly."""
    from teacher.generate import generate_traces

    teacher = _teacher(tiny_model, early_stop, wait=WAIT)
    first = generate_traces(_problems(), teacher=teacher)
    data = tmp_path / "problems.jsonl"
    files.write_jsonl(data, [{"problem": text, "answer": "1"} for text in TEXTS])
    recipe = {
        "name": "b",
        "data": {"spec": "local_jsonl", "path": str(data)},
        "teacher": teacher.model_dump(exclude_none=True),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    options = pipeline.StageOptions(progress=False)
    pipeline.run_stage(load_recipe(path), "generate", runs_dir=tmp_path / "runs", options=options)
    rows = [
        Trace.from_dict(row, where="shard")
        for shard in sorted((tmp_path / "runs" / "b" / "generate").glob("*.jsonl"))
        for row in files.read_jsonl(shard)
    ]
    key = {(t.problem, t.sample): (t.completion, t.thinking_tokens, t.completion_tokens) for t in first}
    assert {(t.problem, t.sample): (t.completion, t.thinking_tokens, t.completion_tokens) for t in rows} == key
    assert any("Wait" in completion for completion, _, _ in key.values())


def test_thinking_budget_needs_vllm_and_room_for_the_answer(tmp_path: Path):
    base = {"name": "r", "data": {"spec": "local_jsonl", "path": "x.jsonl"}}
    openai = {
        "backend": "openai",
        "model": "m",
        "endpoint": {"base_url": "http://127.0.0.1:1/v1"},
        "thinking_budget": {"tokens": 100},
    }
    too_long = {"model": "m", "sampling": {"max_tokens": 100}, "thinking_budget": {"tokens": 100}}
    for teacher, expected in (
        (openai, "needs offline vLLM"),
        (too_long, r"budgets \[100\] must be below sampling.max_tokens=100"),
    ):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({**base, "teacher": teacher}))
        with pytest.raises(RecipeError, match=rf"teacher\.thinking_budget: {expected}"):
            load_recipe(path)
    old = {"id": "a", "source": "t", "kind": "math", "problem": "p", "answer": "1", "sample": 0, "prompt": []}
    old.update(completion="c", reasoning="", final="c", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    assert Trace.from_dict({**old, "teacher": "m", "sampling": {}}, where="old row").thinking_tokens is None
