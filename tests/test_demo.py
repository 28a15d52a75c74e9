"""`make demo`: the synthetic task, the derived ablation recipes, and the whole demo shrunk, end to end, for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill.data import last_boxed
from distill.demo.ablation import UNFILTERED, answers_only, variants
from distill.demo.budget import CONTINUED
from distill.demo.report import BUDGET_ROWS, ROWS
from distill.demo.task import Addition, sample_problems
from distill.recipe import load_recipe
from distill.records import split_reasoning

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"


def test_task_reasoning_reaches_the_answer_column_by_column() -> None:
    problem = Addition((347, 85))
    reasoning, final = split_reasoning(problem.completion())
    assert reasoning.splitlines() == [
        "347 = 3 hundreds, 4 tens, 7 ones",
        "85 = 0 hundreds, 8 tens, 5 ones",
        "ones: 7+5+0=12, carry 1, so far 2",
        "tens: 4+8+1=13, carry 1, so far 32",
        "hundreds: 3+0+1=4, carry 0, so far 432",
    ]
    assert last_boxed(final) == "432"
    for problem in sample_problems(300, seed=7):
        reasoning, final = split_reasoning(problem.completion())
        assert reasoning.splitlines()[-1].endswith(f"so far {sum(problem.numbers)}")
        assert last_boxed(final) == problem.answer == str(sum(problem.numbers))


def test_task_splits_are_deterministic_and_disjoint() -> None:
    heldout = sample_problems(200, seed=1)
    train = sample_problems(500, seed=2, exclude={p.numbers for p in heldout})
    assert heldout == sample_problems(200, seed=1)
    assert len({p.numbers for p in train}) == 500
    assert not {p.numbers for p in train} & {p.numbers for p in heldout}
    assert all(10 <= n <= 999 for p in train for n in p.numbers)


def test_answers_only_keeps_prompt_and_answer_and_drops_the_reasoning() -> None:
    completion = Addition((12, 35)).completion()
    reasoning, final = split_reasoning(completion)
    prompt = [{"role": "user", "content": "What is 12 + 35?"}]
    row = {"reasoning": reasoning, "final": final, "messages": [*prompt, {"role": "assistant", "content": completion}]}
    derived = answers_only(row)
    assert derived["messages"][0] == prompt[0]
    assert derived["messages"][1]["content"] == "<think>\n\n</think>\n\n\\boxed{47}"
    assert split_reasoning(derived["messages"][1]["content"]) == ("", "\\boxed{47}")
    assert row["messages"][1]["content"] == completion  # the distill run's row is not modified


def test_variants_change_only_what_their_row_is_about() -> None:
    recipe = load_recipe(DEMO)
    derived = variants(recipe)
    assert {v.name for v in derived.values()} == {
        "demo-answers",
        "demo-unfiltered",
        "demo-teacher",
        "demo-few",
        "demo-more",
    }
    for key, variant in derived.items():
        assert variant.data == recipe.data and variant.teacher == recipe.teacher
        assert variant.student == recipe.student or key == "more"
        assert variant.hub is None and variant.eval.benchmarks == recipe.eval.benchmarks
        assert variant.eval.sampling == recipe.eval.sampling and not variant.eval.compare_base
        curve = recipe.eval.thinking_budgets if key == "teacher" else []
        assert variant.eval.thinking_budgets == curve, "the budget curve: the distill student's and the teacher's"
    assert derived["answers"].filter == recipe.filter
    unfiltered = derived["unfiltered"].filter.model_dump()
    assert unfiltered == {**recipe.filter.model_dump(), **UNFILTERED}
    assert derived["teacher"].eval.model == recipe.teacher.model
    assert derived["few"].filter == derived["more"].filter == recipe.filter and derived["more"].onpolicy is None
    few = derived["few"]
    assert few.eval.compare_sft and few.onpolicy.config["max_steps"] == recipe.student.sft["max_steps"] // 8
    assert few.onpolicy.teacher is None and few.onpolicy.prompts == [], "the recipe's teacher, every problem"
    more = derived["more"].student
    assert more.model == "runs/demo-few/train", "continues the few student"
    assert more.sft == {**recipe.student.sft, **CONTINUED, "max_steps": few.onpolicy.config["max_steps"]}
    assert CONTINUED["learning_rate"] == few.onpolicy.config["learning_rate"]


def test_budget_gives_the_sft_row_the_teacher_tokens_of_the_on_policy_row(tmp_path: Path) -> None:
    """`more` gets the first problems whose generated tokens cover `few`'s plus the expected scored tokens."""
    from distill import files
    from distill.demo import budget

    traces = [{"id": f"p{i}", "sample": s, "completion_tokens": 100 + i} for i in range(40) for s in (0, 1)]
    files.write_jsonl(tmp_path / "shard-0-of-1.jsonl", traces)
    kept = [{"id": f"p{i}", "completion_tokens": 100} for i in range(40)]  # one kept trace per problem
    spend = budget.plan(tmp_path, kept, steps=2)
    assert spend.few == ["p0", "p1", "p2", "p3"], "a tenth of the 40 kept traces"
    assert spend.expected_scored == 2 * 8 * 100
    assert spend.tokens(spend.few) == sum(2 * (100 + i) for i in range(4))
    before_last = spend.tokens(spend.more[:-1])
    assert before_last < spend.tokens(spend.few) + spend.expected_scored <= spend.tokens(spend.more)


@pytest.mark.slow
def test_demo_shrunk_end_to_end(tmp_path: Path) -> None:
    """prepare → `distill run` → ablate on a few problems: every stage of every run finishes and the report has
    every row. (Accuracies at this size are noise; `make demo` measures them.)"""
    shrink = [
        "--set", "data.0.limit=24",
        "--set", "teacher.sampling.n=1",
        "--set", "teacher.sampling.temperature=0",  # greedy (needs n=1): the most correct traces
        "--set", "student.sft.max_steps=20",
        "--set", "eval.benchmarks.0.limit=12",
        "--set", "eval.sampling.n=2",
        "--set", "eval.pass_k=[1, 2]",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}

    def distill(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "distill.cli", *args, "--no-progress"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    # The teacher keeps its full training (800 steps, ~1.5 min): a shorter one gets no trace right (measured: 400
    # steps, 0 of 48; 800 steps at temperature 1.0, 4 of 48), and the train stage rightly refuses an empty kept set.
    prepare = ["--problems", "24", "--heldout", "12"]
    distill("demo", "prepare", str(DEMO), *shrink, *prepare)
    distill("run", str(DEMO), *shrink, "--dry-run")
    report = distill("demo", "ablate", str(DEMO), *shrink)

    runs = tmp_path / "runs"
    expected = {
        "demo": ("generate", "filter", "train", "eval", "push"),
        "demo-answers": ("generate", "filter", "train", "eval"),
        "demo-unfiltered": ("generate", "filter", "train", "eval"),
        "demo-teacher": ("eval",),
        "demo-few": ("generate", "filter", "train", "onpolicy", "eval"),
        "demo-more": ("generate", "filter", "train", "eval"),
    }
    for run, stages in expected.items():
        for stage in stages:
            assert (runs / run / stage / "manifest.json").is_file(), f"{run}/{stage} did not finish"
    assert (runs / "demo" / "report.md").read_text(encoding="utf-8") == report.rstrip("\n") + "\n"
    for _, label in (*ROWS, *BUDGET_ROWS):
        assert f"| {label} |" in report
    assert "on-policy minus SFT at the same teacher tokens" in report
    assert (runs / "demo" / "accuracy.png").stat().st_size > 0
    headline = next(line for line in report.splitlines() if line.startswith("| SFT on filtered traces"))
    assert re.fullmatch(r"\| .+ \| [\d.]+ \| [\d.]+–[\d.]+ \| [\d.]+ \| .+ / .+ \([\d.]+%\) \| \d+ \|", headline), (
        "pass@1, its interval, maj@k, thinking tokens of correct / wrong samples (share cut), training rows"
    )
    assert "## Thinking budget" in report and (runs / "demo" / "thinking-budget.png").stat().st_size > 0
    for model in ("distill student", "teacher"):
        for budget in (*load_recipe(DEMO).eval.thinking_budgets, "none"):
            assert f"| {model} | {budget} |" in report
    unfiltered = json.loads((runs / "demo-unfiltered" / "filter" / "funnel.json").read_text())
    assert unfiltered["out"] == unfiltered["in"] == 24  # nothing filtered: every trace trains
    kept = [json.loads(line) for line in (runs / "demo-answers" / "filter" / "kept.jsonl").open()]
    assert kept and all(row["messages"][-1]["content"].startswith("<think>\n\n</think>") for row in kept)
