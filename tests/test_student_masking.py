"""What TRL actually trains on: the collated batch masks the prompt (labels -100) and keeps the reply and its
end-of-turn token; two LoRA steps change the adapter and leave the base weights alone; QLoRA trains adapters over
a real NF4 base and folds into the full-precision base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.tinymodel import build_tiny_model
from student.trainer import build_trainer
from student_data import addition_row, addition_rows, plan_for


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


@pytest.mark.slow
def test_student_qlora_trains_adapters_over_an_nf4_base_and_merges_into_the_full_base(
    tiny_model: Path, tmp_path: Path
) -> None:
    """QLoRA as every training process builds it from the plan, with real bitsandbytes and the precision settings
    a GPU run gets (bf16, gradient checkpointing). The stage allows `student.quantization` on CUDA GPUs only;
    bitsandbytes (>= 0.50) also has CPU kernels, which lets this check the composition here: NF4 +
    double-quantized base, bf16 compute, trainable adapters only, and an adapter that merges into the unquantized
    base as W + (alpha / r) B A."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from student.merge import merge_adapter
    from student.trainer import train

    plan = plan_for(
        tiny_model,
        tmp_path,
        rows=addition_rows(32),
        peft={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        quantization="4bit",
        sft={
            "max_steps": 20,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "logging_steps": 2,
            "bf16": True,
            "gradient_checkpointing": True,
        },
    )
    model = build_trainer(plan).model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down): every linear layer but lm_head
    for layer in quantized:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_type == "nf4"
        assert layer.weight.quant_state.nested and layer.compute_dtype == torch.bfloat16
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    result = train(plan)
    losses = [entry["loss"] for entry in result["log_history"] if "loss" in entry]
    assert len(losses) == 10 and losses[-1] < 0.95 * losses[0]
    adapter = Path(plan.save_dir)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)  # no (quantized) base weights

    merged_dir = merge_adapter(adapter, out=tmp_path / "merged", base=str(tiny_model))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert getattr(merged.config, "quantization_config", None) is None
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    delta = (16 / 8) * weights[f"{prefix}.lora_B.weight"].float() @ weights[f"{prefix}.lora_A.weight"].float()
    merged_w, base_w = merged.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight
    assert delta.abs().max() > 1e-4 and torch.allclose(merged_w, base_w + delta, atol=1e-5)


def test_student_qlora_computes_in_the_training_precision() -> None:
    """bf16 by default; fp16 where the recipe trains in fp16 (T4, V100: no bf16), or the 4-bit matmuls would run in
    a precision the GPU lacks."""
    from student.trainer import quantization_config

    assert quantization_config(None, sft={}) is None
    assert quantization_config("4bit", sft={}).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("4bit", sft={"fp16": True}).bnb_4bit_compute_dtype == torch.float16
