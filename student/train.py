"""Stage `train`: fine-tune `student.model` on the filter's kept traces with TRL's SFTTrainer.

    distill train recipes/demo.yaml

Reads `runs/<name>/filter/kept.jsonl`, checks everything that can fail before a single step runs (model, LoRA
targets, context length, chat template, stop token, QLoRA on CPU), drops or truncates overlong rows (counted),
then trains in this process, or on N processes / M machines through `accelerate launch` when `student.accelerate`
names a launcher config (see `student.launch`). Output, at the top of the stage directory:

- full fine-tuning: the model (config.json, model.safetensors), tokenizer with the chat template trained with;
- LoRA: the adapter (adapter_config.json, adapter_model.safetensors) and tokenizer; with `student.merge` the merged
  full model is at the top instead and the adapter under `adapter/`;
- generation_config.json whose eos_token_id is the template's end-of-turn token (the token trained as EOS);
- metrics.json (rows, tokens, throughput, losses) and loss.png; `checkpoints/` (resume points, kept for the hub).

A recipe value reaches TRL in three calls; `student.sft.learning_rate`, say:

1. `distill.recipe.load_recipe(path)`: the YAML mapping, its keys checked against `trl.SFTConfig`'s fields, is
   `recipe.student.sft`;
2. `sft_kwargs(student, ...)` (here): that mapping as written plus what distill decides (checkpoint folder, CPU
   defaults, stop token, `max_length`, ...; each decided key logged once with why) is the final keyword arguments,
   which plan.json carries unchanged (`Plan.args`; `Plan.peft` for `peft.LoraConfig`, task_type included);
3. `arguments.sft_config(kwargs)`: the one `trl.SFTConfig(**kwargs)`, built by `_prepare` to check the arguments
   before anything launches, and by `student.trainer.build_trainer` in every training process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from distill import files, lengths
from distill.errors import DataError, DistillError, RecipeError
from distill.pipeline import StageContext, StageReport
from distill.schema import Recipe, Student
from student import arguments, launch, outputs, preflight, rows, template
from student.checkpoints import checkpoint_target
from student.merge import MODEL_CONFIG, merge_adapter
from student.trainer import PLAN, RESULT, Plan, train

log = logging.getLogger(__name__)
KEPT, CHECKPOINTS, ADAPTER, SCRATCH, LAUNCHER = "kept.jsonl", "checkpoints", "adapter", ".prep", "accelerate.yaml"


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    """Train, then write the model folder, generation_config.json, metrics.json and loss.png into ctx.work_dir."""
    student = recipe.student
    if student is None or "filter" not in ctx.inputs:
        raise DistillError("stage train needs a `student` section and the filter stage's output")
    launcher = launch.load(student.accelerate) if student.accelerate else None
    conversations = rows.read_conversations(ctx.inputs["filter"] / KEPT)
    setup = _prepare(student, work_dir=ctx.work_dir, progress=ctx.options.progress, launcher=launcher)
    fitted = rows.fit(
        conversations,
        tokenizer=setup.tokenizer,
        template=setup.template.text,
        limit=setup.limit,
        overlong=student.overlong,
        can_truncate=setup.kwargs.args["max_length"] is not None,
        splits=setup.splits,
    )
    if not fitted.conversations:
        raise DataError(
            f"{ctx.inputs['filter'] / KEPT}: all {fitted.seen} rows are longer than {setup.limit} tokens "
            f"({fitted.dropped}); raise student.sft.max_length or set student.overlong: truncate"
        )
    plan = _write_plan(student, setup, fitted, work_dir=ctx.work_dir, push_checkpoints=checkpoint_target(recipe))
    log.info(
        "train: %d rows (%d dropped: %s, %d to truncate), %s tokens per epoch, %s, template %s, EOS %s",
        len(fitted.conversations),
        fitted.seen - len(fitted.conversations),
        fitted.dropped or "none",
        fitted.truncated,
        f"{fitted.tokens:,}",
        _mode(student),
        setup.template.source,
        setup.template.end_of_turn,
    )
    counts = {"in": fitted.seen, "out": len(fitted.conversations), "dropped": fitted.dropped}
    if setup.launcher is not None:
        launch.launch(
            setup.launcher,
            config=Path(plan.scratch) / LAUNCHER,
            plan=Path(plan.scratch) / PLAN,
            reports=plan.report_dir,
        )
        if launch.machine_rank() != 0:  # node 0 writes the model and finishes the stage
            shutil.rmtree(plan.scratch, ignore_errors=True)
            return StageReport(counts=counts, complete=False)
    else:
        train(plan)
    metrics = _finish(student, setup, fitted, plan=plan, work_dir=ctx.work_dir)
    extra = {k: metrics[k] for k in ("mode", "loss_first", "loss_last", "global_step", "train_tokens", "eos_token")}
    if metrics["processes"]:
        ranks = metrics["processes"]["ranks"]
        extra.update(distributed_type=ranks[0]["distributed_type"], weights_held=[r["weights_held"] for r in ranks])
        _warn_if_not_sharded(setup.launcher, ranks)
    return StageReport(counts=counts, extra=extra)


def _warn_if_not_sharded(launcher: launch.Launcher | None, ranks: list[dict[str, Any]]) -> None:
    """accelerate quietly runs an FSDP (or DeepSpeed) config as plain DDP where it cannot use it (FSDP on CPU, for
    one): say so, because the memory the config was chosen for was not saved."""
    asked = launcher.distributed_type if launcher else ""
    ran = ranks[0]["distributed_type"]
    if launcher and asked in ("FSDP", "DEEPSPEED") and ran != f"DistributedType.{asked}":
        held = ", ".join(f"{r['weights_held']:.0%}" for r in ranks)
        log.warning(
            "student.accelerate %s asks for %s, but accelerate ran %s (weights held per rank: %s); accelerate "
            "falls back to DDP where it cannot use it (FSDP: anywhere but GPUs and other accelerators)",
            launcher.name,
            asked,
            ran,
            held,
        )


@dataclasses.dataclass
class Setup:
    tokenizer: Any
    template: template.ChatTemplate
    kwargs: arguments.Kwargs  # the final SFTConfig / LoraConfig keyword arguments, as the plan carries them
    limit: int  # row length budget in tokens
    splits: bool  # packing cuts overlong rows into several packed rows instead of truncating them
    launcher: launch.Launcher | None  # student.accelerate, as resolved for this run (None: train in this process)
    base_config: dict[str, Any]  # student.base_config as from_pretrained applies it ({}: the base's own config)


def _prepare(student: Student, *, work_dir: Path, progress: bool, launcher: launch.Launcher | None) -> Setup:
    """Every check that can fail before training, in the order that reports the cheapest fix first."""
    import torch
    from transformers import AutoTokenizer

    on_gpu = torch.cuda.is_available()
    config = preflight.load_config(student.model)
    preflight.check_quantization(student.quantization, has_peft=student.peft is not None, on_gpu=on_gpu)
    overrides = lengths.init_kwargs(config, student.base_config)
    tokenizer = AutoTokenizer.from_pretrained(student.model)
    chat = template.resolve(
        tokenizer,
        model_type=config.model_type,
        path=student.chat_template,
        assistant_only=bool(student.sft.get("assistant_only_loss")),
    )
    kwargs, launcher = sft_kwargs(
        student,
        base_config=overrides,
        end_of_turn=chat.end_of_turn,
        work_dir=work_dir,
        on_gpu=on_gpu,
        progress=progress,
        launcher=launcher,
    )
    if kwargs.peft is not None:
        preflight.check_lora(config, arguments.lora_config(kwargs.peft, where="student.peft"))
    preflight.check_kernels(kwargs.args)
    sft = arguments.sft_config(kwargs.args)
    if sft.padding_free and not sft.packing and sft.max_length is not None:
        raise RecipeError(
            "student.sft.padding_free: without packing TRL cannot enforce max_length; set "
            "student.sft.max_length: null (rows beyond the model's context are then dropped) or packing"
        )
    context = lengths.context(config, overrides)
    limit = lengths.check_max_length(context, max_length=sft.max_length, extended=bool(overrides))
    log.info("train: the keyword arguments every training process gets\n%s", kwargs.describe())
    return Setup(
        tokenizer=tokenizer,
        template=chat,
        kwargs=kwargs,
        limit=limit,
        splits=bool(sft.packing) and sft.packing_strategy in ("wrapped", "bfd_split"),
        launcher=launcher,
        base_config=overrides,
    )


def sft_kwargs(
    student: Student,
    *,
    base_config: dict[str, Any],
    end_of_turn: str,
    work_dir: Path,
    on_gpu: bool,
    progress: bool,
    launcher: launch.Launcher | None,
) -> tuple[arguments.Kwargs, launch.Launcher | None]:
    """The final `trl.SFTConfig` and `peft.LoraConfig` keyword arguments: `student.sft` and `student.peft` as
    written, plus what distill decides (`arguments.decide`; here also `base_config`, as `from_pretrained` takes it,
    the template's `end_of_turn` token and `max_length`), and the launcher config as this run must use it."""
    from trl import SFTConfig

    if "chat_template_path" in student.sft:
        raise RecipeError(
            "student.sft.chat_template_path: set student.chat_template instead (distill checks it has "
            "generation markers and derives the stop token from it)"
        )
    decided = arguments.decide(
        student.sft,
        stage="train",
        where="student.sft",
        config_class=SFTConfig,
        output_dir=work_dir / CHECKPOINTS,
        on_gpu=on_gpu,
        progress=progress,
        peft=student.peft,
        launcher=launcher,
    )
    if base_config:  # the loaded model carries it into every saved config.json
        init = dict(decided.get("model_init_kwargs") or {})
        clash = sorted(init.keys() & base_config.keys())
        if clash:
            raise RecipeError(
                f"student.sft.model_init_kwargs.{clash[0]}: also set by student.base_config; set it there only"
            )
        decided.set("model_init_kwargs", {**init, **base_config}, f"student.base_config {base_config}")
    eos = student.sft.get("eos_token")
    if eos not in (None, end_of_turn):
        raise RecipeError(
            f"student.sft.eos_token: {eos!r} differs from the chat template's end-of-turn "
            f"token {end_of_turn!r}; the student would learn to stop on a token inference never "
            "sees. Remove it (distill sets it from the template)"
        )
    if eos is None:
        decided.set("eos_token", end_of_turn, "the chat template's end-of-turn token, the one inference stops on")
    if "max_length" not in student.sft:
        decided.set(
            "max_length",
            arguments.default(SFTConfig, "max_length"),
            "TRL's default, written out: the length checks, the row fitting and every process use this number",
        )
    return decided.finish(peft=student.peft), decided.launcher


def _write_plan(
    student: Student, setup: Setup, fitted: rows.Rows, *, work_dir: Path, push_checkpoints: dict[str, Any] | None
) -> Plan:
    scratch = launch.scratch_dir(work_dir, name=SCRATCH)
    data, template_file = scratch / "train.jsonl", scratch / "chat_template.jinja"
    files.write_jsonl(data, ({"messages": messages} for messages in fitted.conversations))
    files.write_text(template_file, setup.template.text)
    if setup.launcher is not None:
        files.write_text(scratch / LAUNCHER, yaml.safe_dump(setup.launcher.settings, sort_keys=False))
    merged = student.peft is not None and student.merge
    plan = Plan(
        model=student.model,
        data=str(data),
        template=str(template_file),
        args=setup.kwargs.args,
        peft=setup.kwargs.peft,
        quantization=student.quantization,
        save_dir=str(work_dir / ADAPTER if merged else work_dir),
        scratch=str(scratch),
        push_checkpoints=push_checkpoints,
        reports=str(work_dir / SCRATCH),
        world_size=launch.world_size() if setup.launcher is not None else None,
    )
    plan.write(scratch / PLAN)
    return plan


def _finish(student: Student, setup: Setup, fitted: rows.Rows, *, plan: Plan, work_dir: Path) -> dict[str, Any]:
    """Tied-head copy dropped, stop token, optional merge, metrics.json and loss.png; then drop the scratch folder."""
    scratch = Path(plan.scratch)
    result = json.loads((plan.report_dir / RESULT).read_text(encoding="utf-8"))
    save_dir = Path(plan.save_dir)
    if (save_dir / "config.json").is_file():  # a full model (an adapter folder has none)
        outputs.drop_tied_head(save_dir)
    elif setup.base_config:  # an adapter: its base must load extended wherever it is merged (eval, distill merge)
        files.write_json(save_dir / MODEL_CONFIG, setup.base_config)
    eos_id, pad_id = setup.template.end_of_turn_id, setup.tokenizer.pad_token_id
    outputs.write_generation_config(save_dir, base=student.model, eos_token_id=eos_id, pad_token_id=pad_id)
    if save_dir != work_dir:  # LoRA + merge: merged model at the top, adapter kept under adapter/
        merged = merge_adapter(save_dir, out=scratch / "merged", base=student.model)
        for path in merged.iterdir():
            os.replace(path, work_dir / path.name)
        outputs.write_generation_config(work_dir, base=student.model, eos_token_id=eos_id, pad_token_id=pad_id)
    points = outputs.losses(result["log_history"])
    runtime = result["train_runtime"] or 0.0
    tokens = round(fitted.tokens * (result["epoch"] or 0))
    metrics = {
        "mode": _mode(student),
        "merged": save_dir != work_dir,
        "base_config": setup.base_config,  # student.base_config as applied to the base (context extension)
        "chat_template": setup.template.source,
        "eos_token": setup.template.end_of_turn,
        "eos_token_id": eos_id,
        "rows": {
            "in": fitted.seen,
            "out": len(fitted.conversations),
            "dropped": fitted.dropped,
            "truncated": fitted.truncated,
        },
        "train_tokens_per_epoch": fitted.tokens,
        "train_tokens": tokens,
        "train_runtime_s": runtime,
        # after a resume the runtime covers only the resumed part, so tokens/s would be inflated
        "train_tokens_per_s": round(tokens / runtime, 1) if runtime and not result["resumed_from"] else None,
        "global_step": result["global_step"],
        "epoch": result["epoch"],
        "world_size": result["world_size"],
        "resumed_from": result["resumed_from"],
        "pushed_checkpoints": result["pushed_checkpoints"],  # hub.push_checkpoints: sent and failed uploads
        "processes": process_summary(plan.report_dir),
        "loss_first": points[0][1] if points else None,
        "loss_last": points[-1][1] if points else None,
        "log_history": result["log_history"],
    }
    files.write_json(work_dir / "metrics.json", metrics)
    outputs.write_loss_plot(work_dir / "loss.png", points=points, title=f"{student.model} ({_mode(student)})")
    shutil.rmtree(scratch)
    return metrics


def process_summary(report_dir: Path) -> dict[str, Any] | None:
    """Summary of the per-rank reports of a multi-process run: who saved, and whether the shards overlap."""
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in report_dir.glob("rank-*.json")]
    if not reports:
        return None
    reports.sort(key=lambda report: report["rank"])
    for report in reports:
        weights = report_dir / f"weights-{report['rank']}.json"
        report.update(json.loads(weights.read_text(encoding="utf-8")) if weights.is_file() else {})
    seen = [set(r["rows"]) for r in reports]
    return {
        "ranks": [
            {k: r.get(k) for k in ("rank", "world_size", "backend", "parallel_mode", "device", "should_save")}
            | {k: r.get(k) for k in ("distributed_type", "weights_held")}
            | {"rows": len(r["rows"])}
            for r in reports
        ],
        "rows_seen": len(set().union(*seen)),
        "rows_on_several_ranks": sum(len(a & b) for i, a in enumerate(seen) for b in seen[i + 1 :]),
    }


def _mode(student: Student) -> str:
    if student.peft is None:
        return "full"
    return "qlora" if student.quantization else "lora"
