"""Stage `onpolicy` with real TRL on tiny models: the reverse KL falls, the padded-vocabulary pair trains, a kill -9
resumes, the stage cache follows `train`, a real vLLM server teaches, DDP and ZeRO-3 launches, LoRA merges, and
eval and push take the on-policy student."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill import vocab
from distill.pipeline import StageOptions, run_stage
from distill.recipe import load_recipe
from onpolicy_data import (
    CPU,
    FAST,
    ROOT,
    build_models,
    distill_cli,
    distillation_plan,
    finished_train,
    onpolicy_recipe,
    reverse_kl,
)
from student.trainer import build_trainer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("onpolicy"))


@pytest.mark.parametrize("teacher", ["teacher", "padded"])
def test_one_step_lowers_the_reverse_kl_on_a_fixed_batch(
    models: dict[str, Path], tmp_path: Path, teacher: str
) -> None:
    trainer = build_trainer(distillation_plan(models, tmp_path, teacher=teacher))
    rows = json.loads((models["student"] / "config.json").read_text())["vocab_size"]
    assert trainer.teacher_model.config.get_text_config().vocab_size == rows, "padding rows cut to the student's"
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # the student's own samples
    assert int(inputs["completion_mask"].sum()) > 0
    before = trainer.compute_loss(trainer.model, inputs)
    assert float(before) == pytest.approx(reverse_kl(trainer, inputs), rel=1e-3), "beta 1.0 is the reverse KL"
    trainer.create_optimizer()
    before.backward()
    trainer.optimizer.step()
    after = float(trainer.compute_loss(trainer.model, inputs))
    assert after < float(before), f"reverse KL {float(before):.5f} -> {after:.5f}: one step did not lower it"


def test_trl_alone_refuses_the_padded_pair_distill_cuts_the_rows(models: dict[str, Path], tmp_path: Path) -> None:
    """The trap the stage exists for: TRL compares embedding rows, not tokenizers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="vocab_size"):
        DistillationTrainer(
            model=str(models["student"]),
            teacher_model=AutoModelForCausalLM.from_pretrained(models["padded"]),
            args=DistillationConfig(**CPU, **FAST, output_dir=str(tmp_path / "raw")),
            train_dataset=Dataset.from_list([{"prompt": "1 + 1"}]),
            processing_class=tokenizer,
        )
    pairing = vocab.load_pairing(str(models["student"]), str(models["padded"]), server=False, offline=True)
    assert pairing.teacher_rows == pairing.student_rows + 61 and pairing.rows_for_teacher == pairing.student_rows


def test_stage_distils_resumes_after_kill_and_follows_train(models: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    recipe_path = onpolicy_recipe(tmp_path, models, config={"max_steps": 40, "save_steps": 5})
    finished_train(runs, models)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "distill.cli",
        "onpolicy",
        str(recipe_path),
        "--runs-dir",
        str(runs),
        "--no-progress",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((runs / "op" / ".work").glob("onpolicy-*/checkpoints/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "the stage ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (runs / "op" / "onpolicy").exists(), "a killed stage leaves no output"

    done = distill_cli("onpolicy", str(recipe_path), "--runs-dir", str(runs), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    out = runs / "op" / "onpolicy"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] and metrics["resumed_from"].startswith("checkpoint-")
    assert metrics["global_step"] == 40
    assert metrics["vocab"] == {
        "tokens": metrics["vocab"]["student_rows"],
        "student_rows": metrics["vocab"]["tokens"],
        "teacher_rows": metrics["vocab"]["student_rows"] + 61,
    }
    assert metrics["teacher_tokens"]["scored"] > metrics["teacher_tokens"]["sampled_by_student"] > 0
    steps = [e["step"] for e in metrics["log_history"] if "loss" in e]
    assert steps == list(range(1, 41)), "per-step reverse KL across the kill: the checkpoint's history, then the rest"
    assert metrics["tokens_per_s"] is None, "a resumed run's runtime covers only its own part"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "generation_config.json").read_text() == (
        runs / "op" / "train" / "generation_config.json"
    ).read_text()

    recipe = load_recipe(recipe_path)
    cached = run_stage(recipe, "onpolicy", runs_dir=runs, options=StageOptions(progress=False))
    assert cached.finished_at == json.loads((out / "manifest.json").read_text())["finished_at"], "cached"
    finished_train(runs, models, seed=1)
    from distill.pipeline import status

    assert {row["stage"]: row["state"] for row in status(recipe, runs_dir=runs)}["onpolicy"] == "stale"


@pytest.mark.slow
def test_server_teacher_scores_through_a_real_vllm_server(models: dict[str, Path], tmp_path: Path) -> None:
    """TRL's server distillation: the teacher behind `vllm.entrypoints.openai.api_server` on 127.0.0.1 returns the
    log-prob of every sampled token (prompt_logprobs), and the student trains on them."""
    from conftest import serve_vllm

    runs = tmp_path / "runs"
    finished_train(runs, models)
    with serve_vllm(models["padded"], tmp_path) as url:
        recipe = onpolicy_recipe(tmp_path, models, config={"max_steps": 3})
        data = yaml.safe_load(recipe.read_text())
        data["onpolicy"]["teacher_server"] = url
        recipe.write_text(yaml.safe_dump(data))
        manifest = run_stage(load_recipe(recipe), "onpolicy", runs_dir=runs, options=StageOptions(progress=False))
    metrics = json.loads((runs / "op" / "onpolicy" / "metrics.json").read_text())
    assert metrics["teacher_server"] == url and metrics["global_step"] == 3
    assert metrics["vocab"]["teacher_rows"] is None, "the served teacher's rows are never compared"
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(loss == loss and loss != 0 for loss in losses), losses  # finite, real scores
    assert manifest.extra["teacher"] == str(models["padded"])


def test_eval_and_push_take_the_onpolicy_student_and_the_card_names_the_stage(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from distill import pipeline
    from distill.hub_cards import lineage, model_card

    path = onpolicy_recipe(tmp_path, models)
    data = yaml.safe_load(path.read_text())
    data |= {"eval": {"benchmarks": [{"spec": "local_jsonl", "path": "x.jsonl"}]}, "hub": {"model_repo": "me/s"}}
    path.write_text(yaml.safe_dump(data))
    recipe, options = load_recipe(path), StageOptions()
    assert pipeline.STAGES["eval"].upstream_read(recipe, options) == ("onpolicy",)
    assert pipeline.STAGES["push"].upstream_read(recipe, options) == ("filter", "onpolicy", "eval")
    with_sft = load_recipe(path, overrides=["eval.compare_sft=true"])
    assert pipeline.STAGES["eval"].upstream_read(with_sft, options) == ("onpolicy", "train"), "both students scored"
    assert [row["stage"] for row in pipeline.status(recipe, runs_dir=tmp_path / "runs")][2:5] == [
        "train",
        "onpolicy",
        "eval",
    ]
    card = model_card(recipe, models["student"], None, facts=lineage(recipe, tmp_path / "runs" / "op"))
    assert "then distilled on-policy" in card and "### On-policy distillation" in card
    assert f"`{models['padded']}` (beside the student)" in card and "max_completion_length: 16" in card

    del data["onpolicy"]
    path.write_text(yaml.safe_dump(data))
    plain = load_recipe(path)
    assert pipeline.STAGES["eval"].upstream_read(plain, options) == ("train",)
    assert "On-policy" not in model_card(plain, models["student"], None, facts=lineage(plain, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "zero3"])
def test_launched_on_two_processes_each_rank_samples_its_own_prompts(
    models: dict[str, Path], tmp_path: Path, two_processes: None, launcher: str
) -> None:
    """`onpolicy.accelerate` as `student.accelerate`: 2 CPU processes over gloo, one world, disjoint prompts; under
    ZeRO-3 each rank holds half of the student's weights (the teacher is prepared by TRL for the same engine)."""
    runs = tmp_path / "runs"
    finished_train(runs, models)
    path = onpolicy_recipe(tmp_path, models, config={"max_steps": 3, "save_strategy": "no", "use_cpu": True})
    data = yaml.safe_load(path.read_text())
    data["onpolicy"]["accelerate"] = launcher
    path.write_text(yaml.safe_dump(data))
    run_stage(load_recipe(path), "onpolicy", runs_dir=runs, options=StageOptions(progress=False))
    metrics = json.loads((runs / "op" / "onpolicy" / "metrics.json").read_text())
    ranks = metrics["processes"]["ranks"]
    assert metrics["world_size"] == 2 and [r["world_size"] for r in ranks] == [2, 2]
    assert metrics["processes"]["rows_on_several_ranks"] == 0 and metrics["global_step"] == 3
    held = [r["weights_held"] for r in ranks]
    assert held == ([1.0, 1.0] if launcher == "ddp" else [pytest.approx(0.5, abs=0.02)] * 2), held
    assert (runs / "op" / "onpolicy" / "model.safetensors").is_file()


def test_lora_writes_the_merged_student_and_keeps_the_adapter(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    train = finished_train(runs, models)
    path = onpolicy_recipe(tmp_path, models, config={"max_steps": 2, "save_strategy": "no", "learning_rate": 1e-2})
    data = yaml.safe_load(path.read_text())
    data["onpolicy"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    path.write_text(yaml.safe_dump(data))
    run_stage(load_recipe(path), "onpolicy", runs_dir=runs, options=StageOptions(progress=False))
    out = runs / "op" / "onpolicy"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "config.json").is_file()
    merged, start = load_file(out / "model.safetensors"), load_file(train / "model.safetensors")
    assert merged.keys() == start.keys(), "a whole model, named like the SFT student's"
    changed = [name for name in start if not (merged[name] == start[name]).all()]
    assert changed and all("proj" in name for name in changed), "LoRA moved the linear layers only"
