"""The baselines, on the same trainer, data and evaluation as VKD: GA, GD, KL, NPO, and
MMUnlearner. Each is its config dataclass and a loss."""
from __future__ import annotations

from dataclasses import dataclass

from vkd.config import option
from vkd.methods.base import Method, MethodConfig, Preparation, register
from vkd.methods.losses import answer_kl, nll, npo_loss
from vkd.saliency import MODES, StatsRequest, fisher_mask


@dataclass
class GAConfig(MethodConfig):
    """Gradient ascent has no settings of its own."""


@register("ga")
class GradientAscent(Method):
    """GA: ascend the forget answers' likelihood, nothing else."""
    Config = GAConfig
    streams = ("forget",)

    def loss(self, model, batches, ctx):
        value = nll(model, batches["forget"].inputs)
        return -value, {"loss": float(-value.detach()), "forget_nll": float(value.detach())}


@dataclass
class GDConfig(MethodConfig):
    retain_weight: float = option(1.0, "weight of the retain cross-entropy", low=0)


@register("gd")
class GradientDifference(Method):
    """GD: GA on forget plus cross-entropy on retain."""
    Config = GDConfig

    def loss(self, model, batches, ctx):
        f = nll(model, batches["forget"].inputs)
        r = nll(model, batches["retain"].inputs)
        loss = -f + self.cfg.retain_weight * r
        return loss, {"loss": float(loss.detach()), "forget_nll": float(f.detach()), "retain_nll": float(r.detach())}


@dataclass
class KLConfig(MethodConfig):
    retain_weight: float = option(1.0, "weight of the KL to the starting model on retain", low=0)


@register("kl")
class KLMinimization(Method):
    """KL: GA on forget plus KL(reference || model) of the answer-token distributions on retain."""
    Config = KLConfig
    needs_reference = True

    def loss(self, model, batches, ctx):
        f = nll(model, batches["forget"].inputs)
        kl = answer_kl(model, ctx.reference, batches["retain"].inputs)
        loss = -f + self.cfg.retain_weight * kl
        return loss, {"loss": float(loss.detach()), "forget_nll": float(f.detach()), "retain_kl": float(kl.detach())}


@dataclass
class NPOConfig(MethodConfig):
    retain_weight: float = option(1.0, "weight of the retain cross-entropy", low=0)
    npo_beta: float = option(0.1, "NPO's inverse temperature", above=0)


@register("npo")
class NPO(Method):
    """NPO on forget plus cross-entropy on retain."""
    Config = NPOConfig
    needs_reference = True

    def loss(self, model, batches, ctx):
        f = npo_loss(model, ctx.reference, batches["forget"].inputs, self.cfg.npo_beta)
        r = nll(model, batches["retain"].inputs)
        loss = f + self.cfg.retain_weight * r
        return loss, {"loss": float(loss.detach()), "npo": float(f.detach()), "retain_nll": float(r.detach())}


@dataclass
class MMUnlearnerConfig(GDConfig):
    d_f: float = option(0.3, "Fisher mask threshold on F_f / (F_r + eps)", low=0)
    d_f_mode: str = option("top_fraction", "ratio (update F_f/F_r >= d_f) | top_fraction (update the top d_f)",
                           choices=MODES)
    stat_batches: int = option(16, "batches per worker and split of the statistics pass", low=1)
    eps: float = option(1e-8, "added to the retain Fisher", above=0)

    def check(self) -> None:
        if self.d_f_mode == "top_fraction" and self.d_f > 1:
            raise self.fail("d_f", "must lie in [0, 1] with d_f_mode=top_fraction")


@register("mmunlearner")
class MMUnlearner(GradientDifference):
    """MMUnlearner: GA on forget and descent on retain over the whole model, updating only
    the parameters whose Fisher information is salient for the forget data
    (F_f / (F_r + eps), threshold ``d_f``)."""
    Config = MMUnlearnerConfig

    def statistics(self) -> StatsRequest:
        return StatsRequest(fisher=True, batches=self.cfg.stat_batches)

    def prepare(self, adapter, stats, trainable, seed=0, data=None, plans=None):
        masks = fisher_mask(stats.forget, stats.retain, self.cfg.d_f, self.cfg.d_f_mode, self.cfg.eps)
        return Preparation(masks=masks, figures={"updated_fraction": updated_fraction(masks)})


def updated_fraction(masks: dict) -> float:
    """The share of masked entries that update."""
    return float(sum(float(v.sum()) for v in masks.values()) / max(1, sum(v.numel() for v in masks.values())))
