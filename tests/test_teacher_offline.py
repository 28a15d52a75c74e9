"""The generate stage with the real vLLM engine (CPU) on the tiny model: n > 1, `<think>` forcing, token counts,
dropped/skipped problems, `--shard`, the reusable `generate_traces` call, and one `<think>` under an R1 template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_ENGINE
from distill import files, pipeline
from distill.data import DataSource, load_problems
from distill.prompts import generation_prompt
from distill.recipe import load_recipe
from distill.records import Problem, problem_id
from distill.schema import R1_PROMPT, Teacher
from teacher.shards import shard_of
from teacher.traces import GenerationStats
from teacher_templates import r1_copy

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
PREFIX = "<think>\n"


def _recipe(tmp_path: Path, model: Path, data: dict, **teacher) -> Path:
    recipe = {
        "name": "t",
        "data": data,
        "teacher": {
            "model": str(model),
            "sampling": {"n": 2, "max_tokens": MAX_TOKENS},
            "engine": TINY_ENGINE,
            **teacher,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _traces(stage_dir: Path) -> list[dict]:
    return [row for path in sorted(stage_dir.glob("*.jsonl")) for row in files.read_jsonl(path)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_generate_offline_n2_forced_think_and_exact_token_counts(tmp_path: Path, tiny_model: Path, tokenizer):
    problems = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
    problems += [
        {"problem": "  ", "answer": "1"},  # empty problem: dropped by the loader
        {"problem": "What is 7 + 7?", "answer": None},  # missing answer: dropped by the loader
        {"problem": "Add these: " + " + ".join(["1"] * 150), "answer": "150"},  # > max_model_len: skipped
    ]
    data = tmp_path / "problems.jsonl"
    files.write_jsonl(data, problems)
    engine = {**TINY_ENGINE, "max_model_len": 256}
    recipe = load_recipe(_recipe(tmp_path, tiny_model, {"spec": "local_jsonl", "path": str(data)}, engine=engine))
    manifest = pipeline.run_stage(
        recipe, "generate", runs_dir=tmp_path / "runs", options=pipeline.StageOptions(progress=False)
    )

    assert manifest.counts == {
        "in": 8,
        "out": 5,
        "traces": 10,
        "dropped": {"empty_problem": 1, "missing_answer": 1, "prompt_too_long": 1},
    }
    rows = _traces(tmp_path / "runs" / "t" / "generate")
    assert sorted((r["problem"], r["sample"]) for r in rows) == sorted(
        (p["problem"], s) for p in problems[:5] for s in range(2)
    )
    for row in rows:
        assert row["completion"].startswith(PREFIX)
        assert row["prompt"] == [{"role": "user", "content": R1_PROMPT.format(problem=row["problem"])}]
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert row["prompt_tokens"] == len(tokenizer.encode(text + PREFIX, add_special_tokens=False))
        assert len(tokenizer.encode(PREFIX, add_special_tokens=False)) > 0  # the forced prefix is really in it
        # A random-init model rarely stops by itself: a sample cut by max_tokens is kept, marked `length`.
        assert (row["finish_reason"], row["completion_tokens"]) == ("length", MAX_TOKENS) or (
            row["finish_reason"] == "stop" and row["completion_tokens"] < MAX_TOKENS
        )
        assert row["teacher"] == str(tiny_model) and row["sampling"]["n"] == 2 and row["latency_s"] > 0
    assert len({r["completion"] for r in rows if r["id"] == rows[0]["id"]}) == 2  # n samples differ
    extra = manifest.extra
    assert extra["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert extra["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert extra["finish_reasons"] == {
        "length": sum(r["finish_reason"] == "length" for r in rows),
        **({"stop": n} if (n := sum(r["finish_reason"] == "stop" for r in rows)) else {}),
    }
    assert extra["tokens_per_s"] > 0 and extra["wall_s"] >= extra["generation_s"] > 0


def test_shards_are_disjoint_and_complete(tmp_path: Path, tiny_model: Path, shared_data: Path):
    data = {"spec": "math500", "path": str(shared_data / "math500" / "test.jsonl"), "limit": 12}
    recipe = load_recipe(_recipe(tmp_path, tiny_model, data, sampling={"n": 1, "max_tokens": 4}))
    runs = tmp_path / "runs"
    first = pipeline.run_stage(
        recipe, "generate", runs_dir=runs, options=pipeline.StageOptions(shard=(1, 2), progress=False)
    )
    assert first is None  # one shard of two: the stage is not finished
    assert not (runs / "t" / "generate").exists()
    last = pipeline.run_stage(
        recipe, "generate", runs_dir=runs, options=pipeline.StageOptions(shard=(0, 2), progress=False)
    )
    assert last is not None and last.extra["shards"] == 2
    assert (last.counts["in"], last.counts["out"], last.counts["dropped"]) == (12, 12, {})
    stage_dir = runs / "t" / "generate"
    expected = {p.id for source in load_problems(recipe.data) for p in source.problems}
    by_shard = {i: {r["id"] for r in files.read_jsonl(stage_dir / f"shard-{i}-of-2.jsonl")} for i in range(2)}
    assert by_shard[0] | by_shard[1] == expected and not by_shard[0] & by_shard[1]
    assert all(shard_of(pid, 2) == i for i, ids in by_shard.items() for pid in ids)
    assert all(json.loads((stage_dir / f"shard-{i}-of-2.state.json").read_text())["done"] for i in range(2))


def test_generate_traces_keeps_input_order_and_reuses_an_engine(tiny_model: Path, shared_data: Path):
    from teacher.generate import generate_traces
    from teacher.offline import load_engine

    source = DataSource(spec="math500", path=str(shared_data / "math500" / "test.jsonl"), limit=6)
    problems = load_problems([source])[0].problems
    problems = problems[::-1] + problems[:1]  # reversed, and one problem asked twice
    teacher = Teacher(model=str(tiny_model), sampling={"n": 3, "max_tokens": 4}, engine=TINY_ENGINE)
    llm = load_engine(teacher)
    stats = GenerationStats()
    traces = generate_traces(problems, teacher=teacher, stats=stats, llm=llm)
    assert [(t.id, t.sample) for t in traces] == [(p.id, s) for p in problems for s in range(3)]
    assert stats.problems == 7 and stats.completion_tokens == sum(t.completion_tokens for t in traces)
    again = generate_traces(problems[:2], teacher=teacher, llm=llm)
    assert [t.id for t in again] == [problems[0].id] * 3 + [problems[1].id] * 3


def test_r1_template_that_opens_think_itself_gets_one_prefix(tiny_model: Path, tmp_path: Path):
    """DeepSeek-R1 / R1-Distill templates end the generation prompt with `<think>\\n`: the prompt holds one."""
    from transformers import AutoTokenizer

    from teacher.generate import generate_traces

    model = r1_copy(tiny_model, tmp_path / "r1")
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = [
        Problem(id=problem_id("t", text), source="t", kind="math", problem=text, answer="1")
        for text in ("What is 1 + 2?", "What is 2 + 2?")
    ]
    teacher = Teacher(model=str(model), sampling={"n": 1, "max_tokens": 4}, engine=TINY_ENGINE)
    traces = generate_traces(problems, teacher=teacher)
    think = tokenizer.convert_tokens_to_ids("<think>")
    for trace in traces:
        rendered = tokenizer.apply_chat_template(trace.prompt, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("assistant\n" + PREFIX), "the copy's template opens the think block itself"
        text = generation_prompt(tokenizer, trace.prompt, think_prefix=PREFIX)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids.count(think) == 1
        assert trace.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False)) == len(ids)
        assert trace.completion.startswith(PREFIX)
