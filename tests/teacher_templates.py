"""An R1-family copy of the tiny model: its chat template ends the generation prompt with `<think>\\n` itself, as
DeepSeek-R1's and the R1-Distill models' templates do (shared by the offline and endpoint teacher tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

from distill.tinymodel import CHAT_TEMPLATE

# Only the generation prompt opens the think block; earlier assistant turns render as before (R1's do not repeat it).
GENERATION_PROMPT = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
R1_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(GENERATION_PROMPT, GENERATION_PROMPT.replace("\\n'", "\\n<think>\\n'"))
assert CHAT_TEMPLATE.count(GENERATION_PROMPT) == 1, "the tiny model's template changed: update GENERATION_PROMPT"


def r1_copy(model: Path, out: Path) -> Path:
    """`model` with its tokenizer's chat template replaced by R1_CHAT_TEMPLATE."""
    shutil.copytree(model, out)
    (out / "chat_template.jinja").write_text(R1_CHAT_TEMPLATE)
    return out
