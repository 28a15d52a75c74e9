"""Stage `onpolicy`: the SFT student samples its own answers and the teacher scores every token of them; the student
is trained to lower the divergence to the teacher there (`beta` 1.0: reverse KL), with TRL's DistillationTrainer.

    distill onpolicy recipes/r1-distill-qwen2.5-math-1.5b-onpolicy.yaml

Starts from the `train` stage's student. The prompts are the recipe's problems (or `onpolicy.prompts`), rendered
exactly as the student was taught and is evaluated: the trained chat template's generation prompt, then
`teacher.think_prefix` once. The teacher sits beside the student (`onpolicy.teacher`, default `teacher.model`) or
behind a vLLM server (`onpolicy.teacher_server`, TRL's server distillation). Before any step: the two tokenizers
must be one (`distill.vocab`; padded embedding rows may differ), the template must start an answer the way the SFT
rows did, and the longest prompt plus `max_completion_length` must fit both models. Training, resume after a kill,
accelerate launches and the per-rank reports are the train stage's (`student.trainer`). Output, at the top of the
stage directory: the model and tokenizer (with LoRA, merged; the adapter under `adapter/`), the student's
generation_config.json, metrics.json (per-step reverse KL, sample lengths, tokens/s, teacher tokens) and loss.png.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from distill import files, lengths, vocab
from distill.data import Loaded, content_hash, load_problems
from distill.errors import DataError, DistillError, RecipeError
from distill.mixture import interleave
from distill.pipeline import StageContext, StageReport
from distill.prompts import generation_prompt, messages, source_prompts
from distill.schema import OnPolicy, Recipe
from student import arguments, launch, outputs
from student.merge import merge_adapter
from student.train import process_summary
from student.trainer import PLAN, RESULT, Plan, train

log = logging.getLogger(__name__)
CHECKPOINTS, ADAPTER, SCRATCH, LAUNCHER = "checkpoints", "adapter", ".prep", "accelerate.yaml"
GENERATION_CONFIG = "generation_config.json"


def load(recipe: Recipe) -> list[Loaded]:
    """The prompts' problems (`onpolicy.prompts`, else the recipe's data). The runner loads them once and hashes
    them (`problems_hash`): the stage re-runs when they change, whatever the recipe says."""
    own = recipe.onpolicy.prompts
    return load_problems(own, None) if own else load_problems(recipe.data, recipe.mixture)


problems_hash = content_hash


def teacher_model(recipe: Recipe) -> str:
    """The teacher model (`distill.vocab.teacher_of`), or one clear error when the recipe names none."""
    teacher = vocab.teacher_of(recipe)
    if teacher is not None:
        return teacher
    raise RecipeError(
        "onpolicy.teacher: required when teacher.backend is openai (the endpoint's model cannot score tokens "
        "here): name the teacher model (a local path or hub id sharing the student's tokenizer), and with "
        "onpolicy.teacher_server the vLLM server that holds it"
    )


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    """Check, distil, then write the model, generation_config.json, metrics.json and loss.png into ctx.work_dir."""
    cfg = recipe.onpolicy
    if cfg is None or recipe.teacher is None or "train" not in ctx.inputs:
        raise DistillError("stage onpolicy needs `onpolicy` and `teacher` sections and the train stage's output")
    launcher = launch.load(cfg.accelerate) if cfg.accelerate else None
    scratch = launch.scratch_dir(ctx.work_dir, name=SCRATCH)
    student = _student_model(ctx.inputs["train"], scratch=ctx.run_dir / ".work")
    setup = _prepare(recipe, student=student, work_dir=ctx.work_dir, progress=ctx.options.progress, launcher=launcher)
    prompts, dropped = _prompts(recipe, setup, ctx.problems if ctx.problems is not None else load(recipe))
    if not prompts:
        raise DataError(
            f"onpolicy: no prompt left to sample ({dict(dropped)}); lower onpolicy.config.max_completion_length "
            "or name other problems in onpolicy.prompts"
        )
    plan = _write_plan(cfg, setup, prompts, scratch=scratch, work_dir=ctx.work_dir)
    log.info(
        "onpolicy: %d prompts (%d dropped: %s), teacher %s %s, %s",
        len(prompts),
        sum(dropped.values()),
        dict(dropped) or "none",
        setup.teacher,
        f"at {cfg.teacher_server}" if cfg.teacher_server else "in process",
        "LoRA" if cfg.peft else "full",
    )
    counts = {"in": len(prompts) + sum(dropped.values()), "out": len(prompts), "dropped": dict(dropped)}
    if setup.launcher is not None:
        launch.launch(setup.launcher, config=scratch / LAUNCHER, plan=scratch / PLAN, reports=plan.report_dir)
        if launch.machine_rank() != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            return StageReport(counts=counts, complete=False)
    else:
        train(plan)
    metrics = _finish(cfg, setup, plan=plan, work_dir=ctx.work_dir)
    extra = {k: metrics[k] for k in ("teacher", "loss_first", "loss_last", "global_step", "teacher_tokens")}
    return StageReport(counts=counts, extra=extra)


@dataclasses.dataclass
class Setup:
    student: Path  # the SFT student, a full model folder
    teacher: str  # the teacher model (for a server: the model it serves, for the checks)
    tokenizer: Any  # the student's, with the chat template it was trained with
    kwargs: arguments.Kwargs  # the final DistillationConfig / LoraConfig keyword arguments, as the plan carries them
    pairing: vocab.Pairing
    limit: int  # tokens a prompt plus its completion may take (the smaller model context)
    completion: int  # max_completion_length as TRL resolves it (its default included)
    launcher: launch.Launcher | None


def _student_model(train_dir: Path, *, scratch: Path) -> Path:
    """The SFT student as a full model: the train output, or its LoRA adapter merged into its base first (once,
    as eval serves it: `distill.evaluate.servable`)."""
    from distill.evaluate import servable

    if not any((train_dir / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise DistillError(f"{train_dir}: neither a model (config.json) nor a LoRA adapter; re-run `distill train`")
    return Path(servable(str(train_dir), scratch=scratch))


def _prepare(
    recipe: Recipe, *, student: Path, work_dir: Path, progress: bool, launcher: launch.Launcher | None
) -> Setup:
    """Every check that can fail before a model loads for training, cheapest fix first."""
    import torch
    from transformers import AutoTokenizer

    cfg = recipe.onpolicy
    teacher = teacher_model(recipe)
    on_gpu = torch.cuda.is_available()
    kwargs, launcher = distillation_kwargs(cfg, work_dir=work_dir, on_gpu=on_gpu, progress=progress, launcher=launcher)
    resolved = arguments.distillation_config(kwargs.args, server=bool(cfg.teacher_server))
    if kwargs.peft is not None:
        arguments.lora_config(kwargs.peft, where="onpolicy.peft")
    pairing = vocab.load_pairing(str(student), teacher, server=bool(cfg.teacher_server), offline=False)
    tokenizer = AutoTokenizer.from_pretrained(student)
    check_start(tokenizer, think_prefix=recipe.teacher.think_prefix)
    contexts = lengths.onpolicy_contexts(
        lengths.model_context(str(student)), teacher=None if cfg.teacher_server else teacher, offline=False
    )
    completion = int(resolved.max_completion_length or 0)
    problems = lengths.completion_problems(completion, contexts, notes=[])
    if problems:
        raise RecipeError("\n".join(problems))
    limit = min((ctx for ctx in contexts.values() if ctx is not None), default=2**31)
    if on_gpu and not cfg.teacher_server:
        _check_teacher_fits(teacher)
    log.info("onpolicy: the keyword arguments every training process gets\n%s", kwargs.describe())
    return Setup(student, teacher, tokenizer, kwargs, pairing, limit, completion, launcher)


def distillation_kwargs(
    cfg: OnPolicy, *, work_dir: Path, on_gpu: bool, progress: bool, launcher: launch.Launcher | None
) -> tuple[arguments.Kwargs, launch.Launcher | None]:
    """The final `trl.DistillationConfig` (`ServerDistillationConfig` with a teacher server) and `peft.LoraConfig`
    keyword arguments: `onpolicy.config` and `onpolicy.peft` as written plus what distill decides
    (`arguments.decide`, and the server's URL), and the launcher config as this run must use it."""
    decided = arguments.decide(
        cfg.config,
        stage="onpolicy",
        where="onpolicy.config",
        config_class=arguments.distillation_class(server=bool(cfg.teacher_server)),
        output_dir=work_dir / CHECKPOINTS,
        on_gpu=on_gpu,
        progress=progress,
        peft=cfg.peft,
        launcher=launcher,
    )
    if cfg.teacher_server:
        decided.set("teacher_model_server_url", cfg.teacher_server, "onpolicy.teacher_server")
    return decided.finish(peft=cfg.peft), decided.launcher


def check_start(tokenizer: Any, *, think_prefix: str) -> None:
    """Generation must start the way SFT taught: the chat template's generation prompt plus `think_prefix` must be
    how the trained template renders an assistant turn that starts with the prefix (the SFT rows did)."""
    chat = [{"role": "user", "content": "1 + 1"}]
    prompt = generation_prompt(tokenizer, chat, think_prefix=think_prefix)
    answer = f"{think_prefix}x\n</think>\n\ny"  # a whole R1 answer: templates that drop the reasoning show here
    taught = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": answer}], tokenize=False)
    if not taught.startswith(prompt):
        raise RecipeError(
            f"teacher.think_prefix / the student's chat template: the student would be prompted with {prompt[-80:]!r} "
            f"but was trained on turns rendered as {taught[len(prompt) - 80 : len(prompt) + 10]!r}; its samples "
            "would not start the way SFT taught. Train and distil with one template and one think prefix"
        )


def _check_teacher_fits(teacher: str) -> None:
    """A teacher beside the student holds its bf16 weights on every GPU: refuse one that cannot fit, before the
    student loads, and name the way out."""
    import torch

    from distill import scale

    config = lengths.load_config(teacher, offline=False)
    weights = scale.parameters(config) * 2
    memory = torch.cuda.get_device_properties(0).total_memory
    if weights > 0.8 * memory:
        raise RecipeError(
            f"onpolicy.teacher: {teacher}'s bf16 weights alone take {weights / 2**30:.1f} GiB of this GPU's "
            f"{memory / 2**30:.1f} GiB, before the student, its optimizer and activations: serve it with vLLM "
            "(`vllm serve`) and set onpolicy.teacher_server"
        )


def _prompts(recipe: Recipe, setup: Setup, loaded: list[Loaded]) -> tuple[list[str], Counter[str]]:
    """The text prompts the student continues, and the problems left out by reason (duplicates, too long)."""
    sources = recipe.onpolicy.prompts or recipe.data
    templates = source_prompts(
        sources, teacher=recipe.teacher, where="onpolicy.prompts" if recipe.onpolicy.prompts else "data"
    )
    dropped: Counter[str] = Counter()
    for source in loaded:
        dropped.update(source.dropped)
    tokenizer, think = setup.tokenizer, recipe.teacher.think_prefix
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
    completion = setup.completion
    prompts = []
    for problem in interleave([source.problems for source in loaded]):
        text = generation_prompt(
            tokenizer, messages(problem, teacher=recipe.teacher, prompts=templates), think_prefix=think
        )
        if bos and text.startswith(bos):  # the tokenizer adds it again when TRL tokenizes the text
            text = text[len(bos) :]
        if len(tokenizer(text)["input_ids"]) + completion > setup.limit:
            dropped["prompt_too_long"] += 1
            continue
        prompts.append(text)
    return prompts, dropped


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _write_plan(cfg: OnPolicy, setup: Setup, prompts: list[str], *, scratch: Path, work_dir: Path) -> Plan:
    data, template_file = scratch / "prompts.jsonl", scratch / "chat_template.jinja"
    files.write_jsonl(data, ({"prompt": text} for text in prompts))
    files.write_text(template_file, setup.tokenizer.chat_template)
    if setup.launcher is not None:
        files.write_text(scratch / LAUNCHER, yaml.safe_dump(setup.launcher.settings, sort_keys=False))
    if cfg.teacher_server:
        teacher: dict[str, Any] = {"server": cfg.teacher_server}
    else:
        teacher = {"model": setup.teacher, "vocab_size": setup.pairing.rows_for_teacher}
    plan = Plan(
        model=str(setup.student),
        data=str(data),
        template=str(template_file),
        args=setup.kwargs.args,
        peft=setup.kwargs.peft,
        quantization=None,
        save_dir=str(work_dir / ADAPTER if cfg.peft else work_dir),
        scratch=str(scratch),
        reports=str(work_dir / SCRATCH),
        world_size=launch.world_size() if setup.launcher is not None else None,
        trainer="distillation",
        teacher=teacher,
    )
    plan.write(scratch / PLAN)
    return plan


def _finish(cfg: OnPolicy, setup: Setup, *, plan: Plan, work_dir: Path) -> dict[str, Any]:
    """Merge a LoRA, keep the student's stop token, write metrics.json and loss.png; drop the scratch folder."""
    scratch = Path(plan.scratch)
    result = files.read_json(plan.report_dir / RESULT)
    save_dir = Path(plan.save_dir)
    shutil.copyfile(setup.student / GENERATION_CONFIG, save_dir / GENERATION_CONFIG)  # the SFT stop token
    if save_dir != work_dir:
        merged = merge_adapter(save_dir, out=scratch / "merged", base=str(setup.student))
        for path in merged.iterdir():
            os.replace(path, work_dir / path.name)
    outputs.drop_tied_head(work_dir)
    history = result["log_history"]
    points = outputs.losses(history)
    runtime = result["train_runtime"] or 0.0
    forward = max((int(e["num_tokens"]) for e in history if "num_tokens" in e), default=0)
    sampled = _sampled_tokens(history, setup.kwargs.args, world_size=result["world_size"] or 1)
    metrics = {
        "teacher": setup.teacher,
        "teacher_server": cfg.teacher_server,
        "student_start": str(setup.student),
        "vocab": dataclasses.asdict(setup.pairing),
        "global_step": result["global_step"],
        "train_runtime_s": runtime,
        "resumed_from": result["resumed_from"],
        "world_size": result["world_size"],
        "processes": process_summary(plan.report_dir),  # with a launcher: how each rank ran, which prompts it had
        # prompt + completion tokens through both models (TRL's num_tokens); the teacher runs a forward pass only
        "teacher_tokens": {"generated": 0, "scored": forward, "sampled_by_student": sampled},
        "tokens_per_s": round(forward / runtime, 1) if runtime and not result["resumed_from"] else None,
        "completion_mean_length": [e.get("completions/mean_length") for e in history if "loss" in e],
        "loss_first": points[0][1] if points else None,
        "loss_last": points[-1][1] if points else None,
        "log_history": history,
    }
    files.write_json(work_dir / "metrics.json", metrics)
    outputs.write_loss_plot(work_dir / "loss.png", points=points, title=f"on-policy, teacher {setup.teacher}")
    shutil.rmtree(scratch)
    return metrics


def _sampled_tokens(history: list[dict[str, Any]], args: dict[str, Any], *, world_size: int) -> int | None:
    """Completion tokens the student sampled (and the teacher scored), from the logged mean lengths: exact with
    `logging_steps: 1`, else the mean of each logging window times its steps."""
    per_step = world_size * int(args.get("per_device_train_batch_size", 8))
    per_step *= int(args.get("gradient_accumulation_steps", 1))
    total, previous = 0.0, 0
    for entry in history:
        if "completions/mean_length" in entry and "step" in entry:
            total += entry["completions/mean_length"] * per_step * (entry["step"] - previous)
            previous = entry["step"]
    return round(total) if previous else None
