"""Stage `onpolicy` with real TRL on tiny models: the reverse KL falls, the padded-vocabulary pair trains, a foreign
tokenizer is refused before any model loads, a kill -9 resumes, the stage cache follows `train`, and every check
that can fail before a step does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import finish_stage
from distill import files, vocab
from distill.errors import RecipeError
from distill.pipeline import StageOptions, run_stage
from distill.recipe import load_recipe
from distill.tinymodel import build_tiny_model
from student.trainer import Plan, build_trainer

ROOT = Path(__file__).resolve().parents[1]
# DistillationConfig as the stage resolves it on CPU, for plans made by hand
CPU = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False, "report_to": "none", "seed": 0}
FAST = {"per_device_train_batch_size": 4, "max_completion_length": 16, "learning_rate": 1e-3, "logging_steps": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A student and teachers sharing its tokenizer (one with padded embedding rows, as Qwen2.5-7B pads to 152064
    where 1.5B has 151936), and one with a tokenizer of its own."""
    root = tmp_path_factory.mktemp("onpolicy")
    student = build_tiny_model(root / "student", seed=0)
    rows = json.loads((student / "config.json").read_text())["vocab_size"]
    return {
        "student": student,
        "teacher": build_tiny_model(root / "teacher", seed=1),
        "padded": build_tiny_model(root / "padded", seed=2, vocab_rows=rows + 61),
        "foreign": build_tiny_model(root / "foreign", seed=3, corpus=["completely different words only"] * 3),
    }


def _prompts(tmp: Path, tokenizer_dir: Path, n: int = 8) -> Path:
    from transformers import AutoTokenizer

    from distill.prompts import generation_prompt

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        chat = [{"role": "user", "content": f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"}]
        rows.append({"prompt": generation_prompt(tokenizer, chat, think_prefix="<think>\n")})
    files.write_jsonl(tmp / "prompts.jsonl", rows)
    return tmp / "prompts.jsonl"


def _plan(models: dict[str, Path], tmp: Path, *, teacher: str) -> Plan:
    from transformers import AutoTokenizer

    template = tmp / "template.jinja"
    files.write_text(template, AutoTokenizer.from_pretrained(models["student"]).chat_template)
    pairing = vocab.load_pairing(str(models["student"]), str(models[teacher]), server=False, offline=True)
    return Plan(
        model=str(models["student"]),
        data=str(_prompts(tmp, models["student"])),
        template=str(template),
        args={**CPU, **FAST, "output_dir": str(tmp / "ckpt"), "max_steps": 1},
        peft=None,
        quantization=None,
        save_dir=str(tmp / "out"),
        scratch=str(tmp),
        trainer="distillation",
        teacher={"model": str(models[teacher]), "vocab_size": pairing.rows_for_teacher},
    )


def _reverse_kl(trainer, inputs) -> float:
    """KL(student || teacher) per completion token, computed here from both models' logits."""
    import torch

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logits = [
            m(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
            for m in (trainer.model, trainer.teacher_model)
        ]
    student, teacher = (torch.log_softmax(x.float(), dim=-1) for x in logits)
    per_token = (student.exp() * (student - teacher)).sum(-1)
    valid = inputs["completion_mask"].bool()
    return float(per_token[valid].mean())


@pytest.mark.parametrize("teacher", ["teacher", "padded"])
def test_one_step_lowers_the_reverse_kl_on_a_fixed_batch(
    models: dict[str, Path], tmp_path: Path, teacher: str
) -> None:
    trainer = build_trainer(_plan(models, tmp_path, teacher=teacher))
    rows = json.loads((models["student"] / "config.json").read_text())["vocab_size"]
    assert trainer.teacher_model.config.get_text_config().vocab_size == rows, "padding rows cut to the student's"
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # the student's own samples
    assert int(inputs["completion_mask"].sum()) > 0
    before = trainer.compute_loss(trainer.model, inputs)
    assert float(before) == pytest.approx(_reverse_kl(trainer, inputs), rel=1e-3), "beta 1.0 is the reverse KL"
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


def test_a_foreign_tokenizer_is_refused_naming_gold(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        vocab.load_pairing(str(models["student"]), str(models["foreign"]), server=False, offline=True)
    message = str(info.value)
    assert "does not share the student's tokenizer" in message and "GOLD" in message and "tokens differ" in message
    recipe = _recipe(tmp_path, models, teacher=models["foreign"])
    proc = _distill("recipe", "check", str(recipe))
    assert proc.returncode == 2 and "GOLD" in proc.stderr, proc.stderr[-2000:]


def test_recipe_check_refuses_a_completion_longer_than_the_contexts(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, models, config={"max_completion_length": 4096})
    proc = _distill("recipe", "check", str(recipe))
    assert proc.returncode == 2
    assert (
        "onpolicy.config.max_completion_length: 4096 does not fit the trained student's context (2048" in proc.stderr
    )


def test_generation_must_start_the_way_sft_taught(models: dict[str, Path], tmp_path: Path) -> None:
    """A template that rewrites the assistant turn (R1's drops the reasoning) would prompt the student with text it
    never saw at the start of an answer."""
    from transformers import AutoTokenizer

    from student.onpolicy import check_start

    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    check_start(tokenizer, think_prefix="<think>\n")
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']", "message['content'].split('</think>')[-1]"
    )
    assert "split('</think>')" in tokenizer.chat_template
    with pytest.raises(RecipeError, match="would not start the way SFT taught"):
        check_start(tokenizer, think_prefix="<think>\n")


def _recipe(tmp: Path, models: dict[str, Path], *, teacher: Path | None = None, config: dict | None = None) -> Path:
    """A recipe whose train stage is the tiny student (finished by hand) and whose problems are additions."""
    rng = random.Random(0)
    problems = tmp / "problems.jsonl"
    rows = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(24)]
    files.write_jsonl(
        problems, ({"id": f"p{i}", "problem": f"{a} + {b}", "answer": str(a + b)} for i, (a, b) in enumerate(rows))
    )
    onpolicy = {"config": {**FAST, "report_to": "none", "max_steps": 6, "save_steps": 2, **(config or {})}}
    if teacher is not None:
        onpolicy["teacher"] = str(teacher)
    recipe = {
        "name": "op",
        "data": {"spec": "local_jsonl", "path": str(problems)},
        "teacher": {"model": str(models["padded"])},
        "student": {"model": str(models["student"])},
        "onpolicy": onpolicy,
    }
    path = tmp / "op.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train_output(runs: Path, models: dict[str, Path], *, seed: int = 0) -> Path:
    import shutil

    train = runs / "op" / "train"
    if train.exists():
        shutil.rmtree(train)
    shutil.copytree(models["student"], train)
    (train / "marker.txt").write_text(f"seed {seed}")  # a different train output, as a re-run of train would be
    finish_stage(train, {"in": 1, "out": 1, "dropped": {}})
    return train


def _distill(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )


def test_stage_distils_resumes_after_kill_and_follows_train(models: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    recipe_path = _recipe(tmp_path, models, config={"max_steps": 40, "save_steps": 5})
    _train_output(runs, models)
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

    done = _distill("onpolicy", str(recipe_path), "--runs-dir", str(runs), "--no-progress")
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
    _train_output(runs, models, seed=1)
    from distill.pipeline import status

    assert {row["stage"]: row["state"] for row in status(recipe, runs_dir=runs)}["onpolicy"] == "stale"


@pytest.mark.slow
def test_server_teacher_scores_through_a_real_vllm_server(models: dict[str, Path], tmp_path: Path) -> None:
    """TRL's server distillation: the teacher behind `vllm.entrypoints.openai.api_server` on 127.0.0.1 returns the
    log-prob of every sampled token (prompt_logprobs), and the student trains on them."""
    from conftest import serve_vllm

    runs = tmp_path / "runs"
    _train_output(runs, models)
    with serve_vllm(models["padded"], tmp_path) as url:
        recipe = _recipe(tmp_path, models, config={"max_steps": 3})
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

    path = _recipe(tmp_path, models)
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
    _train_output(runs, models)
    path = _recipe(tmp_path, models, config={"max_steps": 3, "save_strategy": "no", "use_cpu": True})
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


def test_a_teacher_may_know_more_tokens_but_not_rename_the_students(models: dict[str, Path], tmp_path: Path) -> None:
    """QwQ-32B adds `<think>` past Qwen2.5's tokens (allowed); R1-Distill-Qwen renames the special tokens, so the
    student's end-of-turn id is the teacher's `<｜Assistant｜>` (refused, by id and by both names)."""
    import shutil

    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(models["student"])
    more = AutoTokenizer.from_pretrained(models["student"])
    more.add_tokens(["<tool_response>", "</tool_response>"], special_tokens=True)
    assert len(more) == len(student) + 2
    vocab.check_pair(student, more, student_rows=len(student), teacher_rows=len(more), teacher="qwq")

    renamed = tmp_path / "renamed"
    shutil.copytree(models["student"], renamed)
    tokenizer_json = renamed / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace("<|im_end|>", "<｜Assistant｜>"))
    config = json.loads((renamed / "tokenizer_config.json").read_text())
    config["eos_token"] = "<｜Assistant｜>"
    (renamed / "tokenizer_config.json").write_text(json.dumps(config))
    end_of_turn = student.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(RecipeError) as info:
        vocab.load_pairing(str(models["student"]), str(renamed), server=False, offline=True)
    assert f"ids {end_of_turn}: '<|im_end|>' for the student, '<｜Assistant｜>' for the teacher" in str(info.value)


def test_recipe_plan_says_where_the_teacher_weights_go(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from distill.scale import plan

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models["padded"]).parameters())
    path = _recipe(tmp_path, models)
    for accelerate, share in ((None, 1), ("zero3", 2)):
        overrides = [f"onpolicy.accelerate={accelerate}"] if accelerate else []
        figures = plan(load_recipe(path, overrides=overrides), runs_dir=tmp_path / "runs", gpus=2)["onpolicy"]
        assert figures["teacher_weights_per_gpu"]["value"] == round(params * 2 / share / 2**30, 2)
        assert figures["answers_per_step"] == 8 and figures["scored_tokens_at_most"] == 8 * 6 * 16
    served = plan(
        load_recipe(path, overrides=["onpolicy.teacher_server=http://127.0.0.1:9"]), runs_dir=tmp_path, gpus=2
    )["onpolicy"]
    assert served["teacher_weights_per_gpu"] == {"value": 0, "how": "behind the server http://127.0.0.1:9"}


def test_lora_writes_the_merged_student_and_keeps_the_adapter(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    train = _train_output(runs, models)
    path = _recipe(tmp_path, models, config={"max_steps": 2, "save_strategy": "no", "learning_rate": 1e-2})
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
