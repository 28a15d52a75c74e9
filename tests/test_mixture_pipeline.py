"""A three-domain mixture through the real stages: generate (vLLM, tiny model) → filter → eval.

A random tiny model cannot answer anything, so the teacher's forced `think_prefix` carries a finished reasoning block
and one final text holding an answer of every form, and `allowed_token_ids` lets the model only end its turn. Each
row then reaches its domain's verifier with that same text: math-verify reads the `\\boxed{}` number, the choice
check reads `Answer: C` (the boxed number is no letter), and the sandbox runs the ```python block (which echoes its
input). Only the right verifier passes the rows expected below, so a row sent to the wrong one fails the test.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_mixture import write_sources
from transformers import AutoTokenizer

from conftest import TINY_ENGINE
from distill import files, pipeline
from distill.data import load_problems
from distill.recipe import load_recipe

CHOICE_PROMPT = "Question: {problem}\nReply with the letter of your choice."


def scripted_prefix(math_answer: str) -> str:
    return f"<think>\nscripted\n</think>\n\nAnswer: C\n\\boxed{{{math_answer}}}\n\n```python\nprint(input())\n```\n"


@pytest.mark.slow
def test_mixture_generate_filter_eval_routes_each_domain_to_its_verifier(tmp_path, tiny_model, shared_data):
    raw = write_sources(tmp_path, shared_data)
    raw[2]["prompt"] = CHOICE_PROMPT
    math_problems = load_problems(load_recipe(_write(tmp_path, {"name": "probe", "data": raw})).data)[0].problems
    integer = next(p.answer for p in math_problems if p.answer.isdigit())
    eos = AutoTokenizer.from_pretrained(tiny_model).convert_tokens_to_ids("<|im_end|>")
    sampling = {"n": 2, "max_tokens": 4, "temperature": 1.0, "allowed_token_ids": [eos]}
    benchmarks = [
        {**raw[0], "weight": None, "limit": 8},
        {"spec": "local_code_jsonl", "path": raw[1]["path"]},
        {"spec": "local_choice_jsonl", "path": raw[2]["path"], "prompt": CHOICE_PROMPT},
    ]
    recipe = load_recipe(
        _write(
            tmp_path,
            {
                "name": "mix",
                "data": raw,
                "teacher": {
                    "model": str(tiny_model),
                    "think_prefix": scripted_prefix(integer),
                    "sampling": sampling,
                    "engine": TINY_ENGINE,
                },
                "filter": {"workers": 2, "near_dup_threshold": None},
                "eval": {
                    "model": str(tiny_model),
                    "benchmarks": benchmarks,
                    "sampling": sampling,
                    "engine": TINY_ENGINE,
                },
            },
        )
    )
    runs, options = tmp_path / "runs", pipeline.StageOptions(progress=False)

    generated = pipeline.run_stage(recipe, "generate", runs_dir=runs, options=options)
    sources = generated.extra["sources"]
    assert [(s["spec"], s["kind"], s["weight"], s["problems"]) for s in sources] == [
        ("math500", "math", 2.0, 8),
        ("local_code_jsonl", "code", 1.0, 4),
        ("local_choice_jsonl", "choice", 1.0, 4),
    ], "the manifest records each source's share"
    assert sources[0]["dropped"] == {"over_mixture_share": 492} and sources[2]["prompt"] == CHOICE_PROMPT
    traces = [row for path in sorted((runs / "mix/generate").glob("*.jsonl")) for row in files.read_jsonl(path)]
    assert len(traces) == 2 * 16 and {row["finish_reason"] for row in traces} == {"stop"}
    user = {
        row["kind"]: row["prompt"][-1]["content"]
        for row in traces
        if row["meta"]["source_id"] in ("q1", "echo") or row["kind"] == "math"
    }
    assert user["math"].endswith("put your final answer within \\boxed{}."), "math: R1's prompt"
    assert user["code"].endswith("complete that function instead."), "code: the fenced-block prompt"
    assert user["choice"].startswith("Question: ") and "\nA) O2\nB) N2\nC) CO2\nD) He\n" in user["choice"], (
        "choice: the source's own prompt, options listed"
    )

    pipeline.run_stage(recipe, "filter", runs_dir=runs, options=options)
    out = runs / "mix/filter"
    kept = list(files.read_jsonl(out / "kept.jsonl"))
    rejected = list(files.read_jsonl(out / "rejected.jsonl"))
    verdicts = {(row["source"], row["meta"]["source_id"]): row["verdict"]["reason"] for row in kept + rejected}
    for row in kept + rejected:
        if row["source"] == "math500":
            expected = "ok" if row["answer"] == integer else "wrong_answer"
            assert row["verdict"]["reason"] == expected, "math rows were judged by math-verify on the boxed number"
    assert {key: reason for (source, key), reason in verdicts.items() if source == "local_code_jsonl"} == {
        "echo": "ok",
        "echo2": "ok",
        "sum": "wrong_answer",
        "double": "runtime_error",
    }, "code rows ran in the sandbox: echo passes, a sum fails, a call-based test finds no function"
    assert {key: reason for (source, key), reason in verdicts.items() if source == "local_choice_jsonl"} == {
        "q1": "ok",
        "q2": "wrong_answer",
        "q3": "ok",
        "q4": "wrong_answer",
    }, "choice rows were judged by their letter"

    funnel = json.loads((out / "funnel.json").read_text())
    by_source = funnel["by_source"]
    assert {name: (row["in"], row["kind"]) for name, row in by_source.items()} == {
        "math500": (16, "math"),
        "local_code_jsonl": (8, "code"),
        "local_choice_jsonl": (8, "choice"),
    }
    for row in [*by_source.values(), *funnel["by_kind"].values()]:
        assert row["kept"] + sum(row["dropped"].values()) == row["in"], "each source's funnel adds up"
    assert by_source["local_code_jsonl"] == {
        "kind": "code",
        "in": 8,
        "kept": 4,
        "dropped": {"runtime_error": 2, "wrong_answer": 2},
    }
    assert sum(row["kept"] for row in by_source.values()) == len(kept) == funnel["out"]
    assert (
        "| local_code_jsonl | code | 8 | 4 | 50.0 | runtime_error 2, wrong_answer 2 |"
        in (out / "funnel.md").read_text()
    )

    pipeline.run_stage(recipe, "eval", runs_dir=runs, options=options)
    results = json.loads((runs / "mix/eval/results.json").read_text())["student"]
    assert set(results["domains"]) == {"math", "code", "choice"}
    assert results["benchmarks"]["local_code_jsonl"]["pass@1"] == 0.5, "echo and echo2 of 4 code problems"
    assert results["benchmarks"]["local_choice_jsonl"]["pass@1"] == 0.5, "q1 and q3 of 4 questions"
    assert results["domains"]["code"]["pass@1"] == 0.5 and results["overall"]["problems"] == 16
    table = (runs / "mix/eval/results.md").read_text()
    assert "| student (`qwen2`) | all code | code | 4 | 50.0 |" in table


def _write(tmp_path, data) -> str:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)
