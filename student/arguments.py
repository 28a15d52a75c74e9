"""The trainer keyword arguments both training stages resolve the same way: the recipe's pass-through mapping
(`student.sft` for `trl.SFTConfig`, `onpolicy.config` for `trl.DistillationConfig`) plus what distill decides for
the machine it runs on, each decision logged and each overridable by setting the key in the recipe."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from distill import devices
from distill.errors import RecipeError
from student import launch

log = logging.getLogger(__name__)
CPU_DEFAULTS = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}  # bf16 + checkpointing: ~4x slower


def resolve(
    values: dict[str, Any],
    *,
    stage: str,
    where: str,
    config_class: type,
    output_dir: Path,
    on_gpu: bool,
    progress: bool,
    peft: dict[str, Any] | None,
    launcher: launch.Launcher | None,
) -> tuple[dict[str, Any], launch.Launcher | None]:
    """The keyword arguments for `config_class` (`where` names the recipe mapping, `stage` the stage), and the
    launcher config as this run must use it."""
    args = dict(values)
    args["output_dir"] = str(output_dir)
    args.setdefault("disable_tqdm", not progress)
    if not on_gpu:
        if args.get("use_cpu") is not True:
            devices.refuse_cpu_fallback(
                what=f"stage {stage}",
                launcher=launcher.gpu_only if launcher else None,
                escape=f"set {where}.use_cpu: true",
            )
        applied = {key: value for key, value in CPU_DEFAULTS.items() if key not in args}
        args.update(applied)
        log.info("no CUDA device: training on CPU with %s (set them in %s to override)", applied, where)
    elif peft is not None:
        # TRL loads a model named by path in fp32 unless told otherwise: a frozen 7B base would take ~30 GB per GPU
        # before activations. LoRA/QLoRA never update it, so it is loaded in the training precision.
        init = dict(args.get("model_init_kwargs") or {})
        if "dtype" not in init:
            init["dtype"] = "float16" if args.get("fp16") else "bfloat16"
            args["model_init_kwargs"] = init
            log.info(
                "LoRA: the frozen base is loaded in %s (set %s.model_init_kwargs.dtype to override)",
                init["dtype"],
                where,
            )
    if launcher is not None:
        launcher, note = launch.resolve_checkpointing(
            launcher, sft=args, default=default(config_class, "gradient_checkpointing")
        )
        if note:
            section = where.rsplit(".", 1)[0]  # student / onpolicy: where the launcher is named
            log.info("%s.accelerate %s: %s; %s.gradient_checkpointing is off", section, launcher.name, note, where)
    return args, launcher


def default(config_class: type, name: str) -> Any:
    """`config_class`'s own default for `name` (TRL turns some TrainingArguments defaults around)."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def validated(args: dict[str, Any], *, where: str, config_class: type) -> Any:
    """Build the config once here, so a bad combination fails now and not on N launched processes."""
    try:
        return config_class(**args)
    except (TypeError, ValueError) as exc:
        raise RecipeError(
            f"{where}: {config_class.__module__.split('.')[0]}.{config_class.__name__} rejected it: {exc}"
        ) from None
