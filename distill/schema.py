"""The recipe schema: one YAML drives every stage.

Sections that feed a library object are plain mappings passed through under the library's own names and checked
against the installed class (see `distill.passthrough`): `teacher.sampling` → `vllm.SamplingParams`,
`teacher.engine` → `vllm.LLM`, `student.sft` → `trl.SFTConfig`, `student.peft` → `peft.LoraConfig`,
`eval.sampling`/`eval.engine` likewise. Everything else is a distill setting, documented once, here, in its
`description`; the README's recipe reference is generated from these descriptions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

R1_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
# DeepSeek-R1's sampling protocol (R1 paper, section 3): used for generation and for evaluation.
R1_SAMPLING: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95, "n": 4, "max_tokens": 32768}


class Section(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _merge_defaults(defaults: dict[str, Any]):
    """Validator: user keys override `defaults` one by one instead of replacing the whole mapping."""

    def merge(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    return merge


class DataSource(Section):
    spec: str = Field(description="Dataset spec: a name from `datasets/` (e.g. `math500`) or a path to a spec YAML.")
    path: str | None = Field(
        None, description="Local file, glob or directory to read instead of the spec's hub location (same mapping)."
    )
    split: str | None = Field(None, description="Split to read; unset uses the spec's split.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N problems (after the shuffle, if any).")
    seed: int | None = Field(
        None, description="Shuffle the problems with this seed before `limit`; unset keeps order."
    )


class Endpoint(Section):
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key (never the key itself)."
    )
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout; a timeout is retried like a 5xx.")
    max_retries: int = Field(8, ge=0, description="Retries per request on 429/5xx/timeouts/malformed bodies.")
    backoff_s: float = Field(
        1.0, gt=0, description="First retry delay in seconds; doubles per retry, with full jitter, capped at 60 s."
    )
    continue_final_message: bool = Field(
        False,
        description="Force `think_prefix` server-side: send it as a partial assistant turn for the server to continue "
        "(vLLM/SGLang chat option of that name). Off for APIs whose template forces it (DeepSeek's).",
    )
    price_input_per_m: float = Field(0.0, ge=0, description="USD per million prompt tokens, for the cost estimate.")
    price_output_per_m: float = Field(0.0, ge=0, description="USD per million completion tokens.")


class Teacher(Section):
    backend: Literal["vllm", "openai"] = Field(
        "vllm", description="`vllm`: offline `vllm.LLM`; `openai`: any OpenAI-compatible endpoint (see `endpoint`)."
    )
    model: str = Field(
        description="Teacher model: local path or hub id (vllm), or the model name the endpoint serves."
    )
    prompt: str = Field(R1_PROMPT, description="User prompt template; `{problem}` is replaced by the problem text.")
    system_prompt: str | None = Field(None, description="System message; R1 recommends none.")
    think_prefix: str = Field(
        "<think>\n", description="Text the assistant turn is forced to start with (R1 convention); `''` disables."
    )
    sampling: dict[str, Any] = Field(
        default_factory=lambda: dict(R1_SAMPLING),
        description="`vllm.SamplingParams` fields (also sent to endpoints); R1 defaults merged under yours.",
    )
    engine: dict[str, Any] = Field(default_factory=dict, description="`vllm.LLM(...)` keyword arguments.")
    endpoint: Endpoint | None = Field(None, description="Endpoint settings, required when `backend: openai`.")
    _merge_sampling = field_validator("sampling", mode="before")(_merge_defaults(R1_SAMPLING))


class Filter(Section):
    verify: bool = Field(
        True,
        description="Check answers against the reference (math-verify, choice letter, code tests); off keeps "
        "every trace that passes the quality filters, marked `unverified`.",
    )
    selection: Literal["all_correct", "first_correct", "shortest_correct"] = Field(
        "all_correct",
        description="Which correct traces of a problem to keep: all, the first by sample index, or the "
        "shortest by completion tokens; others are counted as `not_selected`.",
    )
    max_per_problem: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many selected traces per problem (the first k for `all_correct`, "
        "the k shortest for `shortest_correct`).",
    )
    pass_rate: tuple[float, float] | None = Field(
        None,
        description="Keep problems whose teacher pass rate (correct / all samples) lies in [lo, hi], a "
        "difficulty band; others count as `pass_rate_out_of_band`. Needs `verify`.",
    )
    truncated: bool = Field(
        True, description="Drop traces cut by max_tokens (finish_reason `length`) or without `</think>`."
    )
    no_answer: bool = Field(
        True,
        description="Drop traces with no final answer after `</think>` (math: no `\\boxed{}`; choice: no "
        "letter; code: no fenced code block).",
    )
    empty_reasoning: bool = Field(True, description="Drop traces whose `<think>` block is empty.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Drop traces whose assistant turn is longer than this, counted with the student's "
        "tokenizer (`student.model`, loaded only when this is set).",
    )
    max_cjk_ratio: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Language mixing: drop reasoning whose CJK share exceeds this (problems that "
        "are not themselves mostly CJK); null disables.",
    )
    max_repeated_ngram_ratio: float | None = Field(
        0.5,
        ge=0,
        le=1,
        description="Degenerate repetition: drop reasoning whose repeated word 10-gram share exceeds "
        "this; null disables.",
    )
    code_in_reasoning: bool = Field(
        True, description="Drop math/choice traces whose reasoning contains fenced code blocks (R1 paper)."
    )
    dedup: bool = Field(True, description="Drop exact duplicate problems (normalised text); the first id seen wins.")
    near_dup_threshold: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="Drop near-duplicate problems above this MinHash Jaccard estimate (datasketch "
        "LSH over word 3-grams); null disables.",
    )
    decontaminate: list[DataSource] = Field(
        default_factory=list,
        description="Benchmarks whose problems must not appear in training data (word 8-gram overlap), as data "
        "sources (a spec name, or a mapping with `path` for a local copy); removals are counted per benchmark.",
    )
    verify_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Hard timeout per answer check (math: parse + verify; code: per test run); a timeout "
        "is counted as `verify_timeout` / `time_limit`, never a hang.",
    )
    workers: int | None = Field(None, ge=1, description="Verification processes; unset uses every core.")

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _names_as_sources(cls, value: Any) -> Any:
        return [{"spec": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class Student(Section):
    model: str = Field(description="Base model to fine-tune: local path or hub id.")
    sft: dict[str, Any] = Field(
        default_factory=lambda: {"assistant_only_loss": True},
        description="`trl.SFTConfig` fields; `assistant_only_loss: true` is merged in unless you set it.",
    )
    peft: dict[str, Any] | None = Field(None, description="`peft.LoraConfig` fields; absent means full fine-tuning.")
    quantization: Literal["4bit"] | None = Field(None, description="`4bit`: QLoRA via bitsandbytes (GPU only).")
    chat_template: str | None = Field(
        None, description="Jinja chat template file with `{% generation %}` markers; unset uses the model's own."
    )
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="Rows longer than `sft.max_length`: drop them (counted) or truncate them."
    )
    accelerate: str | None = Field(
        None, description="Launcher config: a name in `recipes/accelerate/` (`ddp`, `zero3`, ...) or a path."
    )
    merge: bool = Field(False, description="With `peft`, also write the LoRA merged into its base as a full model.")
    _merge_sft = field_validator("sft", mode="before")(_merge_defaults({"assistant_only_loss": True}))


class Eval(Section):
    benchmarks: list[DataSource] = Field(default_factory=list, description="Benchmarks to score (dataset specs).")
    model: str | None = Field(None, description="Model to evaluate; unset evaluates the train stage's output.")
    sampling: dict[str, Any] = Field(
        default_factory=lambda: dict(R1_SAMPLING),
        description="`vllm.SamplingParams` fields; `n` is k, the samples per problem. R1 defaults merged in.",
    )
    engine: dict[str, Any] = Field(default_factory=dict, description="`vllm.LLM(...)` keyword arguments.")
    endpoint: Endpoint | None = Field(
        None, description="Score a model behind an OpenAI-compatible endpoint instead (`model` is its served name)."
    )
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values for the unbiased pass@k estimator.")
    compare_base: bool = Field(False, description="Also score `student.model` (the untrained base) for comparison.")
    _merge_sampling = field_validator("sampling", mode="before")(_merge_defaults(R1_SAMPLING))

    @model_validator(mode="after")
    def _k_within_samples(self) -> Eval:
        n = self.sampling.get("n", 1)
        too_big = [k for k in self.pass_k if k > n]
        if too_big:
            raise ValueError(f"pass_k {too_big} exceeds sampling.n={n}, the samples drawn per problem")
        return self

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _names_as_sources(cls, value: Any) -> Any:
        return [{"spec": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class Hub(Section):
    dataset_repo: str | None = Field(None, description="Hub repo id for the filtered dataset; unset skips it.")
    model_repo: str | None = Field(None, description="Hub repo id for the student; unset skips it.")
    private: bool = Field(True, description="Create repos private.")
    revision: str | None = Field(None, description="Branch to push to; unset uses a branch named after the run.")
    push_checkpoints: bool = Field(False, description="Push each saved training checkpoint to its own branch.")


class Recipe(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name; outputs go to `runs/<name>/<stage>/`."
    )
    data: list[DataSource] = Field(description="Problem sources: one mapping, or a list of them.")
    teacher: Teacher | None = Field(None, description="Trace generation (stage `generate`).")
    filter: Filter = Field(default_factory=Filter, description="Verification and cleaning (stage `filter`).")
    student: Student | None = Field(None, description="Fine-tuning (stage `train`).")
    eval: Eval | None = Field(None, description="Scoring (stage `eval`).")
    hub: Hub | None = Field(None, description="Publishing (stage `push`).")

    @field_validator("data", mode="before")
    @classmethod
    def _single_source(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value
