"""Shared fixtures: a tiny local model (built once per session), the shared real data, vLLM-on-CPU settings.

Everything runs offline on CPU with the real libraries; nothing here mocks vLLM, TRL, PEFT, math-verify or datasets.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill.tinymodel import CPU_ENGINE

REPO = Path(__file__).resolve().parent.parent
# The real data beside a checkout (CI has it); DISTILL_SHARED_DATA points elsewhere, e.g. at nothing, to run the
# suite as a user's clone does.
SHARED_DATA = Path(os.environ.get("DISTILL_SHARED_DATA") or REPO.parent / "shared" / "data")

# vLLM on a 2-core CPU (see ../shared/FACTS.md): in-process engine, one OpenMP thread, explicit KV cache size.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# `teacher.engine` / `eval.engine` settings that make a tiny model servable by vLLM on CPU, fast.
TINY_ENGINE = dict(CPU_ENGINE)


def finish_stage(stage_dir: Path, counts: dict) -> None:
    """Mark a hand-made stage directory finished, as the runner would (a manifest over its current files)."""
    from distill.manifest import finish_by_hand

    finish_by_hand(stage_dir, counts=counts)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Qwen2 (hidden 64, 2 layers, head_dim 32) with a digit-level tokenizer and chat template."""
    from distill.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2")


# `accelerate launch` on 2 CPU processes, one OpenMP thread each (CI machines have 2 cores)
TWO_PROCESSES = {"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TWO_PROCESSES.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        # a user's clone has no ../shared: the tests on real data skip, saying why (CI clones beside it)
        pytest.skip(f"real data not found at {SHARED_DATA} (the repository's sibling folder shared/data)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of the home directory; the pass-through field cache is shared by the whole session."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("DISTILL_CACHE", str(cache / "distill"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(cache / "vllm"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))


@contextlib.contextmanager
def serve_vllm(model: Path, scratch: Path, *extra: str) -> Iterator[str]:
    """The real `vllm.entrypoints.openai.api_server` serving `model` on loopback; yields its base URL (no /v1)."""
    from student.launch import free_port  # the one free-port helper (the stage's launcher picks ports with it)

    port = free_port()
    log = scratch / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", "512", "--kv-cache-memory-bytes", "268435456", *extra]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(scratch / "vllm-cache")}
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not start:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
