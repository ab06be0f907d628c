"""Evaluation during a run, on rank 0 of its trainer (a tune trial's intermediate results,
a batch request's final scores): the multiple-choice items of the run's ``eval`` settings
scored on the model as it trains, with the study objective against the starting model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vkd.config import EvalConfig
from vkd.data.items import eval_items, plan_for, reference_images
from vkd.data.layout import ForgetSet
from vkd.loop import Callback
from vkd.metrics import aggregate, guess_chance
from vkd.model import ModelAdapter
from vkd.scoring import evaluate_items
from vkd.study import objective
from vkd.train import whole_params


@dataclass
class ProbeSpec:
    """What a run evaluates as it trains: the benchmark and forget set, the evaluation
    settings, the starting model and its scores (``before`` on every item,
    ``sample_before`` on the rungs' sample when the caller has them), and the steps (the
    last step always)."""
    data: str
    forget: ForgetSet
    eval: EvalConfig
    start_model: str
    before: dict[str, float]
    at: list[int]
    sample_before: dict[str, float] | None = None


class Probe:
    """The items of ``spec.eval`` (its samples and limits; the long open questions are
    skipped, the objective needs none) scored on a model, with the study objective against
    ``before`` (the lookalike keys of ``spec.forget``). Results before the last step score every ``SAMPLE``-th item of each key
    (cheap rungs for ASHA, the same items at every rung, against the starting model scored
    on those items); the last scores all."""

    SAMPLE = 4

    def __init__(self, spec: ProbeSpec, text_fixed: bool = False):
        cfg = spec.eval
        self.items = eval_items(spec.data, spec.forget, cfg.max_rows, generation=False,
                                plan=plan_for(spec.data, spec.forget, cfg), gen_limit=cfg.max_gen)
        self.references = reference_images(spec.data, spec.forget, cfg.references)
        self.before, self.batch_size = spec.before, cfg.batch_size
        by_key: dict[str, list[dict]] = {}
        for it in self.items:
            by_key.setdefault(it["key"], []).append(it)
        # every SAMPLE-th item of each key (at least one), so every key is scored at every rung
        self.sample = [it for group in by_key.values() for it in group[::self.SAMPLE]]
        # a run that trains the visual module alone cannot move a text-only answer: the
        # earlier rungs take those keys from the starting model (the last result scores them)
        self.rung_items = [it for it in self.sample if it["image"] is not None] if text_fixed else self.sample
        self.start_model, self.lookalikes = spec.start_model, spec.forget.lookalikes
        self.sample_before = spec.sample_before
        self.chance = guess_chance(self.items)  # the open questions' chance, on every item (the rungs too)

    def start_scores(self) -> dict[str, float]:
        """The starting model's scores on the sample."""
        return self.score(ModelAdapter.load(self.start_model), self.sample)

    def score(self, adapter: ModelAdapter, items: list[dict]) -> dict[str, float]:
        model = adapter.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            scores = aggregate(evaluate_items(adapter, items, self.references, self.batch_size), self.lookalikes)
        model.train(was_training)
        return scores

    def __call__(self, adapter: ModelAdapter, final: bool) -> dict[str, float]:
        if final:
            after = self.score(adapter, self.items)
            return {**{f"eval/{k}": v for k, v in after.items()}, **objective(self.before, after, self.chance)}
        if self.sample_before is None:
            self.sample_before = self.start_scores()
        after = {**self.sample_before, **self.score(adapter, self.rung_items)}
        return {**{f"eval/{k}": v for k, v in after.items()}, **objective(self.sample_before, after, self.chance)}


class ProbeCallback(Callback):
    """Evaluates at the run's probe steps. Every rank enters (under ZeRO-3 the parameters
    are gathered for it); rank 0 scores (``probe`` None elsewhere)."""

    def __init__(self, probe: Probe | None):
        self.probe = probe

    def on_step(self, run, report: dict[str, Any]) -> None:
        if not run.timetable.probe(run.step):
            return
        with whole_params(run.engine, run.cfg.zero_stage):
            if self.probe is not None:
                report.update(self.probe(run.adapter, final=run.done))
