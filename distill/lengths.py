"""Context lengths: a model's context after the recipe's config overrides, and the recipe's lengths checked against
each other before any compute is spent.

R1's traces run to 10k+ tokens and its protocol evaluates at 32,768 generated tokens, while Qwen2.5-Math's bases
ship a 4k context. `student.base_config` extends the base the way open-r1 did (`rope_theta` 300k, 32k positions)
in one recipe line; the overrides reach the model when it loads (`from_pretrained` keyword arguments) and so live in
the trained model's config.json, which eval's vLLM and every Hub user read. A recipe whose lengths cannot work is one
`RecipeError` per length, naming the keys and the numbers:

- `student.sft.max_length` longer than the student's context (after the overrides);
- `eval.sampling.max_tokens` (plus the prompt) longer than the evaluated model's context or its
  `eval.engine.max_model_len`;
- `teacher.sampling.max_tokens` longer than an offline teacher's context or `teacher.engine.max_model_len`.

`distill recipe check` runs them where a model's config.json is on disk or in the Hub cache (nothing is fetched);
the stages run them again when they start, with the config they load anyway and, for eval, the longest prompt.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from distill.errors import RecipeError
from distill.schema import Recipe

ROPE = "rope_parameters"  # transformers 5 keeps rope_theta, rope_type, factor, ... in this mapping
# The keys of that mapping for every RoPE type transformers validates (default, linear, dynamic, yarn, longrope,
# llama3): in a recipe they may stand at the top level, as config.json had them before transformers 5.
ROPE_KEYS = frozenset(
    {
        "rope_theta",
        "rope_type",
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
        "short_factor",
        "long_factor",
        "low_freq_factor",
        "high_freq_factor",
    }
)


def load_config(model: str, *, offline: bool, where: str = "model") -> Any | None:
    """The model's transformers config, or None when `offline` and its config.json is neither a local folder nor
    in the Hub cache (a recipe may name a model a later stage writes). Otherwise a missing local folder or an
    unloadable config is a RecipeError naming `where` (the recipe key), not a transformers traceback."""
    from transformers import AutoConfig

    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        if offline:
            return None
        raise RecipeError(f"{where}: {model}: no such directory (a local model folder; a hub id is `org/name`)")
    try:
        return AutoConfig.from_pretrained(model, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if offline:
            return None
        raise RecipeError(f"{where}: {model}: cannot load its config.json ({exc})") from None


def init_kwargs(config: Any, overrides: dict[str, Any], *, where: str = "student.base_config") -> dict[str, Any]:
    """The `from_pretrained` keyword arguments that apply `overrides` to `config`: its own attributes as they are,
    and rope keys (`rope_theta`, `factor`, ...) merged into `rope_parameters`, the name config.json had before
    transformers 5 being the one users know. Every unknown key or mistyped value is reported at once."""
    text = config.get_text_config()
    known = text.to_dict()
    rope = dict(known.get(ROPE) or {})
    kwargs: dict[str, Any] = {}
    problems = []
    for key, value in overrides.items():
        if ROPE in known and (key in ROPE_KEYS or key in rope):
            rope[key] = value
            kwargs[ROPE] = rope
        elif key == ROPE and isinstance(value, dict):
            rope.update(value)
            kwargs[ROPE] = rope
        elif key in known:
            current = known[key]
            if current is not None and value is not None and not _same_kind(current, value):
                problems.append(
                    f"{where}.{key}: expected {type(current).__name__} like the model's {current!r}, got {value!r}"
                )
            kwargs[key] = value
        else:
            close = difflib.get_close_matches(key, [*known, *rope], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}.{key}: unknown key for {type(text).__name__}{hint}")
    if problems:
        raise RecipeError("\n".join(problems))
    return kwargs


def _same_kind(current: Any, value: Any) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, int | float) and isinstance(value, int | float):
        return not (isinstance(current, int) and isinstance(value, float))
    return type(current) is type(value)


def context(config: Any, kwargs: dict[str, Any] | None = None) -> int | None:
    """Positions the model takes after `kwargs` (its max_position_embeddings), or None when it does not say."""
    if kwargs and "max_position_embeddings" in kwargs:
        return kwargs["max_position_embeddings"]
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def student_context(recipe: Recipe, *, offline: bool) -> tuple[int | None, dict[str, Any]]:
    """The student's context after `student.base_config` and the keyword arguments that apply it; (None, {}) when
    its config is not available offline."""
    student = recipe.student
    config = load_config(student.model, offline=offline, where="student.model")
    if config is None:
        return None, {}
    kwargs = init_kwargs(config, student.base_config)
    return context(config, kwargs), kwargs


def check(recipe: Recipe, *, offline: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes): every length the recipe sets that cannot fit, and what could not be checked here."""
    problems: list[str] = []
    notes: list[str] = []
    student_ctx = None
    if recipe.student is not None:
        try:
            student_ctx, _ = student_context(recipe, offline=offline)
        except RecipeError as exc:
            problems += str(exc).splitlines()
        if student_ctx is None:
            notes.append(f"student.model {recipe.student.model}: config.json not here; lengths checked at train")
        else:
            try:
                extended = bool(recipe.student.base_config)
                check_max_length(student_ctx, max_length=recipe.student.sft.get("max_length"), extended=extended)
            except RecipeError as exc:
                problems.append(str(exc))
    if recipe.eval is not None:
        evaluated = recipe.eval.model
        ctx = student_ctx if evaluated is None else _model_context(evaluated, offline=offline, where="eval.model")
        label = "eval.model" if evaluated else "the trained student"
        problems += _generation_fits(
            "eval",
            recipe.eval.sampling,
            recipe.eval.engine,
            ctx,
            label=label,
            notes=notes,
            endpoint=recipe.eval.endpoint,
        )
    if recipe.teacher is not None and recipe.teacher.backend == "vllm":
        ctx = _model_context(recipe.teacher.model, offline=offline, where="teacher.model")
        problems += _generation_fits(
            "teacher", recipe.teacher.sampling, recipe.teacher.engine, ctx, label="teacher.model", notes=notes
        )
    if recipe.onpolicy is not None:
        problems += _completion_fits(recipe, student_ctx, offline=offline, notes=notes)
    return problems, notes


def _completion_fits(recipe: Recipe, student_ctx: int | None, *, offline: bool, notes: list[str]) -> list[str]:
    """`onpolicy.config.max_completion_length` (plus a prompt) must fit the student and a teacher beside it."""
    from distill.vocab import teacher_of

    onpolicy = recipe.onpolicy
    teacher = None if onpolicy.teacher_server else teacher_of(recipe)
    contexts = onpolicy_contexts(student_ctx, teacher=teacher, offline=offline)
    return completion_problems(onpolicy.config.get("max_completion_length"), contexts, notes=notes)


def onpolicy_contexts(student_ctx: int | None, *, teacher: str | None, offline: bool) -> dict[str, int | None]:
    """The contexts an on-policy sample must fit, by who has them: the trained student, and a teacher beside it
    (None: the teacher is behind a server, whose context is its own business)."""
    contexts = {"the trained student": student_ctx}
    if teacher:
        contexts[f"onpolicy's teacher {teacher}"] = _model_context(teacher, offline=offline)
    return contexts


def completion_problems(completion: int | None, contexts: dict[str, int | None], *, notes: list[str]) -> list[str]:
    """One message per context `completion` tokens cannot fit with any prompt; unknown contexts go to `notes`."""
    if completion is None:
        return []
    problems = []
    for who, ctx in contexts.items():
        if ctx is None:
            notes.append(f"onpolicy: {who}'s config.json not here; lengths checked when the stage starts")
        elif completion >= ctx:
            problems.append(
                f"onpolicy.config.max_completion_length: {completion} does not fit {who}'s context ({ctx} "
                "positions) with any prompt; lower it"
            )
    return problems


def check_max_length(context: int | None, *, max_length: int | None, extended: bool) -> int:
    """`student.sft.max_length` against the student's context (`extended`: after `student.base_config`):
    positions past it are untrained or out of range. Returns the length budget rows are measured against."""
    if max_length is not None and context is not None and max_length > context:
        fix = "lower it" if extended else "lower it, or extend the context with student.base_config"
        example = "" if extended else f" (e.g. max_position_embeddings: {_round_up(max_length)}, rope_theta: 300000)"
        raise RecipeError(
            f"student.sft.max_length: {max_length} is larger than the student's context ({context} positions, "
            f"max_position_embeddings{' after student.base_config' if extended else ''}); {fix}{example}"
        )
    return max_length or context or 2**31


def model_context(model: str, *, offline: bool = False) -> int | None:
    """A model's context (max_position_embeddings), or None when its config does not say (or is not available
    `offline`)."""
    return _model_context(model, offline=offline)


def _model_context(model: str, *, offline: bool, where: str = "model") -> int | None:
    config = load_config(model, offline=offline, where=where)
    return context(config) if config is not None else None


def _generation_fits(
    section: str,
    sampling: dict[str, Any],
    engine: dict[str, Any],
    model_ctx: int | None,
    *,
    label: str,
    notes: list[str],
    endpoint: Any = None,
    prompt_tokens: int = 1,
    limit_name: str | None = None,
) -> list[str]:
    """`max_tokens` plus the prompt must fit the engine's `max_model_len`, which must fit the model."""
    if endpoint is not None:
        return []  # the server owns its context; it rejects what does not fit, and that is counted
    max_tokens, max_model_len = sampling.get("max_tokens"), engine.get("max_model_len")
    problems = []
    if max_model_len is not None and model_ctx is not None and max_model_len > model_ctx:
        problems.append(
            f"{section}.engine.max_model_len: {max_model_len} is longer than {label}'s context ({model_ctx} "
            "positions); vLLM refuses it: lower it"
            + (" or extend the context with student.base_config" if section == "eval" else "")
        )
    limit = max_model_len or model_ctx
    if limit is None:
        notes.append(f"{section}: {label}'s config.json not here; lengths checked when the stage starts")
    elif max_tokens is not None and max_tokens + prompt_tokens > limit:
        source = limit_name or (f"{section}.engine.max_model_len" if max_model_len else f"{label}'s context")
        needed = (
            f"{max_tokens} + a {prompt_tokens}-token prompt" if prompt_tokens > 1 else f"{max_tokens} + the prompt"
        )
        problems.append(
            f"{section}.sampling.max_tokens: {needed} does not fit {source} ({limit} tokens): answers would be cut "
            f"off and counted wrong; lower max_tokens or raise the context"
        )
    return problems


def check_teacher(recipe: Recipe) -> None:
    """At generate start, for an offline teacher: raise when `teacher.sampling.max_tokens` cannot fit its context
    (the config is read as vLLM will read it, downloaded if it must be)."""
    teacher = recipe.teacher
    if teacher is None or teacher.backend != "vllm":
        return
    problems = _generation_fits(
        "teacher",
        teacher.sampling,
        teacher.engine,
        _model_context(teacher.model, offline=False, where="teacher.model"),
        label="teacher.model",
        notes=[],
    )
    if problems:
        raise RecipeError("\n".join(problems))


def eval_prompt_problem(recipe: Recipe, *, max_model_len: int, longest_prompt: int, label: str) -> str | None:
    """At eval start, with the engine's `max_model_len` and the longest rendered benchmark prompt: the message when
    the prompt plus `eval.sampling.max_tokens` cannot fit, else None."""
    problems = _generation_fits(
        "eval",
        recipe.eval.sampling,
        {"max_model_len": max_model_len},
        None,
        label=label,
        notes=[],
        prompt_tokens=longest_prompt,
        limit_name=f"the max_model_len vLLM serves {label} with",
    )
    return problems[0] if problems else None


def _round_up(tokens: int) -> int:
    """The next power of two at or above `tokens` (context sizes are usually one)."""
    return 1 << (tokens - 1).bit_length()
