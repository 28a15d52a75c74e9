"""Long-context students in one recipe line (`student.base_config`), and recipes whose lengths cannot work refused
by `distill recipe check` with the keys and the numbers. A tiny model with a 256-position context stands in for
Qwen2.5-Math's 4k one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_ENGINE
from distill import files
from distill.cli import main as cli_main
from distill.errors import RecipeError
from distill.schema import Recipe
from distill.tinymodel import build_tiny_model
from student.train import run
from student_data import addition_row, context, make_run

EXTEND = {"max_position_embeddings": 1024, "rope_theta": 40000.0}  # 256 → 1024 positions, as open-r1 did 4k → 32k


@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("short") / "qwen2", max_position_embeddings=256)


def _recipe(tmp_path: Path, model: Path, *, student: dict | None = None, **sections) -> Path:
    data = {
        "name": "long",
        "data": {"spec": "local_jsonl", "path": "problems.jsonl"},
        "teacher": {"backend": "vllm", "model": str(model), "sampling": {"max_tokens": 200}},
        "student": {"model": str(model), "sft": {"max_length": 200}, **(student or {})},
        "eval": {
            "benchmarks": [{"spec": "local_jsonl", "path": "heldout.jsonl"}],
            "sampling": {"n": 1, "max_tokens": 200},
            "pass_k": [1],
        },
    }
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        data[section][key] = {**data[section].get(key, {}), **value}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _check(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = cli_main(["recipe", "check", str(path)])
    return code, [line.removeprefix("error: ") for line in capsys.readouterr().err.splitlines() if str(path) in line]


def test_recipe_check_refuses_each_length_that_cannot_fit(short_model: Path, tmp_path: Path, capsys) -> None:
    path = _recipe(
        tmp_path,
        short_model,
        student__sft={"max_length": 512},
        eval__sampling={"max_tokens": 300},
        teacher__sampling={"max_tokens": 400},
    )
    code, lines = _check(path, capsys)
    assert code == 2
    assert lines == [
        f"{path}: student.sft.max_length: 512 is larger than the student's context (256 positions, "
        "max_position_embeddings); lower it, or extend the context with student.base_config (e.g. "
        "max_position_embeddings: 512, rope_theta: 300000)",
        f"{path}: eval.sampling.max_tokens: 300 + the prompt does not fit the trained student's context (256 "
        "tokens): answers would be cut off and counted wrong; lower max_tokens or raise the context",
        f"{path}: teacher.sampling.max_tokens: 400 + the prompt does not fit teacher.model's context (256 tokens): "
        "answers would be cut off and counted wrong; lower max_tokens or raise the context",
    ]
    code, lines = _check(_recipe(tmp_path, short_model, eval__engine={"max_model_len": 1024}), capsys)
    assert (code, len(lines)) == (2, 1) and "eval.engine.max_model_len: 1024 is longer than the trained student's" in (
        lines[0]
    )
    assert _check(_recipe(tmp_path, short_model), capsys) == (0, [])


def test_base_config_extends_the_context_the_checks_use(short_model: Path, tmp_path: Path, capsys) -> None:
    extended = _recipe(
        tmp_path,
        short_model,
        student={"base_config": EXTEND},
        student__sft={"max_length": 700},
        eval__sampling={"max_tokens": 600},
        eval__engine={"max_model_len": 1024},
    )
    assert _check(extended, capsys) == (0, [])
    too_long = _recipe(tmp_path, short_model, student={"base_config": EXTEND}, student__sft={"max_length": 2048})
    code, lines = _check(too_long, capsys)
    assert code == 2 and lines == [
        f"{too_long}: student.sft.max_length: 2048 is larger than the student's context (1024 positions, "
        "max_position_embeddings after student.base_config); lower it"
    ]


def test_base_config_keys_are_checked_against_the_config_class(short_model: Path, tmp_path: Path, capsys) -> None:
    bad = {"rope_thetta": 1e6, "max_position_embeddings": "long", "hidden_sise": 8}
    code, lines = _check(_recipe(tmp_path, short_model, student={"base_config": bad}), capsys)
    assert code == 2
    assert [line.removeprefix(f"{tmp_path / 'long.yaml'}: ") for line in lines] == [
        "student.base_config.hidden_sise: unknown key for Qwen2Config (did you mean hidden_size?)",
        "student.base_config.max_position_embeddings: expected int like the model's 256, got 'long'",
        "student.base_config.rope_thetta: unknown key for Qwen2Config (did you mean rope_theta?)",
    ]


def _long_rows(n: int) -> list[dict]:
    """Rows of ~600 student tokens (the tiny tokenizer spells digits one by one): longer than the base's 256."""
    rows = []
    for i in range(n):
        row = addition_row(100 + i, 200 + i)
        steps = " ".join(f"{j} + {i}" for j in range(100))
        row["messages"][-1]["content"] = f"<think>\n{steps}\n</think>\n\n\\boxed{{{300 + 2 * i}}}"
        rows.append(row)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora_merged"])
def test_extended_student_trains_on_long_rows_and_vllm_serves_its_context(
    mode: str, short_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    rows = _long_rows(4)
    tokenizer = AutoTokenizer.from_pretrained(short_model)
    text = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert 500 < len(ids) < 700, len(ids)
    sft = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 700, "report_to": "none"}
    lora = {"peft": {"r": 4, "target_modules": "all-linear"}, "merge": True} if mode == "lora_merged" else {}
    student = {"model": str(short_model), "sft": sft, **lora}
    recipe, runs = make_run(tmp_path, rows, student)
    with pytest.raises(RecipeError, match=r"max_length: 700 is larger than the student's context \(256 positions"):
        run(recipe, ctx=context(runs, recipe, tmp_path / "refused"))

    recipe, runs = make_run(tmp_path, rows, {**student, "base_config": EXTEND})
    report = run(recipe, ctx=context(runs, recipe, tmp_path / "work"))
    assert report.counts == {"in": 4, "out": 4, "dropped": {}} and report.extra["global_step"] == 2
    saved = json.loads((tmp_path / "work" / "config.json").read_text())
    assert saved["max_position_embeddings"] == 1024 and saved["rope_parameters"]["rope_theta"] == 40000.0
    metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert metrics["base_config"] == {
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_theta": 40000.0, "rope_type": "default"},
    }
    if mode == "lora_merged":  # the adapter remembers how its base was loaded, for every later merge
        assert files.read_json(tmp_path / "work" / "adapter" / "model_config.json") == metrics["base_config"]

    llm = LLM(model=str(tmp_path / "work"), **{**TINY_ENGINE, "max_model_len": 1024})
    prompt = (ids * 2)[:700]  # past the old 256 positions
    (out,) = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    )
    assert len(out.prompt_token_ids) == 700 and len(out.outputs[0].token_ids) == 300
    assert llm.llm_engine.model_config.max_model_len == 1024


def test_filter_warns_when_the_length_limit_removes_too_much(tiny_model: Path, tmp_path: Path, caplog) -> None:
    from distill import pipeline
    from distill.manifest import Manifest
    from test_filter_stage import place_generate, think, trace

    short, long = think("1 + 1 = 2", "\\boxed{2}"), think(" ".join(["1 + 1 = 2"] * 40), "\\boxed{2}")
    rows = [trace("1 + 1?", "2", text, sample=i) for i, text in enumerate([short, long, long, long])]

    def run_filter(name: str, **settings) -> Manifest:
        place_generate(tmp_path / "runs", name, rows)
        recipe = Recipe.model_validate(
            {
                "name": name,
                "data": {"spec": "local_jsonl", "path": "unused.jsonl"},
                "teacher": {"model": "teacher"},
                "student": {"model": str(tiny_model)},
                "filter": {"workers": 1, "max_tokens": 60, **settings},
            }
        )
        options = pipeline.StageOptions(progress=False)
        return pipeline.run_stage(recipe, "filter", runs_dir=tmp_path / "runs", options=options)

    with caplog.at_level("WARNING", logger="distill.filter"):
        manifest = run_filter("warned")
    expected = "filter.max_tokens removed 3 of the 4 traces that reached it (75%, more than filter.warn_too_long_share"
    assert manifest.counts["dropped"]["too_long"] == 3 and expected in caplog.text
    assert expected in manifest.extra["warnings"][0]
    assert f"> **Warning:** {expected}" in (tmp_path / "runs" / "warned" / "filter" / "funnel.md").read_text()
    assert "warnings" not in run_filter("tolerated", warn_too_long_share=0.8).extra


# Qwen2.5-Math-1.5B's published config.json (the numbers only: no weights are needed to plan)
QWEN25_MATH_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


@pytest.mark.parametrize("path", sorted(Path("recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_plan_runs_on_every_shipped_recipe(path: Path, capsys) -> None:
    assert cli_main(["recipe", "plan", str(path), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for ") and "problems" in out


def test_recipe_plan_of_the_1_5b_recipe_matches_the_hand_computed_figures(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    from transformers import Qwen2Config

    Qwen2Config(**QWEN25_MATH_15B, architectures=["Qwen2ForCausalLM"]).save_pretrained(tmp_path / "base")
    local = [
        f"{{spec: {name}, path: {shared_data / name / 'test.jsonl'}}}" for name in ("math500", "aime24", "aime25")
    ]
    args = ["--set", f"student.model={tmp_path / 'base'}", "--set", f"eval.benchmarks=[{', '.join(local)}]"]
    recipe = "recipes/r1-distill-qwen2.5-math-1.5b.yaml"
    assert cli_main(["recipe", "plan", recipe, "--gpus", "8", "--json", "--runs-dir", str(tmp_path), *args]) == 0
    plan = json.loads(capsys.readouterr().out)
    generations = 20_000 * 4  # data.limit x teacher.sampling.n
    assert plan["problems"] == {"value": 20_000, "how": "at most `limit`"}
    assert plan["teacher"]["generations"] == generations
    assert plan["teacher"]["completion_tokens_at_most"] == generations * 32_768
    student = plan["student"]
    assert student["sequences_per_step"] == 1 * 16 * 8  # batch x accumulation x GPUs
    assert student["steps_per_epoch"] == 625 and student["tokens_per_epoch_at_most"] == generations * 32_768
    memory = student["memory_per_gpu"]
    params = 1_543_714_304  # Qwen2.5-1.5B: 1.54B with tied embeddings
    h, layers, inter, kv, tokens = 1536, 28, 8960, 2 * 128, 32_768
    states = params * (2 + 14 / 8)  # ZeRO-2 over 8 GPUs: bf16 weights whole, gradients + Adam sharded
    activations = layers * 2 * tokens * h + tokens * (2 * (6 * h + 2 * kv) + 2 * 4 * inter)
    assert memory["parameters"] == params
    assert memory["model_states"] == round(states / 2**30, 2) == 5.39
    assert memory["activations"] == round(activations / 2**30, 2) == 5.41
    assert memory["logits"] == 0.0, "use_liger_kernel: the logits are never materialised"
    assert memory["total"] == round((states + activations) / 2**30, 2)
    evaluation = plan["eval"]
    assert {name: b["value"] for name, b in evaluation["benchmarks"].items()} == {
        "math500": 500,
        "aime24": 30,
        "aime25": 30,
    }
    assert evaluation["generations"] == 560 * 16 * 2  # problems x n x (student + base)
    assert evaluation["completion_tokens_at_most"] == 560 * 16 * 2 * 32_768


def test_model_card_records_the_base_config_overrides(tiny_model: Path, tmp_path: Path) -> None:
    from distill.hub_cards import lineage, model_card

    recipe = Recipe.model_validate(
        {
            "name": "long",
            "data": {"spec": "local_jsonl", "path": "unused.jsonl"},
            "student": {"model": "Qwen/Qwen2.5-Math-7B", "base_config": EXTEND},
            "hub": {"model_repo": "me/long-student"},
        }
    )
    card = model_card(recipe, tiny_model, None, facts=lineage(recipe, tmp_path))
    assert (
        "The base's config was changed before training (`student.base_config`): `max_position_embeddings: 1024`, "
        "`rope_theta: 40000.0`; the model's config.json carries it" in card
    )
    assert "base_config:\n  max_position_embeddings: 1024\n  rope_theta: 40000.0\nsft:" in card


def _eval_recipe(tmp_path: Path, model: Path, *, base: Path, **eval_section) -> Recipe:
    files.write_jsonl(
        tmp_path / "heldout.jsonl", [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2)]
    )
    return Recipe.model_validate(
        {
            "name": "long",
            "data": {"spec": "local_jsonl", "path": "unused.jsonl"},
            "student": {"model": str(base)},
            "eval": {
                "model": str(model),
                "benchmarks": [{"spec": "local_jsonl", "path": str(tmp_path / "heldout.jsonl")}],
                "sampling": {"n": 1, "max_tokens": 200, "temperature": 0.0},
                "engine": {**TINY_ENGINE, "max_model_len": 1024},
                "pass_k": [1],
                **eval_section,
            },
        }
    )


@pytest.mark.slow
def test_eval_serves_the_extended_student_at_its_context_and_the_base_at_its_own(
    short_model: Path, tmp_path: Path, caplog
) -> None:
    """compare_base with a student extended to 1024 positions: the base (256) cannot start an engine of 1024, so it
    is scored at its own context with a warning; each model's max_model_len is in the results."""
    import shutil

    from distill import pipeline

    extended = tmp_path / "extended"
    shutil.copytree(short_model, extended)
    config = files.read_json(extended / "config.json")
    files.write_json(extended / "config.json", {**config, "max_position_embeddings": 1024})
    recipe = _eval_recipe(tmp_path, extended, base=short_model, compare_base=True)
    with caplog.at_level("WARNING"):
        pipeline.run_stage(recipe, "eval", runs_dir=tmp_path / "runs", options=pipeline.StageOptions(progress=False))
    results = files.read_json(tmp_path / "runs" / "long" / "eval" / "results.json")
    assert (results["student"]["max_model_len"], results["base"]["max_model_len"]) == (1024, 256)
    assert 0 < results["student"]["longest_prompt_tokens"] == results["base"]["longest_prompt_tokens"] < 100


def test_eval_refuses_a_student_whose_prompt_and_max_tokens_cannot_fit(short_model: Path, tmp_path: Path) -> None:
    from distill import pipeline

    recipe = _eval_recipe(tmp_path, short_model, base=short_model, engine={**TINY_ENGINE, "max_model_len": 256})
    recipe = recipe.model_copy(
        update={"eval": recipe.eval.model_copy(update={"sampling": {"n": 1, "max_tokens": 250}})}
    )
    with pytest.raises(
        RecipeError,
        match=r"eval.sampling.max_tokens: 250 \+ a \d+-token prompt does not fit the "
        r"max_model_len vLLM serves student with \(256 tokens\)",
    ):
        pipeline.run_stage(recipe, "eval", runs_dir=tmp_path / "runs", options=pipeline.StageOptions(progress=False))
    assert not (tmp_path / "runs" / "long" / "eval").exists()
