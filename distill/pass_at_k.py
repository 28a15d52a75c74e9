"""pass@k and maj@k as a Hugging Face `evaluate` metric module, loadable by path by anyone:

    import evaluate
    metric = evaluate.load("path/to/distill/pass_at_k.py")
    metric.compute(predictions=[["12", "12", "7"]], references=[[True, True, False]], k=[1, 2])
    # {"pass@1": 0.667, "pass@2": 1.0, "maj@3": 1.0, "problems": 1, "samples": 3}

Each prediction is one problem's k sampled answers (canonical answer keys, "" where none was extracted); each
reference is the matching list of verdicts (True = verified correct). pass@1 is the mean over samples (R1's
protocol); pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), averaged over problems;
maj@n counts a problem as solved when the most common non-empty answer is a correct one.
"""

from __future__ import annotations

from collections import Counter

import evaluate
import numpy as np

import datasets

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list (one per problem) of lists of answer keys, one per sample.
    references: list (one per problem) of lists of booleans, one per sample: was that sample correct?
    k: list of k values for pass@k (each at most the samples per problem).
Returns:
    dict with "pass@k" for each k, "maj@n" (n = samples per problem), "problems" and "samples".
"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: list[str], verdicts: list[bool]) -> bool:
    """Is the most frequent non-empty answer correct? Ties go to the answer seen first (a fixed, stated rule)."""
    votes = Counter(a for a in answers if a)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == top)
    return any(v for a, v in zip(answers, verdicts, strict=True) if a == winner)


def score(predictions: list[list[str]], references: list[list[bool]], k: list[int]) -> dict[str, float | int]:
    """The metric itself, usable without `evaluate` (the eval stage and the module share it)."""
    if not references:
        raise ValueError("no problems to score")
    sizes = {len(r) for r in references}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    results: dict[str, float | int] = {}
    for value in sorted(set(k)):
        results[f"pass@{value}"] = float(np.mean([pass_at_k(n, sum(r), value) for r in references]))
    results[f"maj@{n}"] = float(
        np.mean([majority_correct(p, r) for p, r in zip(predictions, references, strict=True)])
    )
    results["problems"], results["samples"] = len(references), n
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chen et al., Evaluating Large Language Models Trained on Code, 2021 (pass@k estimator).",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1,)):
        return score([list(p) for p in predictions], [list(r) for r in references], list(k))
