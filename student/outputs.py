"""What the stage leaves beside the model: generation_config.json (the stop token), metrics.json and loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill import files

GENERATION_CONFIG = "generation_config.json"


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
