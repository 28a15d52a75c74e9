"""Teacher pieces that need no model: sharding, resume repair, done markers, prompts, completion normalisation."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest

from distill import files, pipeline
from distill.errors import DataError, DistillError, RecipeError
from distill.prompts import check_template, messages, with_think_prefix
from distill.records import Problem, Trace, problem_id, split_reasoning
from distill.schema import Recipe, Teacher
from teacher.completions import normalise_completion
from teacher.generate import load, problems_hash
from teacher.generation_progress import ProgressBar
from teacher.shards import ShardStore, shard_of
from teacher.traces import GenerationStats, make_trace


def _problem(text: str, **fields) -> Problem:
    return Problem(id=problem_id("t", text), source="t", kind="math", problem=text, answer="1", **fields)


def _rows(problem: Problem, samples: range) -> list[dict]:
    return [
        make_trace(
            problem,
            sample=s,
            prompt=[],
            completion=f"<think>\nr{s}\n</think>\n\n\\boxed{{1}}",
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=5,
            teacher="m",
            sampling={},
            latency_s=0.1,
        ).to_dict()
        for s in samples
    ]


def test_shard_partition_disjoint_and_complete():
    ids = [problem_id("math500", f"problem {i}") for i in range(1000)]
    parts = [{pid for pid in ids if shard_of(pid, 8) == i} for i in range(8)]
    assert set().union(*parts) == set(ids)
    assert sum(len(p) for p in parts) == len(ids)
    assert min(len(p) for p in parts) > 80  # hashes spread evenly: no shard is starved
    assert [shard_of(pid, 8) for pid in ids] == [int(pid, 16) % 8 for pid in ids]  # documented rule, stable


def test_resume_drops_torn_tail_and_incomplete_problems(tmp_path: Path):
    done, partial, torn = _problem("a"), _problem("b"), _problem("c")
    store = ShardStore(tmp_path, shard=(0, 1), samples=3)
    lines = [json.dumps(r) for r in _rows(done, range(3)) + _rows(partial, range(2)) + _rows(torn, range(1))]
    store.path.write_text("\n".join(lines) + "\n" + json.dumps(_rows(torn, range(1, 2))[0])[:40])
    assert store.resume() == {done.id}
    kept = list(files.read_jsonl(store.path))
    assert [(r["id"], r["sample"]) for r in kept] == [(done.id, s) for s in range(3)]
    assert store.path.read_text().endswith("\n")
    assert not list(tmp_path.glob(".*tmp-*"))  # the rewrite was atomic and left nothing behind


def test_resume_of_intact_file_keeps_bytes(tmp_path: Path):
    store = ShardStore(tmp_path, shard=(1, 2), samples=2)
    files.write_jsonl(store.path, _rows(_problem("a"), range(2)))
    before = store.path.read_bytes()
    assert store.resume() == {_problem("a").id}
    assert store.path.read_bytes() == before


def test_resume_rejects_corruption_inside_the_file(tmp_path: Path):
    store = ShardStore(tmp_path, shard=(0, 1), samples=1)
    store.path.write_text(json.dumps(_rows(_problem("a"), range(1))[0]) + "\n{broken\n" + "{}\n")
    with pytest.raises(DataError, match=r"shard-0-of-1\.jsonl:2: not valid JSON"):
        store.resume()


def test_other_shard_count_in_work_dir_is_refused(tmp_path: Path):
    (tmp_path / "shard-0-of-4.jsonl").write_text("")
    with pytest.raises(DistillError, match=r"--shard i/4 \(not i/2\)"):
        ShardStore(tmp_path, shard=(0, 2), samples=1)


def test_exactly_one_shard_completes_the_set(tmp_path: Path):
    stores = [ShardStore(tmp_path, shard=(i, 6), samples=1) for i in range(6)]
    results: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.mark_done({"wall_s": 1.0}))) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    assert all(state["done"] for state in stores[0].all_states())


def test_writer_appends_whole_problems_durably(tmp_path: Path):
    store = ShardStore(tmp_path, shard=(0, 1), samples=2)
    traces = [Trace.from_dict(r, where="test") for r in _rows(_problem("a"), range(2))]
    with store.writer(snapshot=lambda: {"wall_s": 1.5}) as writer:
        writer.add([traces])
    assert [r["sample"] for r in files.read_jsonl(store.path)] == [0, 1]
    assert store.previous_state() == {"wall_s": 1.5, "done": False}


def test_writer_failure_surfaces_in_the_stage(tmp_path: Path):
    store = ShardStore(tmp_path, shard=(0, 1), samples=1)
    traces = [Trace.from_dict(r, where="test") for r in _rows(_problem("a"), range(1))]
    with pytest.raises(TypeError, match="not JSON serializable"), store.writer(snapshot=dict) as writer:
        traces[0].meta = {"bad": object()}  # type: ignore[dict-item]
        writer.add([traces])


def test_messages_follow_r1_conventions():
    teacher = Teacher(model="m")
    chat = messages(_problem("What is 1+1?"), teacher=teacher)
    assert chat == [
        {
            "role": "user",
            "content": "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]
    choice = Problem(id="ab", source="t", kind="choice", problem="Pick one.", answer="B", choices=["x", "y"])
    system = Teacher(model="m", system_prompt="Be brief.", prompt="{problem}")
    assert messages(choice, teacher=system) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Pick one.\n\nA) x\nB) y"},
    ]


@pytest.mark.parametrize(
    "template, message",
    [
        ("Solve: {question}", "cannot fill the template"),
        ("Solve and box it: \\boxed{}", "cannot fill the template"),
        ("Solve it.", "must contain {problem}"),
    ],
)
def test_bad_prompt_template_is_a_recipe_error(template: str, message: str):
    with pytest.raises(RecipeError, match=message):
        check_template(template)


def test_reasoning_field_and_inline_reasoning_normalise_alike():
    separate = normalise_completion("\n\\boxed{4}", reasoning="\n2+2=4\n", think_prefix="<think>\n")
    inline = normalise_completion("<think>\n2+2=4\n</think>\n\n\\boxed{4}", reasoning=None, think_prefix="<think>\n")
    prompted = normalise_completion("2+2=4\n</think>\n\n\\boxed{4}", reasoning=None, think_prefix="<think>\n")
    assert separate == inline == prompted == "<think>\n2+2=4\n</think>\n\n\\boxed{4}"
    assert split_reasoning(separate) == ("2+2=4", "\\boxed{4}")
    assert normalise_completion("plain", reasoning=None, think_prefix="") == "plain"
    # Cut short inside its reasoning (a timeout): the block stays open, as the reasoning never ended.
    assert normalise_completion("", reasoning="2+2", think_prefix="<think>\n", cut_short=True) == "<think>\n2+2"


@pytest.mark.parametrize(
    "rendered, prefix, expected",
    [
        ("<|im_start|>assistant\n", "<think>\n", "<|im_start|>assistant\n<think>\n"),  # Qwen: the prefix is added
        ("<｜Assistant｜><think>\n", "<think>\n", "<｜Assistant｜><think>\n"),  # R1 / R1-Distill: already there
        ("<｜Assistant｜><think>", "<think>\n", "<｜Assistant｜><think>\n"),  # only the missing newline
        ("<｜Assistant｜><think>\n\n", "<think>\n", "<｜Assistant｜><think>\n\n"),  # more whitespace: left alone
        ("<|im_start|>assistant\n", "", "<|im_start|>assistant\n"),  # prefix disabled
    ],
)
def test_think_prefix_is_written_once(rendered: str, prefix: str, expected: str):
    assert with_think_prefix(rendered, prefix) == expected


def _local_recipe(path: Path, **data) -> Recipe:
    return Recipe.model_validate(
        {"name": "u", "data": {"spec": "local_jsonl", "path": str(path), **data}, "teacher": {"model": "unused"}}
    )


def test_input_hash_follows_the_selected_problems(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    files.write_jsonl(path, [{"problem": f"q{i}", "answer": str(i)} for i in range(4)])

    def input_hash(recipe: Recipe) -> str:
        return problems_hash(load(recipe))

    assert input_hash(_local_recipe(path, limit=3)) == input_hash(_local_recipe(path, limit=3))
    assert input_hash(_local_recipe(path, limit=3)) != input_hash(_local_recipe(path, limit=4))


def test_missing_answer_column_stops_before_any_model_loads(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    files.write_jsonl(path, [{"problem": "q", "solution": "s"}])
    options = pipeline.StageOptions(progress=False)
    with pytest.raises(DataError, match=r"p\.jsonl: spec local_jsonl maps fields\.answer to column 'answer'"):
        pipeline.run_stage(_local_recipe(path), "generate", runs_dir=tmp_path / "runs", options=options)


def test_progress_bar_shows_rate_and_cost(capsys: pytest.CaptureFixture[str]):
    stats = GenerationStats(price_input_per_m=1.0, price_output_per_m=2.0)
    bar = ProgressBar(total=2, stats=stats, show_cost=True, enabled=True)
    with bar.shown():
        stats.add([Trace.from_dict(r, where="test") for r in _rows(_problem("a"), range(2))])
        bar.update()
    text = capsys.readouterr().err
    assert "1/2" in text and "tok/s" in text and "$0.00" in text


def _api_recipe(**endpoint) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "u",
            "data": "math500",
            "teacher": {"backend": "openai", "model": "m", "endpoint": {"base_url": "http://x/v1", **endpoint}},
        }
    )


def test_extra_body_is_fingerprinted_but_stream_and_retried_finish_reasons_are_not():
    stage, options = pipeline.STAGES["generate"], pipeline.StageOptions()
    base = pipeline.section_hash(_api_recipe(), stage, options)
    assert pipeline.section_hash(_api_recipe(stream=False), stage, options) == base
    assert pipeline.section_hash(_api_recipe(retry_finish_reasons=[]), stage, options) == base
    assert pipeline.section_hash(_api_recipe(extra_body={"thinking": {"type": "enabled"}}), stage, options) != base


@pytest.mark.parametrize(
    "extra_body, message",
    [
        ({"stream": False}, "endpoint.extra_body.stream: this request field is set from the recipe"),
        ({"temperature": 0.2}, "endpoint.extra_body.temperature: this request field is set from teacher.sampling"),
    ],
)
def test_extra_body_cannot_set_a_field_twice(extra_body: dict, message: str):
    with pytest.raises(ValueError, match=message):
        _api_recipe(extra_body=extra_body)


def test_raw_http_errors_from_a_stream_are_classified():
    """openai < 3 lets httpx's own errors escape while a stream is read; openai 3 raises httpx2's, wrapped."""
    from teacher.endpoint import _retry_cause

    endpoint = _api_recipe().teacher.endpoint
    modules = [importlib.import_module(name) for name in ("httpx", "httpx2") if importlib.util.find_spec(name)]
    assert modules, "the openai client runs on httpx or httpx2"
    for module in modules:
        assert _retry_cause(module.ReadTimeout("silent"), endpoint=endpoint, what="s") == "timeout"
        assert _retry_cause(module.RemoteProtocolError("peer closed"), endpoint=endpoint, what="s") == "connection"
        assert _retry_cause(module.ReadError("reset"), endpoint=endpoint, what="s") == "connection"


def test_vllm_engine_refuses_cpu_where_gpus_were_promised(monkeypatch: pytest.MonkeyPatch) -> None:
    from teacher.offline import load_engine

    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    teacher = Teacher(model="some/teacher")
    with pytest.raises(DistillError, match=r"vLLM for some/teacher: GPUs are expected here \(SLURM_GPUS_ON_NODE=8\)"):
        load_engine(teacher)


def test_generate_refuses_max_tokens_the_offline_teacher_cannot_fit(tiny_model, tmp_path) -> None:
    files.write_jsonl(tmp_path / "p.jsonl", [{"problem": "1 + 1?", "answer": "2"}])
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "data": {"spec": "local_jsonl", "path": str(tmp_path / "p.jsonl")},
            "teacher": {"model": str(tiny_model), "sampling": {"max_tokens": 4096}},  # the tiny model has 2048
        }
    )
    options = pipeline.StageOptions(progress=False)
    with pytest.raises(RecipeError, match=r"teacher.sampling.max_tokens: 4096 \+ the prompt does not fit teacher"):
        pipeline.run_stage(recipe, "generate", runs_dir=tmp_path / "runs", options=options)


def test_a_missing_local_teacher_is_one_recipe_error(tmp_path: Path):
    """Not transformers' "Repo id must be in the form ..." traceback: the key, the path and what was expected."""
    from distill import lengths

    path = tmp_path / "problems.jsonl"
    files.write_jsonl(path, [{"problem": "1+1", "answer": "2"}])
    recipe = _local_recipe(path)
    recipe.teacher.model = str(tmp_path / "no" / "teacher")
    with pytest.raises(RecipeError, match=rf"teacher\.model: {tmp_path}/no/teacher: no such directory"):
        lengths.check_teacher(recipe)
