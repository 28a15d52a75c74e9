"""The `openai` backend: a real vLLM OpenAI-compatible server on 127.0.0.1, plus a loopback fault injector (the only
fake, standing at the network edge) that answers whole or streamed: 429, 500, a hang, a garbled body, a dropped
connection, a stream cut or gone silent half-way, a finish reason worth a retry, and another model than asked."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import serve_vllm
from distill import files, pipeline
from distill.errors import DistillError
from distill.schema import R1_PROMPT, Recipe
from fault_injector import FaultInjector
from student.launch import free_port  # the one free-port helper (the stage's launcher picks ports with it)
from teacher_templates import R1_CHAT_TEMPLATE

PREFIX = "<think>\n"


def _recipe(data: Path, *, base_url: str, model: str, n: int = 2, **endpoint) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "api",
            "data": {"spec": "local_jsonl", "path": str(data)},
            "teacher": {
                "backend": "openai",
                "model": model,
                "sampling": {"n": n, "max_tokens": 8, "top_k": 20},
                "endpoint": {"base_url": base_url, "api_key_env": "DISTILL_TEST_KEY", **endpoint},
            },
        }
    )


def _run(recipe: Recipe, runs: Path):
    return pipeline.run_stage(recipe, "generate", runs_dir=runs, options=pipeline.StageOptions(progress=False))


def _rows(runs: Path) -> list[dict]:
    return [r for path in sorted((runs / "api" / "generate").glob("*.jsonl")) for r in files.read_jsonl(path)]


@pytest.fixture
def problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTILL_TEST_KEY", "secret-for-tests")
    path = tmp_path / "problems.jsonl"
    files.write_jsonl(path, [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)])
    return path


@pytest.fixture
def injector() -> Iterator[str]:
    FaultInjector.script, FaultInjector.received, FaultInjector.succeeded = [], [], 0
    FaultInjector.model, FaultInjector.fingerprint = "teacher", None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultInjector)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", [True, False])
def test_faults_are_retried_counted_and_lose_nothing(problems: Path, tmp_path: Path, injector: str, stream: bool):
    FaultInjector.script = ["ok", "429", "500", "hang", "garbled", "drop", "cut", "silent"]  # flapping mid-run
    recipe = _recipe(
        problems,
        base_url=injector,
        model="teacher",
        stream=stream,
        max_concurrency=1,
        timeout_s=1.0,  # a loaded 2-core machine can pause a healthy stream for a good part of a second
        backoff_s=0.01,
        price_input_per_m=2.0,
        price_output_per_m=10.0,
    )
    manifest = _run(recipe, tmp_path / "runs")
    assert manifest.extra["retries"] == {
        "rate_limited": 1,
        "server_error": 1,
        "timeout": 2,  # no answer at all, and half an answer then silence
        "malformed": 1,
        "connection": 2,  # closed before answering, and half-way through
    }
    assert manifest.counts == {"in": 3, "out": 3, "dropped": {}, "traces": 6}
    rows = _rows(tmp_path / "runs")
    assert sorted((r["problem"], r["sample"]) for r in rows) == [
        (f"What is {i} + 1?", s) for i in range(3) for s in range(2)
    ]
    for row in rows:  # reasoning_content normalised into the <think> form, then split back
        assert row["completion"] == f"{PREFIX}{row['reasoning']}\n</think>\n\n\\boxed{{2}}"
        assert row["reasoning"].startswith("thinking ") and row["final"] == "\\boxed{2}"
        assert (row["prompt_tokens"], row["completion_tokens"], row["finish_reason"]) == (11, 7, "stop")
        assert (row["reported_model"], row["system_fingerprint"]) == ("teacher", None)
    assert manifest.extra["timed_out"] == 0 and manifest.extra["reported_models"] == {"teacher": 6}
    assert manifest.extra["cost_usd"] == pytest.approx((6 * 11 * 2.0 + 6 * 7 * 10.0) / 1e6)
    sent = FaultInjector.received
    assert len(sent) == 6 + 7  # one request per sample, plus one per injected fault
    assert all(s["auth"] == "Bearer secret-for-tests" for s in sent)
    for request in sent:  # what went over the wire: R1 chat, one sample each, sampling keys passed through
        body = request["body"]
        assert (body["model"], body["n"], body["max_tokens"], body["top_k"]) == ("teacher", 1, 8, 20)
        assert body["temperature"] == 0.6 and body["top_p"] == 0.95
        assert body.get("stream", False) is stream
        assert body.get("stream_options") == ({"include_usage": True} if stream else None)
    prompts = {R1_PROMPT.format(problem=f"What is {i} + 1?") for i in range(3)}  # math: R1 prompt by default
    assert {json.dumps(s["body"]["messages"]) for s in sent} == {
        json.dumps([{"role": "user", "content": p}]) for p in prompts
    }


def test_exhausted_retries_stop_with_one_error_and_keep_finished_problems(problems, tmp_path, injector):
    FaultInjector.script = ["ok"] + ["500"] * 6  # two problems in flight share the failures
    recipe = _recipe(
        problems, base_url=injector, model="teacher", n=1, max_concurrency=1, max_retries=2, backoff_s=0.01
    )
    with pytest.raises(
        DistillError, match=rf"{injector}: problem \w+ sample 0 failed 3 times, last with server_error"
    ):
        _run(recipe, tmp_path / "runs")
    (work,) = (tmp_path / "runs" / "api" / ".work").glob("generate-*")
    assert len(list(files.read_jsonl(work / "shard-0-of-1.jsonl"))) == 1  # the finished problem is on disk
    manifest = _run(recipe, tmp_path / "runs")  # the rerun continues: two problems left
    assert (
        manifest.counts["out"] == 3
        and len({r["id"] for r in _rows(tmp_path / "runs")}) == len(_rows(tmp_path / "runs")) == 3
    )
    assert FaultInjector.succeeded == 3  # the finished problem was not asked again


@pytest.mark.parametrize(
    "stream, fault, completion",
    [(True, "silent", PREFIX + "thinking "), (False, "hang", PREFIX)],  # a stream keeps what came before the silence
)
def test_sample_timing_out_on_every_try_is_kept_cut_short(problems, tmp_path, injector, stream, fault, completion):
    FaultInjector.script = [fault] * 3  # two samples share them; whichever gets two of them is out of retries
    endpoint = {"stream": stream, "max_concurrency": 1, "timeout_s": 1.0, "max_retries": 1, "backoff_s": 0.01}
    recipe = _recipe(problems, base_url=injector, model="teacher", n=1, **endpoint)
    manifest = _run(recipe, tmp_path / "runs")
    assert manifest.counts == {"in": 3, "out": 3, "dropped": {}, "traces": 3}, "no fatal error, nothing lost"
    assert manifest.extra["retries"] == {"timeout": 3}
    assert manifest.extra["timed_out"] == 1 and manifest.extra["finish_reasons"] == {"stop": 2, "timeout": 1}
    (cut,) = [row for row in _rows(tmp_path / "runs") if row["finish_reason"] == "timeout"]
    assert cut["completion"] == completion, "what arrived, its reasoning left open"
    assert (cut["prompt_tokens"], cut["completion_tokens"]) == (0, 0), "no usage arrived: unknown"
    assert len(FaultInjector.received) == 3 + 2


def test_streamed_sample_that_gets_nothing_on_every_try_stops_the_run(problems, tmp_path, injector):
    """Silence from the first byte is a down or swamped server, not a long sample: kept, it would be an empty trace
    that marks its problem done for good."""
    FaultInjector.script = ["ok", "hang", "hang", "hang"]  # two samples in flight share them: one gets two
    endpoint = {"max_concurrency": 1, "timeout_s": 1.0, "max_retries": 1, "backoff_s": 0.01}
    recipe = _recipe(problems, base_url=injector, model="teacher", n=1, **endpoint)
    with pytest.raises(DistillError, match=r"sample 0 got nothing in 1 s on all 2 tries; check the server"):
        _run(recipe, tmp_path / "runs")
    (work,) = (tmp_path / "runs" / "api" / ".work").glob("generate-*")
    assert [r["finish_reason"] for r in files.read_jsonl(work / "shard-0-of-1.jsonl")] == ["stop"], "none kept empty"


def test_retried_finish_reason_is_retried_then_kept_cut_short(problems: Path, tmp_path: Path, injector: str):
    FaultInjector.script = ["insufficient"] * 3  # as above: one sample gets two, and is out of retries
    recipe = _recipe(
        problems, base_url=injector, model="teacher", n=1, max_concurrency=1, max_retries=1, backoff_s=0.01
    )
    manifest = _run(recipe, tmp_path / "runs")  # the default retry_finish_reasons: [insufficient_system_resource]
    assert manifest.extra["retries"] == {"finish_insufficient_system_resource": 3}
    assert manifest.extra["finish_reasons"] == {"stop": 2, "insufficient_system_resource": 1}
    assert manifest.counts["traces"] == 3 and len(FaultInjector.received) == 3 + 2
    FaultInjector.script = ["insufficient"]
    kept = _recipe(problems, base_url=injector, model="teacher", n=1, max_concurrency=1, retry_finish_reasons=[])
    manifest = _run(kept, tmp_path / "runs-not-retried")
    assert manifest.extra["retries"] == {} and manifest.extra["finish_reasons"]["insufficient_system_resource"] == 1


def test_reported_model_is_recorded_counted_warned_and_carded(problems, tmp_path, injector, caplog):
    from distill.hub_cards import dataset_card, lineage

    FaultInjector.model, FaultInjector.fingerprint = "deepseek-v4-flash", "fp_v4"  # the alias now serves V4
    recipe = _recipe(problems, base_url=injector, model="deepseek-reasoner", max_concurrency=2)
    with caplog.at_level("WARNING", logger="teacher.endpoint"):
        manifest = _run(recipe, tmp_path / "runs")
    rows = _rows(tmp_path / "runs")
    assert {(r["teacher"], r["reported_model"], r["system_fingerprint"]) for r in rows} == {
        ("deepseek-reasoner", "deepseek-v4-flash", "fp_v4")
    }
    assert manifest.extra["reported_models"] == {"deepseek-v4-flash": 6}
    assert manifest.extra["system_fingerprints"] == {"fp_v4": 6}
    warning = "teacher.model is deepseek-reasoner but the endpoint reports deepseek-v4-flash: the traces are "
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher.model")] == [
        warning + "deepseek-v4-flash's"
    ], "one warning per reported model, not one per trace"
    card = dataset_card(recipe, tmp_path, rows=6, facts=lineage(recipe, tmp_path / "runs" / "api"))
    assert (
        "- model reported by the endpoint: `deepseek-v4-flash` (6 generated traces) (not `deepseek-reasoner`" in card
    )
    assert "- system fingerprints: `fp_v4` (6)" in card


def test_extra_body_is_sent_in_every_request(problems: Path, tmp_path: Path, injector: str):
    extra = {"thinking": {"type": "enabled"}, "chat_template_kwargs": {"enable_thinking": True}}
    recipe = _recipe(problems, base_url=injector, model="teacher", n=1, extra_body=extra)
    _run(recipe, tmp_path / "runs")
    assert len(FaultInjector.received) == 3
    for request in FaultInjector.received:
        body = request["body"]
        assert {key: body[key] for key in extra} == extra and body["top_k"] == 20, "merged beside sampling extras"


def test_endpoint_down_at_start_names_the_url(problems: Path, tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(DistillError, match=rf"teacher endpoint {url} is not usable: APIConnectionError"):
        _run(_recipe(problems, base_url=url, model="teacher"), tmp_path / "runs")


def test_missing_key_variable_is_named(problems: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DISTILL_TEST_KEY")
    with pytest.raises(DistillError, match="environment variable DISTILL_TEST_KEY is not set"):
        _run(_recipe(problems, base_url="http://127.0.0.1:9/v1", model="teacher"), tmp_path / "runs")


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real `vllm.entrypoints.openai.api_server` serving the tiny model on loopback (one per module)."""
    # --trust-request-chat-template lets a test send an R1-style template through `endpoint.extra_body`
    with serve_vllm(tiny_model, tmp_path_factory.mktemp("server"), "--trust-request-chat-template") as url:
        yield f"{url}/v1"


@pytest.mark.slow
def test_real_vllm_server_through_openai_backend(problems: Path, tmp_path: Path, vllm_server: str, tiny_model):
    from transformers import AutoTokenizer

    recipe = _recipe(
        problems,
        base_url=vllm_server,
        model=str(tiny_model),
        max_concurrency=4,
        price_input_per_m=0.55,
        price_output_per_m=2.19,
    )
    manifest = _run(recipe, tmp_path / "runs")
    assert manifest.counts == {"in": 3, "out": 3, "dropped": {}, "traces": 6}
    assert manifest.extra["retries_total"] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = _rows(tmp_path / "runs")
    for row in rows:
        assert row["completion"].startswith(PREFIX) and row["teacher"] == str(tiny_model)
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert row["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
        assert row["finish_reason"] in ("length", "stop") and 0 < row["completion_tokens"] <= 8
        assert row["finish_reason"] == "stop" or row["completion_tokens"] == 8
    tokens_in = sum(r["prompt_tokens"] for r in rows)
    tokens_out = sum(r["completion_tokens"] for r in rows)
    assert manifest.extra["cost_usd"] == pytest.approx((tokens_in * 0.55 + tokens_out * 2.19) / 1e6, abs=1e-4)


@pytest.mark.slow
def test_real_vllm_server_continues_the_forced_think_prefix(
    problems: Path, tmp_path: Path, vllm_server: str, tiny_model
):
    from transformers import AutoTokenizer

    recipe = _recipe(problems, base_url=vllm_server, model=str(tiny_model), continue_final_message=True)
    _run(recipe, tmp_path / "runs")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = _rows(tmp_path / "runs")
    assert rows
    for row in rows:
        assert row["completion"].startswith(PREFIX) and row["prompt"][-1]["role"] == "user", "stored as offline"
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) + PREFIX
        assert row["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False)), (
            "the server saw the open assistant turn with the prefix in its prompt"
        )


@pytest.mark.slow
def test_real_vllm_server_continues_one_think_under_an_r1_template(
    problems: Path, tmp_path: Path, vllm_server: str, tiny_model
):
    """An R1 template ends its generation prompt with `<think>\\n`; continuing the open assistant turn instead
    (no generation prompt) must not add a second one."""
    from transformers import AutoTokenizer

    extra = {"chat_template": R1_CHAT_TEMPLATE}
    recipe = _recipe(
        problems, base_url=vllm_server, model=str(tiny_model), continue_final_message=True, extra_body=extra
    )
    manifest = _run(recipe, tmp_path / "runs")
    assert manifest.counts["traces"] == 6
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    think = len(tokenizer.encode(PREFIX, add_special_tokens=False))
    for row in _rows(tmp_path / "runs"):
        text = tokenizer.apply_chat_template(
            row["prompt"], chat_template=R1_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert text.endswith("assistant\n" + PREFIX) and text.count("<think>") == 1
        assert row["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False)), (
            f"the server's prompt holds one <think> (two would be {think} tokens more)"
        )
        assert row["completion"].startswith(PREFIX)
