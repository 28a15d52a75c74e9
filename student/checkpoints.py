"""Push each checkpoint to its own Hub branch as it is saved (`hub.push_checkpoints`), like open-r1's per-step
branches: a long run's intermediate students can be evaluated or recovered before it ends.

Only the main process pushes, only the model files (optimizer, scheduler and RNG states stay local), to
`<run branch>-step-<N>` of `hub.model_repo`, through the same `distill.hub.upload` the push stage uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distill import hub
from distill.errors import RecipeError

LOCAL_ONLY = ["optimizer.pt", "scheduler.pt", "rng_state*.pth", "*.pth", "training_args.bin"]


class PushCheckpoints(TrainerCallback):
    def __init__(self, *, repo_id: str, private: bool, branch: str) -> None:
        self.repo_id, self.private, self.branch = repo_id, private, branch
        self.pushed: list[dict[str, str]] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.pushed.append(
            hub.upload(
                folder,
                repo_id=self.repo_id,
                repo_type="model",
                revision=f"{self.branch}-step-{state.global_step}",
                private=self.private,
                ignore_patterns=LOCAL_ONLY,
            )
        )


def checkpoint_target(recipe: Any) -> dict[str, Any] | None:
    """What `Plan.push_checkpoints` carries to the training processes, or None when not asked for."""
    if recipe.hub is None or not recipe.hub.push_checkpoints:
        return None
    if not recipe.hub.model_repo:
        raise RecipeError("hub.push_checkpoints: needs hub.model_repo, the repo the checkpoints go to")
    return {"repo_id": recipe.hub.model_repo, "private": recipe.hub.private, "branch": hub.default_revision(recipe)}
