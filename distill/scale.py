"""`distill recipe plan RECIPE`: the scale a recipe asks for, before any compute is spent (nanoGPT prints its tokens
per iteration before training; a distillation run deserves the same sanity check before a week of GPU time).

    distill recipe plan recipes/r1-distill-qwen2.5-math-1.5b.yaml --gpus 8

Each figure says how it was got. Finished stages give measured counts (their manifests); otherwise the figures are
bounds computed from the recipe: problems from `limit` / `mixture.total` (or a local file's rows), teacher tokens
as problems x n x max_tokens (every sample running to its limit), training rows as every generated trace kept.
The student's memory per GPU is arithmetic, not a measurement (`accelerate estimate-memory` does the same for the
weights): parameters from a `meta`-device skeleton of the base's config (nothing is downloaded; the config must be
on disk or in the Hub cache), bytes per parameter for the training mode and sharding, plus activations at
`max_length` and the logits the loss needs unless Liger's fused cross-entropy never materialises them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.manifest import read_manifest
from distill.schema import Recipe

GIB = 2**30
# Bytes per parameter of the model states in bf16 mixed precision with Adam (ZeRO paper, K = 12): bf16 weights and
# gradients 2 + 2, fp32 master weights + two moments 12. `replicated` stays whole on every GPU, `sharded` is split
# over the world. DDP under the HF Trainer keeps fp32 weights and gradients (4 + 4) beside the moments (8).
STATES = {
    "ddp": {"replicated": 16, "sharded": 0},
    "zero2": {"replicated": 2, "sharded": 14},
    "zero3": {"replicated": 0, "sharded": 16},
    "zero3-offload": {"replicated": 0, "sharded": 0},  # weights and optimizer live in CPU RAM, gathered per layer
    "fsdp": {"replicated": 0, "sharded": 16},
}


def plan(recipe: Recipe, *, runs_dir: Path, gpus: int) -> dict[str, Any]:
    """Every figure of the plan, as a dict (what `--json` prints)."""
    run_dir = runs_dir / recipe.name
    problems = _problems(recipe, run_dir)
    figures: dict[str, Any] = {"recipe": recipe.name, "gpus": gpus, "problems": problems}
    if recipe.teacher is not None:
        figures["teacher"] = _teacher(recipe, problems, run_dir)
    if recipe.student is not None:
        figures["student"] = _student(recipe, figures.get("teacher"), run_dir, gpus=gpus)
    if recipe.onpolicy is not None:
        figures["onpolicy"] = _onpolicy(recipe, gpus=gpus)
    if recipe.eval is not None:
        figures["eval"] = _eval(recipe)
    return figures


def _onpolicy(recipe: Recipe, *, gpus: int) -> dict[str, Any]:
    """Sampled-and-scored tokens at most (steps x answers per step x max_completion_length) and where the teacher's
    weights go: on a vLLM server, or in bf16 beside the student on every GPU (a ZeRO-3 launcher shards them)."""
    from distill import lengths
    from distill.vocab import teacher_of

    onpolicy, world = recipe.onpolicy, max(gpus, 1)
    config = onpolicy.config
    per_step = int(config.get("per_device_train_batch_size", 8)) * int(config.get("gradient_accumulation_steps", 1))
    steps, completion = config.get("max_steps"), config.get("max_completion_length")
    answers = per_step * world * int(steps) if steps else None
    teacher = teacher_of(recipe)
    figures: dict[str, Any] = {
        "teacher": teacher,
        "answers_per_step": per_step * world,
        "answers": answers,
        "scored_tokens_at_most": answers * int(completion) if answers and completion else None,
    }
    if onpolicy.teacher_server:
        figures["teacher_weights_per_gpu"] = {"value": 0, "how": f"behind the server {onpolicy.teacher_server}"}
        return figures
    teacher_config = lengths.load_config(teacher, offline=True) if teacher else None
    if teacher_config is None:
        figures["teacher_weights_per_gpu"] = {"value": None, "how": f"unknown: {teacher}'s config.json not here"}
        return figures
    share = world if _sharding(onpolicy.accelerate).startswith("zero3") else 1
    weights = parameters(teacher_config) * 2 / share
    figures["teacher_weights_per_gpu"] = {
        "value": round(weights / GIB, 2),
        "how": f"bf16, {'sharded by ZeRO-3' if share > 1 else 'whole on every GPU'}; above ~80% of a GPU: "
        "set onpolicy.teacher_server",
    }
    return figures


def _count(value: int | None, how: str) -> dict[str, Any]:
    return {"value": value, "how": how}


def _problems(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(run_dir / "generate")
    if manifest is not None:
        return _count(manifest.counts["out"], "measured (generate manifest)")
    if recipe.mixture.total is not None:
        return _count(recipe.mixture.total, "mixture.total")
    counts = [_source_count(source) for source in recipe.data]
    if any(count is None for count, _ in counts):
        unknown = next(how for count, how in counts if count is None)
        return _count(None, unknown or "unknown: a hub source without `limit` (its size is read when generate runs)")
    hows = sorted({how for _, how in counts})
    return _count(sum(count for count, _ in counts), " + ".join(hows))


def _source_count(source: Any) -> tuple[int | None, str]:
    """A source's problem count: its local file read with its spec, else its `limit` (an upper bound)."""
    from distill.data import load_source, load_spec
    from distill.errors import DistillError

    spec = load_spec(source.spec)
    if source.path or spec.path:
        try:
            return len(load_source(source).problems), "rows of the local files"
        except DistillError as exc:
            return None, f"unknown: {exc}"
    return (source.limit, "at most `limit`") if source.limit else (None, "")


def _teacher(recipe: Recipe, problems: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    teacher = recipe.teacher
    n, max_tokens = int(teacher.sampling.get("n", 1)), teacher.sampling.get("max_tokens")
    count = problems["value"]
    generations = count * n if count is not None else None
    out: dict[str, Any] = {"model": teacher.model, "n": n, "max_tokens": max_tokens, "generations": generations}
    out["completion_tokens_at_most"] = generations * max_tokens if generations is not None and max_tokens else None
    endpoint = teacher.endpoint
    if endpoint is not None and endpoint.price_output_per_m and out["completion_tokens_at_most"] is not None:
        out["cost_usd_at_most"] = round(out["completion_tokens_at_most"] * endpoint.price_output_per_m / 1e6, 2)
    manifest = read_manifest(run_dir / "generate")
    if manifest is not None:
        out["measured"] = {k: manifest.extra.get(k) for k in ("completion_tokens", "prompt_tokens", "cost_usd")}
    return out


def _student(recipe: Recipe, teacher: dict[str, Any] | None, run_dir: Path, *, gpus: int) -> dict[str, Any]:
    student = recipe.student
    sft = student.sft
    max_length = sft.get("max_length")
    kept = read_manifest(run_dir / "filter")
    if kept is not None:
        rows = _count(kept.counts["out"], "measured (filter manifest)")
    else:
        generated = teacher["generations"] if teacher else None
        rows = _count(generated, "at most: every generated trace kept")
    batch = int(sft.get("per_device_train_batch_size", 8)) * int(sft.get("gradient_accumulation_steps", 1)) * gpus
    out: dict[str, Any] = {
        "model": student.model,
        "rows_per_epoch": rows,
        "sequences_per_step": batch,
        "steps_per_epoch": math.ceil(rows["value"] / batch) if rows["value"] is not None else None,
        "max_length": max_length,
        "tokens_per_epoch_at_most": rows["value"] * max_length if rows["value"] is not None and max_length else None,
        "epochs": sft.get("num_train_epochs", 3.0),
    }
    out["memory_per_gpu"] = memory(recipe, gpus=gpus)
    return out


def _eval(recipe: Recipe) -> dict[str, Any]:
    benchmarks = {}
    for source in recipe.eval.benchmarks:
        count, how = _source_count(source)
        benchmarks[source.name] = _count(count, how or "unknown: a hub benchmark (read when eval runs)")
    n, max_tokens = int(recipe.eval.sampling.get("n", 1)), recipe.eval.sampling.get("max_tokens")
    known = [b["value"] for b in benchmarks.values()]
    total = sum(known) if None not in known else None
    models = 1 + int(recipe.eval.compare_base) + int(recipe.eval.compare_sft and recipe.onpolicy is not None)
    generations = total * n * models if total is not None else None
    return {
        "benchmarks": benchmarks,
        "n": n,
        "models": models,
        "generations": generations,
        "completion_tokens_at_most": generations * max_tokens if generations is not None and max_tokens else None,
    }


def memory(recipe: Recipe, *, gpus: int) -> dict[str, Any]:
    """The student's per-GPU memory in GiB, by part, or the reason it cannot be estimated here."""
    from distill import lengths

    student = recipe.student
    config = lengths.load_config(student.model, offline=True)
    if config is None:
        return {"how": f"unknown: {student.model}'s config.json is not on disk or in the Hub cache"}
    config = config.__class__.from_dict({**config.to_dict(), **lengths.init_kwargs(config, student.base_config)})
    total, lora = _parameters(config, peft=student.peft)
    text = config.get_text_config()
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    inter = getattr(text, "intermediate_size", 4 * hidden)
    kv = getattr(text, "num_key_value_heads", text.num_attention_heads) * (hidden // text.num_attention_heads)
    sharding = _sharding(student.accelerate)
    world = max(gpus, 1)
    if student.peft is None:
        bytes_per = STATES.get(sharding, STATES["ddp"])
        states = total * (bytes_per["replicated"] + bytes_per["sharded"] / world)
    else:  # frozen base in bf16 (4-bit for QLoRA, ~0.55 bytes with its scales), adapter trained in fp32 + Adam
        base = 0.55 if student.quantization else 2.0
        states = total * base + lora * 16
    sft = student.sft
    tokens = int(sft.get("per_device_train_batch_size", 8)) * int(sft.get("max_length") or lengths.context(config))
    # Per token and layer, what backward needs in bf16 (SDPA/flash attention, no seq^2 term): the norm inputs and
    # outputs and residuals (6 x hidden), q/k/v (hidden + 2 x kv), the MLP's gate, up, activation and product.
    per_layer = tokens * (2 * (6 * hidden + 2 * kv) + 2 * 4 * inter)
    checkpointing = sft.get("gradient_checkpointing", True)
    activations = layers * 2 * tokens * hidden + per_layer if checkpointing else layers * per_layer
    liger = bool(sft.get("use_liger_kernel"))
    logits = 0 if liger else tokens * vocab * (2 + 4 + 4)  # bf16 logits, fp32 copy for the loss, its gradient
    parts = {"model_states": states, "activations": activations, "logits": logits}
    return {
        "how": f"estimate: {total / 1e9:.2f}B parameters, {sharding} over {world} GPU(s), "
        f"{'LoRA' if student.peft else 'full'}, {tokens:,} tokens per micro-batch, checkpointing "
        f"{'on' if checkpointing else 'off'}, Liger {'on' if liger else 'off'}",
        "parameters": total,
        "trainable": lora if student.peft else total,
        **{name: round(value / GIB, 2) for name, value in parts.items()},
        "total": round(sum(parts.values()) / GIB, 2),
    }


def _sharding(accelerate: str | None) -> str:
    """Which row of STATES a launcher config trains with, read from the config itself (any file, not only ours)."""
    if accelerate is None:
        return "ddp"
    from distill.recipe import read_yaml
    from student.launch import config_file  # lazily, as eval reaches the teacher: distill's modules stay light

    settings = read_yaml(config_file(accelerate))
    kind = settings.get("distributed_type")
    if kind == "FSDP":
        return "fsdp"
    if kind != "DEEPSPEED":
        return "ddp"
    deepspeed = settings.get("deepspeed_config") or {}
    if int(deepspeed.get("zero_stage", 0)) < 3:
        return "zero2"
    return "zero3-offload" if deepspeed.get("offload_param_device", "none") != "none" else "zero3"


def parameters(config: Any) -> int:
    """Every parameter of a model with this config, counted on the `meta` device (no weights are read)."""
    return _parameters(config, peft=None)[0]


def _parameters(config: Any, *, peft: dict[str, Any] | None) -> tuple[int, int]:
    """(all parameters, LoRA parameters) of a skeleton on the `meta` device: exact, and no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in skeleton.parameters())  # tied embeddings are one parameter, counted once
    if peft is None:
        return total, 0
    from peft.tuners.tuners_utils import check_target_module_exists

    from student.arguments import LORA_DEFAULTS, lora_config  # the train stage's own LoraConfig

    lora = lora_config({**LORA_DEFAULTS, **peft}, where="student.peft")
    linear = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    if lora.target_modules == "all-linear" or lora.target_modules is None:
        targets = [m for n, m in linear if not n.endswith("lm_head")]
    else:
        targets = [m for n, m in linear if check_target_module_exists(lora, n)]
    return total, sum(lora.r * (m.in_features + m.out_features) for m in targets)


def render(figures: dict[str, Any]) -> str:
    """The plan as aligned text lines: figure, value, how it was got."""
    lines = [f"plan for {figures['recipe']} on {figures['gpus']} GPU(s)"]

    def row(name: str, value: Any, how: str = "") -> None:
        shown = "unknown" if value is None else f"{value:,}" if isinstance(value, int | float) else str(value)
        lines.append(f"  {name:<42} {shown:>16}  {how}")

    problems = figures["problems"]
    row("problems", problems["value"], problems["how"])
    if teacher := figures.get("teacher"):
        row("teacher generations", teacher["generations"], f"problems x n={teacher['n']}")
        bound = f"at most: x max_tokens={teacher['max_tokens']}"
        row("teacher completion tokens", teacher["completion_tokens_at_most"], bound)
        if "cost_usd_at_most" in teacher:
            row("teacher cost (USD)", teacher["cost_usd_at_most"], "at most: output tokens x price_output_per_m")
        for key, value in (teacher.get("measured") or {}).items():
            row(f"teacher {key}", value, "measured (generate manifest)")
    if student := figures.get("student"):
        rows = student["rows_per_epoch"]
        row("training rows per epoch", rows["value"], rows["how"])
        row("sequences per optimizer step", student["sequences_per_step"], "batch x accumulation x GPUs")
        row("optimizer steps per epoch", student["steps_per_epoch"], f"epochs: {student['epochs']}")
        bound = f"at most: rows x max_length={student['max_length']}"
        row("training tokens per epoch", student["tokens_per_epoch_at_most"], bound)
        mem = student["memory_per_gpu"]
        if "total" in mem:
            for part in ("model_states", "activations", "logits", "total"):
                row(f"student memory per GPU: {part} (GiB)", mem[part], mem["how"] if part == "total" else "")
        else:
            row("student memory per GPU", None, mem["how"])
    if onpolicy := figures.get("onpolicy"):
        row("on-policy answers per step", onpolicy["answers_per_step"], "batch x accumulation x GPUs")
        row(
            "on-policy tokens sampled and scored",
            onpolicy["scored_tokens_at_most"],
            "at most: x max_steps x max_completion_length; the teacher generates none",
        )
        weights = onpolicy["teacher_weights_per_gpu"]
        row("on-policy teacher weights per GPU (GiB)", weights["value"], weights["how"])
    if evaluation := figures.get("eval"):
        for name, count in evaluation["benchmarks"].items():
            row(f"eval problems: {name}", count["value"], count["how"])
        how = f"problems x n={evaluation['n']} x {evaluation['models']} model(s)"
        row("eval generations", evaluation["generations"], how)
        row("eval completion tokens", evaluation["completion_tokens_at_most"], "at most: x max_tokens")
    return "\n".join(lines) + "\n"
