"""`hub.push_checkpoints`: each saved checkpoint goes to its own branch while training runs (recorded Hub calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distill import hub
from distill.errors import RecipeError
from distill.recipe import load_recipe
from student.checkpoints import checkpoint_target
from student.train import run
from student_data import addition_rows, context, make_run
from test_hub import RecordingHfApi


@pytest.mark.slow
def test_student_pushes_each_checkpoint_to_its_own_branch(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    api = RecordingHfApi()
    monkeypatch.setattr(hub, "make_api", lambda: api)
    student = {
        "model": str(tiny_model),
        "sft": {
            "max_steps": 4,
            "save_steps": 2,
            "per_device_train_batch_size": 4,
            "report_to": "none",
            "logging_steps": 1,
        },
    }
    recipe, runs = make_run(tmp_path, addition_rows(16), student, name="ckpt")
    data = recipe.model_dump(mode="json")
    data["hub"] = {"model_repo": "me/ckpt-student", "push_checkpoints": True}
    (tmp_path / "ckpt.yaml").write_text(yaml.safe_dump(data))
    recipe = load_recipe(tmp_path / "ckpt.yaml")
    run(recipe, ctx=context(runs, recipe, tmp_path / "work"))
    branch = hub.default_revision(recipe)
    uploads = [kwargs for name, kwargs in api.calls if name == "upload_folder"]
    assert [u["revision"] for u in uploads] == [f"{branch}-step-2", f"{branch}-step-4"]
    assert [kwargs["branch"] for name, kwargs in api.calls if name == "create_branch"] == [
        f"{branch}-step-2",
        f"{branch}-step-4",
    ]
    for upload in uploads:
        assert upload["repo_id"] == "me/ckpt-student" and upload["folder_path"].endswith(
            f"checkpoint-{upload['revision'].rsplit('-', 1)[1]}"
        )
        assert sorted(upload["files"]) == [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ], "model files only: no optimizer, scheduler, RNG or trainer state"
    assert all(kwargs["private"] for name, kwargs in api.calls if name == "create_repo")
    pushed = json.loads((tmp_path / "work" / "metrics.json").read_text())["pushed_checkpoints"]
    assert [p["revision"] for p in pushed["sent"]] == [f"{branch}-step-2", f"{branch}-step-4"] and not pushed["failed"]
    assert not list((tmp_path / "work" / "checkpoints" / ".push").iterdir()), "sent snapshots are removed"


def test_student_push_checkpoints_needs_a_model_repo(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ndata: {spec: gsm8k}\nstudent: {model: m}\nhub: {push_checkpoints: true}\n")
    with pytest.raises(RecipeError, match=r"hub\.push_checkpoints: needs hub\.model_repo"):
        checkpoint_target(load_recipe(path))
