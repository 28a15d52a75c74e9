"""What the stage leaves beside the model: generation_config.json (the stop token), metrics.json and loss.png; and
the one fix-up of the saved model that some backends need (`drop_tied_head`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from distill import files

log = logging.getLogger(__name__)
GENERATION_CONFIG = "generation_config.json"
TIED_HEAD, EMBEDDINGS = "lm_head.weight", "model.embed_tokens.weight"


def write_generation_config(out: Path, *, base: str, eos_token_id: int, pad_token_id: int | None) -> None:
    """Stop at the template's end-of-turn token: vLLM and transformers read eos_token_id from this file, and a
    student whose generation EOS differs from its training EOS runs to max_tokens (open-r1 #603)."""
    from transformers import GenerationConfig

    source = out if (out / GENERATION_CONFIG).is_file() else base
    try:
        config = GenerationConfig.from_pretrained(source)
    except OSError:  # the base ships none
        config = GenerationConfig()
    config.eos_token_id = eos_token_id
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    files.write_json(out / GENERATION_CONFIG, config.to_diff_dict())
    model_config = out / "config.json"  # absent for an adapter folder
    if model_config.is_file():
        values = json.loads(model_config.read_text(encoding="utf-8"))
        values["eos_token_id"] = eos_token_id
        files.write_json(model_config, values)


def losses(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]


def write_loss_plot(path: Path, *, points: list[tuple[int, float]], title: str) -> None:
    """Training loss against optimizer step (PNG; written atomically like every output)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def drop_tied_head(model_dir: Path) -> bool:
    """DeepSpeed ZeRO-2's save (accelerate clones the state dict, so transformers no longer sees the tie) writes the
    output head of a model with tied embeddings as a tensor of its own, a copy of the embeddings. Loaders tie it
    again and ignore the copy, so it only adds vocab x hidden to every upload (0.47 GB for Qwen2.5-1.5B in bf16):
    remove it from the shard that holds it when it equals the embeddings. Returns whether it did."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else None
    where = index["weight_map"] if index else dict.fromkeys((TIED_HEAD, EMBEDDINGS), "model.safetensors")
    if not config.get("tie_word_embeddings") or TIED_HEAD not in where or EMBEDDINGS not in where:
        return False
    shard = model_dir / where[TIED_HEAD]
    with safe_open(shard, "pt") as handle:
        names, metadata = list(handle.keys()), handle.metadata()
        if TIED_HEAD not in names:
            return False
        tensors = {name: handle.get_tensor(name) for name in names}
    with safe_open(model_dir / where[EMBEDDINGS], "pt") as handle:
        embeddings = handle.get_tensor(EMBEDDINGS)
    head = tensors.pop(TIED_HEAD)
    if not torch.equal(head, embeddings):
        return False
    staging = shard.with_name(f".{shard.name}.tmp")
    save_file(tensors, staging, metadata=metadata)
    os.replace(staging, shard)
    if index:
        del index["weight_map"][TIED_HEAD]
        if "total_size" in index.get("metadata", {}):
            index["metadata"]["total_size"] -= head.nbytes
        files.write_json(index_path, index)
    log.info("%s: dropped %s, a saved copy of the tied %s", model_dir, TIED_HEAD, EMBEDDINGS)
    return True
