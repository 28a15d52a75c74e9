"""Stage `push`: publish the filtered dataset and the student to the Hugging Face Hub with lineage cards.

Both repos are first staged as folders under the stage directory, exactly as they will be sent: `dataset/`
(parquet shards as `Dataset.push_to_hub` lays them out, plus a dataset card) and `model/` (safetensors weights or
adapter, tokenizer, generation config, plus a model card with `model-index` metadata). `--dry-run` stops there.
Otherwise each folder goes up with `HfApi.create_repo` (private unless the recipe says otherwise), `create_branch`
(one branch per run) and `upload_folder`. The token comes only from the environment (`HF_TOKEN`) or
`huggingface-cli login`; distill never reads, writes or logs it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from distill import files
from distill.hub_cards import dataset_card, lineage, model_card
from distill.manifest import canonical_hash
from distill.pipeline import StageContext, StageReport, student_stage
from distill.schema import Recipe

log = logging.getLogger(__name__)
# Train-stage files that are bookkeeping, not part of the model repo.
NOT_MODEL_FILES = {"manifest.json", "metrics.json", "training_args.bin"}


def make_api() -> Any:
    """The Hub client; the one seam tests replace with a recorder (the Hub is unreachable from CI)."""
    from huggingface_hub import HfApi

    return HfApi()


def default_revision(recipe: Recipe) -> str:
    """The branch a run pushes to: `hub.revision`, or one named after the run and its recipe hash."""
    return recipe.hub.revision or f"run-{recipe.name}-{canonical_hash(recipe.model_dump(mode='json'))[:8]}"


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    hub = recipe.hub
    facts = lineage(recipe, ctx.run_dir)
    revision = default_revision(recipe)
    staged: dict[str, tuple[str, str, Path]] = {}
    if hub.dataset_repo:
        folder = stage_dataset(recipe, ctx.inputs["filter"], ctx.work_dir / "dataset", facts=facts)
        staged["dataset"] = (hub.dataset_repo, "dataset", folder)
    if hub.model_repo:
        student_dir = ctx.inputs[student_stage(recipe)]
        folder = stage_model(recipe, student_dir, ctx.inputs.get("eval"), ctx.work_dir / "model", facts=facts)
        staged["model"] = (hub.model_repo, "model", folder)
    sent = [] if ctx.options.dry_run else push(staged, revision=revision, private=hub.private)
    files.write_json(ctx.work_dir / "push.json", {"revision": revision, "dry_run": ctx.options.dry_run, "sent": sent})
    count = sum(1 for _, _, folder in staged.values() for p in folder.rglob("*") if p.is_file())
    log.info(
        "push: %d repos, %d files, revision %s%s",
        len(staged),
        count,
        revision,
        " (dry run: nothing sent)" if ctx.options.dry_run else "",
    )
    return StageReport(
        counts={"in": count, "out": 0 if ctx.options.dry_run else count, "dropped": {}},
        extra={
            "repos": {kind: repo for kind, (repo, _, _) in staged.items()},
            "revision": revision,
            "dry_run": ctx.options.dry_run,
        },
    )


def stage_dataset(recipe: Recipe, filter_dir: Path, out: Path, *, facts: dict[str, Any]) -> Path:
    """Kept traces as `data/train-00000-of-00001.parquet` (the layout `Dataset.push_to_hub` writes) + card."""
    import datasets

    kept = datasets.load_dataset("json", data_files=str(filter_dir / "kept.jsonl"), split="train")
    (out / "data").mkdir(parents=True, exist_ok=True)
    kept.to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    files.write_text(out / "README.md", dataset_card(recipe, filter_dir, rows=len(kept), facts=facts))
    return out


def stage_model(recipe: Recipe, train_dir: Path, eval_dir: Path | None, out: Path, *, facts: dict[str, Any]) -> Path:
    """The trained model folder as the Hub will hold it: weights, tokenizer, configs, and the model card."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(train_dir.iterdir()):
        if path.is_file() and path.name not in NOT_MODEL_FILES and files.TMP_MARK not in path.name:
            shutil.copy2(path, out / path.name)
    results = (
        files.read_json(eval_dir / "results.json") if eval_dir and (eval_dir / "results.json").is_file() else None
    )
    files.write_text(out / "README.md", model_card(recipe, train_dir, results, facts=facts))
    return out


def push(staged: dict[str, tuple[str, str, Path]], *, revision: str, private: bool) -> list[dict[str, str]]:
    """Upload each staged folder to its repo's branch for this run."""
    return [
        upload(folder, repo_id=repo_id, repo_type=repo_type, revision=revision, private=private)
        for repo_id, repo_type, folder in staged.values()
    ]


def upload(
    folder: Path,
    *,
    repo_id: str,
    repo_type: str,
    revision: str,
    private: bool,
) -> dict[str, str]:
    """Create the repo (if needed) and the branch, then upload `folder` to that branch. Also used by the student
    to push each checkpoint's model files to its own branch while it trains (`hub.push_checkpoints`)."""
    api = make_api()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        revision=revision,
        commit_message=f"distill: {folder.name} from run {revision}",
    )
    log.info("pushed %s %s@%s", repo_type, repo_id, revision)
    return {"repo": repo_id, "type": repo_type, "revision": revision, "commit": str(info)}
