"""The filter stage end to end on hand-written and real traces placed as a finished generate stage: funnel, kept
and rejected rows, dedup, decontamination, selection, quality steps, the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import finish_stage
from distill import cli, files, pipeline
from distill.errors import DataError
from distill.manifest import Manifest, read_manifest
from distill.records import problem_id, split_reasoning
from distill.schema import Recipe


def trace(
    problem: str,
    answer: str | None,
    completion: str,
    *,
    sample: int = 0,
    kind: str = "math",
    finish_reason: str = "stop",
    tokens: int = 10,
    **extra,
) -> dict:
    reasoning, final = split_reasoning(completion)
    return {
        "id": problem_id("test", problem),
        "source": "test",
        "kind": kind,
        "problem": problem,
        "answer": answer,
        "sample": sample,
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": problem}],
        "completion": completion,
        "reasoning": reasoning,
        "final": final,
        "finish_reason": finish_reason,
        "prompt_tokens": 5,
        "completion_tokens": tokens,
        "teacher": "t",
        "sampling": {"n": 4},
        **extra,
    }


def think(reasoning: str, final: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{final}"


def place_generate(runs: Path, name: str, rows: list[dict]) -> None:
    """A finished generate stage (traces + manifest), as the teacher would leave it."""
    out = runs / name / "generate"
    files.write_jsonl(out / "traces.jsonl", rows)
    finish_stage(out, {"in": len(rows), "out": len(rows)})


def recipe(name: str = "t", **filter_section) -> Recipe:
    return Recipe.model_validate(
        {
            "name": name,
            "data": [{"spec": "local_jsonl", "path": "unused.jsonl"}],
            "teacher": {"model": "teacher"},
            "filter": {"workers": 2, **filter_section},
        }
    )


def run_filter(tmp_path: Path, rows: list[dict], **filter_section) -> tuple[Manifest, Path]:
    runs = tmp_path / "runs"
    place_generate(runs, "t", rows)
    manifest = pipeline.run_stage(
        recipe(**filter_section), "filter", runs_dir=runs, options=pipeline.StageOptions(progress=False)
    )
    return manifest, runs / "t" / "filter"


def rows_of(path: Path) -> list[dict]:
    return list(files.read_jsonl(path))


def assert_adds_up(manifest: Manifest, out: Path) -> dict:
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["in"] == funnel["out"] + sum(funnel["dropped"].values())
    assert manifest.counts["in"] == funnel["in"] and manifest.counts["out"] == funnel["out"]
    assert len(rows_of(out / "kept.jsonl")) == funnel["out"]
    assert len(rows_of(out / "rejected.jsonl")) == funnel["in"] - funnel["out"]
    for step in funnel["steps"]:
        assert step["seen"] == step["kept"] + step["dropped"] == step["kept"] + sum(step["reasons"].values())
    kept, every = rows_of(out / "kept.jsonl"), rows_of(out / "kept.jsonl") + rows_of(out / "rejected.jsonl")
    got = funnel["yield"]
    assert got == manifest.extra["yield"]
    assert (got["problems"], got["problems_kept"]) == (len({r["id"] for r in every}), len({r["id"] for r in kept}))
    assert got["teacher_tokens"] == sum(int(r.get("completion_tokens") or 0) for r in every)
    return funnel


def real_traces(shared_data: Path) -> list[tuple[dict, dict]]:
    pairs = []
    for name in ("skyt1_32b_aime24.jsonl", "skyt1_32b_reflection_amc23.jsonl"):
        for source in files.read_jsonl(shared_data / "reasoning_traces" / name):
            answer = source.get("reference_answer_normalized") or str(source["reference_answer"])
            row = trace(
                source["problem"],
                answer,
                source["response"],
                tokens=len(source["response"]) // 4,
                finish_reason="stop" if source["has_think_close"] else "length",
            )
            pairs.append((source, row))
    return pairs


def test_filter_stage_real_traces(tmp_path: Path, shared_data: Path) -> None:
    """70 real long-CoT traces: truncated ones rejected as truncated, complete ones verified like the harness."""
    pairs = real_traces(shared_data)
    manifest, out = run_filter(
        tmp_path, [row for _, row in pairs], max_cjk_ratio=None, max_repeated_ngram_ratio=None, code_in_reasoning=False
    )
    funnel = assert_adds_up(manifest, out)
    by_id = {row["id"]: source for source, row in pairs}
    rejected = rows_of(out / "rejected.jsonl")
    kept = rows_of(out / "kept.jsonl")
    truncated = {r["id"] for r in rejected if r["verdict"]["reason"] == "truncated"}
    assert truncated == {row["id"] for source, row in pairs if not source["has_think_close"]}
    verified = {r["id"]: r["verdict"]["correct"] for r in rejected if r["step"] == "answer_matches"}
    verified |= {r["id"]: r["verdict"]["correct"] for r in kept}
    agree = sum(by_id[pid]["harness_score"] == correct for pid, correct in verified.items())
    assert len(verified) == 54 and agree == 54, (agree, len(verified))
    assert funnel["out"] == 40
    row = kept[0]
    assert row["verdict"] == {"correct": True, "reason": "ok"}
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][1]["content"] == row["problem"]
    assert row["messages"][2]["content"] == f"<think>\n{row['reasoning']}\n</think>\n\n{row['final']}"
    for name in ("funnel.md", "funnel.png", "lengths.png", "manifest.json"):
        assert (out / name).stat().st_size > 0
    assert "| truncated | 70 | 54 | 16 | truncated 16 |" in (out / "funnel.md").read_text()


def test_filter_stage_dedup_and_decontamination(tmp_path: Path, shared_data: Path) -> None:
    gsm8k = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[7])["question"]
    math500 = json.loads((shared_data / "math500" / "test.jsonl").read_text().splitlines()[3])["problem"]
    long_problem = (
        "A farmer has a rectangular field that is twice as long as it is wide and the perimeter of "
        "the field is three hundred meters in total so what is the area of the field in square meters"
    )
    ok = think("work it out", "\\boxed{5}")
    rows = [
        trace("What is the sum of 2 and 3?", "5", ok),
        trace("what is the SUM of 2 and 3 ?", "5", ok),  # exact duplicate after normalisation
        trace(long_problem, "5", ok),
        trace(long_problem.replace("square meters", "square metres"), "5", ok),  # near duplicate: 1 word differs
        trace(math500, "5", ok),  # a MATH-500 test problem
        trace("Answer this: " + gsm8k, "5", ok),  # a GSM8K test problem, reworded at the start
        trace("What is 10 divided by 2?", "5", ok, sample=0),
        trace("What is 10 divided by 2?", "5", ok, sample=1),  # same problem id: a sample, not a duplicate
    ]
    benches = [
        {"spec": "math500", "path": str(shared_data / "math500" / "test.jsonl")},
        {"spec": "gsm8k", "path": str(shared_data / "gsm8k" / "test.jsonl")},
    ]
    manifest, out = run_filter(tmp_path, rows, decontaminate=benches)
    funnel = assert_adds_up(manifest, out)
    assert funnel["dropped"]["contaminated_math500"] == 1
    assert funnel["dropped"]["contaminated_gsm8k"] == 1
    assert funnel["dropped"]["duplicate_problem"] == 1
    assert funnel["dropped"]["near_duplicate_problem"] == 1
    assert funnel["out"] == 4
    steps = {r["problem"]: r["step"] for r in rows_of(out / "rejected.jsonl")}
    assert steps["what is the SUM of 2 and 3 ?"] == "exact_dedup"
    assert steps[math500] == "decontaminate"


def test_filter_stage_quality_steps_and_unverified(tmp_path: Path) -> None:
    long_reasoning = " ".join(f"step {i} adds {i} to the running total" for i in range(60))
    rows = [
        trace("q1", "5", think(long_reasoning, "\\boxed{5}"), tokens=900),
        trace("q2", "5", "<think>\nI think the answer is", finish_reason="length"),
        trace("q3", "5", think("", "\\boxed{5}")),
        trace("q4", "5", think(long_reasoning, "The answer is five.")),
        trace("q5", "5", think("这是一个问题 " * 30 + long_reasoning[:100], "\\boxed{5}")),
        trace("q6", "5", think("again and again " * 200, "\\boxed{5}")),
        trace("q7", "5", think("```python\nprint(5)\n```", "\\boxed{5}")),
        trace("q8", "5", think(long_reasoning, "\\boxed{6}")),
        trace("q9", None, think("chat", "Hello there"), kind="none"),
        trace("q10", "5", think(long_reasoning, "\\boxed{5}"), finish_reason="length"),
    ]
    manifest, out = run_filter(tmp_path, rows)
    funnel = assert_adds_up(manifest, out)
    reasons = {r["problem"]: r["verdict"]["reason"] for r in rows_of(out / "rejected.jsonl")}
    assert reasons == {
        "q2": "truncated",
        "q3": "empty_reasoning",
        "q4": "no_answer",
        "q5": "language_mixing",
        "q6": "repetition",
        "q7": "code_in_reasoning",
        "q8": "wrong_answer",
        "q10": "truncated",
    }
    verdicts = {r["problem"]: r["verdict"] for r in rows_of(out / "kept.jsonl")}
    assert verdicts == {"q1": {"correct": True, "reason": "ok"}, "q9": {"correct": None, "reason": "unverified"}}
    assert all(funnel["dropped"][r] == 0 for r in ("verify_error", "verify_timeout", "not_selected"))


def test_filter_stage_selection_and_pass_rate(tmp_path: Path) -> None:
    right, wrong = think("r", "\\boxed{5}"), think("r", "\\boxed{4}")
    rows = [
        trace("p", "5", c, sample=i, tokens=t)
        for i, (c, t) in enumerate([(wrong, 10), (right, 30), (right, 20), (right, 40)])
    ]
    rows += [trace("q", "5", right, sample=i, tokens=10) for i in range(4)]  # pass rate 1.0
    cases = {
        "all": ({}, {("p", 1), ("p", 2), ("p", 3), ("q", 0), ("q", 1), ("q", 2), ("q", 3)}),
        "first": ({"selection": "first_correct"}, {("p", 1), ("q", 0)}),
        "shortest": ({"selection": "shortest_correct"}, {("p", 2), ("q", 0)}),
        "cap": ({"max_per_problem": 2}, {("p", 1), ("p", 2), ("q", 0), ("q", 1)}),
        "short2": ({"selection": "shortest_correct", "max_per_problem": 2}, {("p", 2), ("p", 1), ("q", 0), ("q", 1)}),
        "band": ({"pass_rate": [0.25, 0.8]}, {("p", 1), ("p", 2), ("p", 3)}),
        # one shortest + one longest; on q's equal lengths the longest pick is the reverse tie order
        "mix": ({"selection": "length_mix", "max_per_problem": 2}, {("p", 2), ("p", 3), ("q", 0), ("q", 3)}),
        "mix3": (
            {"selection": "length_mix", "max_per_problem": 3, "longest_share": 0.34},
            {("p", 1), ("p", 2), ("p", 3), ("q", 0), ("q", 1), ("q", 3)},
        ),
        "long": (
            {"selection": "length_mix", "max_per_problem": 1, "longest_share": 1.0},
            {("p", 3), ("q", 3)},
        ),
    }
    for label, (section, expected) in cases.items():
        manifest, out = run_filter(tmp_path / label, rows, **section)
        assert_adds_up(manifest, out)
        assert {(r["problem"], r["sample"]) for r in rows_of(out / "kept.jsonl")} == expected, label
    # the band drops q: half the problems covered, all 140 teacher tokens paid for 3 kept traces
    band = json.loads((tmp_path / "band" / "runs" / "t" / "filter" / "funnel.json").read_text())["yield"]
    assert band == {
        "problems": 2,
        "problems_kept": 1,
        "coverage": 0.5,
        "teacher_tokens": 140,
        "teacher_tokens_per_kept": 46.7,
    }
    assert (
        "Coverage 1 of 2 problems (50.0%)" in (tmp_path / "band" / "runs" / "t" / "filter" / "funnel.md").read_text()
    )


def test_filter_stage_rejects_malformed_trace(tmp_path: Path) -> None:
    row = trace("q", "5", think("r", "\\boxed{5}"))
    del row["finish_reason"]
    with pytest.raises(DataError, match=r"traces.jsonl record 2: Trace row lacks finish_reason"):
        run_filter(tmp_path, [trace("p", "5", think("r", "\\boxed{5}")), row])
    assert read_manifest(tmp_path / "runs" / "t" / "filter") is None


def test_filter_cli_commands(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`distill filter RECIPE` and `distill verify` as a user runs them."""
    monkeypatch.chdir(tmp_path)
    place_generate(tmp_path / "runs", "cli", [trace("p", "5", think("r", "\\boxed{5}"))])
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "cli",
                "data": {"spec": "local_jsonl", "path": "x"},
                "teacher": {"model": "m"},
                "filter": {"workers": 1},
            }
        )
    )
    assert cli.main(["filter", "r.yaml", "--no-progress"]) == 0
    assert read_manifest(tmp_path / "runs" / "cli" / "filter").counts["out"] == 1
    source = shared_data / "reasoning_traces" / "skyt1_32b_reflection_amc23.jsonl"
    args = [
        "verify",
        str(source),
        "--answer-field",
        "reference_answer_normalized",
        "--response-field",
        "response",
        "--output",
        "v.jsonl",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    out = rows_of(tmp_path / "v.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in files.read_jsonl(source)]
    assert sum(r["verdict"]["correct"] == r["harness_score"] for r in out) == 40
    assert {r["verdict"]["reason"] for r in out} == {"ok", "truncated", "wrong_answer"}
    args[args.index("response")] = "nope"
    assert cli.main(args) == 2
    assert "record 1: no field 'nope'" in capsys.readouterr().err


def test_filter_verify_command_code_and_choice(tmp_path: Path) -> None:
    tests = json.dumps([{"input": "2 3\n", "output": "5\n"}])
    good = think("add them", "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    code_rows = [
        {"tests": tests, "out": good},
        {"tests": tests, "out": think("r", "```python\nprint(6)\n```")},
        {"tests": tests, "out": think("r", "no code")},
    ]
    files.write_jsonl(tmp_path / "code.jsonl", code_rows)
    choice_rows = [{"gold": "B", "out": think("r", "The answer is (B)")}, {"gold": "B", "out": "<think>\nhmm"}]
    files.write_jsonl(tmp_path / "choice.jsonl", choice_rows)
    for name, answer_field, kind in (("code", "tests", "code"), ("choice", "gold", "choice")):
        args = [
            "verify",
            str(tmp_path / f"{name}.jsonl"),
            "--answer-field",
            answer_field,
            "--response-field",
            "out",
            "--kind",
            kind,
            "--output",
            str(tmp_path / f"{name}.out.jsonl"),
            "--workers",
            "1",
            "--no-progress",
        ]
        assert cli.main(args) == 0
    reasons = [r["verdict"]["reason"] for r in rows_of(tmp_path / "code.out.jsonl")]
    assert reasons == ["ok", "wrong_answer", "no_answer"]
    verdicts = [r["verdict"] for r in rows_of(tmp_path / "choice.out.jsonl")]
    assert verdicts == [{"correct": True, "reason": "ok"}, {"correct": False, "reason": "truncated"}]
