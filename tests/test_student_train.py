"""Student stage on the tiny model with the real TRL/PEFT/vLLM: full SFT and LoRA train, save, reload and serve;
the trained student stops at the template's end-of-turn token."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_ENGINE
from distill.cli import main as cli_main
from student.train import run
from student_data import addition_row, addition_rows, context, make_run

SFT = {"per_device_train_batch_size": 8, "logging_steps": 5, "report_to": "none", "seed": 0, "max_length": 256}


def overlong_row() -> dict:
    row = addition_row(12, 34)
    row["id"] = "too-long"
    row["messages"][-1]["content"] = "<think>\n" + "1 + 1 = 2. " * 200 + "\n</think>\n\n\\boxed{46}"
    return row


@pytest.fixture(scope="module")
def full_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("full")
    student = {"model": str(tiny_model), "sft": {**SFT, "max_steps": 150, "learning_rate": 5e-3}}
    recipe, runs = make_run(tmp, [*addition_rows(96), overlong_row()], student)
    report = run(recipe, ctx=context(runs, recipe, tmp / "work"))
    return tmp / "work", report.counts


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    peft = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    student = {
        "model": str(tiny_model),
        "sft": {**SFT, "max_steps": 40, "learning_rate": 1e-2},
        "peft": peft,
        "merge": True,
    }
    recipe, runs = make_run(tmp, addition_rows(64), student)
    run(recipe, ctx=context(runs, recipe, tmp / "work"))
    return tmp / "work"


@pytest.mark.slow
def test_student_full_sft_learns_and_writes_the_model_folder(full_run: tuple[Path, dict], tiny_model: Path) -> None:
    out, counts = full_run
    assert counts == {"in": 97, "out": 96, "dropped": {"overlong": 1}}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "full" and metrics["global_step"] == 150
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == metrics["eos_token_id"]
    assert metrics["eos_token"] == "<|im_end|>"
    assert not (out / ".prep").exists()
    trained, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.slow
def test_student_full_sft_reloads_with_transformers(full_run: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = full_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        addition_row(21, 43)["messages"][:-1], add_generation_prompt=True, return_dict=False
    )
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=80, do_sample=False)[0, len(prompt) :]
    assert generated[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped at end-of-turn
    assert "</think>" in tokenizer.decode(generated)


@pytest.mark.slow
def test_student_lora_merges_and_distill_merge_matches(lora_run: Path, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["mode"] == "lora" and metrics["merged"]
    assert metrics["loss_last"] < metrics["loss_first"]
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert cli_main(["merge", str(lora_run / "adapter"), str(tmp_path / "merged"), "--base", str(tiny_model)]) == 0
    ours, cli = load_file(lora_run / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert ours.keys() == cli.keys() and all(torch.allclose(ours[k], cli[k]) for k in ours)
    base = load_file(tiny_model / "model.safetensors")
    assert any(not torch.allclose(ours[k], base[k]) for k in base)
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    gen = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == metrics["eos_token_id"]


@pytest.mark.slow
def test_student_vllm_serves_trained_models_and_stops_at_end_of_turn(
    full_run: tuple[Path, dict], lora_run: Path
) -> None:
    """The stop-token invariant (open-r1 #603): greedy output ends because of end-of-turn, not max_tokens."""
    from vllm import LLM, SamplingParams

    prompts = [addition_row(a, b)["messages"][:-1] for a, b in ((21, 43), (305, 61), (77, 18))]
    params = SamplingParams(temperature=0.0, max_tokens=200)
    for model, must_stop in ((full_run[0], True), (lora_run, False)):
        llm = LLM(model=str(model), **TINY_ENGINE)
        outputs = llm.chat(prompts, params, use_tqdm=False)
        assert all(o.outputs[0].token_ids for o in outputs)
        if must_stop:
            assert [o.outputs[0].finish_reason for o in outputs] == ["stop"] * len(prompts)
            assert all("</think>" in o.outputs[0].text and "\\boxed{" in o.outputs[0].text for o in outputs)
        del llm
        gc.collect()
