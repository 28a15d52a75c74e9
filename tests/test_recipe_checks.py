"""Every error a recipe alone decides is found by `load_recipe` (so `distill recipe check` reports it, exit 2) with
the file and the dotted key, not when a stage runs: cross-section rules, empty sections, and values the pass-through
library would refuse (`vllm.SamplingParams` bounds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill import files, passthrough
from distill.errors import RecipeError
from distill.recipe import load_recipe

BASE = {"name": "t", "data": {"spec": "math500", "path": "x.jsonl"}, "teacher": {"model": "m"}}
PASS_K = "eval: pass_k [1] exceeds sampling.n=0, the samples drawn per problem"
# (recipe sections on top of BASE, the error lines after the file name), one per rule
BAD = {
    "compare_base_without_student": (
        {"eval": {"benchmarks": ["math500"], "compare_base": True}},
        ["eval.compare_base: needs student.model (the base to compare with) in the recipe"],
    ),
    "empty_benchmarks": (
        {"eval": {"benchmarks": []}},
        ["eval.benchmarks: name at least one benchmark dataset spec, e.g. [math500]"],
    ),
    "no_benchmarks_key": (
        {"eval": {"pass_k": [1]}},
        ["eval.benchmarks: name at least one benchmark dataset spec, e.g. [math500]"],
    ),
    "pass_rate_without_verify": (
        {"filter": {"verify": False, "pass_rate": [0.2, 0.8]}},
        ["filter.pass_rate: needs filter.verify: true (the pass rate counts verified answers)"],
    ),
    "max_tokens_without_student": (
        {"filter": {"max_tokens": 1000}},
        ["filter.max_tokens: counting needs the student's tokenizer; set student.model"],
    ),
    "both_cross_section_rules_at_once": (
        {"filter": {"max_tokens": 1000}, "eval": {"benchmarks": ["math500"], "compare_base": True}},
        [
            "filter.max_tokens: counting needs the student's tokenizer; set student.model",
            "eval.compare_base: needs student.model (the base to compare with) in the recipe",
        ],
    ),
    "teacher_n_negative": (
        {"teacher": {"model": "m", "sampling": {"n": -1}}},
        ["teacher.sampling.n: expected at least 1 for vllm.SamplingParams, got -1"],
    ),
    "eval_n_zero": (
        {"eval": {"benchmarks": ["math500"], "sampling": {"n": 0}}},
        [PASS_K, "eval.sampling.n: expected at least 1 for vllm.SamplingParams, got 0"],
    ),
    "max_tokens_zero": (
        {"teacher": {"model": "m", "sampling": {"max_tokens": 0}}},
        ["teacher.sampling.max_tokens: expected at least 1 for vllm.SamplingParams, got 0"],
    ),
    "temperature_negative": (
        {"teacher": {"model": "m", "sampling": {"temperature": -1}}},
        ["teacher.sampling.temperature: expected a value in [0, 2] for vllm.SamplingParams, got -1"],
    ),
    "top_p_zero_and_penalty_too_big": (
        {"eval": {"benchmarks": ["math500"], "sampling": {"top_p": 0, "presence_penalty": 2.5}}},
        [
            "eval.sampling.top_p: expected a value in (0, 1] for vllm.SamplingParams, got 0",
            "eval.sampling.presence_penalty: expected a value in [-2, 2] for vllm.SamplingParams, got 2.5",
        ],
    ),
}


def write(tmp_path: Path, sections: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections}, sort_keys=False))
    return path


@pytest.mark.parametrize("name", BAD)
def test_recipe_check_reports_rule_with_file_and_key(tmp_path: Path, name: str) -> None:
    sections, expected = BAD[name]
    path = write(tmp_path, sections)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).splitlines() == [f"{path}: {line}" for line in expected]


def test_recipe_check_cli_exits_2_with_every_line(tmp_path: Path) -> None:
    for name in ("both_cross_section_rules_at_once", "top_p_zero_and_penalty_too_big"):
        sections, expected = BAD[name]
        path = write(tmp_path, sections)
        proc = subprocess.run(
            [sys.executable, "-m", "distill.cli", "recipe", "check", str(path)], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == "error: " + "\n".join(f"{path}: {line}" for line in expected)


def test_recipe_values_at_the_bounds_load(tmp_path: Path) -> None:
    sampling = {"n": 1, "max_tokens": 1, "temperature": 0, "top_p": 1, "top_k": -1, "repetition_penalty": 0.1}
    path = write(tmp_path, {"teacher": {"model": "m", "sampling": sampling}})
    assert load_recipe(path).teacher.sampling["top_k"] == -1


def test_sampling_bounds_match_what_vllm_refuses() -> None:
    """The bounds table mirrors `SamplingParams._verify_args`: vLLM accepts the value on the bound (or just inside
    an open one) and refuses the value just outside, on each side."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for key, bound in passthrough.BOUNDS[passthrough.SAMPLING.label].items():
        step = 0.5 if bound.low_open or bound.high is not None else 1  # int fields have no upper bound
        edges = [(bound.low + (step if bound.low_open else 0), bound.low - (0 if bound.low_open else step))]
        if bound.high is not None:
            edges.append((bound.high, bound.high + step))
        for inside, outside in edges:
            assert bound.holds(inside) and not bound.holds(outside), key
            SamplingParams(**{key: inside})
            with pytest.raises(VLLMValidationError):
                SamplingParams(**{key: outside})


def test_recipe_check_names_section_and_library_that_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed vLLM that fails to import (a broken install, stood in for by a package ahead of it on the path
    that raises ImportError) is one RecipeError line per section it feeds, not a traceback."""
    passthrough.library_fields(passthrough.SAMPLING)  # the session's cache, read with the real vLLM
    version = passthrough.installed_version(passthrough.SAMPLING)
    cache = json.loads(passthrough._cache_path().read_text())
    del cache[f"{passthrough.SAMPLING.label}@{version}"]  # only these fields are read again (the rest is cached)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    files.write_json(passthrough._cache_path(), cache)
    shadow = tmp_path / "shadow" / "vllm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    path = write(tmp_path, {"teacher": {"model": "m", "sampling": {"n": 2}}})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == (
        f"{path}: teacher.sampling: could not read the fields of vllm.SamplingParams from the installed {version} "
        "(ImportError: simulated broken install); the stage that uses it would fail too: repair or reinstall vllm"
    )
