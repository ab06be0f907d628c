"""The losses methods are made of: answer log-likelihoods, (capped) NLL, NPO, and the
visual features a distillation term compares.

Losses are means over answer tokens unless a function says otherwise (NPO uses sequence
log-likelihoods, as its paper does).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vkd.config import ConfigError
from vkd.model import ModelAdapter

DISTANCES = ("mse", "cosine")
_KEEPS_LOGITS: dict[type, bool] = {}


def keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (Hugging Face's): through a
    DeepSpeed engine, its module's."""
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
    if keeps_logits(model):
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


def answer_kl(model: nn.Module, reference: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(reference || model) of the answer-token distributions."""
    _, mask, logits = answer_logps(model, inputs)
    with torch.no_grad():
        _, _, ref_logits = answer_logps(reference, inputs)
    return F.kl_div(torch.log_softmax(logits[mask], -1), torch.log_softmax(ref_logits[mask], -1),
                    log_target=True, reduction="batchmean")


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
        raise ConfigError(f"unlearn.vkd.vkd_layers: no module {missing[0]} in this model")
    unseen = adapter.unseen_visual()
    dead = [n for n in wanted if any(f"{n}.{p}" in unseen for p, _ in modules[n].named_parameters())]
    if dead:
        raise ConfigError(f"unlearn.vkd.vkd_layers: {dead[0]} feeds nothing the LLM sees (after the vision "
                          "feature layer); distil a layer at or before it")
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
    raise ValueError(f"unlearn.vkd.vkd_distance={kind!r}; choose one of {', '.join(DISTANCES)}")


def visual_features(adapter: ModelAdapter, pixel_values: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """The features of a batch of images without gradients: projector output and vision layers."""
    with feature_tap(adapter, layers) as tapped, torch.no_grad():
        adapter.image_features(pixel_values)
    return {k: v.detach() for k, v in tapped.items()}
