"""Metric keys, their directions, and the per-item scores they average.

Every key lies in [0, 1]. Its goal, for an unlearned model against its starting model:
``lower`` (the forget entities' image questions: forgotten is what was asked for) or
``keep`` (everything else: their text, and everyone else). This module is the one list of
keys; reports, studies, batch thresholds and benchmarks read it from here.

==================  =========================================================  ==========
key                 what                                                        goal
==================  =========================================================  ==========
forget_vqa          MC accuracy, image questions on the forget entities         lower
test_vqa            MC accuracy, unseen images of the forget entities           lower
forget_qa           MC accuracy, text-only questions on the forget entities     keep
retain_vqa          MC accuracy, image questions on the other entities          keep
retain_qa           MC accuracy, text-only questions on the other entities      keep
*_rougeL            ROUGE-L F1 of greedy answers to the open questions          as the prefix
*_cloze             fill-in-the-blank accuracy (answer starts with the truth)   as the prefix
==================  =========================================================  ==========
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

import numpy as np

# (role, kind) of every multiple-choice key, forgetting first; a role's rows: forget (the
# forget entities' profile rows), test (their unseen images), retain (every other entity)
MC_KEYS = ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa")
FORGET_KEYS = ("forget_vqa", "test_vqa")          # goal lower: what unlearning removes
KEEP_KEYS = ("forget_qa", "retain_vqa", "retain_qa")
SUFFIXES = ("", "_rougeL", "_cloze")              # multiple choice, ROUGE-L, cloze


def direction(key: str) -> str:
    """'lower' where an unlearned model should score less than its starting model, else 'keep'."""
    return "lower" if key.startswith(FORGET_KEYS) else "keep"


ROLE_KINDS = ("forget_vqa", "forget_qa", "test_vqa", "test_qa", "retain_vqa", "retain_qa")
DIRECTIONS = {f"{base}{suffix}": direction(base) for base in ROLE_KINDS for suffix in SUFFIXES}

_WORD = re.compile(r"\w+")


def normalise(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (longest common subsequence)."""
    a, b = normalise(prediction), normalise(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def cloze_correct(prediction: str, truth: str) -> float:
    pred, ref = normalise(prediction), normalise(truth)
    return float(bool(ref) and pred[:len(ref)] == ref)


def aggregate(results: Iterable[dict]) -> dict[str, float]:
    """Per key, the mean of its items' values."""
    sums: dict[str, list[float]] = defaultdict(list)
    for r in results:
        sums[r["key"]].append(float(r["value"]))
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def counts(results: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in results:
        out[r["key"]] += 1
    return dict(sorted(out.items()))


def format_table(metrics: dict[str, float], n: dict[str, int] | None = None,
                 columns: dict[str, dict[str, float]] | None = None) -> str:
    """A plain-text table: one row per metric, its direction, and one or more value columns."""
    columns = columns or {"value": metrics}
    head = f"{'metric':<22} {'goal':<6}" + "".join(f" {c:>10}" for c in columns) + (f" {'n':>6}" if n else "")
    lines = [head, "-" * len(head)]
    for key in sorted(set().union(*[set(c) for c in columns.values()])):
        vals = "".join(f" {c[key]:>10.3f}" if key in c else f" {'':>10}" for c in columns.values())
        lines.append(f"{key:<22} {DIRECTIONS.get(key, ''):<6}{vals}" + (f" {n.get(key, 0):>6}" if n else ""))
    return "\n".join(lines)
