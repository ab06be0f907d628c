"""VKD, Visual Knowledge Distillation unlearning (ARCHITECTURE.md, "The method"): the LLM
frozen; the visual module pruned of the neurons that matter for the forget entities and
trained, where the Fisher mask allows, on L = L_out + beta * L_VKD."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from vkd.config import option
from vkd.data.layout import TRAIN_SPLIT, read_rows
from vkd.data.streams import sample_rows
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
    retain_weight: float = option(1.0, "weight of the retain cross-entropy (0: the retain images only pass "
                                       "through the visual module)", low=0)
    forget_loss: str = option("ga", "ga (ascent on the answers) | npo | refusal (descent to refusal_answer) | "
                                    "generic (the forget pictures' visual features drawn to the generic person's, the "
                                    "teacher's mean over the retain pictures: no LLM in the step)",
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
    d_f: float = option(0.3, "Fisher mask threshold on F_f / (F_r + eps)", low=0)
    d_f_mode: str = option("top_fraction", "ratio (update F_f/F_r >= d_f) | top_fraction (update the top d_f)",
                           choices=MODES)
    stat_batches: int = option(16, "batches per worker and split of the statistics pass", low=1)
    eps: float = option(1e-8, "added to the retain statistics", above=0)
    noise: float = option(0.0, "before training, every entry the Fisher mask selects gets Gaussian noise of this "
                               "many times its tensor's std (what made the forget entities out is gone; L_VKD heals "
                               "the rest)", low=0)
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
    saliency. L_out = forget term (GA by default) + retain cross-entropy on retain image
    pairs; L_VKD = distance between the student's and the frozen teacher's visual features
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

    def statistics(self) -> StatsRequest:
        return StatsRequest(importance=self.cfg.importance, fisher=True, teacher_layers=list(self.cfg.vkd_layers),
                            batches=self.cfg.stat_batches)

    def prepare(self, adapter, stats, trainable, seed=0):
        c = self.cfg
        # only the neurons of the layers that train (a frozen layer stays exactly as it was)
        names = set(trainable)
        forget, retain = (replace(st, importance={k: v for k, v in st.importance.items() if f"{k}.weight" in names})
                          for st in (stats.forget, stats.retain))
        pruned = pruned_neurons(forget, retain, c.d_i, c.d_i_mode, c.eps)
        fisher = fisher_mask(stats.forget, stats.retain, c.d_f, c.d_f_mode, c.eps)
        if c.noise:  # before pruning, so that a pruned neuron's weights stay zero
            add_noise(adapter, fisher, c.noise, seed)
        masks = combine_masks(apply_pruning(adapter, pruned), fisher)
        figures = {"pruned_neurons": int(sum(int(v.sum()) for v in pruned.values())),
                   "neurons": int(sum(v.numel() for v in pruned.values())),
                   "updated_fraction": updated_fraction(fisher), "teacher_images": len(stats.teacher)}
        teacher = self.teacher_table(stats.teacher)
        return Preparation(masks=masks, teacher=teacher, figures=figures,
                           pruned={k: torch.nonzero(v).flatten().tolist() for k, v in pruned.items() if v.any()})

    def teacher_table(self, teacher: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        """The teacher's features by image key; with forget_loss generic, also the generic
        person (key ``GENERIC``): the teacher's mean features over the retain pictures."""
        table = dict(teacher)
        if self.cfg.forget_loss == "generic":
            names = next(iter(teacher.values())).keys()
            table[GENERIC] = {n: torch.stack([t[n] for t in teacher.values()]).float().mean(0) for n in names}
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
