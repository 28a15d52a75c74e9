"""The training rows: the filter's `kept.jsonl` → chat conversations that fit the length budget.

Only `messages` reaches the trainer (the other trace fields mix types Arrow cannot always unify, and TRL ignores
them). Lengths are measured with the template and tokenizer used for training, so what is dropped or truncated here
is exactly what would have been; every dropped row is counted with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import files
from distill.errors import DataError

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass
class Rows:
    conversations: list[list[dict[str, str]]]
    tokens: int  # tokens in the kept conversations (before any truncation by the trainer)
    seen: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # rows the trainer cuts to max_length, or splits across packed rows (wrapped, bfd_split)


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """Every row's `messages`, validated: [system?, user, ..., assistant] with string contents."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (the filter stage writes it)")
    conversations = []
    for lineno, row in enumerate(files.read_jsonl(path), start=1):
        where = f"{path}:{lineno} (id={row.get('id', '?')})"
        conversations.append(_messages(row, where=where))
    if not conversations:
        raise DataError(f"{path}: no rows; the filter kept nothing to train on (see its funnel.md)")
    return conversations


def _messages(row: dict[str, Any], *, where: str) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: expected a non-empty "messages" list of chat turns, got {messages!r:.80}')
    for turn in messages:
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: each message needs role in {ROLES} and string content, got {turn!r:.80}")
    if messages[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in messages):
        raise DataError(f"{where}: messages must hold a user turn and end with the assistant turn")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def fit(
    conversations: list[list[dict[str, str]]],
    *,
    tokenizer: Any,
    template: str,
    limit: int,
    overlong: str,
    can_truncate: bool,
    splits: bool = False,
) -> Rows:
    """Keep the rows that fit `limit` tokens; longer ones are dropped (`overlong`), or, with `overlong: truncate`,
    left for the trainer to cut (or, when `splits`, to spread over several packed rows) — unless the trainer would
    cut them inside the prompt: nothing would be left to learn, so they are dropped as `overlong_prompt` (TRL
    would drop them silently). Order is kept."""
    texts = tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    rows = Rows(conversations=[], tokens=0, seen=len(conversations))
    for conversation, length in zip(conversations, lengths, strict=True):
        if length > limit:
            if overlong == "drop" or not can_truncate:
                reason = "overlong"
            elif not splits and _prompt_length(conversation, tokenizer=tokenizer, template=template) >= limit:
                reason = "overlong_prompt"
            else:
                reason = None
            if reason:
                rows.dropped[reason] = rows.dropped.get(reason, 0) + 1
                continue
            rows.truncated += 1
            length = length if splits else limit
        rows.conversations.append(conversation)
        rows.tokens += length
    return rows


def _prompt_length(conversation: list[dict[str, str]], *, tokenizer: Any, template: str) -> int:
    prompt = tokenizer.apply_chat_template(
        conversation[:-1], chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    return len(prompt)
