"""Which chat template the student trains with, and which token ends its turn.

Assistant-only loss needs `{% generation %}` markers in the template (TRL turns them into the loss mask), and the
student only learns to stop if the end-of-turn token lies inside them (open-r1 #603, #492, #520). The template is
picked in this order: `student.chat_template` (a file), the model's own template when it has the markers, the
family template shipped in `student/templates/` (Qwen2.5, Llama-3). The template trained with is saved with the
tokenizer, so vLLM renders prompts exactly as training did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import DistillError, RecipeError
from distill.records import THINK_CLOSE, THINK_OPEN

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
# model_type → (shipped template, tokens the template writes that the vocabulary must have)
FAMILIES = {
    "qwen2": ("qwen2.5.jinja", ("<|im_start|>", "<|im_end|>")),
    "llama": ("llama3.jinja", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
PROBE = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    source: str  # where it came from, for the log and metrics.json
    end_of_turn: str  # the token that ends the assistant turn: training EOS and generation_config.eos_token_id
    end_of_turn_id: int


def has_markers(template: Any) -> bool:
    """The same test TRL applies before it decides the template needs patching."""
    from trl.chat_template_utils import has_generation_markers

    return bool(template) and has_generation_markers(template)


def resolve(tokenizer: Any, *, model_type: str, path: str | None, assistant_only: bool) -> ChatTemplate:
    """Pick the template (see module docstring) and find its end-of-turn token; raise when none fits."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise RecipeError(f"student.chat_template: {path}: file not found")
        text, source = file.read_text(encoding="utf-8"), str(file)
    elif has_markers(own := _own_template(tokenizer)) or (own and not assistant_only):
        text, source = own, "model"
    else:
        text, source = _family_template(tokenizer, model_type=model_type)
    if assistant_only and not has_markers(text):
        raise RecipeError(
            f"student.chat_template: the template from {source} has no {{% generation %}} markers, "
            "which assistant-only loss needs; add them or set student.sft.assistant_only_loss: false"
        )
    token, token_id = end_of_turn(tokenizer, template=text, source=source)
    check_think_tokens(tokenizer)
    return ChatTemplate(text=text, source=source, end_of_turn=token, end_of_turn_id=token_id)


def _own_template(tokenizer: Any) -> str | None:
    """The tokenizer's template; one shipped as named variants counts by its `default` (as in TRL)."""
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def _family_template(tokenizer: Any, *, model_type: str) -> tuple[str, str]:
    if model_type not in FAMILIES:
        raise RecipeError(
            f"student.chat_template: the model ({model_type}) has no chat template with {{% generation %}} markers "
            f"and distill ships templates only for {', '.join(sorted(FAMILIES))}; point student.chat_template at a "
            "Jinja file whose assistant turn (including its end-of-turn token) is wrapped in the markers"
        )
    name, needed = FAMILIES[model_type]
    vocab = tokenizer.get_vocab()
    missing = [token for token in needed if token not in vocab]
    if missing:
        raise RecipeError(
            f"student.chat_template: the shipped {name} needs {', '.join(missing)} in the vocabulary, "
            "which this tokenizer lacks; set student.chat_template to a template for this tokenizer"
        )
    log.info("chat template: the model's own has no generation markers; using student/templates/%s", name)
    return (TEMPLATES / name).read_text(encoding="utf-8"), f"student/templates/{name}"


def end_of_turn(tokenizer: Any, *, template: str, source: str) -> tuple[str, int]:
    """The last token the template puts inside the assistant's generation span (trailing whitespace skipped).

    Without markers (assistant_only_loss off) the token right after the reply text is taken instead."""
    out = tokenizer.apply_chat_template(
        PROBE, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    span = [i for i, bit in zip(ids, mask, strict=True) if bit] or _after_reply(tokenizer, ids)
    stop = next((i for i in reversed(span) if tokenizer.decode([i]).strip()), None)
    added = set(tokenizer.get_added_vocab().values())
    if stop is None or stop not in added:
        found = "nothing" if stop is None else repr(tokenizer.decode([stop]))
        raise RecipeError(
            f"chat template from {source}: the assistant turn must end with an end-of-turn token "
            f"inside {{% generation %}}, found {found}; the student would never learn to stop"
        )
    return tokenizer.convert_ids_to_tokens(stop), stop


def _after_reply(tokenizer: Any, ids: list[int]) -> list[int]:
    reply = tokenizer.encode(PROBE[-1]["content"], add_special_tokens=False)
    for start in range(len(ids) - len(reply), -1, -1):
        if ids[start : start + len(reply)] == reply:
            return ids[start : start + len(reply) + 1]
    return []


def check_think_tokens(tokenizer: Any) -> None:
    """`<think>`/`</think>` must stay plain text as in R1-Distill: as special tokens, decoding with
    skip_special_tokens (vLLM's default) would delete them and the filter/eval could not split the reasoning."""
    special = set(tokenizer.all_special_tokens)
    for tag in (THINK_OPEN, THINK_CLOSE):
        if tag in special:
            raise DistillError(
                f"tokenizer: {tag} is a special token, so decoding would drop it from the output; "
                "register it as a normal added token (special=False) or leave it out of the vocabulary"
            )
