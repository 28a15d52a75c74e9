"""The `endpoint` section: how teacher and eval reach an OpenAI-compatible server (DeepSeek's API, vLLM, SGLang)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from distill.records import CUT_SHORT
from distill.sources import Section

# Request fields distill fills from the recipe's own keys, so `endpoint.extra_body` must not.
OWN_FIELDS_FROM = "teacher.model, the prompt, sampling.n, endpoint.stream, endpoint.continue_final_message"
OWN_FIELDS = ("model", "messages", "n", "stream", "stream_options", "continue_final_message", "add_generation_prompt")


def check_extra_body(endpoint: Endpoint | None, sampling: dict[str, Any], *, section: str) -> None:
    """Validator: a field in both `extra_body` and a recipe key would live in two places (and one would lose)."""
    for key in endpoint.extra_body if endpoint else ():
        if key in sampling or key in OWN_FIELDS:
            where = f"{section}.sampling" if key in sampling else f"the recipe ({OWN_FIELDS_FROM})"
            raise ValueError(f"endpoint.extra_body.{key}: this request field is set from {where}; set it there")


class Endpoint(Section):
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key (never the key itself)."
    )
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once.")
    stream: bool = Field(True, description="Stream answers, so `timeout_s` bounds the gaps, not whole samples.")
    timeout_s: float = Field(
        600.0, gt=0, description="Longest silence: between chunks with `stream`, else the wait for a whole answer."
    )
    max_retries: int = Field(
        8,
        ge=0,
        description="Retries per sample on 429/5xx/timeouts/malformed bodies. A sample still timing out is then kept "
        "cut short (finish_reason `timeout`, with the text that arrived); streamed with nothing arrived, it stops "
        "the run (a down server must not mark problems done).",
    )
    backoff_s: float = Field(
        1.0, gt=0, description="First retry delay in seconds; doubles per retry, with full jitter, capped at 60 s."
    )
    retry_finish_reasons: list[str] = Field(
        default_factory=lambda: ["insufficient_system_resource"],
        description="Finish reasons of samples the server cut short (DeepSeek: no capacity): retried like a 5xx, "
        "counted as `finish_<reason>`; the last try is kept, cut short, when retries run out.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields merged into every request body, for provider options `sampling` lacks (DeepSeek: "
        "`thinking: {type: enabled}`; vLLM: `chat_template`, `chat_template_kwargs`); part of the stage fingerprint.",
    )
    continue_final_message: bool = Field(
        False,
        description="Force `think_prefix` server-side: send it as a partial assistant turn for the server to continue "
        "(vLLM/SGLang chat option of that name). Off for APIs whose template forces it (DeepSeek's).",
    )
    price_input_per_m: float = Field(0.0, ge=0, description="USD per million prompt tokens, for the cost estimate.")
    price_output_per_m: float = Field(0.0, ge=0, description="USD per million completion tokens.")

    @field_validator("retry_finish_reasons")
    @classmethod
    def _cut_short_only(cls, value: list[str]) -> list[str]:
        """A retried reason's last try is kept cut short, so the filter must drop it as truncated."""
        unknown = [reason for reason in value if reason not in CUT_SHORT]
        if unknown:
            raise ValueError(f"{unknown}: not finish reasons of a cut-short sample; choose from {sorted(CUT_SHORT)}")
        return value
