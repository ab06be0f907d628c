"""Metrics: multiple-choice accuracy by option log-likelihood, ROUGE-L and cloze accuracy.

All values lie in [0, 1]. Directions, for an unlearned model against its vanilla model:

==================  =========================================================  ==========
key                 what                                                        goal
==================  =========================================================  ==========
forget_vqa          MC accuracy, image questions on the forget entities         lower
forget_qa           MC accuracy, text-only questions on the forget entities     keep
test_vqa            MC accuracy, unseen images of the forget entities           lower
retain_vqa          MC accuracy, image questions on the other entities          keep
retain_qa           MC accuracy, text-only questions on the other entities      keep
*_vqa_rougeL        ROUGE-L F1 of greedy answers, image questions               as above
*_qa_rougeL         ROUGE-L F1 of greedy answers, text questions                keep
*_cloze             fill-in-the-blank accuracy (answer starts with the truth)   as above
==================  =========================================================  ==========

A multiple-choice item is scored by the log-likelihood of each option as the answer,
calibrated by the option's likelihood without the entity's image or name (see
``option_scores``); the highest wins. This is deterministic and needs no instruction following. Each item sits in its own
padded row, so batching changes nothing but float rounding.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from vkd.data.layout import decode_image
from vkd.model import ModelAdapter

_WORD = re.compile(r"\w+")


def _direction(key: str) -> str:
    """'lower' where an unlearned model should score less than its vanilla model, else 'keep'."""
    return "lower" if key.startswith(("forget_vqa", "test_vqa")) else "keep"


DIRECTIONS = {f"{role}_{kind}{suffix}": _direction(f"{role}_{kind}")
              for role in ("forget", "retain", "test") for kind in ("vqa", "qa")
              for suffix in ("", "_rougeL", "_cloze")}


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


def item_images(items: Sequence[dict]) -> list[Any] | None:
    """Decoded images of a group of items (all with an image, or None when they have none)."""
    if items[0]["image"] is None:
        return None
    return [decode_image(it["image"], it["source"]) for it in items]


def _option_logp(adapter: ModelAdapter, prompt_ids: list[list[int]], options: list[str],
                 extra: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean log-likelihood per token of ``options[i]`` after ``prompt_ids[i]``."""
    batch = adapter.batch(prompt_ids, adapter.target_ids(options, eos=False))
    labels = batch.pop("labels")[:, 1:]
    logits = adapter.model(**batch, **extra).logits[:, :-1].float()
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


CONTENT_FREE_NAME = "N/A"


def _reference(item: dict) -> str:
    """The content-free twin of an item's prompt: an image question without its image, a
    text question with the entity's name replaced by "N/A"."""
    if item["image"] is not None:
        return item["question"]
    name = item.get("name") or ""
    return item["question"].replace(name, CONTENT_FREE_NAME) if name else ""


@torch.no_grad()
def option_scores(adapter: ModelAdapter, items: Sequence[dict], ref_cache: dict | None = None) -> np.ndarray:
    """Calibrated score of every option of every item: [items, options].

    score = mean log p(option | context) - mean log p(option | content-free context), where
    the content-free context drops what identifies the entity: the image of an image
    question (the question is asked as text alone), the name of a text question (replaced
    by "N/A"). This is contextual calibration ("calibrate before use"), a pointwise mutual
    information: it removes the model's prior for the option string under that question,
    so neither a model that favours short or frequent strings nor a random one scores above
    chance by them; what is left is what the entity's picture or name adds. (A blank image
    is no content-free image for a trained model: it maps it to some entity and then
    penalises that entity's answers; on the demo vanilla model that cost 0.12 accuracy.)
    The content-free scores repeat across entities; ``ref_cache`` keeps them for one model."""
    images = item_images(items)
    prompt_ids, extra = adapter.prompt_inputs([it["question"] for it in items], images)
    n_opt = len(items[0]["options"])
    options = [opt for it in items for opt in it["options"]]
    rep = {k: v.repeat_interleave(n_opt, dim=0) for k, v in extra.items()}
    cond = _option_logp(adapter, [p for p in prompt_ids for _ in range(n_opt)], options, rep)
    table = {} if ref_cache is None else ref_cache
    wanted = [(_reference(it), opt) for it in items for opt in it["options"]]
    missing = sorted(set(wanted) - set(table))
    if missing:
        ref_ids, _ = adapter.prompt_inputs([q for q, _ in missing], None)
        table.update(zip(missing, _option_logp(adapter, ref_ids, [o for _, o in missing], {}).tolist()))
    prior = torch.tensor([table[w] for w in wanted])
    return (cond - prior).view(len(items), n_opt).numpy()


@torch.no_grad()
def generate(adapter: ModelAdapter, items: Sequence[dict], max_new_tokens: int) -> list[str]:
    prompt_ids, extra = adapter.prompt_inputs([it["question"] for it in items], item_images(items))
    batch = adapter.batch(prompt_ids, left_pad=True)
    batch.pop("labels")
    tok = adapter.tokenizer
    out = adapter.model.generate(**batch, **extra, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip().split("\n")[0] for t in texts]


def score_items(adapter: ModelAdapter, items: Sequence[dict], max_new_tokens: int = 24,
                ref_cache: dict | None = None) -> list[dict]:
    """One result per item: ``{key, value}``; value is 0/1 for mc and cloze, ROUGE-L F1 for gen.

    Items are computed one group at a time (same task, with or without image), each item
    alone in its padded row, so the result does not depend on batch composition."""
    groups: dict[tuple[str, bool, int], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[(it["task"], it["image"] is None, len(it["options"]))].append(i)
    values = [0.0] * len(items)
    for (task, _, _), idx in groups.items():
        sub = [items[i] for i in idx]
        if task == "mc":
            scores = option_scores(adapter, sub, ref_cache)
            for i, it, s in zip(idx, sub, scores):
                values[i] = float(int(np.argmax(s)) == int(it["answer"]))
        else:
            answers = generate(adapter, sub, max_new_tokens)
            for i, it, ans in zip(idx, sub, answers):
                values[i] = rouge_l(ans, it["truth"]) if task == "gen" else cloze_correct(ans, it["truth"])
    return [{"key": it["key"], "value": v} for it, v in zip(items, values)]


def aggregate(results: Iterable[dict]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for r in results:
        sums[r["key"]].append(float(r["value"]))
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def counts(results: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in results:
        out[r["key"]] += 1
    return dict(sorted(out.items()))


def evaluate_items(adapter: ModelAdapter, items: Sequence[dict], batch_size: int = 32,
                   max_new_tokens: int = 24) -> list[dict]:
    """In-process evaluation (unit tests, small runs): the same scoring the Ray actors run."""
    results: list[dict] = []
    cache: dict = {}
    for start in range(0, len(items), batch_size):
        results += score_items(adapter, items[start:start + batch_size], max_new_tokens, cache)
    return results
