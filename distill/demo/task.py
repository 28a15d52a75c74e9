"""The demo's synthetic task: 3-digit addition whose chain of thought lays the sum out column by column.

A tiny model cannot add 3-digit numbers in one step, but it can learn each step of the written method: lay out each
number by place, add one column (two digits and a carry) at a time, and extend a running result. Fixed-width
operands (100–999) keep every step at a fixed position, which a 2-layer model learns in ~800 SFT steps (mixed 2–3
digit widths needed ~1,500). So the reasoning is genuinely needed (answers-only training is the ablation that shows
it), and a briefly trained teacher makes the mistakes (a dropped carry, a misread digit) that verification then
filters out. Every digit is its own token
(see `distill.tinymodel`), so a column step is a lookup the model can learn in minutes on 2 cores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands")


@dataclass(frozen=True)
class Addition:
    """One problem: the numbers to add (two or more)."""

    numbers: tuple[int, ...]

    @property
    def text(self) -> str:
        return f"What is {' + '.join(map(str, self.numbers))}?"

    @property
    def answer(self) -> str:
        return str(sum(self.numbers))

    def reasoning(self) -> str:
        """The written method: place layout, then one line per column with the carry and the running result."""
        width = max(len(str(n)) for n in self.numbers)
        digits = [str(n).zfill(width) for n in self.numbers]
        lines = [
            f"{n} = " + ", ".join(f"{d} {PLACES[width - 1 - i]}" for i, d in enumerate(ds))
            for n, ds in zip(self.numbers, digits, strict=True)
        ]
        carry, result = 0, ""
        for column in range(width):
            column_digits = [int(ds[width - 1 - column]) for ds in digits]
            total = sum(column_digits) + carry
            result = str(total % 10) + result
            terms = "+".join(map(str, [*column_digits, carry]))
            lines.append(f"{PLACES[column]}: {terms}={total}, carry {total // 10}, so far {result}")
            carry = total // 10
        if carry:
            result = str(carry) + result
            lines.append(f"{PLACES[width]}: carry {carry}, so far {result}")
        return "\n".join(lines)

    def completion(self) -> str:
        """The gold assistant turn in R1's form (the teacher's `think_prefix` `<think>\\n` included)."""
        return f"<think>\n{self.reasoning()}\n</think>\n\n\\boxed{{{self.answer}}}"


def sample_problems(
    count: int,
    *,
    seed: int,
    digits: tuple[int, int] = (3, 3),
    operands: int = 2,
    exclude: set[tuple[int, ...]] | frozenset = frozenset(),
) -> list[Addition]:
    """`count` distinct problems, deterministic in `seed`, none in `exclude` (keeps the splits disjoint)."""
    rng = random.Random(seed)
    seen, problems = set(exclude), []
    while len(problems) < count:
        numbers = tuple(_number(rng, rng.randint(*digits)) for _ in range(operands))
        if numbers not in seen:
            seen.add(numbers)
            problems.append(Addition(numbers))
    return problems


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)
