"""One sample's answer from an OpenAI-compatible endpoint, whole or streamed, in one shape.

A streamed answer is assembled chunk by chunk into a `Reply` the caller owns, so when the stream breaks off (a
timeout, a dropped connection) the text that came before the break is still there to keep. Both spellings of the
reasoning field are read: `reasoning_content` (DeepSeek's API) and `reasoning` (vLLM's reasoning parsers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Malformed(Exception):
    """A 200 answer without a usable choice (no JSON, no choices, no message)."""


class CutOff(Exception):
    """The stream ended without a finish_reason: the connection closed before the answer did."""


@dataclass
class Reply:
    """What arrived of one sample: text, finish reason, token usage, and the model the server says it ran."""

    content: list[str] = field(default_factory=list)  # pieces as they arrived (one per chunk when streamed)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str | None = None  # None until the server says why the sample ended
    prompt_tokens: int = 0  # 0 until the server reports usage (the last chunk, with include_usage)
    completion_tokens: int = 0
    model: str | None = None
    system_fingerprint: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str | None:
        """The separate reasoning, or None when the server sent none (then any reasoning is inline in the text)."""
        return "".join(self.reasoning) or None

    def take(self, response: Any) -> None:
        """Fill from a whole (non-streamed) chat completion."""
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise Malformed(f"no choices in the response: {str(response)[:200]!r}")
        self._add_piece(choices[0].message, finish_reason=choices[0].finish_reason)
        self._add_meta(response)

    def add(self, chunk: Any) -> None:
        """Add one stream chunk: a delta of choice 0 (one sample per request), and/or usage."""
        for choice in getattr(chunk, "choices", None) or ():
            if choice.delta is not None:
                self._add_piece(choice.delta, finish_reason=choice.finish_reason)
            elif choice.finish_reason:
                self.finish_reason = choice.finish_reason
        self._add_meta(chunk)

    def _add_piece(self, piece: Any, *, finish_reason: str | None) -> None:
        if piece.content:
            self.content.append(piece.content)
        reasoning = getattr(piece, "reasoning_content", None) or getattr(piece, "reasoning", None)
        if reasoning:
            self.reasoning.append(reasoning)
        if finish_reason:
            self.finish_reason = finish_reason

    def _add_meta(self, part: Any) -> None:
        self.model = getattr(part, "model", None) or self.model
        self.system_fingerprint = getattr(part, "system_fingerprint", None) or self.system_fingerprint
        usage = getattr(part, "usage", None)
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage.prompt_tokens or 0, usage.completion_tokens or 0


async def fetch(client: Any, arguments: dict[str, Any], reply: Reply) -> None:
    """Send one chat request and fill `reply` as its answer arrives: chunk by chunk when `arguments` ask to stream,
    at once otherwise. Raises what the client raises (or Malformed, CutOff); what arrived before stays in `reply`."""
    if not arguments.get("stream"):
        reply.take(await client.chat.completions.create(**arguments))
        return
    stream = await client.chat.completions.create(**arguments)
    try:
        async for chunk in stream:
            reply.add(chunk)
    finally:
        await stream.close()  # a broken-off stream must not hold its connection
    if reply.finish_reason is None:
        raise CutOff(f"the stream ended after {len(reply.content) + len(reply.reasoning)} pieces, before finishing")
