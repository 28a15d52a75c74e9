"""The loopback HTTP server that stands in for remote chat APIs in the endpoint tests (the only fake, at the network
edge): it answers from a script of faults and records every request it was sent."""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import ClassVar


class FaultInjector(BaseHTTPRequestHandler):
    """Answers chat completions from a script of faults, then succeeds; records every request it was sent. It
    answers `stream: true` requests as server-sent events in HTTP/1.1 chunks (as uvicorn sends vLLM's), others
    as one JSON body. Faults: 429, 500, `hang` (no answer past the timeout), `drop` (closed before answering),
    `garbled` (not JSON), `cut` (closed half-way through the answer), `silent` (half the answer, then silence past
    the timeout), `insufficient` (an answer DeepSeek ends with `insufficient_system_resource`)."""

    protocol_version = "HTTP/1.1"
    silence_s: ClassVar[float] = 3.0  # how long `hang` and `silent` say nothing: past the tests' 1 s timeout
    script: ClassVar[list[str]] = []
    received: ClassVar[list[dict]] = []
    succeeded: ClassVar[int] = 0
    model: ClassVar[str] = "teacher"  # the model it reports having run
    fingerprint: ClassVar[str | None] = None

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [{"id": "teacher", "object": "model"}]}))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append({"body": body, "auth": self.headers["Authorization"]})
        fault = type(self).script.pop(0) if type(self).script else "ok"
        index, stream = len(type(self).received), body.get("stream", False)
        if fault == "hang":
            time.sleep(self.silence_s)
            self.close_connection = True
        elif fault == "drop":
            self._drop()
        elif fault in ("429", "500"):
            self._send(int(fault), json.dumps({"error": {"message": f"injected {fault}"}}))
        elif fault == "garbled" and stream:
            self._events(['{"id": "x", "choices": [{"mess'])
        elif fault == "garbled":
            self._send(200, '{"id": "x", "choices": [{"mess')
        else:
            if fault == "ok":
                type(self).succeeded += 1
            finish = "insufficient_system_resource" if fault == "insufficient" else "stop"
            chunks = [json.dumps(chunk) for chunk in self._chunks(index, finish)]
            whole = json.dumps(self._completion(index, finish))
            broken = fault in ("cut", "silent")
            if stream:
                self._events(chunks[:2] if broken else [*chunks, "[DONE]"], end=not broken)
            else:
                self._send(200, whole, upto=len(whole) // 2 if broken else None)
            if fault == "cut":
                self._drop()
            elif fault == "silent":
                time.sleep(self.silence_s)
                self.close_connection = True

    def _send(self, status: int, text: str, *, upto: int | None = None) -> None:
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[:upto])
        self.wfile.flush()

    def _events(self, events: list[str], *, end: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            data = f"data: {event}\n\n".encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        if end:
            self.wfile.write(b"0\r\n\r\n")

    def _drop(self) -> None:
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _meta(self, index: int, kind: str) -> dict:
        return {
            "id": f"c{index}",
            "object": kind,
            "created": 0,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def _completion(self, index: int, finish: str) -> dict:
        message = {"role": "assistant", "content": "\\boxed{2}", _reasoning_field(index): f"thinking {index}"}
        return {
            **self._meta(index, "chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": USAGE,
        }

    def _chunks(self, index: int, finish: str) -> list[dict]:
        """The same answer in pieces: role, reasoning in two deltas, the answer in two, finish, then usage."""
        field = _reasoning_field(index)
        deltas = [{"role": "assistant", "content": ""}, {field: "thinking "}, {field: str(index)}]
        deltas += [{"content": "\\boxed{"}, {"content": "2}"}, {}]
        chunks = [
            {
                **self._meta(index, "chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish if i == len(deltas) - 1 else None}],
            }
            for i, delta in enumerate(deltas)
        ]
        return [*chunks, {**self._meta(index, "chat.completion.chunk"), "choices": [], "usage": USAGE}]


USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def _reasoning_field(index: int) -> str:
    # DeepSeek's API names the field `reasoning_content`; vLLM >= 0.11 with a reasoning parser names it `reasoning`.
    return "reasoning_content" if index % 2 else "reasoning"
