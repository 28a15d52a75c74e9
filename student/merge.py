"""`distill merge ADAPTER OUT [--base BASE]`: fold a LoRA adapter into its base and write a full model.

A merged model serves like any other (vLLM, transformers) without PEFT. The output folder is assembled beside OUT
and renamed into place, so a kill never leaves a half-written model under OUT. The adapter folder's tokenizer and
generation_config.json (the trained end-of-turn token) are kept; the base's are used only when the adapter has none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import DistillError

log = logging.getLogger(__name__)
GENERATION_CONFIG = "generation_config.json"
# `student.base_config` as applied to the base when the adapter was trained (a longer context, a new rope_theta):
# the base loads with it again here, so the merged model keeps the context the adapter was trained at.
MODEL_CONFIG = "model_config.json"


def merge_adapter(adapter: Path, *, out: Path, base: str | None = None) -> Path:
    """Merge `adapter` into `base` (default: the adapter's `base_model_name_or_path`) and write it to `out`."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise DistillError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    if out.exists() and any(out.iterdir()):
        raise DistillError(f"{out}: exists and is not empty; choose a new folder for the merged model")
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base:
        raise DistillError(f"{adapter}/adapter_config.json names no base model; pass --base")
    overrides = (
        json.loads((adapter / MODEL_CONFIG).read_text(encoding="utf-8")) if (adapter / MODEL_CONFIG).is_file() else {}
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", **overrides)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if (adapter / GENERATION_CONFIG).is_file():
            shutil.copyfile(adapter / GENERATION_CONFIG, staging / GENERATION_CONFIG)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("merged %s into %s → %s", adapter, base, out)
    return out


def main(args: argparse.Namespace) -> int:
    merge_adapter(args.adapter, out=args.out, base=args.base)
    print(args.out)
    return 0
