"""The onpolicy stage's checks before any step: a foreign or renamed tokenizer is refused naming GOLD (a teacher
may know more tokens), the answer must start as SFT taught, lengths fit, and `recipe plan` says where the teacher's
weights go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill import vocab
from distill.errors import RecipeError
from distill.recipe import load_recipe
from onpolicy_data import build_models, distill_cli, onpolicy_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("onpolicy"))


def test_a_foreign_tokenizer_is_refused_naming_gold(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        vocab.load_pairing(str(models["student"]), str(models["foreign"]), server=False, offline=True)
    message = str(info.value)
    assert "does not share the student's tokenizer" in message and "GOLD" in message and "tokens differ" in message
    recipe = onpolicy_recipe(tmp_path, models, teacher=models["foreign"])
    proc = distill_cli("recipe", "check", str(recipe))
    assert proc.returncode == 2 and "GOLD" in proc.stderr, proc.stderr[-2000:]


def test_recipe_check_refuses_a_completion_longer_than_the_contexts(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = onpolicy_recipe(tmp_path, models, config={"max_completion_length": 4096})
    proc = distill_cli("recipe", "check", str(recipe))
    assert proc.returncode == 2
    assert (
        "onpolicy.config.max_completion_length: 4096 does not fit the trained student's context (2048" in proc.stderr
    )


def test_generation_must_start_the_way_sft_taught(models: dict[str, Path], tmp_path: Path) -> None:
    """A template that rewrites the assistant turn (R1's drops the reasoning) would prompt the student with text it
    never saw at the start of an answer."""
    from transformers import AutoTokenizer

    from student.onpolicy import check_start

    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    check_start(tokenizer, think_prefix="<think>\n")
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']", "message['content'].split('</think>')[-1]"
    )
    assert "split('</think>')" in tokenizer.chat_template
    with pytest.raises(RecipeError, match="would not start the way SFT taught"):
        check_start(tokenizer, think_prefix="<think>\n")


def test_a_teacher_may_know_more_tokens_but_not_rename_the_students(models: dict[str, Path], tmp_path: Path) -> None:
    """QwQ-32B adds `<think>` past Qwen2.5's tokens (allowed); R1-Distill-Qwen renames the special tokens, so the
    student's end-of-turn id is the teacher's `<｜Assistant｜>` (refused, by id and by both names)."""
    import shutil

    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(models["student"])
    more = AutoTokenizer.from_pretrained(models["student"])
    more.add_tokens(["<tool_response>", "</tool_response>"], special_tokens=True)
    assert len(more) == len(student) + 2
    vocab.check_pair(student, more, student_rows=len(student), teacher_rows=len(more), teacher="qwq")

    renamed = tmp_path / "renamed"
    shutil.copytree(models["student"], renamed)
    tokenizer_json = renamed / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace("<|im_end|>", "<｜Assistant｜>"))
    config = json.loads((renamed / "tokenizer_config.json").read_text())
    config["eos_token"] = "<｜Assistant｜>"
    (renamed / "tokenizer_config.json").write_text(json.dumps(config))
    end_of_turn = student.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(RecipeError) as info:
        vocab.load_pairing(str(models["student"]), str(renamed), server=False, offline=True)
    assert f"ids {end_of_turn}: '<|im_end|>' for the student, '<｜Assistant｜>' for the teacher" in str(info.value)


def test_recipe_plan_says_where_the_teacher_weights_go(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from distill.scale import plan

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models["padded"]).parameters())
    path = onpolicy_recipe(tmp_path, models)
    for accelerate, share in ((None, 1), ("zero3", 2)):
        overrides = [f"onpolicy.accelerate={accelerate}"] if accelerate else []
        figures = plan(load_recipe(path, overrides=overrides), runs_dir=tmp_path / "runs", gpus=2)["onpolicy"]
        assert figures["teacher_weights_per_gpu"]["value"] == round(params * 2 / share / 2**30, 2)
        assert figures["answers_per_step"] == 8 and figures["scored_tokens_at_most"] == 8 * 6 * 16
    served = plan(
        load_recipe(path, overrides=["onpolicy.teacher_server=http://127.0.0.1:9"]), runs_dir=tmp_path, gpus=2
    )["onpolicy"]
    assert served["teacher_weights_per_gpu"] == {"value": 0, "how": "behind the server http://127.0.0.1:9"}
