"""Recipe loading: every error names the file and key, pass-through sections are checked against the real classes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distill.errors import RecipeError
from distill.recipe import dump_recipe, load_recipe

BASE = {
    "name": "t",
    "data": {"spec": "math500", "path": "x.jsonl", "limit": 3},
    "teacher": {"model": "some/teacher", "sampling": {"max_tokens": 64}},
    "student": {"model": "some/student", "sft": {"learning_rate": 1e-4}, "peft": {"r": 8}},
    "eval": {"benchmarks": ["math500"]},
}


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_lines(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides=overrides)
    return str(info.value).splitlines()


def test_recipe_valid_base_resolves_r1_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.teacher.sampling == {"temperature": 0.6, "top_p": 0.95, "n": 4, "max_tokens": 64}
    assert recipe.student.sft == {"assistant_only_loss": True, "learning_rate": 1e-4}
    assert recipe.teacher.think_prefix == "<think>\n"
    assert recipe.data[0].limit == 3 and recipe.eval.benchmarks[0].spec == "math500"


def test_recipe_passthrough_typo_names_file_key_and_suggestion(tmp_path):
    bad = {**BASE, "student": {"model": "s", "sft": {"learnig_rate": 1e-5}}}
    path = write(tmp_path, bad)
    assert error_lines(path) == [
        f"{path}: student.sft.learnig_rate: unknown key for trl.SFTConfig (did you mean learning_rate?)"
    ]


def test_recipe_collects_every_error_at_once(tmp_path):
    bad = {
        "name": "t",
        "data": {"spec": "math500", "limti": 3},
        "teacher": {"model": "m", "sampling": {"temprature": 0.7, "max_tokens": "lots"}, "engine": {"model": "x"}},
        "student": {"model": "s", "peft": {"lora_alfa": 16}},
        "eval": {"k": 4},
    }
    path = write(tmp_path, bad)
    lines = error_lines(path)
    assert all(line.startswith(f"{path}: ") for line in lines)
    text = "\n".join(lines)
    assert "data.0.limti: unknown key (did you mean limit?)" in text
    assert "eval.k: unknown key (known keys: benchmarks, model, sampling" in text
    assert "teacher.sampling.temprature: unknown key for vllm.SamplingParams (did you mean temperature?)" in text
    assert "teacher.sampling.max_tokens: expected int for vllm.SamplingParams, got str 'lots'" in text
    assert "teacher.engine.model: set by distill from teacher.model; set it there instead" in text
    assert "student.peft.lora_alfa: unknown key for peft.LoraConfig (did you mean lora_alpha?)" in text
    assert "eval.benchmarks: name at least one benchmark dataset spec, e.g. [math500]" in text
    assert len(lines) == 7


def test_recipe_wrong_type_and_missing_key(tmp_path):
    bad = {"name": "t", "data": {"spec": "math500", "limit": "many"}, "student": {"sft": {}}}
    lines = error_lines(write(tmp_path, bad))
    assert any("data.0.limit: Input should be a valid integer" in line and "'many'" in line for line in lines)
    assert any(line.endswith("student.model: required key is missing") for line in lines)


def test_recipe_engine_keys_checked_against_vllm_llm_and_engine_args(tmp_path):
    good = {
        **BASE,
        "teacher": {
            "model": "m",
            "engine": {
                "tensor_parallel_size": 8,
                "pipeline_parallel_size": 2,
                "distributed_executor_backend": "ray",
                "enable_prefix_caching": True,
            },
        },
    }
    assert load_recipe(write(tmp_path, good)).teacher.engine["tensor_parallel_size"] == 8
    bad = {**BASE, "teacher": {"model": "m", "engine": {"tensor_paralel_size": 8}}}
    assert error_lines(write(tmp_path, bad))[0].endswith(
        "teacher.engine.tensor_paralel_size: unknown key for vllm.LLM (did you mean tensor_parallel_size?)"
    )


def test_recipe_missing_file_and_bad_yaml(tmp_path):
    assert error_lines(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: file not found"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert error_lines(broken)[0].startswith(f"{broken}: not valid YAML")


def test_recipe_overrides_parse_yaml_values_and_list_indexes(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(
        path,
        overrides=(
            "student.sft.learning_rate=1e-5",
            "data.0.limit=7",
            "eval.compare_base=true",
            "teacher.engine.enforce_eager=true",
        ),
    )
    assert recipe.student.sft["learning_rate"] == 1e-5 and isinstance(recipe.student.sft["learning_rate"], float)
    assert recipe.data[0].limit == 7 and recipe.eval.compare_base is True
    assert recipe.teacher.engine == {"enforce_eager": True}
    assert error_lines(path, ("student.sft.learnig_rate=1e-5",))[0].endswith("(did you mean learning_rate?)")
    assert "expected KEY=VALUE" in error_lines(path, ("student.sft.learning_rate",))[0]
    assert "data has 1 items, no '3'" in error_lines(path, ("data.3.limit=1",))[0]


def test_recipe_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\ndata: {spec: math500}\nstudent:\n  model: s\n  sft: {learning_rate: 1e-5, weight_decay: 0}\n"
    )
    sft = load_recipe(path).student.sft
    assert sft["learning_rate"] == 1e-5 and isinstance(sft["learning_rate"], float)


def test_recipe_show_prints_fully_resolved_recipe(tmp_path):
    path = write(tmp_path, BASE)
    out = subprocess.run(
        [sys.executable, "-m", "distill.cli", "recipe", "show", str(path), "--set", "student.sft.learning_rate=1e-5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = yaml.safe_load(out)
    assert shown["student"]["sft"]["learning_rate"] == 1e-5
    assert shown["teacher"]["sampling"]["top_p"] == 0.95 and shown["filter"]["verify"] is True
    assert yaml.safe_load(dump_recipe(load_recipe(path))) == {
        **shown,
        "student": {**shown["student"], "sft": {"assistant_only_loss": True, "learning_rate": 1e-4}},
    }


def test_recipe_cli_error_is_one_message_and_exit_code_2(tmp_path):
    bad = {**BASE, "student": {"model": "s", "sft": {"learnig_rate": 1e-5}}}
    path = write(tmp_path, bad)
    for command in (["recipe", "show"], ["status"], ["filter"], ["run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "distill.cli", *command, str(path)], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 2, command
        assert proc.stderr.strip() == (
            f"error: {path}: student.sft.learnig_rate: unknown key for trl.SFTConfig (did you mean learning_rate?)"
        )
        assert not (tmp_path / "runs").exists(), "a bad recipe must leave nothing behind"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.data
    assert path.read_text().startswith("#"), f"{path.name} must start with a header comment (assumes, how, cost)"


def test_recipe_cross_field_check_pass_k_within_samples(tmp_path):
    bad = {**BASE, "eval": {"benchmarks": ["math500"], "pass_k": [1, 8], "sampling": {"n": 4}}}
    path = write(tmp_path, bad)
    assert error_lines(path) == [f"{path}: eval: pass_k [8] exceeds sampling.n=4, the samples drawn per problem"]


def test_recipe_fingerprints_ignore_fields_left_at_their_default():
    """A field added to the schema with a default changes no stage fingerprint: finished outputs (days of teacher
    traces, a trained model) stay valid when distill is upgraded. Setting a value, even back to a default, is
    judged by the value: at the default it is the same recipe."""
    from distill import pipeline

    options = pipeline.StageOptions()
    plain = load_recipe("recipes/r1-distill-qwen2.5-math-7b.yaml")
    spelled_out = load_recipe(
        "recipes/r1-distill-qwen2.5-math-7b.yaml",
        overrides=["filter.warn_too_long_share=0.2", "teacher.endpoint.extra_body={}", "filter.dedup=true"],
    )
    changed = load_recipe("recipes/r1-distill-qwen2.5-math-7b.yaml", overrides=["filter.dedup=false"])
    for stage in pipeline.STAGES.values():
        assert pipeline.section_hash(plain, stage, options) == pipeline.section_hash(spelled_out, stage, options)
    assert pipeline.section_hash(changed, pipeline.STAGES["filter"], options) != pipeline.section_hash(
        plain, pipeline.STAGES["filter"], options
    )


def test_recipe_length_mix_needs_max_per_problem(tmp_path):
    lines = error_lines(write(tmp_path, {**BASE, "filter": {"selection": "length_mix"}}))
    assert any("filter" in line and "length_mix` needs max_per_problem" in line for line in lines), lines
    bad_share = {**BASE, "filter": {"selection": "length_mix", "max_per_problem": 2, "longest_share": 1.5}}
    assert any("filter.longest_share" in line for line in error_lines(write(tmp_path, bad_share)))
