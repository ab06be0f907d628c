"""VKD, Visual Knowledge Distillation unlearning (ARCHITECTURE.md, "The method"): the LLM
frozen; the visual module pruned of the neurons that matter for the forget entities and
trained, where the Fisher mask allows, on L = L_out + beta * L_VKD."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from vkd.config import option
from vkd.data.layout import TRAIN_SPLIT, read_rows
from vkd.data.streams import row_key, sample_rows
from vkd.methods.base import Method, MethodConfig, Preparation, register
from vkd.methods.baselines import updated_fraction
from vkd.methods.losses import DISTANCES, capped_nll, feature_distance, feature_tap, nll, npo_loss
from vkd.saliency import (CRITERIA, MODES, StatsRequest, apply_pruning, combine_masks, fisher_mask,
                          pruned_neurons)
from vkd.train import trainable_names

FORGET_LOSSES = ("ga", "npo", "refusal", "generic")
GENERIC = -1  # the teacher table's key of the generic person (image keys are non-negative)


@dataclass
class VKDConfig(MethodConfig):
    retain_weight: float = option(0.0, "weight of the retain cross-entropy (0: the retain images only pass "
                                       "through the visual module)", low=0)
    forget_loss: str = option("generic", "ga (ascent on the answers) | npo | refusal (descent to refusal_answer) | "
                                    "generic (the forget pictures' visual features drawn to a generic person's: "
                                    "generic_candidates; no LLM in the step)",
                              choices=FORGET_LOSSES)
    forget_cap: float = option(0.0, "forget_loss ga: a forget sequence stops being ascended once its mean answer "
                                    "NLL reaches this (0: never)", low=0)
    refusal_answer: str = option("I don't know.", "the forget target of forget_loss refusal")
    npo_beta: float = option(0.1, "forget_loss npo: NPO's inverse temperature", above=0)
    beta: float = option(1.0, "weight of L_VKD, the distillation to the teacher's visual features", low=0)
    vkd_distance: str = option("mse", "distance of L_VKD", choices=DISTANCES)
    vkd_layers: list[int] = option(factory=list, help="vision layers distilled besides the projector output")
    vision_layers: int = option(0, "train the last N vision layers and the projector (0: every layer)", low=0)
    importance: str = option("activation", "neuron importance: activation (mean |a|) | taylor (mean |a dL/da|)",
                             choices=CRITERIA)
    d_i: float = option(0.02, "pruning threshold on s = I_f / (I_r + eps)", low=0)
    d_i_mode: str = option("top_fraction", "ratio (prune s >= d_i) | top_fraction (prune the top d_i of neurons)",
                           choices=MODES)
    d_f: float = option(1.0, "Fisher mask threshold on F_f / (F_r + eps) (top_fraction 1: every trained entry "
                             "updates and no Fisher is measured)", low=0)
    d_f_mode: str = option("top_fraction", "ratio (update F_f/F_r >= d_f) | top_fraction (update the top d_f)",
                           choices=MODES)
    stat_batches: int = option(16, "batches per worker and split of the statistics pass", low=1)
    eps: float = option(1e-8, "added to the retain statistics", above=0)
    noise: float = option(0.0, "before training, every entry the Fisher mask selects gets Gaussian noise of this "
                               "many times its tensor's std (what made the forget entities out is gone; L_VKD heals "
                               "the rest)", low=0)
    generic_candidates: int = option(32, "forget_loss generic: candidates for the generic person (the retain "
                                         "pictures' mean, and means over random halves of the retain entities); the "
                                         "one under which the frozen LLM says fewest of the forget answers is drawn "
                                         "to (1: the mean of every retain picture)", low=1)
    generic_pairs: int = option(128, "forget_loss generic: forget question-answer pairs that judge the candidates",
                                low=1)
    lookalike_rows: int = option(0, "of the retain stream's rows, at most this many are the lookalikes' (the retain "
                                    "entities nearest a forget entity: hard negatives of the distillation)", low=0)

    def check(self) -> None:
        for name, mode in (("d_i", self.d_i_mode), ("d_f", self.d_f_mode)):
            if mode == "top_fraction" and getattr(self, name) > 1:
                raise self.fail(name, f"must lie in [0, 1] with {name}_mode=top_fraction")


@register("vkd")
class VKD(Method):
    """Visual Knowledge Distillation: the LLM frozen; the visual module (its last
    ``vision_layers`` layers and the projector) trains on L = L_out + beta * L_VKD, after
    pruning the neurons that matter for the forget entities and masking updates by Fisher
    saliency. L_out = forget term (by default generic: the forget pictures' features drawn
    to a generic person's, ``generic_person``) + retain cross-entropy on retain image pairs
    (weight 0 by default); L_VKD = distance between the student's and the frozen teacher's visual features
    (projector output, and vision layers ``vkd_layers``) on the retain images. With
    ``retain_weight`` 0 the retain images only pass through the visual module (the LLM is
    frozen, so features held to the teacher's keep its answers), which halves the LLM's work
    per step."""
    Config = VKDConfig
    retain_text: ClassVar[bool] = False   # text-only pairs never reach the visual module

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.cfg.forget_loss == "npo"

    def trainable(self, adapter):
        return trainable_names(adapter, "visual", self.cfg.vision_layers)

    def forget_answer(self) -> str | None:
        return self.cfg.refusal_answer if self.cfg.forget_loss == "refusal" else None

    @property
    def visual_only(self) -> bool:
        """Whether a step needs the visual module alone (no LLM forward or backward)."""
        return self.cfg.forget_loss == "generic" and not self.cfg.retain_weight

    def stream_plans(self, data, fs, unlearn):
        """The base streams; a step that needs pictures alone takes each picture once (not once
        per question about it); with ``lookalike_rows``, that many retain rows are the
        lookalikes'."""
        plans = super().stream_plans(data, fs, unlearn)
        retain = plans["retain"]
        if self.cfg.lookalike_rows and fs.lookalikes:
            looks = set(fs.lookalikes)
            rows = [r for r in read_rows(Path(data), TRAIN_SPLIT, retain.ids) if r.get("image") is not None]
            hard = sample_rows([r for r in rows if r["ID"] in looks], self.cfg.lookalike_rows, unlearn.seed)
            rest = sample_rows([r for r in rows if r["ID"] not in looks], max(0, unlearn.retain_rows - len(hard)),
                               unlearn.seed)
            retain = replace(retain, rows=hard | rest)
        if self.visual_only:
            return {"forget": replace(plans["forget"], one_per_image=True), "retain": replace(retain, one_per_image=True)}
        return {**plans, "retain": retain}

    @property
    def updates_all(self) -> bool:
        """Whether the Fisher mask selects every trained entry (then no Fisher is measured)."""
        c = self.cfg
        return (c.d_f_mode == "top_fraction" and c.d_f >= 1) or (c.d_f_mode == "ratio" and c.d_f == 0)

    def statistics(self) -> StatsRequest:
        return StatsRequest(importance=self.cfg.importance, fisher=not self.updates_all,
                            teacher_layers=list(self.cfg.vkd_layers),
                            batches=self.cfg.stat_batches)

    def prepare(self, adapter, stats, trainable, seed=0, data=None, plans=None):
        c = self.cfg
        # only the neurons of the layers that train (a frozen layer stays exactly as it was)
        names = set(trainable)
        forget, retain = (replace(st, importance={k: v for k, v in st.importance.items() if f"{k}.weight" in names})
                          for st in (stats.forget, stats.retain))
        pruned = pruned_neurons(forget, retain, c.d_i, c.d_i_mode, c.eps)
        fisher = (select_all(adapter, trainable) if self.updates_all
                  else fisher_mask(stats.forget, stats.retain, c.d_f, c.d_f_mode, c.eps))
        if c.noise:  # before pruning, so that a pruned neuron's weights stay zero
            add_noise(adapter, fisher, c.noise, seed)
        masks = apply_pruning(adapter, pruned)
        if not self.updates_all:
            masks = combine_masks(masks, fisher)
        # an all-ones mask changes no gradient: the trainer gets no hook and no file for it
        masks = {k: v for k, v in masks.items() if not bool(v.all())}
        figures = {"pruned_neurons": int(sum(int(v.sum()) for v in pruned.values())),
                   "neurons": int(sum(v.numel() for v in pruned.values())),
                   "updated_fraction": updated_fraction(fisher), "teacher_images": len(stats.teacher)}
        teacher = self.teacher_table(stats.teacher)
        if c.forget_loss == "generic" and c.generic_candidates > 1 and data is not None and plans:
            # the LLM judges it (pruning changed only the visual module, whose output the judge replaces)
            start = time.perf_counter()
            teacher[GENERIC], judged = generic_person(adapter, stats.teacher, data, plans, c, seed)
            figures.update(judged, generic_seconds=time.perf_counter() - start)
        return Preparation(masks=masks, teacher=teacher, figures=figures,
                           pruned={k: torch.nonzero(v).flatten().tolist() for k, v in pruned.items() if v.any()})

    def teacher_table(self, teacher: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        """The teacher's features by image key; with forget_loss generic, also the generic
        person (key ``GENERIC``): the teacher's mean features over the retain pictures."""
        table = dict(teacher)
        if self.cfg.forget_loss == "generic":
            table[GENERIC] = mean_features(teacher, sorted(teacher))
        return table

    def forget_term(self, model, forget: dict[str, torch.Tensor], ctx) -> torch.Tensor:
        c = self.cfg
        if c.forget_loss == "npo":
            return npo_loss(model, ctx.reference, forget, c.npo_beta)
        if c.forget_loss == "refusal":  # the forget stream carries the refusal answer
            return nll(model, forget)
        if c.forget_cap > 0:
            return -capped_nll(model, forget, c.forget_cap)
        return -nll(model, forget)

    def _distance(self, tapped: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
                  rows: slice) -> torch.Tensor:
        """L_VKD-style distance of the tapped features of batch rows ``rows`` to ``targets``
        (one table per row)."""
        total = torch.zeros(())
        for name, feats in tapped.items():
            target = torch.stack([t[name] for t in targets]).to(feats.device)
            total = total.to(feats.device) + feature_distance(feats[rows].reshape(target.shape), target,
                                                              self.cfg.vkd_distance)
        return total

    def loss(self, model, batches, ctx):
        forget, retain = batches["forget"], batches["retain"]
        retain_targets = [ctx.teacher[int(k)] for k in retain.image_keys.tolist()]
        if self.cfg.forget_loss == "generic":  # one pass of the visual module over both batches
            n = forget.inputs["pixel_values"].shape[0]
            with feature_tap(ctx.adapter, self.cfg.vkd_layers) as tapped:
                ctx.adapter.image_features(torch.cat([forget.inputs["pixel_values"], retain.inputs["pixel_values"]]))
            f = self._distance(tapped, [ctx.teacher[GENERIC]] * n, slice(0, n))
            distill = self._distance(tapped, retain_targets, slice(n, None))
            r = nll(model, retain.inputs) if self.cfg.retain_weight else torch.zeros((), device=f.device)
        else:
            f = self.forget_term(model, forget.inputs, ctx)
            with feature_tap(ctx.adapter, self.cfg.vkd_layers) as tapped:
                if self.cfg.retain_weight:
                    r = nll(model, retain.inputs)
                else:  # no retain cross-entropy: the retain images need the visual module, not the LLM
                    ctx.adapter.image_features(retain.inputs["pixel_values"])
                    r = torch.zeros((), device=retain.inputs["pixel_values"].device)
            distill = self._distance(tapped, retain_targets, slice(None))
        loss = f + self.cfg.retain_weight * r + self.cfg.beta * distill
        return loss, {"loss": float(loss.detach()), "forget_term": float(f.detach()),
                      "retain_nll": float(r.detach()), "vkd": float(distill.detach())}


def generic_person(adapter, teacher: dict[int, dict[str, torch.Tensor]], data, plans, cfg: VKDConfig,
                   seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The generic person the forget pictures are drawn to: of ``cfg.generic_candidates``
    candidate feature sets (the mean of every retain picture's teacher features, then means
    over the pictures of random halves of the retain entities), the one under which the
    frozen LLM, shown it in place of a forget picture, gives the fewest of
    ``cfg.generic_pairs`` forget answers by greedy decoding (ties: the lower mean answer
    likelihood). A mean of other people still decodes as someone: on the demo, the plain
    mean answered 9-17% of 128 forget questions right (their commonest values; the report's
    ``generic_forget_answers_mean``).
    Returns the features and figures for the report."""
    rng = random.Random(seed)
    forget = replace(plans["forget"], one_per_image=False, answer=None, turns=1)
    pairs = [{"image": s["image"], "source": s["source"], "question": q, "truth": a}
             for row in read_rows(Path(data), TRAIN_SPLIT, forget.ids) if forget.keep(row)
             for s in forget.sequences(row) for q, a in zip(s["questions"], s["answers"])]
    pairs = rng.sample(pairs, min(cfg.generic_pairs, len(pairs)))
    retain = plans["retain"]
    entity = {row_key(r): r["ID"] for r in read_rows(Path(data), TRAIN_SPLIT, retain.ids) if retain.keep(r)}
    groups: dict[str, list[int]] = {}
    for key in sorted(teacher):
        groups.setdefault(entity.get(key, str(key)), []).append(key)
    people = sorted(groups)
    candidates = [mean_features(teacher, sorted(teacher))]  # the plain mean, as teacher_table gives it
    for _ in range(cfg.generic_candidates - 1):
        half = rng.sample(people, max(1, len(people) // 2))
        candidates.append(mean_features(teacher, [k for p in half for k in groups[p]]))
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        parts = judging_prompts(adapter, pairs)
        hits = [forget_answers_under(adapter, c["projector"], parts) for c in candidates]
        tied = [i for i, h in enumerate(hits) if h == min(hits)]
        logp = {i: truth_logp_under(adapter, candidates[i]["projector"], parts) for i in {0, *tied}}
    finally:
        adapter.model.train(was_training)
    best = min(tied, key=lambda i: (logp[i], i))
    return candidates[best], {"generic_candidate": best, "generic_forget_answers": hits[best],
                              "generic_forget_answers_mean": hits[0], "generic_forget_logp": logp[best],
                              "generic_forget_logp_mean": logp[0]}


def mean_features(teacher: dict[int, dict[str, torch.Tensor]], keys: list[int]) -> dict[str, torch.Tensor]:
    """The mean of the teacher's features over the images ``keys``, per tapped layer."""
    names = sorted(next(iter(teacher.values())))
    return {n: torch.stack([teacher[k][n] for k in keys]).float().mean(0) for n in names}


def judging_prompts(adapter, pairs: list[dict], size: int = 32) -> list[tuple[list[dict], list, dict, list[int]]]:
    """The judging pairs in batches of ``size``, their prompts built once for every candidate:
    (pairs, prompt ids, image inputs, answer lengths)."""
    from vkd.scoring import item_images, short_answer_tokens

    parts = []
    for i in range(0, len(pairs), size):
        part = pairs[i:i + size]
        ids, extra = adapter.prompt_inputs([it["question"] for it in part], item_images(part))
        parts.append((part, ids, extra, short_answer_tokens(adapter, part)))
    return parts


@contextmanager
def features_in_place(adapter, features: torch.Tensor) -> Iterator[None]:
    """The projector's output replaced by ``features`` (one image's) for every picture."""
    projector = dict(adapter.model.named_modules())[adapter.family.projector[0].rstrip(".")]
    hook = projector.register_forward_hook(
        lambda _m, _i, out: features.to(out.dtype).reshape(-1, features.shape[-1])
        .repeat(out.numel() // features.numel(), 1).reshape(out.shape))
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def forget_answers_under(adapter, features: torch.Tensor, parts) -> float:
    """The share of the judging pairs (``judging_prompts``) whose greedy answer holds the
    truth when the LLM sees ``features`` in place of every picture's."""
    from vkd.metrics import contains_truth
    from vkd.scoring import greedy

    with features_in_place(adapter, features):
        hits = sum(contains_truth(a, it["truth"]) for part, ids, extra, limits in parts
                   for a, it in zip(greedy(adapter, ids, extra, limits), part))
    return hits / max(1, sum(len(p[0]) for p in parts))


@torch.no_grad()
def truth_logp_under(adapter, features: torch.Tensor, parts) -> float:
    """The truths' mean log-likelihood per token under ``features``, as ``forget_answers_under``."""
    from vkd.scoring import _option_logp

    with features_in_place(adapter, features):
        total = sum(float(_option_logp(adapter, ids, [it["truth"] for it in part], extra).sum())
                    for part, ids, extra, _ in parts)
    return total / max(1, sum(len(p[0]) for p in parts))


def select_all(adapter, names) -> dict[str, torch.Tensor]:
    """The Fisher mask that selects every entry of the parameters ``names``."""
    params = dict(adapter.model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.float32) for n in names}


@torch.no_grad()
def add_noise(adapter, selected: dict[str, torch.Tensor], scale: float, seed: int) -> None:
    """Gaussian noise of ``scale`` times each tensor's std on its ``selected`` entries, in place
    (seeded: the same request draws the same noise)."""
    params = dict(adapter.model.named_parameters())
    rng = torch.Generator().manual_seed(seed)
    for name in sorted(selected):
        p = params[name]
        noise = torch.randn(p.shape, generator=rng, dtype=torch.float32)
        p.add_((scale * p.float().std() * noise * selected[name]).to(p.dtype))
