"""Can a teacher score a student's tokens? Decided by the tokenizers, not by the embedding rows.

On-policy distillation compares the two models' next-token distributions token id by token id, so both must mean
the same text by every id. TRL checks that by comparing `config.vocab_size`, which is the number of embedding
*rows*, padded past the tokenizer for fast matrix shapes: Qwen2.5-0.5B/1.5B/3B have 151936 rows, Qwen2.5-7B/14B/32B
and R1-Distill-Qwen-7B/32B have 152064, all with one 151665-token tokenizer. So TRL refuses the pairs people use
most, and would accept two models whose different tokenizers happen to pad to one size.

Here the tokenizers decide (every student token has its id in the teacher's, special tokens included), and the
padding is handled in one place: the teacher's rows are cut to the student's (`rows_for_teacher`), which drops only
ids the student cannot produce. DeepSeek's R1-Distill-Qwen models are refused beside a Qwen2.5 student: their
tokenizer renames the special tokens at 151643-151648 (the student's end-of-turn `<|im_end|>`, 151645, is their
`<｜Assistant｜>`), so the teacher would score every stop as an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.errors import RecipeError

GOLD = (
    "cross-tokenizer distillation is TRL's GOLD (trl.experimental.gold), which distill does not run yet: use a "
    "teacher of the student's family, or SFT on its traces (stages generate, filter, train)"
)


@dataclass(frozen=True)
class Pairing:
    tokens: int  # tokens the shared tokenizer has (the ids that occur)
    student_rows: int  # the student's vocab_size (embedding rows)
    teacher_rows: int | None  # the teacher's, when its config is known (None: behind a server, not read)

    @property
    def rows_for_teacher(self) -> int | None:
        """The teacher's new row count when it differs from the student's only by padding, else None."""
        if self.teacher_rows is None or self.teacher_rows == self.student_rows:
            return None
        return self.student_rows


def check_pair(
    student_tokenizer: Any, teacher_tokenizer: Any, *, student_rows: int, teacher_rows: int | None, teacher: str
) -> Pairing:
    """Raise one RecipeError when `teacher` cannot score the student's token ids; else how the rows pair up.

    Every token of the student's tokenizer must have the same id in the teacher's, special tokens included (the
    student's end-of-turn token must end a turn for the teacher too). A teacher may know more tokens (QwQ-32B adds
    `<think>` at 151667 to Qwen2.5's 151665): the student never samples them."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    differ = sorted(
        (token for token, i in student_vocab.items() if teacher_vocab.get(token) != i), key=student_vocab.get
    )
    if differ:
        by_id = {i: token for token, i in teacher_vocab.items()}
        example = ", ".join(
            f"{student_vocab[token]}: {token!r} for the student, {by_id.get(student_vocab[token])!r} for the teacher"
            for token in differ[:3]
        )
        raise RecipeError(
            f"onpolicy.teacher: {teacher} does not share the student's tokenizer ({len(differ)} of the student's "
            f"{len(student_vocab)} tokens differ, e.g. ids {example}); on-policy distillation compares the models "
            f"token id by token id, so {GOLD}"
        )
    tokens = len(student_vocab)
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows is not None and rows < tokens:
            raise RecipeError(
                f"onpolicy.teacher: the {who} has {rows} embedding rows for a {tokens}-token tokenizer: ids past "
                "its rows cannot be scored"
            )
    return Pairing(tokens=tokens, student_rows=student_rows, teacher_rows=teacher_rows)


def load_pairing(student: str, teacher: str, *, server: bool, offline: bool) -> Pairing | None:
    """Load both tokenizers (and configs) and check them; None when `offline` and one is not on disk or in the Hub
    cache (the stage checks again when it starts, where it may download them)."""
    from transformers import AutoTokenizer

    from distill import lengths

    student_config = lengths.load_config(student, offline=offline)
    teacher_config = None if server else lengths.load_config(teacher, offline=offline)
    if student_config is None or (teacher_config is None and not server):
        return None
    try:
        tokenizers = [AutoTokenizer.from_pretrained(m, local_files_only=offline) for m in (student, teacher)]
    except (OSError, ValueError):
        if offline:
            return None
        raise
    teacher_rows = teacher_config.get_text_config().vocab_size if teacher_config else None
    student_rows = student_config.get_text_config().vocab_size
    return check_pair(*tokenizers, student_rows=student_rows, teacher_rows=teacher_rows, teacher=teacher)


def teacher_of(recipe: Any) -> str | None:
    """The model that scores the student's samples: `onpolicy.teacher`, else an offline teacher's `teacher.model`
    (an endpoint's served name is no model to load); None when neither is set."""
    if recipe.onpolicy.teacher:
        return recipe.onpolicy.teacher
    return recipe.teacher.model if recipe.teacher is not None and recipe.teacher.backend == "vllm" else None


def check_recipe(recipe: Any, *, offline: bool = True) -> list[str]:
    """For `distill recipe check`: the on-policy teacher against the student's tokenizer, where both are on disk
    or in the Hub cache (the stage checks again against the trained student, whose tokenizer is the base's)."""
    onpolicy = recipe.onpolicy
    if onpolicy is None or recipe.student is None:
        return []
    teacher = onpolicy.teacher or (
        recipe.teacher.model if recipe.teacher and recipe.teacher.backend == "vllm" else None
    )
    if teacher is None:
        return ["onpolicy.teacher: required when teacher.backend is openai (name the model that scores the samples)"]
    try:
        load_pairing(recipe.student.model, teacher, server=bool(onpolicy.teacher_server), offline=offline)
    except RecipeError as exc:
        return [str(exc)]
    return []
