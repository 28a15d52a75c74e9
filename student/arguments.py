"""The library configs both training stages build, and the one place each is built.

A stage's keyword arguments are its recipe mapping as written (`student.sft` for `trl.SFTConfig`, `onpolicy.config`
for `trl.DistillationConfig`, the `peft` sections for `peft.LoraConfig`) plus what distill decides for this machine
and run (`decide`), each decided key with why (`Kwargs.why`, logged once by the stage). The stage builds the configs
from the final keyword arguments once, so a bad combination fails there and not on N launched processes; plan.json
carries exactly those keyword arguments, and every training process builds its configs with the same functions
(`sft_config`, `distillation_config`, `lora_config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from distill import devices
from distill.errors import RecipeError
from student import launch

CPU_DEFAULTS = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}  # bf16 + checkpointing: ~4x slower
LORA_DEFAULTS = {"task_type": "CAUSAL_LM"}  # PEFT's causal-LM wrapper, which TRL's trainers expect


@dataclasses.dataclass(frozen=True)
class Kwargs:
    """A stage's final keyword arguments, exactly as plan.json carries them to every training process."""

    where: str  # the recipe mapping `args` starts from: student.sft / onpolicy.config
    target: str  # the config class `args` is for, e.g. trl.SFTConfig
    args: dict[str, Any]
    peft: dict[str, Any] | None  # peft.LoraConfig keyword arguments (task_type included); None: no LoRA
    why: dict[str, str]  # recipe path distill set -> why; every other key is the recipe's, as written

    def describe(self) -> str:
        """The one log entry of a stage's resolved arguments (each "as passed to" line ends in a Python literal)."""
        lines = [f"{self.where} as passed to {self.target}: {self.args}"]
        if self.peft is not None:
            lines.append(f"{_section(self.where)}.peft as passed to peft.LoraConfig: {self.peft}")
        lines.append("set by distill (every other key is the recipe's, as written):")
        lines += [f"  {path}: {why}" for path, why in self.why.items()]
        return "\n".join(lines)


@dataclasses.dataclass
class Decisions:
    """The keys distill sets on top of a recipe mapping, each with why, and the launcher config as the run uses it."""

    recipe: dict[str, Any]  # the recipe mapping, never changed
    where: str
    target: str
    launcher: launch.Launcher | None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    why: dict[str, str] = dataclasses.field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """`key` as the config will get it: distill's value, else the recipe's."""
        return self.values[key] if key in self.values else self.recipe.get(key, default)

    def set(self, key: str, value: Any, why: str) -> None:
        self.values[key] = value
        self.note(f"{self.where}.{key}", why)

    def note(self, path: str, why: str) -> None:
        """A decision about `path` (a key, or a launcher setting); a second one for the same path is appended."""
        self.why[path] = f"{self.why[path]}; {why}" if path in self.why else why

    def finish(self, *, peft: dict[str, Any] | None) -> Kwargs:
        """The final keyword arguments: the recipe's keys, then distill's (a key in both gets distill's value)."""
        lora = None
        if peft is not None:
            lora = {**LORA_DEFAULTS, **peft}
            for key in LORA_DEFAULTS.keys() - peft.keys():
                self.note(f"{_section(self.where)}.peft.{key}", "PEFT's causal-LM wrapper, as TRL's trainers expect")
        return Kwargs(self.where, self.target, {**self.recipe, **self.values}, lora, dict(self.why))


def decide(
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
) -> Decisions:
    """What distill sets in `values` (the recipe mapping `where`, for `config_class`) that both stages decide the
    same way: the checkpoint folder, progress bars, the CPU defaults or LoRA's base precision, and checkpointing
    under FSDP. A key the recipe sets wins, except `output_dir` and, under FSDP, `gradient_checkpointing`."""
    decided = Decisions(recipe=values, where=where, target=_name(config_class), launcher=launcher)
    decided.set("output_dir", str(output_dir), "the stage's checkpoints/ (kept across a kill: a rerun resumes there)")
    if "disable_tqdm" not in values:
        decided.set(
            "disable_tqdm",
            not progress,
            "progress bars on" if progress else "progress off (--no-progress, or no terminal)",
        )
    if not on_gpu:
        if values.get("use_cpu") is not True:
            devices.refuse_cpu_fallback(
                what=f"stage {stage}",
                launcher=launcher.gpu_only if launcher else None,
                escape=f"set {where}.use_cpu: true",
            )
        for key, value in CPU_DEFAULTS.items():
            if key not in values:
                decided.set(key, value, f"no CUDA device: the CPU default (set it in {where} to override)")
    elif peft is not None:
        # TRL loads a model named by path in fp32 unless told otherwise: a frozen 7B base would take ~30 GB per GPU
        # before activations. LoRA/QLoRA never update it, so it is loaded in the training precision.
        init = dict(values.get("model_init_kwargs") or {})
        if "dtype" not in init:
            init["dtype"] = "float16" if values.get("fp16") else "bfloat16"
            decided.set(
                "model_init_kwargs",
                init,
                f"LoRA: the frozen base loads in {init['dtype']}, not fp32 (set {where}.model_init_kwargs.dtype to "
                "override)",
            )
    if launcher is not None:
        _fsdp_checkpointing(decided, config_class=config_class)
    return decided


def _fsdp_checkpointing(decided: Decisions, *, config_class: type) -> None:
    """Under FSDP, checkpointing asked for anywhere runs as FSDP's own (`launch.resolve_checkpointing`)."""
    merged = {**decided.recipe, **decided.values}
    view = dict(merged)  # resolve_checkpointing turns gradient_checkpointing off in it under FSDP
    launcher, note = launch.resolve_checkpointing(
        decided.launcher, sft=view, default=default(config_class, "gradient_checkpointing")
    )
    decided.launcher = launcher
    section = _section(decided.where)
    if note:
        decided.note(
            f"{section}.accelerate", f"{launcher.name}: {note}; {decided.where}.gradient_checkpointing is off"
        )
    key, unset = "gradient_checkpointing", object()
    if view.get(key, unset) != merged.get(key, unset):
        decided.set(key, view[key], f"{section}.accelerate {launcher.name} is FSDP: checkpointing is FSDP's own")


def default(config_class: type, name: str) -> Any:
    """`config_class`'s own default for `name` (TRL turns some TrainingArguments defaults around)."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def sft_config(args: dict[str, Any], *, where: str = "student.sft") -> Any:
    """The one `trl.SFTConfig(**args)`: the stage's check of the final keyword arguments, and each process's config."""
    from trl import SFTConfig

    return build(SFTConfig, args, where=where)


def distillation_class(*, server: bool) -> type:
    """`trl.DistillationConfig`, or with a teacher behind a vLLM server TRL's `ServerDistillationConfig`."""
    if server:
        from trl.experimental.server_distillation import ServerDistillationConfig

        return ServerDistillationConfig
    from trl import DistillationConfig

    return DistillationConfig


def distillation_config(args: dict[str, Any], *, server: bool) -> Any:
    """The one `DistillationConfig(**args)` (or `ServerDistillationConfig`), for the stage's check and each process."""
    return build(distillation_class(server=server), args, where="onpolicy.config")


def lora_config(peft: dict[str, Any], *, where: str) -> Any:
    """The one `peft.LoraConfig(**peft)` of both stages (`peft` as `Decisions.finish` resolved it)."""
    from peft import LoraConfig

    return build(LoraConfig, peft, where=where)


def build(config_class: type, args: dict[str, Any], *, where: str) -> Any:
    """`config_class(**args)`, its rejection reported as the recipe mapping `where`'s error."""
    try:
        return config_class(**args)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {_name(config_class)} rejected it: {exc}") from None


def _name(config_class: type) -> str:
    return f"{config_class.__module__.split('.')[0]}.{config_class.__name__}"


def _section(where: str) -> str:
    return where.rsplit(".", 1)[0]  # student / onpolicy: where the launcher and peft are named
