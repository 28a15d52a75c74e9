"""The demo's on-policy rows, compared at an equal teacher budget, and the intervals of every row.

On-policy distillation is sold on cost: the teacher scores the student's samples (one forward pass) instead of
generating traces. So the rows are (measured before they were built, see the issue's notes: on this task an SFT
student trained on verified traces beats its own teacher, and reverse KL to that teacher can only pull it back):

- `few`: SFT on the kept traces of the first problems only (a tenth of the kept traces), the demo's SFT settings
  (a quarter of its steps, tried to save time, left the student at 0.0: it had not yet learned the format);
- `few` + on-policy: then `onpolicy_steps` on-policy steps from that student, prompts from every problem;
- `more`: the `few` student again, SFT-continued for as many steps, at the same learning rate, on the kept traces
  of the first K problems, K chosen so the teacher generated as many tokens for them as `few` cost plus the
  expected scored tokens of the on-policy steps: the same start, the same extra steps, the same teacher tokens.

Teacher tokens are completion tokens: generated (every sample of the problems used, kept or not) and scored (the
student's sampled completions; the prompts the teacher also reads are reported beside them). Intervals and paired
differences are `distill.intervals`'.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import files

FEW_SHARE = 0.1  # of the kept traces, for the `few` rows
ONPOLICY = {  # trl.DistillationConfig for the on-policy row (lr 1e-3 collapsed a tiny student; 3e-4 did best)
    "beta": 1.0,
    "temperature": 1.0,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 8,
    "max_completion_length": 140,  # a correct answer takes <= 125 tokens
    "logging_steps": 1,  # per-step sample lengths: the scored tokens are counted exactly
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}


# student.sft changes of the `more` row, which continues the `few` student as the on-policy row does
CONTINUED = {"learning_rate": ONPOLICY["learning_rate"], "lr_scheduler_type": "constant", "warmup_steps": 0}


def onpolicy_steps(sft_steps: int) -> int:
    """An eighth of the SFT steps (125 for the demo's 1000): each costs ~5-7x an SFT step on CPU."""
    return max(1, sft_steps // 8)


@dataclass(frozen=True)
class Budget:
    few: list[str]  # problem ids of the `few` rows, in data order
    more: list[str]  # problem ids of the equal-budget SFT row
    generated: dict[str, int]  # teacher completion tokens per problem (all its samples)
    expected_scored: int  # scored completion tokens the on-policy steps should take (the kept traces' mean length)

    def tokens(self, ids: list[str]) -> int:
        return sum(self.generated.get(i, 0) for i in ids)


def plan(generate_dir: Path, kept: list[dict[str, Any]], *, steps: int) -> Budget:
    """The problems of the `few` and `more` rows, from the distill run's traces (nothing is generated again)."""
    generated: dict[str, int] = defaultdict(int)
    order: list[str] = []
    for path in sorted(generate_dir.glob("shard-*.jsonl")):
        for trace in files.read_jsonl(path):
            if trace["id"] not in generated:
                order.append(trace["id"])
            generated[trace["id"]] += int(trace.get("completion_tokens") or 0)
    kept_per_problem: dict[str, int] = defaultdict(int)
    for row in kept:
        kept_per_problem[row["id"]] += 1
    wanted, few, count = max(1, math.ceil(FEW_SHARE * len(kept))), [], 0
    for problem in order:
        if count >= wanted:
            break
        few.append(problem)
        count += kept_per_problem[problem]
    mean = sum(int(r.get("completion_tokens") or 0) for r in kept) / max(len(kept), 1)
    expected = round(steps * ONPOLICY["per_device_train_batch_size"] * mean)
    target = sum(generated[i] for i in few) + expected
    more, total = [], 0
    for problem in order:
        if total >= target:
            break
        more.append(problem)
        total += generated[problem]
    return Budget(few=few, more=more, generated=dict(generated), expected_scored=expected)
