"""Scoring a model on evaluation items: multiple choice by calibrated option
log-likelihood, and greedy answers to the open questions (see ``vkd.metrics`` for the keys
and their directions).

A multiple-choice item is scored by the log-likelihood of each option as the answer,
calibrated by the option's likelihood given other entities' images, or without the entity's
name (see ``option_scores``); the highest wins. This is deterministic and needs no
instruction following. Each item sits in its own padded row, so batching changes nothing
but float rounding. Each prompt runs once and its keys/values are shared by its options.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from vkd.data.layout import decode_image
from vkd.metrics import cloze_correct, contains_truth, rouge_l
from vkd.model import ModelAdapter


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
    return ((logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).cpu()


def _shared_option_logp(adapter: ModelAdapter, prompt_ids: list[list[int]], options: list[list[str]],
                        extra: dict[str, torch.Tensor]) -> torch.Tensor:
    """``_option_logp`` of every option in ``options[i]`` after ``prompt_ids[i]``, flat, with
    each prompt run once: its last logits predict the options' first tokens, and its
    keys/values, repeated per option, the later ones. Prompts are left-padded so that their
    keys end where the options start; positions count real tokens only, as in the
    right-padded full sequences."""
    batch = adapter.batch(prompt_ids, left_pad=True)
    mask = batch["attention_mask"]
    out = adapter.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=True,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1, **extra)
    dev = mask.device
    row = torch.tensor([i for i, opts in enumerate(options) for _ in opts], device=dev)
    targets = adapter.target_ids([o for opts in options for o in opts], eos=False)
    width = max(1, *map(len, targets))
    tokens = torch.full((len(targets), width), adapter.tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(targets), width), dtype=torch.long)
    for i, t in enumerate(targets):
        tokens[i, :len(t)], valid[i, :len(t)] = torch.tensor(t, dtype=torch.long), 1
    tokens, valid = tokens.to(dev), valid.to(dev)
    logits = out.logits[row, -1:].float()
    if width > 1:  # no image here: it is in the cached keys/values
        out.cache.batch_select_indices(row)
        rest = adapter.model(input_ids=tokens[:, :-1], attention_mask=torch.cat([mask[row], valid[:, :-1]], 1),
                             position_ids=mask.sum(-1)[row, None] + torch.arange(width - 1, device=dev),
                             cache=out.cache).logits
        logits = torch.cat([logits, rest.float()], 1)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return ((logp * valid).sum(-1) / valid.sum(-1).clamp(min=1)).cpu()


def _options_logp(adapter: ModelAdapter, questions: list[str], images: list[Any] | None,
                  options: list[list[str]]) -> torch.Tensor:
    """Mean log-likelihood per token of every option in ``options[i]`` as the answer to
    ``questions[i]`` (asked of ``images[i]``), flat. Families with 3-D positions (Qwen2-VL's
    mrope) run one full sequence per option instead of sharing the prompt's keys/values."""
    if adapter.family.name == "llava":
        prompt_ids, extra = adapter.prompt_inputs(questions, images)
        return _shared_option_logp(adapter, prompt_ids, options, extra)
    row = [i for i, opts in enumerate(options) for _ in opts]
    ids, extra = adapter.prompt_inputs([questions[i] for i in row], None if images is None else [images[i] for i in row])
    return _option_logp(adapter, ids, [o for opts in options for o in opts], extra)


CONTENT_FREE_NAME = "N/A"


class Calibration:
    """The content-free side of the option scores, for one model and one benchmark.

    An image question is calibrated by the marginal over ``references``: other entities'
    profile images, (entity id, image) pairs, fixed for the benchmark (see
    :func:`vkd.data.items.reference_images`). A text question is calibrated by the same
    question with the entity's name replaced by "N/A". The likelihoods repeat across
    entities (same question, same option strings), so they are kept here."""

    def __init__(self, references: Sequence[tuple[str, Any]] = ()):
        self.references = list(references)
        self.text: dict[tuple[str, str], float] = {}
        self.image: dict[tuple[str, str], torch.Tensor] = {}

    def text_prior(self, adapter: ModelAdapter, items: Sequence[dict]) -> torch.Tensor:
        wanted = [(self._unnamed(it), opt) for it in items for opt in it["options"]]
        missing = _by_question(set(wanted) - set(self.text))
        if missing:
            logp = _options_logp(adapter, list(missing), None, list(missing.values()))
            self.text.update(zip(_pairs(missing), logp.tolist()))
        return torch.tensor([self.text[w] for w in wanted])

    def image_prior(self, adapter: ModelAdapter, items: Sequence[dict]) -> torch.Tensor:
        """log of the mean likelihood of each option over the reference images of entities
        other than the item's own."""
        if not self.references:
            raise ValueError("image questions need reference images to calibrate against: "
                             "pass Calibration(reference_images(data, forget, k))")
        wanted = [(it["question"], opt) for it in items for opt in it["options"]]
        missing = _by_question(set(wanted) - set(self.image))
        if missing:
            questions, options = list(missing), list(missing.values())
            per_ref = [_options_logp(adapter, questions, [image] * len(questions), options)
                       for _, image in self.references]
            self.image.update(zip(_pairs(missing), torch.stack(per_ref, 1)))
        out = []
        owners = [ent for ent, _ in self.references]
        for it in items:
            keep = torch.tensor([o != it["entity"] for o in owners])
            for opt in it["options"]:
                logp = self.image[(it["question"], opt)][keep]
                out.append(torch.logsumexp(logp, 0) - np.log(len(logp)))
        return torch.stack(out)

    @staticmethod
    def _unnamed(item: dict) -> str:
        name = item.get("name") or ""
        return item["question"].replace(name, CONTENT_FREE_NAME) if name else ""


def _by_question(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(question, option) pairs as each question's options, in sorted order."""
    out: dict[str, list[str]] = defaultdict(list)
    for question, option in sorted(pairs):
        out[question].append(option)
    return dict(out)


def _pairs(by_question: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(q, o) for q, opts in by_question.items() for o in opts]


@torch.no_grad()
def option_scores(adapter: ModelAdapter, items: Sequence[dict], calibration: Calibration) -> np.ndarray:
    """Calibrated score of every option of every item: [items, options].

    score = log p(option | context) - log p(option | content-free context), each a mean
    per token. The content-free context keeps the question and drops what identifies the
    entity: for an image question, the likelihood is averaged over other entities' profile
    images (a domain-conditional PMI: what this picture adds over a picture of someone
    else); for a text question, the name is replaced by "N/A". This is contextual
    calibration ("calibrate before use"): it removes the model's prior for the option
    string under that question, so neither a model that favours short or frequent strings
    nor a random one scores above chance by them.

    Measured alternatives (benchmarks/calibration.py, demo vanilla model, 450 image
    questions): raw likelihood 0.909, a blank image 0.789 (a trained model maps it to some
    entity and penalises that entity's answers), the question alone without an image 0.842
    (the text-only prompt is out of the image questions' distribution), the marginal over 8
    reference images 0.902; an untrained model is at chance under all four."""
    images = item_images(items)
    n_opt = len(items[0]["options"])
    cond = _options_logp(adapter, [it["question"] for it in items], images, [it["options"] for it in items])
    prior = calibration.image_prior(adapter, items) if images else calibration.text_prior(adapter, items)
    return (cond - prior).view(len(items), n_opt).numpy()


@torch.no_grad()
def generate(adapter: ModelAdapter, items: Sequence[dict], max_new_tokens: int | Sequence[int]) -> list[str]:
    """Greedy answers, the first line of each; ``max_new_tokens`` per item (each row's own
    length: its answer does not depend on what else is in the batch) or for all."""
    limits = [max_new_tokens] * len(items) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    prompt_ids, extra = adapter.prompt_inputs([it["question"] for it in items], item_images(items))
    return greedy(adapter, prompt_ids, extra, limits)


@torch.no_grad()
def greedy(adapter: ModelAdapter, prompt_ids: list[list[int]], extra: dict[str, torch.Tensor],
           limits: Sequence[int]) -> list[str]:
    """``generate`` on prompts already built: the first line of each greedy answer, at most
    ``limits[i]`` tokens."""
    batch = adapter.batch(prompt_ids, left_pad=True)
    batch.pop("labels")
    tok = adapter.tokenizer
    out = adapter.model.generate(**batch, **extra, max_new_tokens=max(limits), do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    texts = tok.batch_decode([row[:n] for row, n in zip(new, limits)], skip_special_tokens=True)
    return [t.strip().split("\n")[0] for t in texts]


SHORT_MARGIN = 2  # tokens a short answer may run past its ground truth


def short_answer_tokens(adapter: ModelAdapter, items: Sequence[dict]) -> list[int]:
    """Greedy decoding length of each short question: its truth's tokens and
    ``SHORT_MARGIN``: enough for the answer, too little for a list of guesses."""
    return [len(t) + SHORT_MARGIN for t in adapter.target_ids([it["truth"] for it in items])]


def score_items(adapter: ModelAdapter, items: Sequence[dict], calibration: Calibration,
                max_new_tokens: int = 24) -> list[dict]:
    """One result per item: ``{key, entity, value}``; value is 0/1 for mc, short and cloze,
    ROUGE-L F1 for gen.

    Items are computed one group at a time (same task, with or without image), each item
    alone in its padded row, so the result does not depend on batch composition."""
    groups: dict[tuple[str, bool, int], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[(it["task"], it["image"] is None, len(it["options"]))].append(i)
    values = [0.0] * len(items)
    for (task, _, _), idx in groups.items():
        sub = [items[i] for i in idx]
        if task == "mc":
            scores = option_scores(adapter, sub, calibration)
            for i, it, s in zip(idx, sub, scores):
                values[i] = float(int(np.argmax(s)) == int(it["answer"]))
        elif task == "short":
            answers = generate(adapter, sub, short_answer_tokens(adapter, sub))
            for i, it, ans in zip(idx, sub, answers):
                values[i] = contains_truth(ans, it["truth"])
        else:
            answers = generate(adapter, sub, max_new_tokens)
            for i, it, ans in zip(idx, sub, answers):
                values[i] = rouge_l(ans, it["truth"]) if task == "gen" else cloze_correct(ans, it["truth"])
    return [{"key": it["key"], "entity": it["entity"], "value": v} for it, v in zip(items, values)]


def evaluate_items(adapter: ModelAdapter, items: Sequence[dict], references: Sequence[tuple[str, Any]],
                   batch_size: int = 32, max_new_tokens: int = 24) -> list[dict]:
    """In-process evaluation (unit tests, small runs): the same scoring the Ray actors run."""
    results: list[dict] = []
    calibration = Calibration(references)
    for start in range(0, len(items), batch_size):
        results += score_items(adapter, items[start:start + batch_size], calibration, max_new_tokens)
    return results
