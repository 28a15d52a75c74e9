"""Checks that must fail before training starts: minutes into a run (or after a queue wait) is too late.

Each error names the recipe key, what was found and the fix. The model's module names come from a skeleton built
on the `meta` device: no weights are read, so this costs a fraction of a second even for a large base.
"""

from __future__ import annotations

from typing import Any

from distill.errors import RecipeError


def load_config(model: str) -> Any:
    """The base model's config; a missing local path or an unreachable hub id is a recipe error."""
    from distill import lengths

    return lengths.load_config(model, offline=False, where="student.model")


def check_lora(config: Any, lora: Any) -> Any:
    """Make sure the `peft.LoraConfig`'s target_modules match something in this architecture."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    if lora.target_modules is None or lora.target_modules == "all-linear":
        return lora  # PEFT picks the model's own defaults / every linear layer
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in skeleton.named_modules() if name]
    if not any(check_target_module_exists(lora, name) for name in names):
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise RecipeError(
            f"student.peft.target_modules: {sorted(lora.target_modules)!r} matches no module of "
            f"{config.model_type}; its linear modules are: {', '.join(linear)}"
        )
    return lora


def check_quantization(quantization: str | None, *, has_peft: bool, on_gpu: bool) -> None:
    """QLoRA (4-bit NF4 base weights via bitsandbytes) trains a LoRA adapter, on a CUDA GPU: it exists to fit a
    base into GPU memory, and on CPU (where recent bitsandbytes also runs) full-precision LoRA is the plain choice."""
    if quantization is None:
        return
    if not on_gpu:
        raise RecipeError(
            "student.quantization: 4bit (QLoRA, bitsandbytes) is for CUDA GPUs and none is visible; "
            "remove student.quantization to train LoRA in full precision on this machine"
        )
    if not has_peft:
        raise RecipeError("student.quantization: 4bit trains only adapters; add a student.peft section (LoRA)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("student.quantization: 4bit needs bitsandbytes: pip install 'distill[gpu]'") from None


# Optional GPU kernels a recipe can ask for, and the package each needs (the `gpu` extra has liger-kernel).
KERNELS = {
    ("use_liger_kernel", True): ("liger_kernel", "liger-kernel"),
    ("attn_implementation", "flash_attention_2"): ("flash_attn", "flash-attn"),
    ("attn_implementation", "flash_attention_3"): ("flash_attn_interface", "flash-attn-3"),
}


def check_kernels(sft: dict[str, Any]) -> None:
    """A kernel package the recipe asks for must be installed: transformers fails only once the model loads, in
    every launched process, after the queue wait."""
    import importlib.util

    asked = {"use_liger_kernel": sft.get("use_liger_kernel")}
    asked["attn_implementation"] = (sft.get("model_init_kwargs") or {}).get("attn_implementation")
    for (key, value), (module, package) in KERNELS.items():
        if asked[key] == value and importlib.util.find_spec(module) is None:
            where = "student.sft." + ("model_init_kwargs." if key == "attn_implementation" else "") + key
            raise RecipeError(
                f"{where}: {value} needs the {package} package, which is not installed; pip install {package}"
            )
