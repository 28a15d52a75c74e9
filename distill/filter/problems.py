"""Problem-level steps: decontamination against benchmarks, exact and near-duplicate removal.

They judge a *problem*, once, the first time one of its traces streams by; every trace of the problem then gets the
same answer (memoised by problem id). Traces of one problem id are never duplicates of each other; a second id
whose text matches an earlier problem is, and the first id seen wins. They run in the parent process, before
verification, so duplicates and benchmark problems cost no verifier time.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from typing import Any

from distill.filter.steps import Step
from distill.sources import DataSource

log = logging.getLogger(__name__)
_WORD = re.compile(r"\w+")
DECONTAM_N = 8  # word n-gram length for benchmark overlap (open-r1 and the Tulu/OLMo reports use 8 to 13)
SHINGLE_N = 3  # word shingles for MinHash
NUM_PERM = 64  # MinHash permutations: ~0.5 KB of LSH state per problem


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalise(text: str) -> str:
    """Case, Unicode form, punctuation and spacing do not make a problem new."""
    return " ".join(words(text))


def ngrams(tokens: list[str], n: int) -> set[str]:
    """Word n-grams; a text shorter than n is one gram (so short benchmark questions still match exactly)."""
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class _Memo(Step):
    """A step whose verdict is per problem: computed for the first trace of a problem id, reused for the rest."""

    def __init__(self) -> None:
        self._seen: dict[str, str | None] = {}

    def check(self, record: dict[str, Any]) -> str | None:
        pid = record["id"]
        if pid not in self._seen:
            self._seen[pid] = self.judge(record["problem"])
        return self._seen[pid]

    def judge(self, problem: str) -> str | None:
        raise NotImplementedError(f"{type(self).__name__}.judge")


class Decontaminate(_Memo):
    """Drop problems sharing a word 8-gram with a benchmark; the reason names the benchmark
    (`contaminated_<benchmark>`), so the funnel counts removals per benchmark."""

    name = "decontaminate"

    def __init__(self, benchmarks: dict[str, list[str]]) -> None:
        super().__init__()
        self.index: dict[int, str] = {}  # hash of an 8-gram -> first benchmark holding it
        for bench, problems in benchmarks.items():
            for text in problems:
                for gram in ngrams(words(text), DECONTAM_N):
                    self.index.setdefault(hash(gram), bench)
        self.reasons = tuple(f"contaminated_{bench}" for bench in benchmarks)

    def judge(self, problem: str) -> str | None:
        for gram in ngrams(words(problem), DECONTAM_N):
            if (bench := self.index.get(hash(gram))) is not None:
                return f"contaminated_{bench}"
        return None


def load_benchmarks(sources: list[DataSource]) -> dict[str, list[str]]:
    """Problem texts per benchmark, read through the dataset specs (the same loader as the recipe's data)."""
    from distill.data import load_source

    texts: dict[str, list[str]] = {}
    for source in sources:
        loaded = load_source(source)
        texts.setdefault(loaded.spec.name, []).extend(p.problem for p in loaded.problems)
        log.info("decontaminate: %d problems of %s (%s)", len(loaded.problems), loaded.spec.name, loaded.location)
    return texts


class ExactDedup(_Memo):
    name, reasons = "exact_dedup", ("duplicate_problem",)

    def __init__(self) -> None:
        super().__init__()
        self.digests: set[bytes] = set()

    def judge(self, problem: str) -> str | None:
        digest = hashlib.blake2b(normalise(problem).encode(), digest_size=12).digest()
        if digest in self.digests:
            return "duplicate_problem"
        self.digests.add(digest)
        return None


class NearDedup(_Memo):
    """MinHash LSH (datasketch) over word 3-grams: drops a problem whose estimated Jaccard similarity to an
    earlier kept problem exceeds the threshold."""

    name, reasons = "near_dedup", ("near_duplicate_problem",)

    def __init__(self, *, threshold: float) -> None:
        from datasketch import MinHashLSH

        super().__init__()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.count = 0

    def judge(self, problem: str) -> str | None:
        from datasketch import MinHash

        shingles = ngrams(words(problem), SHINGLE_N)
        if not shingles:
            return None
        sketch = MinHash(num_perm=NUM_PERM)
        sketch.update_batch([s.encode() for s in shingles])
        if self.lsh.query(sketch):
            return "near_duplicate_problem"
        self.lsh.insert(str(self.count), sketch)
        self.count += 1
        return None


def problem_steps(config: Any) -> list[Step]:
    """The problem-level steps a `Filter` section switches on: decontamination, exact dedup, near dedup."""
    steps: list[Step] = []
    if config.decontaminate:
        steps.append(Decontaminate(load_benchmarks(config.decontaminate)))
    if config.dedup:
        steps.append(ExactDedup())
    if config.near_dup_threshold is not None:
        steps.append(NearDedup(threshold=config.near_dup_threshold))
    return steps
