"""Metric keys, their directions, and the per-item scores they average.

Every key lies in [0, 1]. Its goal, for an unlearned model against its starting model:
``lower`` (the forget entities' image questions: forgotten is what was asked for) or
``keep`` (everything else: their text, and everyone else). This module is the one list of
keys; reports, studies, batch thresholds and benchmarks read it from here.

======================  ======================================================  ======
key                     what                                                    goal
======================  ======================================================  ======
forget_vqa              image questions, the forget entities' profile images    lower
test_vqa                image questions, unseen images of the forget entities   lower
forget_qa               text-only questions about the forget entities           keep
retain_vqa              image questions, every other entity's profile image     keep
retain_qa               text-only questions about every other entity            keep
retain_test_vqa         image questions, unseen images of other entities        keep
lookalike_vqa           retain_vqa of the lookalikes (the retain entities       keep
                        nearest a forget entity to the starting model)
lookalike_test_vqa      retain_test_vqa of the lookalikes                       keep
======================  ======================================================  ======

Each key is multiple-choice accuracy (calibrated option log-likelihood, ``vkd.scoring``);
its twins: ``<key>_gen``, the share of short open questions (the multiple-choice questions
asked without options, and open questions whose truth has at most six words) whose greedy
answer contains the ground truth, both normalised (:func:`normalise_answer`; the answer is
at most two tokens longer than its truth, so a list of guesses does not fit);
``*_rougeL`` (ROUGE-L F1 of greedy answers to the long open questions) and ``*_cloze``
(fill-in-the-blank: the answer starts with the truth), as the prefix.
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Iterable

import numpy as np

MC_KEYS = ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa")
NEW_KEYS = ("retain_test_vqa", "lookalike_vqa", "lookalike_test_vqa")   # unseen retain images, lookalikes
BASE_KEYS = MC_KEYS + NEW_KEYS
GEN_KEYS = tuple(f"{k}_gen" for k in BASE_KEYS)
KEYS = BASE_KEYS + GEN_KEYS                       # the headline keys: every report, study and decision
FORGET_KEYS = ("forget_vqa", "test_vqa")          # goal lower: what unlearning removes
SUFFIXES = ("", "_gen", "_rougeL", "_cloze")
LOOKALIKE_OF = {"retain_vqa": "lookalike_vqa", "retain_test_vqa": "lookalike_test_vqa"}


def direction(key: str) -> str:
    """'lower' where an unlearned model should score less than its starting model, else 'keep'."""
    return "lower" if key.startswith(FORGET_KEYS) else "keep"


ROLE_KINDS = ("forget_vqa", "forget_qa", "test_vqa", "test_qa", "retain_vqa", "retain_qa", *NEW_KEYS)
DIRECTIONS = {f"{base}{suffix}": direction(base) for base in ROLE_KINDS for suffix in SUFFIXES}
# the relearning attack's Accuracy Gaps (relearned - unlearned, on what the attack held out) and their keys
RELEARN_KEYS = {"relearn_ag": "forget_vqa", "relearn_test_ag": "test_vqa", "relearn_ag_gen": "forget_vqa_gen",
                "relearn_test_ag_gen": "test_vqa_gen"}
MC_CHANCE = 0.25                                                # four options
CHANCE = {k: (MC_CHANCE if k in BASE_KEYS else 0.0) for k in KEYS}   # an untrained model's score
                                                                     # (generation: see guess_chance)

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


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and the articles a, an, the dropped, spaces collapsed (as
    SQuAD's answer matching does)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def contains_truth(prediction: str, truth: str) -> float:
    """1.0 when the normalised truth is a run of whole words of the normalised answer."""
    t = normalise_answer(truth)
    return float(bool(t) and f" {t} " in f" {normalise_answer(prediction)} ")


def guess_chance(items: Iterable[dict]) -> dict[str, float]:
    """Per short-answer key whose goal is lower (``forget_vqa_gen``, ``test_vqa_gen``), the
    share of its items a stranger answers right: one who knows the population but not the
    person, and answers the open question with what someone else is (another entity's
    value). An item's chance is the share of the other entities in ``items`` that have its
    truth (normalised) among their own short answers; the key's is the mean over its items.

    It is the open questions' counterpart of multiple choice's 1/4: on the synthetic
    benchmark an occupation or a pet is shared by several people, so a model that has
    forgotten a person and answers with the commonest pet still says the truth for some of
    them (about 8% of forget_10's short answers), as any model that never saw the person
    would. A model that answers *less* often than that avoids the truth: it still tells it
    apart. Names and birth years are almost never shared, so their chance is about 0."""
    items = [it for it in items if it.get("task") == "short"]
    truths: dict[str, set[str]] = defaultdict(set)
    for it in items:
        truths[it["entity"]].add(normalise_answer(it["truth"]))
    shares: dict[str, list[float]] = defaultdict(list)
    for it in items:
        if direction(it["key"]) != "lower":
            continue
        others = [e for e in truths if e != it["entity"]]
        t = normalise_answer(it["truth"])
        shares[it["key"]].append(sum(t in truths[e] for e in others) / len(others) if others else 0.0)
    return {k: float(np.mean(v)) for k, v in sorted(shares.items())}


def cloze_correct(prediction: str, truth: str) -> float:
    pred, ref = normalise(prediction), normalise(truth)
    return float(bool(ref) and pred[:len(ref)] == ref)


def with_lookalikes(results: Iterable[dict], lookalikes: Iterable[str] = ()) -> list[dict]:
    """The results, and again under the lookalike keys those of the retain keys' items whose
    entity is a lookalike (the lookalike keys are views of the retain keys)."""
    results, wanted = list(results), set(lookalikes)
    extra = []
    for r in results:
        base = r["key"][:-len("_gen")] if r["key"].endswith("_gen") else r["key"]
        if base in LOOKALIKE_OF and r["entity"] in wanted:
            extra.append({**r, "key": LOOKALIKE_OF[base] + r["key"][len(base):]})
    return results + extra


def aggregate(results: Iterable[dict], lookalikes: Iterable[str] = ()) -> dict[str, float]:
    """Per key, the mean of its items' values (with the lookalike keys of ``lookalikes``)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for r in with_lookalikes(results, lookalikes):
        sums[r["key"]].append(float(r["value"]))
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def counts(results: Iterable[dict], lookalikes: Iterable[str] = ()) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in with_lookalikes(results, lookalikes):
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
