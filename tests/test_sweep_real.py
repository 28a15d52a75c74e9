"""A 2x2 `distill sweep` through the real stages on tiny models, two variants at a time: generate (vLLM) and filter
run once for all four variants, train once per learning rate, eval once per variant; the report's rows are the
variants' own `eval/results.json`.

A random tiny model cannot do arithmetic, so the teacher's forced `think_prefix` carries a finished reasoning block
and the answer every problem shares, and `allowed_token_ids` lets the model only end its turn (as in
test_mixture_pipeline.py): every trace verifies, and the student has rows to train on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from transformers import AutoTokenizer

from conftest import TINY_ENGINE
from distill import intervals
from distill.manifest import read_manifest

PAIRS = [(1, 6), (2, 5), (3, 4), (0, 7), (4, 3), (5, 2), (6, 1), (7, 0)]


@pytest.mark.slow
def test_sweep_2x2_on_tiny_models_shares_upstream_stages_in_parallel(tmp_path, tiny_model):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": "7"}) + "\n" for a, b in PAIRS))
    eos = AutoTokenizer.from_pretrained(tiny_model).convert_tokens_to_ids("<|im_end|>")
    only_end = {"max_tokens": 4, "temperature": 1.0, "allowed_token_ids": [eos]}
    recipe = {
        "name": "tiny",
        "data": {"spec": "local_jsonl", "path": str(data)},
        "teacher": {
            "model": str(tiny_model),
            "think_prefix": "<think>\nscripted\n</think>\n\n\\boxed{7}",
            "sampling": {"n": 1, **only_end},
            "engine": TINY_ENGINE,
        },
        "filter": {"workers": 1, "near_dup_threshold": None},
        "student": {
            "model": str(tiny_model),
            "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "report_to": "none", "save_strategy": "no"},
        },
        "eval": {
            "benchmarks": [{"spec": "local_jsonl", "path": str(data), "limit": 4}],
            "sampling": {"n": 2, **only_end},
            "engine": TINY_ENGINE,
            "pass_k": [1],
        },
        "hub": {"dataset_repo": "me/traces", "model_repo": "me/student"},  # a sweep drops it: nothing is pushed
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    grid = ["--grid", "student.sft.learning_rate=1e-3,1e-2", "--grid", "eval.sampling.temperature=0.5,1.0"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "sweep", "tiny.yaml", *grid, "--parallel", "2", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    runs = tmp_path / "runs" / "tiny-sweep"
    logs = "".join(p.read_text()[-2000:] for p in sorted((runs / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-3000:] + logs
    names = [f"learning_rate-{lr}_temperature-{t}" for lr in ("1e-3", "1e-2") for t in ("0.5", "1.0")]

    def ran(stage: str, variants: list[str]) -> set[tuple[str, str, str]]:
        """Distinct runs of `stage` among `variants`: a linked output carries the manifest of the run it came from."""
        manifests = [read_manifest(runs / name / stage) for name in variants]
        return {(m.recipe, m.started_at, m.output_hash) for m in manifests}

    assert len(ran("generate", names)) == 1 and len(ran("filter", names)) == 1
    assert len(ran("train", names)) == 2
    assert len(ran("train", names[:2])) == 1 and len(ran("train", names[2:])) == 1, "one training per learning rate"
    assert {m[0] for m in ran("eval", names)} == set(names), "each variant's eval is its own"
    assert not any((runs / name / "push").exists() for name in names)

    results = json.loads((runs / "results.json").read_text())
    report = (runs / "report.md").read_text()
    for name in names:
        scored = json.loads((runs / name / "eval" / "results.json").read_text())["student"]
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} ") or f"**{name}**" in line)
        assert f"| {intervals.percent(scored['overall']['interval'])} | 4 × 2 |" in row
        assert results["variants"][name]["eval"]["overall"] == scored["overall"]
        assert results["variants"][name]["kept_traces"] == 8 and results["variants"][name]["train_rows"] == 8
    assert set(results["paired"]) == {f"{name} - {names[0]}" for name in names[1:]}
    assert (runs / "pass1-local_jsonl.png").stat().st_size > 0
    assert report.count("shared with") >= 3 + 3 + 2, "generate and filter linked three times, train twice"
