"""bench/harness.py and bench/table.py on cheap deterministic callables: the timing logic every bench relies on."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    """bench/ is no package (its files are named like the packages they measure): load by path, as the benches do."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = sys.modules.setdefault(f"bench_{name}", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


harness = load("harness")
table = load("table")


def returning(values: list) -> Callable[[], object]:
    """A side that returns `values` in call order, and fails loudly if called more often than that."""
    it = iter(values)
    return lambda: next(it)


def test_bench_harness_interleaves_abba_after_one_uncounted_warmup():
    calls: list[str] = []
    a = lambda: calls.append("a") or 1.0  # noqa: E731
    b = lambda: calls.append("b") or 1.0  # noqa: E731
    result = harness.compare(a, b, rounds=4, log=lambda line: None)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert result.order[:4] == ["warmup:stage", "warmup:raw", "0:stage", "0:raw"]
    assert result.order[4:6] == ["1:raw", "1:stage"]
    assert result.rounds == 4 and len(result.ratios["rate"]) == 4


def test_bench_harness_reports_median_of_per_round_ratios_not_ratio_of_medians():
    # warm-up 100/1 is not counted; rounds: 1/1, 4/1 (B went first), 9/3 -> ratios 1, 4, 3
    a = returning([100.0, 1.0, 4.0, 9.0])
    b = returning([1.0, 1.0, 1.0, 3.0])
    result = harness.compare(a, b, rounds=3, log=lambda line: None)
    assert result.ratios["rate"] == [1.0, 4.0, 3.0]
    assert result.ratio() == 3.0  # the ratio of the medians would be 4 / 1 = 4
    assert result.spread() == [1.0, 4.0]
    assert result.median("stage") == 4.0 and result.median("raw") == 1.0
    fields = result.fields("ratio_vs_raw")
    assert fields["ratio_vs_raw"] == 3.0 and fields["spread"] == [1.0, 4.0] and fields["rounds"] == 3
    assert len(fields["load_avg"]) == 2 and all(x >= 0 for x in fields["load_avg"])
    assert fields["quick"] is False


def test_bench_harness_divides_work_by_seconds_and_keeps_named_quantities():
    a = returning([{"wall": (10, 1.0), "cpu": 8.0, "load_s": 3.0}] * 2)
    b = returning([{"wall": (10, 2.0), "cpu": 4.0}] * 2)
    result = harness.compare(a, b, rounds=1, log=lambda line: None)
    assert result.ratio("wall") == 2.0 and result.ratio("cpu") == 2.0
    assert "load_s" not in result.ratios and result.median("stage", "load_s") == 3.0
    with pytest.raises(KeyError, match="load_s"):
        result.ratio("load_s")


def test_bench_harness_times_real_callables():
    def side(seconds: float) -> tuple[float, float]:
        t0 = time.perf_counter()
        time.sleep(seconds)
        return 1.0, time.perf_counter() - t0

    result = harness.compare(lambda: side(0.001), lambda: side(0.004), rounds=1, log=lambda line: None)
    assert result.ratio() > 1.0  # the faster side has the higher rate


def test_bench_harness_rejects_bad_measurements_naming_the_side():
    with pytest.raises(ValueError, match=r"side raw, rate: expected .* seconds > 0"):
        harness.compare(lambda: 1.0, lambda: (5, 0.0), rounds=1, log=lambda line: None)
    with pytest.raises(TypeError, match="side stage, rate: expected a number"):
        harness.compare(lambda: "fast", lambda: 1.0, rounds=1, log=lambda line: None)
    with pytest.raises(ValueError, match="rounds"):
        harness.compare(lambda: 1.0, lambda: 1.0, rounds=0)


def test_bench_harness_rounds_and_quick_options():
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    assert harness.rounds_of(parser.parse_args([])) == harness.DEFAULT_ROUNDS
    assert harness.rounds_of(parser.parse_args(["--quick"])) == harness.QUICK_ROUNDS
    assert harness.rounds_of(parser.parse_args(["--quick", "--rounds", "5"])) == 5
    with pytest.raises(ValueError, match="--rounds"):
        harness.rounds_of(parser.parse_args(["--rounds", "0"]))
    result = harness.compare(lambda: 2.0, lambda: 1.0, rounds=1, quick=True, log=lambda line: None)
    assert result.fields("ratio_vs_raw")["quick"] is True


def test_bench_every_bench_uses_the_harness_and_states_a_target():
    for path in sorted(BENCH.glob("*.py")):
        if path.stem in ("harness", "table"):
            continue
        text = path.read_text()
        assert "harness.add_arguments(parser)" in text and "harness.compare(" in text, f"{path.name}: no harness"
        assert '"target"' in text, f"{path.name}: its JSON line needs a target for the `make bench` table"


SAMPLES = [
    {
        "bench": "student",
        "ratio_vs_raw": 0.962,
        "spread": [0.95, 0.981],
        "rounds": 3,
        "useful_token_ratio": 0.97,
        "target": {"ratio_vs_raw": ">= 0.95", "useful_token_ratio": ">= 0.9"},
    },
    {"bench": "filter", "ratio_vs_ideal": 0.8, "spread": [0.7, 0.9], "rounds": 1, "quick": True, "rss_growth": 1.2,
     "target": {"ratio_vs_ideal": ">= 0.9", "rss_growth": "< 1.5"}},
    {"bench": "eval", "ratio_vs_raw": 0.93, "spread": [0.9, 0.95], "rounds": 3, "target": 0.9},
    {"bench": "teacher", "skipped": "MATH-500 not found"},
]  # fmt: skip


def test_bench_table_one_row_per_target_with_spread_and_verdict(tmp_path):
    paths = []
    for summary in SAMPLES:
        path = tmp_path / f"{summary['bench']}.out"
        path.write_text(f"round 0 stage: rate 1\nsome log {{not json\n{json.dumps(summary)}\n")
        paths.append(path)
    assert table.last_json(paths[0]) == SAMPLES[0]
    lines = table.render([table.last_json(p) for p in paths]).splitlines()
    assert lines[0].split() == list(table.COLUMNS)
    cells = [line.split() for line in lines[1:]]
    assert cells[0] == ["student", "ratio_vs_raw", "0.962", "0.950-0.981", "3", ">=", "0.95", "yes"]
    assert cells[1] == ["student", "useful_token_ratio", "0.970", "-", "-", ">=", "0.9", "yes"]
    assert cells[2] == ["filter", "ratio_vs_ideal", "0.800", "(quick)", "0.700-0.900", "1", ">=", "0.9", "no"]
    assert cells[3][-3:] == ["<", "1.5", "yes"]
    assert cells[4] == ["eval", "ratio_vs_raw", "0.930", "0.900-0.950", "3", ">=", "0.9", "yes"]
    assert cells[5][:2] == ["teacher", "skipped"]


def test_bench_table_errors_name_the_file_and_the_bound(tmp_path):
    empty = tmp_path / "broken.out"
    empty.write_text("Traceback (most recent call last):\n")
    with pytest.raises(ValueError, match=r"broken\.out: no JSON line"):
        table.last_json(empty)
    with pytest.raises(ValueError, match=r"'~ 0\.9'"):
        table.rows({"bench": "x", "ratio_vs_raw": 1.0, "target": {"ratio_vs_raw": "~ 0.9"}})
