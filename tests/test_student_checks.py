"""Bad input fails before training with one clear message; overlong rows are counted; templates, stop token and
launcher configs are what they claim. Nothing here trains, so it runs in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from distill.errors import DataError, DistillError, RecipeError
from student import launch, rows, template
from student.train import run
from student_data import addition_row, addition_rows, context, make_run

FAST = {"max_steps": 1, "report_to": "none"}


def run_stage(tmp: Path, data: list[dict], student: dict) -> None:
    recipe, runs = make_run(tmp, data, student)
    run(recipe, ctx=context(runs, recipe, tmp / "work"))


@pytest.mark.parametrize(
    ("change", "data", "error", "expected"),
    [
        ({}, [], DataError, "kept.jsonl: no rows; the filter kept nothing"),
        ({}, [{"id": "x1", "problem": "1+1"}], DataError, 'kept.jsonl:1 (id=x1): expected a non-empty "messages"'),
        ({"model": "./no/such/model"}, None, RecipeError, "student.model: ./no/such/model: no such directory"),
        (
            {"peft": {"target_modules": ["attn_qkv"]}},
            None,
            RecipeError,
            "target_modules: ['attn_qkv'] matches no module of qwen2; its linear modules are: down_proj, gate_proj",
        ),
        (
            {"sft": {**FAST, "max_length": 4096}},
            None,
            RecipeError,
            "max_length: 4096 is larger than the student's context (2048 positions",
        ),
        (
            {"quantization": "4bit", "peft": {"r": 4}},
            None,
            RecipeError,
            "4bit (QLoRA, bitsandbytes) is for CUDA GPUs and none is visible",
        ),
        (
            {"sft": {**FAST, "eos_token": "<|endoftext|>"}},
            None,
            RecipeError,
            "differs from the chat template's end-of-turn token '<|im_end|>'",
        ),
        ({"sft": {**FAST, "padding_free": True}}, None, RecipeError, "without packing TRL cannot enforce max_length"),
        ({"accelerate": "zero9"}, None, RecipeError, "student.accelerate: 'zero9' is neither a file nor one of ddp,"),
    ],
    ids=[
        "empty",
        "no_messages",
        "no_model",
        "lora_targets",
        "max_length",
        "qlora_cpu",
        "eos",
        "padding_free",
        "acc",
    ],
)
def test_student_bad_input_fails_before_training(
    change: dict, data: list | None, error: type, expected: str, tiny_model: Path, tmp_path: Path
) -> None:
    student = {"model": str(tiny_model), "sft": FAST, **change}
    with pytest.raises(error) as info:
        run_stage(tmp_path, addition_rows(4) if data is None else data, student)
    assert expected in str(info.value)
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_student_deepspeed_config_without_deepspeed_fails_before_training(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what the import system reports where it is not installed
    with pytest.raises(RecipeError, match=r"zero3.yaml\) uses DeepSpeed, which is not installed; pip install"):
        run_stage(tmp_path, addition_rows(4), {"model": str(tiny_model), "sft": FAST, "accelerate": "zero3"})
    assert not (tmp_path / "work" / ".prep").exists()


def test_student_template_without_markers_is_rejected(tiny_model: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    with pytest.raises(RecipeError, match=r"plain.jinja has no \{% generation %\} markers"):
        run_stage(tmp_path, addition_rows(4), {"model": str(tiny_model), "chat_template": str(plain), "sft": FAST})


def test_student_overlong_rows_are_dropped_or_truncated_and_counted(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short, long_reply, long_prompt = addition_row(1, 2), addition_row(3, 4), addition_row(5, 6)
    long_reply["messages"][-1]["content"] += " 7" * 200
    long_prompt["messages"][0]["content"] += " 7" * 200
    convs = [r["messages"] for r in (short, long_reply, long_prompt)]
    text = tokenizer.chat_template
    dropped = rows.fit(convs, tokenizer=tokenizer, template=text, limit=120, overlong="drop", can_truncate=True)
    assert (len(dropped.conversations), dropped.dropped, dropped.truncated) == (1, {"overlong": 2}, 0)
    cut = rows.fit(convs, tokenizer=tokenizer, template=text, limit=120, overlong="truncate", can_truncate=True)
    assert (len(cut.conversations), cut.dropped, cut.truncated) == (2, {"overlong_prompt": 1}, 1)
    assert cut.conversations == convs[:2] and cut.seen == 3
    split = rows.fit(
        convs, tokenizer=tokenizer, template=text, limit=120, overlong="truncate", can_truncate=True, splits=True
    )
    assert (len(split.conversations), split.dropped, split.truncated) == (3, {}, 2)  # wrapped packing keeps all
    no_limit = rows.fit(convs, tokenizer=tokenizer, template=text, limit=120, overlong="truncate", can_truncate=False)
    assert no_limit.dropped == {"overlong": 2}  # max_length null: nothing would cut them, so they cannot fit


def test_student_shipped_llama3_template_ends_turns_with_eot(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    tokenizer.chat_template = None
    chat = template.resolve(tokenizer, model_type="llama", path=None, assistant_only=True)
    assert chat.source == "student/templates/llama3.jinja" and chat.end_of_turn == "<|eot_id|>"
    messages = addition_row(2, 3, system="S")["messages"]
    rendered = tokenizer.apply_chat_template(messages, chat_template=chat.text, tokenize=False)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{messages[1]['content']}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{messages[2]['content']}<|eot_id|>"
    )
    qwen_vocab = AutoTokenizer.from_pretrained(tiny_model)
    qwen_vocab.chat_template = None
    with pytest.raises(RecipeError, match=r"llama3.jinja needs <\|start_header_id\|>"):
        template.resolve(qwen_vocab, model_type="llama", path=None, assistant_only=True)


def test_student_think_tags_must_stay_plain_text(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template.check_think_tokens(tokenizer)  # the tiny tokenizer keeps them as normal added tokens
    assert (
        tokenizer.decode(tokenizer.encode("<think>\nx\n</think>"), skip_special_tokens=True) == "<think>\nx\n</think>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["</think>"]})
    with pytest.raises(DistillError, match="</think> is a special token"):
        template.check_think_tokens(tokenizer)


def test_student_launcher_configs_are_valid_and_cluster_free() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    names = sorted(p.stem for p in launch.REPO_CONFIGS.glob("*.yaml"))
    assert names == ["ddp", "fsdp", "zero2", "zero3", "zero3-offload"]
    for name in names:
        path = launch.config_file(name)
        config = ClusterConfig.from_yaml_file(path)
        raw = yaml.safe_load(path.read_text())
        assert (config.num_machines, config.machine_rank) == (1, 0) and "num_processes" not in raw
        assert "main_process_ip" not in raw and path.read_text().startswith("# Launcher config")


def test_student_launch_command_takes_machines_from_the_environment(tmp_path: Path) -> None:
    config, plan = launch.config_file("zero3"), tmp_path / "plan.json"
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29555", "NPROC_PER_NODE": "8"}
    cmd = launch.command(config, plan=plan, env=env)
    flags = dict(zip(cmd[3:-3:2], cmd[4:-3:2], strict=True))
    assert flags == {
        "--config_file": str(config),
        "--num_processes": "16",
        "--num_machines": "2",
        "--machine_rank": "1",
        "--main_process_ip": "10.0.0.7",
        "--main_process_port": "29555",
    }
    assert cmd[-3:] == ["-m", "student.launch", str(plan)]
    with pytest.raises(DistillError, match="set MASTER_ADDR"):
        launch.command(config, plan=plan, env={"NNODES": "2"})
    single = launch.command(config, plan=plan, env={"NPROC_PER_NODE": "2"})
    assert single[single.index("--num_processes") + 1] == "2" and "--machine_rank" not in single


def test_student_merge_rejects_a_folder_without_adapter(tmp_path: Path) -> None:
    from distill.cli import main as cli_main

    assert cli_main(["merge", str(tmp_path), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_student_full_sequence_loss_finds_stop_token_without_markers(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    chat = template.resolve(
        AutoTokenizer.from_pretrained(tiny_model), model_type="qwen2", path=str(plain), assistant_only=False
    )
    assert (chat.source, chat.end_of_turn) == (str(plain), "<|im_end|>")


def test_student_template_that_leaves_end_of_turn_untrained_is_rejected(tiny_model: Path, tmp_path: Path) -> None:
    """open-r1 #603: markers around the reply but not its <|im_end|>: loss looks fine, the model never stops."""
    from transformers import AutoTokenizer

    bad = tmp_path / "bad.jinja"
    bad.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(RecipeError, match="must end with an end-of-turn token inside"):
        template.resolve(
            AutoTokenizer.from_pretrained(tiny_model), model_type="qwen2", path=str(bad), assistant_only=True
        )


def test_student_drops_a_saved_copy_of_the_tied_head_from_a_sharded_model(tiny_model: Path, tmp_path: Path) -> None:
    """The ZeRO-2 wart (see test_student_zero.py) on a sharded save: the copy lives in another shard than the
    embeddings; it goes, the index follows, and the model loads to the same logits. A head that differs is kept."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from student.outputs import drop_tied_head

    model = tmp_path / "sharded"
    shutil.copytree(tiny_model, model)
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    first, second = names[: len(names) // 2], [*names[len(names) // 2 :], "lm_head.weight"]
    assert "model.embed_tokens.weight" in first
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for shard, members in shards.items():
        save_file({name: weights[name] for name in members}, model / shard, metadata={"format": "pt"})
    total = sum(t.nbytes for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: s for s, ms in shards.items() for n in ms}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.tensor([[5, 6, 7, 8]])
    before = AutoModelForCausalLM.from_pretrained(model)(ids).logits

    assert drop_tied_head(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    second_shard = load_file(model / "model-00002-of-00002.safetensors")
    assert "lm_head.weight" not in index["weight_map"] and "lm_head.weight" not in second_shard
    assert index["metadata"]["total_size"] == total - weights["lm_head.weight"].nbytes
    assert torch.equal(AutoModelForCausalLM.from_pretrained(model)(ids).logits, before)
    assert not drop_tied_head(model)  # nothing left to drop

    other = tmp_path / "other_head"
    shutil.copytree(tiny_model, other)
    save_file({**weights, "lm_head.weight": weights["lm_head.weight"] + 1}, other / "model.safetensors")
    assert not drop_tied_head(other) and "lm_head.weight" in load_file(other / "model.safetensors")
