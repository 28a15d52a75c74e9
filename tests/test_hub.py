"""Stage `push`: exact staged repo folders, lineage cards, and exactly what would be sent to the Hub.

The Hub is unreachable here, so the one fake is a recorder standing in for `HfApi` (the HTTP boundary); it
records every call with the files and their hashes as they would have been uploaded.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM

import datasets
from conftest import finish_stage
from distill import files, hub, pipeline
from distill.recipe import load_recipe

TOKEN = "hf_SeCrEtT0kenThatMustNeverBeWritten"


class RecordingHfApi:
    """Records the Hub calls `distill.hub.push` makes, with the uploaded folder's file list and hashes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        sent = {
            p.relative_to(folder).as_posix(): files.sha256_file(p)
            for p in sorted(__import__("pathlib").Path(folder).rglob("*"))
            if p.is_file()
        }
        self.calls.append(("upload_folder", {**kwargs, "files": sent}))
        return f"commit-{len(self.calls)}"


def _finish(run_dir, stage, counts):
    finish_stage(run_dir / stage, counts)


@pytest.fixture
def finished_run(tmp_path, tiny_model, monkeypatch):
    """A run whose filter, train and eval stages are finished: kept traces, the tiny model, eval results."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_dir = tmp_path / "runs" / "pushme"
    kept = [
        {
            "id": f"p{i}",
            "problem": f"What is {i} + {i}?",
            "answer": str(2 * i),
            "source": "local_jsonl",
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"<think>\n{i}+{i}\n</think>\n\n\\boxed{{{2 * i}}}"},
            ],
        }
        for i in range(6)
    ]
    files.write_jsonl(run_dir / "filter" / "kept.jsonl", kept)
    files.write_text(run_dir / "filter" / "funnel.md", "| step | in | out |\n|---|---|---|\n| verify | 9 | 6 |\n")
    _finish(run_dir, "filter", {"in": 9, "out": 6, "dropped": {"wrong_answer": 3}})
    shutil.copytree(tiny_model, run_dir / "train")
    files.write_json(run_dir / "train" / "metrics.json", {"train_loss": 1.0})
    _finish(run_dir, "train", {"in": 6, "out": 1, "dropped": {}})
    results = {
        "model": "runs/pushme/train",
        "k": 4,
        "interval_method": "95% normal interval over problems",
        "benchmarks": {
            "math500": {
                "pass@1": 0.25,
                "maj@4": 0.3,
                "problems": 10,
                "samples": 4,
                "interval": {"mean": 0.25, "low": 0.1, "high": 0.4, "problems": 10},
            }
        },
        "paired": {
            "student - base": {"overall": {"mean": 0.2, "low": 0.05, "high": 0.35, "problems": 10}, "benchmarks": {}}
        },
    }
    files.write_json(run_dir / "eval" / "results.json", results)
    _finish(run_dir, "eval", {"in": 10, "out": 40, "dropped": {}})
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "name": "pushme",
                "data": {"spec": "local_jsonl", "path": "x.jsonl"},
                "teacher": {"model": "deepseek-ai/DeepSeek-R1"},
                "student": {"model": "Qwen/Qwen2.5-Math-1.5B"},
                "eval": {"benchmarks": ["math500"]},
                "hub": {"dataset_repo": "me/pushme-traces", "model_repo": "me/pushme-1.5b"},
            }
        )
    )
    return load_recipe(recipe_path), tmp_path / "runs"


def _push(recipe, runs, *, dry_run, monkeypatch):
    api = RecordingHfApi()
    monkeypatch.setattr(hub, "make_api", lambda: api)
    options = pipeline.StageOptions(dry_run=dry_run, progress=False)
    manifest = pipeline.run_stage(recipe, "push", runs_dir=runs, options=options)
    return manifest, api


def test_hub_dry_run_stages_loadable_repos_and_sends_nothing(finished_run, monkeypatch):
    recipe, runs = finished_run
    manifest, api = _push(recipe, runs, dry_run=True, monkeypatch=monkeypatch)
    assert api.calls == [] and manifest.extra["dry_run"] is True
    model_dir = runs / "pushme" / "push" / "model"
    assert AutoModelForCausalLM.from_pretrained(model_dir).num_parameters() > 0
    assert not (model_dir / "metrics.json").exists() and (model_dir / "generation_config.json").is_file()
    card = (model_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-Math-1.5B" and meta["datasets"] == ["me/pushme-traces"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == "HuggingFaceH4/MATH-500"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"pass@1": 25.0, "maj@4": 30.0}
    assert "| math500 | 10 | 30.0 | 25.0 | 10.0–40.0 |" in card and "## Lineage" in card, "intervals in the table"
    assert "Paired difference `student - base` over 10 problems: +20.0 (+5.0 to +35.0) points (excludes zero)" in card
    data = datasets.load_dataset("parquet", data_files=str(runs / "pushme/push/dataset/data/*.parquet"), split="train")
    assert data["messages"] == [row["messages"] for row in files.read_jsonl(runs / "pushme/filter/kept.jsonl")]
    dataset_card = (runs / "pushme/push/dataset/README.md").read_text()
    assert "| verify | 9 | 6 |" in dataset_card and "deepseek-ai/DeepSeek-R1" in dataset_card
    assert "| local_jsonl | local file | your own |" in dataset_card


def test_hub_push_sends_exactly_the_staged_folders_private_on_a_run_branch(finished_run, monkeypatch, caplog):
    recipe, runs = finished_run
    caplog.set_level(logging.DEBUG)
    manifest, api = _push(recipe, runs, dry_run=False, monkeypatch=monkeypatch)
    revision = manifest.extra["revision"]
    assert revision.startswith("run-pushme-")
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"] * 2
    create_dataset, branch_dataset, upload_dataset = (kwargs for _, kwargs in api.calls[:3])
    assert create_dataset == {"repo_id": "me/pushme-traces", "repo_type": "dataset", "private": True, "exist_ok": True}
    assert branch_dataset == {
        "repo_id": "me/pushme-traces",
        "branch": revision,
        "repo_type": "dataset",
        "exist_ok": True,
    }
    assert upload_dataset["revision"] == revision and set(upload_dataset["files"]) == {
        "README.md",
        "data/train-00000-of-00001.parquet",
    }
    upload_model = api.calls[5][1]
    staged = runs / "pushme" / "push" / "model"
    assert upload_model["files"] == {p.name: files.sha256_file(p) for p in staged.iterdir()}
    assert "model.safetensors" in upload_model["files"] and "token" not in upload_model
    # The token is read by huggingface_hub from the environment; it appears nowhere distill writes or logs.
    for path in runs.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in caplog.text and TOKEN not in repr(api.calls)


def test_hub_dry_run_then_real_push_reruns_the_stage(finished_run, monkeypatch):
    recipe, runs = finished_run
    _push(recipe, runs, dry_run=True, monkeypatch=monkeypatch)
    _, api = _push(recipe, runs, dry_run=False, monkeypatch=monkeypatch)
    assert len(api.calls) == 6, "a dry run must not count as a finished real push"
    _, again = _push(recipe, runs, dry_run=False, monkeypatch=monkeypatch)
    assert again.calls == [], "a finished push with the same inputs is cached"
