"""What TRL actually trains on: the collated batch masks the prompt (labels -100) and keeps the reply and its
end-of-turn token; two LoRA steps change the adapter and leave the base weights alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill import files
from distill.tinymodel import build_tiny_model
from student import template
from student.trainer import Plan, build_trainer
from student_data import addition_row, addition_rows

CPU = {
    "assistant_only_loss": True,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "seed": 0,
}


def plan_for(model: Path, tmp: Path, *, rows: list[dict], sft: dict, peft: dict | None = None) -> Plan:
    from transformers import AutoConfig, AutoTokenizer

    chat = template.resolve(
        AutoTokenizer.from_pretrained(model),
        model_type=AutoConfig.from_pretrained(model).model_type,
        path=None,
        assistant_only=True,
    )
    files.write_jsonl(tmp / "train.jsonl", ({"messages": r["messages"]} for r in rows))
    files.write_text(tmp / "template.jinja", chat.text)
    return Plan(
        model=str(model),
        data=str(tmp / "train.jsonl"),
        template=str(tmp / "template.jinja"),
        sft={**CPU, "output_dir": str(tmp / "ckpt"), "eos_token": chat.end_of_turn, **sft},
        peft=peft,
        quantization=None,
        save_dir=str(tmp / "out"),
        scratch=str(tmp),
    )


@pytest.fixture(scope="module")
def templateless_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2 tiny model whose tokenizer has no chat template: the stage must fall back to the shipped one."""
    out = build_tiny_model(tmp_path_factory.mktemp("bare") / "qwen2")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["model_template", "shipped_qwen2.5_template"])
def test_student_collated_batch_masks_prompt_and_trains_end_of_turn(
    which: str, tiny_model: Path, templateless_model: Path, tmp_path: Path
) -> None:
    model = tiny_model if which == "model_template" else templateless_model
    rows = [addition_row(12, 345), addition_row(7, 8, system="Be brief.")]
    trainer = build_trainer(
        plan_for(model, tmp_path, rows=rows, sft={"per_device_train_batch_size": 2, "shuffle_dataset": False})
    )
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = trainer.processing_class
    if which != "model_template":
        assert "You are Qwen" in tokenizer.decode(batch["input_ids"][0])  # Qwen2.5's layout was used
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ids, labels, mask, row in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], rows, strict=True):
        trained = ids[labels != -100]
        assert torch.equal(labels[labels != -100], trained)
        assert tokenizer.decode(trained) == row["messages"][-1]["content"] + "<|im_end|>"
        assert trained[-1].item() == eot  # the stop token is learned
        prompt_len = int((labels != -100).nonzero()[0])
        assert prompt_len > 10 and (labels[:prompt_len] == -100).all()  # system/user turns and headers: masked
        assert (labels[mask == 0] == -100).all()  # padding too


@pytest.mark.slow
def test_student_lora_two_steps_change_adapter_not_base(tiny_model: Path, tmp_path: Path) -> None:
    peft = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    plan = plan_for(
        tiny_model,
        tmp_path,
        rows=addition_rows(16),
        peft=peft,
        sft={"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "no"},
    )
    trainer = build_trainer(plan)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    adapter = [k for k in before if "lora_" in k]
    assert adapter and all(after[k].requires_grad for k in adapter)
    assert any(not torch.equal(before[k], after[k]) for k in adapter if "lora_B" in k)
    base = [k for k in before if "lora_" not in k]
    assert base and all(torch.equal(before[k], after[k]) for k in base)
