"""`distill tiny-model`: a servable random-init LM whose tokenizer behaves the same in training and in vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distill.errors import DistillError
from distill.tinymodel import build_tiny_model

MESSAGES = [
    {"role": "user", "content": "What is 123 + 45?"},
    {"role": "assistant", "content": "<think>\n3 + 5 = 8\n</think>\n\n\\boxed{168}"},
]


def test_tiny_model_loads_with_transformers_and_generates(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= 32, "vLLM's CPU attention needs head_dim >= 32"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer("1 + 1 =", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_tiny_model_tokenizer_same_in_auto_and_fast_loaders(tiny_model, shared_data):
    """vLLM loads with AutoTokenizer; training may use the fast class directly. They must agree token for token."""
    auto, fast = AutoTokenizer.from_pretrained(tiny_model), PreTrainedTokenizerFast.from_pretrained(tiny_model)
    text = (shared_data / "math500" / "test.jsonl").read_text()[:30000]
    assert auto(text).input_ids == fast(text).input_ids
    assert auto.decode(auto(text).input_ids) == text


def test_tiny_model_digits_and_think_tags(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert [t for t in tokenizer.tokenize("12345") if t.strip("Ġ")] == ["1", "2", "3", "4", "5"]
    for tag in ("<think>", "</think>"):
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1
        assert tokenizer.decode(tokenizer(tag).input_ids, skip_special_tokens=True) == tag, "think tags stay text"


def test_tiny_model_chat_template_marks_the_assistant_turn_and_eos(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoded = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == MESSAGES[1]["content"] + "<|im_end|>", "the loss covers the answer and the end-of-turn token"
    generation_config = json.loads((tiny_model / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


def test_tiny_model_rejects_unservable_head_dim(tmp_path):
    with pytest.raises(DistillError, match="head_dim must be an integer >= 32"):
        build_tiny_model(tmp_path / "m", hidden_size=64, heads=4)


def test_tiny_model_cli_llama(tmp_path):
    out = tmp_path / "llama"
    subprocess.run(
        [sys.executable, "-m", "distill.cli", "tiny-model", str(out), "--arch", "llama"],
        check=True,
        capture_output=True,
    )
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
