"""The recipe schema: one YAML drives every stage.

Sections that feed a library object are plain mappings passed through under the library's own names and checked
against the installed class (see `distill.passthrough`): `teacher.sampling` → `vllm.SamplingParams`,
`teacher.engine` → `vllm.LLM`, `student.sft` → `trl.SFTConfig`, `student.peft` and `onpolicy.peft` →
`peft.LoraConfig`, `onpolicy.config` → `trl.DistillationConfig`, `eval.sampling`/`eval.engine` likewise. Everything
else is a distill setting, documented once, here, in its `description`; the README's recipe reference is generated
from these descriptions. Where problems come from (dataset specs, data sources, mixtures) is in `distill.sources`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from distill.schema_endpoint import Endpoint, check_extra_body
from distill.sources import DataSource, Mixture, Section, as_sources, unweighted_sources

R1_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
# The default user prompt of each answer kind (`teacher.prompt` or a source's `prompt` replaces it): the answer is
# asked for in the form the kind's verifier reads (`distill.filter.answers`).
KIND_PROMPTS: dict[str, str] = {
    "math": R1_PROMPT,
    "choice": "{problem}\nPlease reason step by step, and put the letter of the correct option within \\boxed{{}}.",
    "code": "{problem}\nPlease reason step by step, then give your complete solution in Python 3 in a single "
    "```python code block at the end. The program reads from standard input and writes to standard output; if the "
    "problem gives starter code, complete that function instead.",
    "none": "{problem}\nPlease reason step by step before answering.",
}
# DeepSeek-R1's sampling protocol (R1 paper, section 3): used for generation and for evaluation.
R1_SAMPLING: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95, "n": 4, "max_tokens": 32768}


def _merge_defaults(defaults: dict[str, Any]):
    """Validator: user keys override `defaults` one by one instead of replacing the whole mapping."""

    def merge(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    return merge


class ThinkingBudget(Section):
    """s1's budget forcing (Muennighoff et al. 2025), done by continuing token ids offline (`teacher.budget`)."""

    tokens: int = Field(
        ge=1,
        description="Most thinking tokens per sample: at this count `</think>` is forced and the model writes its "
        "answer.",
    )
    wait: int = Field(
        0,
        ge=0,
        description="Times `wait_text` is appended when a sample closes its think block before `tokens` (it "
        "thinks on, within the same budget); 0 accepts the first close.",
    )
    wait_text: str = Field("Wait", min_length=1, description="Text appended to keep a sample thinking (s1's).")


class Teacher(Section):
    backend: Literal["vllm", "openai"] = Field(
        "vllm", description="`vllm`: offline `vllm.LLM`; `openai`: any OpenAI-compatible endpoint (see `endpoint`)."
    )
    model: str = Field(description="Teacher model: local path or hub id (vllm), or the name the endpoint serves.")
    prompt: str | None = Field(
        None,
        description="User prompt template for every source (`{problem}` is replaced by the problem text); unset: "
        "each answer kind's default (R1's `\\boxed{}` prompt for math, a letter in `\\boxed{}` for choice, a "
        "```python block for code). A source's own `prompt` wins.",
    )
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
    thinking_budget: ThinkingBudget | None = Field(
        None,
        description="Cap each sample's thinking (s1 budget forcing; backend `vllm` only); unset: only `max_tokens`.",
    )
    _merge_sampling = field_validator("sampling", mode="before")(_merge_defaults(R1_SAMPLING))

    @field_validator("thinking_budget")
    @classmethod
    def _budget_fits(cls, value: ThinkingBudget | None, info: ValidationInfo) -> ThinkingBudget | None:
        offline = info.data.get("backend", "vllm") == "vllm"
        problem = value and _budget_problem([value.tokens], info.data.get("sampling") or {}, offline=offline)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _extra_body_only_adds(self) -> Teacher:
        check_extra_body(self.endpoint, self.sampling, section="teacher")
        return self


def _budget_problem(budgets: list[int], sampling: dict[str, Any], *, offline: bool) -> str | None:
    """Budget forcing continues each sample from its token ids, which only the offline engine takes, and the answer
    needs room after the budget within `max_tokens`."""
    if budgets and not offline:
        return "needs offline vLLM: budget forcing continues samples by token ids, which an endpoint cannot take"
    limit = sampling.get("max_tokens")
    over = [b for b in budgets if isinstance(limit, int) and b >= limit]
    return f"budgets {over} must be below sampling.max_tokens={limit}, which also holds the answer" if over else None


class Filter(Section):
    verify: bool = Field(
        True,
        description="Check answers against the reference (math-verify, choice letter, code tests); off keeps "
        "every trace that passes the quality filters, marked `unverified`.",
    )
    selection: Literal["all_correct", "first_correct", "shortest_correct", "length_mix"] = Field(
        "all_correct",
        description="Which correct traces of a problem to keep: all, the first by sample index, the "
        "shortest by completion tokens, or a mix of shortest and longest; others count as `not_selected`.",
    )
    max_per_problem: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many selected traces per problem (the first k for `all_correct`, "
        "the k shortest for `shortest_correct`); `length_mix` needs it.",
    )
    longest_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="`length_mix`: the share of the `max_per_problem` kept traces taken from the longest "
        "correct ones (rounded); the rest are the shortest. Small students learn better from mixed lengths.",
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
    warn_too_long_share: float | None = Field(
        0.2,
        ge=0,
        le=1,
        description="Warn (log, manifest, funnel.md) when `max_tokens` removes more than this share of the traces "
        "that reach it: long traces are the hard problems' ones; null disables.",
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
    sandbox: Literal["bwrap", "unshare", "rlimits"] = Field(
        "bwrap",
        description="Isolation for model-written code (filter and code benchmarks): `bwrap` hides the network and "
        "the file system and is required unless you opt out; `unshare` (no network, readable file system) and "
        "`rlimits` (limits only) are weaker, warned about, and named in funnel.md and the dataset card.",
    )

    _names_as_sources = field_validator("decontaminate", mode="before")(lambda value: as_sources(value))
    _unweighted = field_validator("decontaminate")(lambda value: unweighted_sources(value, "decontaminate"))

    @model_validator(mode="after")
    def _length_mix_needs_cap(self) -> Filter:
        if self.selection == "length_mix" and self.max_per_problem is None:
            raise ValueError("selection `length_mix` needs max_per_problem: the shares are of that many traces")
        return self

    @field_validator("pass_rate")
    @classmethod
    def _pass_rate_needs_verify(cls, value: tuple[float, float] | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("verify", True):
            raise ValueError("needs filter.verify: true (the pass rate counts verified answers)")
        return value


class Student(Section):
    model: str = Field(description="Base model to fine-tune: local path or hub id.")
    sft: dict[str, Any] = Field(
        default_factory=lambda: {"assistant_only_loss": True},
        description="`trl.SFTConfig` fields; `assistant_only_loss: true` is merged in unless you set it.",
    )
    base_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the base model's config.json, applied when it loads for training and so saved in "
        "the trained model's config.json (eval's vLLM and Hub users get them), e.g. a longer context: "
        "`{max_position_embeddings: 32768, rope_theta: 300000}`. Keys are checked against the model's config class.",
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


class OnPolicy(Section):
    teacher: str | None = Field(
        None,
        description="Teacher that scores the student's samples: local path or hub id, sharing the student's tokenizer "
        "(padded embedding rows may differ); unset: `teacher.model` when `teacher.backend` is vllm. With "
        "`teacher_server` it names the served model, for the tokenizer and context checks.",
    )
    teacher_server: str | None = Field(
        None,
        description="Base URL of a vLLM server holding the teacher (`http://host:8000`), for teachers too big to sit "
        "beside the student: TRL's server distillation, scoring with the teacher's log-prob of each sampled token.",
    )
    prompts: list[DataSource] = Field(
        default_factory=list,
        description="Problems the student answers (data sources); empty: the recipe's `data`, problems the filter "
        "dropped included. Each is prompted as the teacher was (`teacher.prompt`, `teacher.think_prefix`).",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="`trl.DistillationConfig` fields (`beta` 1.0: reverse KL; `max_completion_length`; "
        "`learning_rate`, TRL's default 1e-6); with `teacher_server`, `ServerDistillationConfig`'s too.",
    )
    peft: dict[str, Any] | None = Field(
        None,
        description="`peft.LoraConfig` fields; absent: every weight trains. With it the merged model is the "
        "stage's output and the adapter is kept under `adapter/`.",
    )
    accelerate: str | None = Field(
        None, description="Launcher config: a name in `recipes/accelerate/` (`ddp`, `zero3`, ...) or a path."
    )

    _names_as_sources = field_validator("prompts", mode="before")(lambda value: as_sources(value))


class Eval(Section):
    benchmarks: list[DataSource] = Field(
        default_factory=list, validate_default=True, description="Benchmarks to score (dataset specs)."
    )
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
    compare_sft: bool = Field(
        False, description="With `onpolicy`, also score the train stage's SFT student (label `sft`) before it."
    )
    repeat: int = Field(
        1,
        ge=1,
        description="Score every model this many times, with engine seeds `engine.seed` + 0, 1, ...; the report "
        "gives the spread between runs beside each run's interval (`distill eval --repeat`).",
    )
    thinking_budgets: list[PositiveInt] = Field(
        default_factory=list,
        description="Also score the evaluated model with at most B thinking tokens for each B (s1's budget "
        "forcing: `</think>` forced at B): the accuracy-vs-thinking-tokens curve (`distill eval --budgets`).",
    )
    budget_wait: int = Field(0, ge=0, description="On the budget curve: `Wait`s appended when a sample stops early.")
    _merge_sampling = field_validator("sampling", mode="before")(_merge_defaults(R1_SAMPLING))

    @model_validator(mode="after")
    def _k_within_samples(self) -> Eval:
        n = self.sampling.get("n", 1)
        too_big = [k for k in self.pass_k if k > n]
        if too_big:
            raise ValueError(f"pass_k {too_big} exceeds sampling.n={n}, the samples drawn per problem")
        problem = _budget_problem(self.thinking_budgets, self.sampling, offline=self.endpoint is None)
        if problem:
            raise ValueError(f"thinking_budgets: {problem}")
        check_extra_body(self.endpoint, self.sampling, section="eval")
        return self

    _names_as_sources = field_validator("benchmarks", mode="before")(lambda value: as_sources(value))
    _unweighted = field_validator("benchmarks")(lambda value: unweighted_sources(value, "benchmarks"))

    @field_validator("benchmarks")
    @classmethod
    def _some_benchmarks(cls, value: list[DataSource]) -> list[DataSource]:
        if not value:
            raise ValueError("name at least one benchmark dataset spec, e.g. [math500]")
        return value


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
    data: list[DataSource] = Field(description="Problem sources: a spec name, one mapping, or a list of them.")
    mixture: Mixture = Field(default_factory=Mixture, description="How weighted sources are mixed.")
    teacher: Teacher | None = Field(None, description="Trace generation (stage `generate`).")
    filter: Filter = Field(default_factory=Filter, description="Verification and cleaning (stage `filter`).")
    student: Student | None = Field(None, description="Fine-tuning (stage `train`).")
    onpolicy: OnPolicy | None = Field(
        None, description="On-policy distillation of the trained student (stage `onpolicy`, after `train`)."
    )
    eval: Eval | None = Field(None, description="Scoring (stage `eval`).")
    hub: Hub | None = Field(None, description="Publishing (stage `push`).")

    @field_validator("data", mode="before")
    @classmethod
    def _single_source(cls, value: Any) -> Any:
        return as_sources([value] if isinstance(value, dict | str) else value)

    @model_validator(mode="after")
    def _across_sections(self) -> Recipe:
        """Rules that span sections, all reported at once (one line each, led by the key to change)."""
        problems = []
        weighted = [i for i, source in enumerate(self.data) if source.weight is not None]
        if weighted and len(weighted) < len(self.data):
            unweighted = [f"data.{i} ({s.name})" for i, s in enumerate(self.data) if s.weight is None]
            problems.append(
                f"weight: set on every data source or on none; {', '.join(unweighted)} has none "
                f"(data.{weighted[0]} has {self.data[weighted[0]].weight})"
            )
        if self.mixture.total is not None and not weighted:
            problems.append("mixture.total: needs a `weight` on every data source")
        if self.student is None and self.filter.max_tokens is not None:
            problems.append("filter.max_tokens: counting needs the student's tokenizer; set student.model")
        if self.student is None and self.eval is not None and self.eval.compare_base:
            problems.append("eval.compare_base: needs student.model (the base to compare with) in the recipe")
        if problems:
            raise ValueError("\n".join(problems))
        return self
