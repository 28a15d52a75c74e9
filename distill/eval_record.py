"""What one model's scoring records beside its scores: how many tokens its samples thought for, and everything that
can move a score (engine, versions, sampling, prompts, templates), so two results can be compared or reproduced.

Token use: wrong answers running ~3x longer than right ones is a known signature of a reasoning model that loops
(DeepScaleR), and a large share cut by `max_tokens` says the budget, not the model, decided the score.
"""

from __future__ import annotations

import statistics
from typing import Any

from distill.manifest import canonical_hash, package_versions
from distill.records import CUT_SHORT, Trace
from distill.schema import Teacher

# vLLM engine settings that change samples or their order, read from the running engine (not only the recipe's)
ENGINE_FIELDS = {
    "dtype": ("model_config", "dtype"),
    "max_model_len": ("model_config", "max_model_len"),
    "seed": ("model_config", "seed"),
    "tensor_parallel_size": ("parallel_config", "tensor_parallel_size"),
    "pipeline_parallel_size": ("parallel_config", "pipeline_parallel_size"),
    "data_parallel_size": ("parallel_config", "data_parallel_size"),
    "max_num_seqs": ("scheduler_config", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens"),
    "enable_prefix_caching": ("cache_config", "enable_prefix_caching"),
    "kv_cache_dtype": ("cache_config", "cache_dtype"),
}


def thinking_tokens(trace: Trace, tokenizer: Any) -> int:
    """Tokens spent thinking: counted at generation when it tracked them (a thinking budget), else the think block
    re-tokenised with the model's tokenizer; a sample that never closed it thought for all of its tokens. Without a
    tokenizer (an endpoint), its completion tokens."""
    counted = getattr(trace, "thinking_tokens", None)
    if counted is not None:
        return counted
    if tokenizer is None or "</think>" not in trace.completion:
        return trace.completion_tokens
    return len(tokenizer.encode(trace.reasoning, add_special_tokens=False))


def token_use(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and median thinking tokens of correct and of wrong samples, and the share cut by max_tokens."""

    def summary(values: list[int]) -> dict[str, Any]:
        if not values:
            return {"samples": 0, "mean": None, "median": None}
        return {"samples": len(values), "mean": statistics.fmean(values), "median": statistics.median(values)}

    correct = [r["thinking_tokens"] for r in rows if r["verdict"]["correct"]]
    wrong = [r["thinking_tokens"] for r in rows if not r["verdict"]["correct"]]
    cut = sum(r["finish_reason"] in CUT_SHORT for r in rows)
    return {
        "correct": summary(correct),
        "wrong": summary(wrong),
        "cut_by_max_tokens": cut / len(rows) if rows else 0.0,
    }


def reproducibility(teacher: Teacher, llm: Any, *, prompts: dict[str, str]) -> dict[str, Any]:
    """The settings behind a model's samples: the engine as it ran, package versions, sampling, and hashes of the
    prompt templates and the chat template (a changed template changes every prompt)."""
    record: dict[str, Any] = {
        "backend": teacher.backend,
        "engine_arguments": teacher.engine,
        "sampling": teacher.sampling,
        "think_prefix": teacher.think_prefix,
        "system_prompt": teacher.system_prompt,
        "prompt_template_hash": canonical_hash({"default": teacher.prompt, "per_benchmark": prompts})[:16],
        "versions": package_versions(),
    }
    if teacher.thinking_budget is not None:
        record["thinking_budget"] = teacher.thinking_budget.model_dump()
    if llm is None:
        record["endpoint"] = teacher.endpoint.model_dump(mode="json") if teacher.endpoint else None
        record["engine"] = None  # a server's settings are its own; only what it reports per sample is known
        return record
    config = llm.llm_engine.vllm_config
    record["engine"] = {
        name: _plain(getattr(getattr(config, part), key, None)) for name, (part, key) in ENGINE_FIELDS.items()
    }
    template = getattr(llm.get_tokenizer(), "chat_template", None)
    record["chat_template_hash"] = canonical_hash(template)[:16] if template else None
    return record


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
