"""Push each checkpoint to its own Hub branch as it is saved (`hub.push_checkpoints`), like open-r1's per-step
branches: a long run's intermediate students can be evaluated or recovered before it ends.

What goes up is an allow-list of the checkpoint's top-level files (weights, configs, tokenizer, chat template):
never optimizer, scheduler or RNG states, nor DeepSpeed's `global_step*/` folders, which hold about 90 GB of Adam
state per 7B checkpoint. The upload runs in a background thread on the main process: the other ranks go on training
instead of waiting in a collective while rank 0 sends gigabytes (long enough to hit the distributed timeout).
Uploads go one at a time, in order, to `<run branch>-step-<N>` of `hub.model_repo`, through the same
`distill.hub.upload` the push stage uses; the trainer waits for them after its last collective (`wait`).

Each upload sends a snapshot: hard links to the allowed files in `checkpoints/.push/checkpoint-N`, so rotation
(`save_total_limit`) may delete the checkpoint before its upload ends. A snapshot is removed once sent; one left by
a failed upload or a killed run is sent again when training resumes.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distill import hub
from distill.errors import RecipeError

log = logging.getLogger(__name__)
MODEL_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.jinja",
)
SNAPSHOTS = ".push"


def model_files(folder: Path) -> list[Path]:
    """The checkpoint's top-level files a model repo needs, sorted; subfolders (DeepSpeed states) never qualify."""
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, m) for m in MODEL_FILES))


def snapshot(folder: Path, out: Path) -> Path:
    """Hard links (copies where the filesystem has none) to `folder`'s model files in `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in model_files(folder):
        try:
            os.link(path, out / path.name)
        except OSError:
            shutil.copy2(path, out / path.name)
    return out


class PushCheckpoints(TrainerCallback):
    def __init__(self, *, repo_id: str, private: bool, branch: str) -> None:
        self.repo_id, self.private, self.branch = repo_id, private, branch
        self.uploads: list[tuple[Path, Future[dict[str, str]]]] = []
        self.executor: ThreadPoolExecutor | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        for left in sorted((Path(args.output_dir) / SNAPSHOTS).glob("checkpoint-*")):
            log.info("push_checkpoints: %s was not sent before; sending it now", left.name)
            self._submit(left)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        self._submit(snapshot(Path(args.output_dir) / name, Path(args.output_dir) / SNAPSHOTS / name))

    def _submit(self, folder: Path) -> None:
        self.executor = self.executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-checkpoints")
        step = folder.name.rpartition("-")[2]
        future = self.executor.submit(
            hub.upload,
            folder,
            repo_id=self.repo_id,
            repo_type="model",
            revision=f"{self.branch}-step-{step}",
            private=self.private,
        )
        self.uploads.append((folder, future))

    def wait(self) -> dict[str, list[Any]]:
        """Block until every upload has ended (call it after the last collective): what was sent, and what was
        not (its snapshot stays for the next run, or a manual `huggingface-cli upload`)."""
        sent, failed = [], []
        for folder, future in self.uploads:
            try:
                sent.append(future.result())
            except Exception as exc:  # a failed upload must not fail a finished training run; it is reported
                log.warning(
                    "push_checkpoints: %s was not sent (%s: %s); its snapshot is kept", folder, type(exc).__name__, exc
                )
                failed.append({"checkpoint": folder.name, "error": f"{type(exc).__name__}: {exc}"})
            else:
                shutil.rmtree(folder, ignore_errors=True)
        if self.executor is not None:
            self.executor.shutdown()
        self.uploads = []
        return {"sent": sent, "failed": failed}


def checkpoint_target(recipe: Any) -> dict[str, Any] | None:
    """What `Plan.push_checkpoints` carries to the training processes, or None when not asked for."""
    if recipe.hub is None or not recipe.hub.push_checkpoints:
        return None
    if not recipe.hub.model_repo:
        raise RecipeError("hub.push_checkpoints: needs hub.model_repo, the repo the checkpoints go to")
    return {"repo_id": recipe.hub.model_repo, "private": recipe.hub.private, "branch": hub.default_revision(recipe)}
