"""Unlearning methods: one small class per method, registered by name, all on one trainer.

A method says which parameters train, which data streams each step takes (``forget`` and
``retain`` batches), what it needs computed before training (a frozen reference model,
Fisher statistics, neuron importance, the teacher's visual features), and its loss. The
trainer (``pipelines/trainer.py``) runs every method, and ``finetune`` (vanilla training and
the relearning attack), the same way.

Losses are means over answer tokens unless a method says otherwise (NPO uses sequence
log-likelihoods, as its paper does).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vkd.config import ConfigError, UnlearnConfig
from vkd.model import ModelAdapter
from vkd.registry import Registry

FORGET_LOSSES = ("ga", "npo", "refusal")
DISTANCES = ("mse", "cosine")


@dataclass
class StepContext:
    """What a method's loss may use besides the model and the batches."""
    adapter: ModelAdapter
    cfg: UnlearnConfig
    reference: nn.Module | None = None                       # frozen vanilla model (kl, npo)
    teacher: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)   # image key -> features


_KEEPS_LOGITS: dict[type, bool] = {}


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (Hugging Face's): through a
    DeepSpeed engine, its module's."""
    import inspect

    module = getattr(model, "module", model)
    if type(module) not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[type(module)] = "logits_to_keep" in inspect.signature(module.forward).parameters
    return _KEEPS_LOGITS[type(module)]


def answer_logps(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels, their mask, and the logits (shifted). Only
    the positions where some row of the batch has an answer token are projected onto the
    vocabulary (the image and prompt positions are most of a sequence, and a real LLM's
    vocabulary is tens of thousands wide); the columns are those positions, in order."""
    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    args = {k: v for k, v in inputs.items() if k != "labels"}
    if _keeps_logits(model):
        keep = mask.any(0).nonzero().flatten()  # position t predicts token t + 1
        logits = model(**args, logits_to_keep=keep).logits.float()
        labels, mask = labels[:, keep], mask[:, keep]
    else:
        logits = model(**args).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask, logits


def nll(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over answer tokens."""
    logp, mask, _ = answer_logps(model, inputs)
    return -logp.sum() / mask.sum().clamp(min=1)


def capped_nll(model: nn.Module, inputs: dict[str, torch.Tensor], cap: float) -> torch.Tensor:
    """Mean over sequences of each one's answer NLL, clipped at ``cap``: a sequence already
    at the cap adds no gradient, so ascent on it pushes the forget answers down to a level
    and stops, instead of running on (and dragging the shared visual features along)."""
    logp, mask, _ = answer_logps(model, inputs)
    per_sequence = -logp.sum(1) / mask.sum(1).clamp(min=1)
    return per_sequence.clamp(max=cap).mean()


@contextmanager
def feature_tap(adapter: ModelAdapter, layers: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Capture, during any forward, the projector's output (``projector``: the image tokens
    the LLM sees) and the outputs of vision layers ``layers`` (``layer{i}``)."""
    fam = adapter.family
    wanted = {fam.projector[0].rstrip("."): "projector"}
    wanted.update({f"{fam.vision_layers}{i}": f"layer{i}" for i in layers})
    captured: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(adapter.model.named_modules())
    missing = [n for n in wanted if n not in modules]
    if missing:
        raise ValueError(f"unlearn.vkd_layers: no module {missing[0]} in this model")
    for name, key in wanted.items():
        def hook(_m, _args, out, key=key):
            captured[key] = out[0] if isinstance(out, tuple) else out
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    raise ValueError(f"unlearn.vkd_distance={kind!r}; choose one of {', '.join(DISTANCES)}")


class Method:
    """Base class: plain fine-tuning on the ``train`` stream (vanilla model, relearning)."""
    trainable = "all"              # all | visual
    streams: tuple[str, ...] = ("train",)
    retain_text = True             # the retain stream holds text-only pairs too
    needs_reference = False
    needs_fisher = False           # Fisher statistics (forget and retain) before training
    prunes = False                 # neuron importance and pruning before training
    distills = False               # the teacher's visual features on the retain images

    def __init__(self, cfg: UnlearnConfig):
        self.cfg = cfg

    def loss(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]],
             ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        loss = nll(model, batches["train"])
        return loss, {"loss": float(loss.detach())}

    # --- shared terms ---
    def forget_term(self, model: nn.Module, forget: dict[str, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        kind = self.cfg.forget_loss
        if kind == "ga" and self.cfg.forget_cap > 0:
            return -capped_nll(model, forget, self.cfg.forget_cap)
        if kind == "ga" or kind == "refusal":  # refusal: the forget stream carries the refusal answer
            value = nll(model, forget)
            return -value if kind == "ga" else value
        if kind == "npo":
            return npo_loss(model, ctx.reference, forget, self.cfg.npo_beta)
        raise ValueError(f"unlearn.forget_loss={kind!r}; choose one of {', '.join(FORGET_LOSSES)}")


METHODS: Registry[type[Method]] = Registry("unlearning method")
METHODS.register("finetune")(Method)


def npo_loss(model: nn.Module, reference: nn.Module | None, forget: dict[str, torch.Tensor],
             beta: float) -> torch.Tensor:
    """Negative Preference Optimization: -(2/beta) E log sigmoid(-beta log(pi/pi_ref)) over
    forget sequences (sequence log-likelihoods of the answers)."""
    if reference is None:
        raise ValueError("npo needs the frozen reference model")
    logp, _, _ = answer_logps(model, forget)
    with torch.no_grad():
        ref, _, _ = answer_logps(reference, forget)
    ratio = logp.sum(-1) - ref.sum(-1)
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


@METHODS.register("ga")
class GradientAscent(Method):
    """GA: ascend the forget answers' likelihood, nothing else."""
    streams = ("forget",)

    def loss(self, model, batches, ctx):
        value = nll(model, batches["forget"])
        return -value, {"loss": float(-value.detach()), "forget_nll": float(value.detach())}


@METHODS.register("gd")
class GradientDifference(Method):
    """GD: GA on forget plus cross-entropy on retain."""
    streams = ("forget", "retain")

    def loss(self, model, batches, ctx):
        f = nll(model, batches["forget"])
        r = nll(model, batches["retain"])
        loss = -f + self.cfg.retain_weight * r
        return loss, {"loss": float(loss.detach()), "forget_nll": float(f.detach()), "retain_nll": float(r.detach())}


@METHODS.register("kl")
class KLMinimization(Method):
    """KL: GA on forget plus KL(reference || model) of the answer-token distributions on retain."""
    streams = ("forget", "retain")
    needs_reference = True

    def loss(self, model, batches, ctx):
        f = nll(model, batches["forget"])
        retain = batches["retain"]
        _, mask, logits = answer_logps(model, retain)
        with torch.no_grad():
            _, _, ref_logits = answer_logps(ctx.reference, retain)
        kl = F.kl_div(torch.log_softmax(logits[mask], -1), torch.log_softmax(ref_logits[mask], -1),
                      log_target=True, reduction="batchmean")
        loss = -f + self.cfg.retain_weight * kl
        return loss, {"loss": float(loss.detach()), "forget_nll": float(f.detach()), "retain_kl": float(kl.detach())}


@METHODS.register("npo")
class NPO(Method):
    """NPO on forget plus cross-entropy on retain."""
    streams = ("forget", "retain")
    needs_reference = True

    def loss(self, model, batches, ctx):
        f = npo_loss(model, ctx.reference, batches["forget"], self.cfg.npo_beta)
        r = nll(model, batches["retain"])
        loss = f + self.cfg.retain_weight * r
        return loss, {"loss": float(loss.detach()), "npo": float(f.detach()), "retain_nll": float(r.detach())}


@METHODS.register("mmunlearner")
class MMUnlearner(GradientDifference):
    """MMUnlearner: GA on forget and descent on retain over the whole model, updating only
    the parameters whose Fisher information is salient for the forget data
    (F_f / (F_r + eps), threshold ``d_f``)."""
    needs_fisher = True


@METHODS.register("vkd")
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
    trainable = "visual"
    streams = ("forget", "retain")
    retain_text = False            # text-only pairs never reach the visual module
    needs_fisher = True
    prunes = True
    distills = True

    def __init__(self, cfg: UnlearnConfig):
        super().__init__(cfg)
        if cfg.forget_loss == "npo":
            self.needs_reference = True

    def loss(self, model, batches, ctx):
        f = self.forget_term(model, batches["forget"], ctx)
        retain = batches["retain"]
        keys = retain.pop("image_key")
        with feature_tap(ctx.adapter, self.cfg.vkd_layers) as tapped:
            if self.cfg.retain_weight:
                r = nll(model, retain)
            else:  # no retain cross-entropy: the retain images need the visual module, not the LLM
                ctx.adapter.image_features(retain["pixel_values"])
                r = torch.zeros((), device=retain["pixel_values"].device)
        distill = torch.zeros((), device=r.device)
        for name, student in tapped.items():
            teacher = torch.stack([ctx.teacher[int(k)][name] for k in keys.tolist()]).to(student.device)
            distill = distill + feature_distance(student.reshape(teacher.shape), teacher, self.cfg.vkd_distance)
        loss = f + self.cfg.retain_weight * r + self.cfg.beta * distill
        return loss, {"loss": float(loss.detach()), "forget_term": float(f.detach()),
                      "retain_nll": float(r.detach()), "vkd": float(distill.detach())}


def method_for(cfg: UnlearnConfig) -> Method:
    """The method of ``cfg.method`` (an error listing the registered names), its settings
    checked first (errors name the field)."""
    from vkd.saliency import CRITERIA, MODES

    choices = {"forget_loss": FORGET_LOSSES, "vkd_distance": DISTANCES, "importance": CRITERIA,
               "d_i_mode": MODES, "d_f_mode": MODES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"unlearn.{name}={getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")
    for name in ("steps", "batch_size", "stat_batches"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"unlearn.{name} must be at least 1, got {getattr(cfg, name)}")
    for name, mode in (("d_i", cfg.d_i_mode), ("d_f", cfg.d_f_mode)):
        if mode == "top_fraction" and not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"unlearn.{name}={getattr(cfg, name)} must lie in [0, 1] with {name}_mode=top_fraction")
    if (cfg.lr <= 0 or cfg.npo_beta <= 0 or cfg.beta < 0 or cfg.retain_rows < 0 or cfg.vision_layers < 0
            or cfg.forget_cap < 0):
        raise ConfigError("unlearn.lr and unlearn.npo_beta must be positive; unlearn.beta, unlearn.retain_rows, "
                          "unlearn.vision_layers and unlearn.forget_cap must not be negative")
    return METHODS.get(cfg.method)(cfg)


def visual_features(adapter: ModelAdapter, pixel_values: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's features of a batch of images: projector output and vision layers."""
    with feature_tap(adapter, layers) as tapped, torch.no_grad():
        adapter.image_features(pixel_values)
    return {k: v.detach() for k, v in tapped.items()}

