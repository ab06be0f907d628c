"""What matters for the target entities: neuron importance (for pruning) and the diagonal
Fisher information (for the update mask), on the visual module.

A *neuron* is an input channel of a down-projection Linear of the visual module (the second
Linear of every vision MLP and of the projector; ``Family.neuron_modules``): its activation
``a`` is the MLP's hidden unit, its outgoing weights are that module's ``weight[:, j]``.
Pruning zeroes the outgoing weights and masks their gradients, so the neuron stays dead
through training.

Statistics are sums (additive across batches and workers): per split, the summed
importance per neuron with the number of token positions, and the summed squared gradient
per parameter with the number of batches. :func:`measure_split` and
:func:`teacher_features` are the statistics pass of one rank, :func:`all_reduce` sums the
ranks' (``pipelines/stats.py`` runs them on Ray Train).
"""
from __future__ import annotations

import contextlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from vkd.model import ModelAdapter

CRITERIA = ("activation", "taylor")
MODES = ("ratio", "top_fraction")


def neuron_modules(adapter: ModelAdapter) -> dict[str, nn.Linear]:
    """The down-projection Linear modules whose input channels are the visual neurons (none
    of a layer the LLM never sees: ``ModelAdapter.unseen_visual``)."""
    patterns = [re.compile(p + "$") for p in adapter.family.neuron_modules]
    unseen = adapter.unseen_visual()
    found = {n: m for n, m in adapter.model.named_modules()
             if isinstance(m, nn.Linear) and any(p.match(n) for p in patterns) and f"{n}.weight" not in unseen}
    if not found:
        raise ValueError(f"no visual MLP found in this {adapter.family.name} model to score neurons on")
    return found


@dataclass
class SplitStats:
    """Summed statistics of one split (forget or retain)."""
    importance: dict[str, torch.Tensor] = field(default_factory=dict)   # module -> [in_features]
    positions: dict[str, float] = field(default_factory=dict)           # module -> token positions seen
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)       # parameter -> g^2 summed
    batches: int = 0

    def add(self, other: "SplitStats") -> None:
        for mine, theirs in ((self.importance, other.importance), (self.fisher, other.fisher)):
            for k, v in theirs.items():
                mine[k] = mine[k] + v if k in mine else v.clone()
        for k, v in other.positions.items():
            self.positions[k] = self.positions.get(k, 0.0) + v
        self.batches += other.batches

    def mean_importance(self) -> dict[str, torch.Tensor]:
        return {k: v / max(self.positions.get(k, 0.0), 1.0) for k, v in self.importance.items()}

    def mean_fisher(self) -> dict[str, torch.Tensor]:
        return {k: v / max(self.batches, 1) for k, v in self.fisher.items()}


@contextmanager
def neuron_meter(adapter: ModelAdapter, stats: SplitStats, criterion: str) -> Iterator[None]:
    """Accumulate neuron importance into ``stats`` while the model runs: mean |a| over token
    positions (``activation``) or mean |a * dL/da| (``taylor``, filled in on backward)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unlearn.vkd.importance={criterion!r}; choose one of {', '.join(CRITERIA)}")
    handles = []

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple) -> None:
            a = args[0]
            flat = a.detach().reshape(-1, a.shape[-1])
            stats.positions[name] = stats.positions.get(name, 0.0) + flat.shape[0]
            if criterion == "activation":
                _add(stats.importance, name, flat.abs().sum(0))
            elif a.requires_grad:
                a.register_hook(lambda g: _add(stats.importance, name,
                                               (a.detach() * g).reshape(-1, a.shape[-1]).abs().sum(0)))
        return pre

    for name, module in neuron_modules(adapter).items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _add(table: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    value = value.detach().float()
    table[key] = table[key] + value if key in table else value.clone()


def accumulate_fisher(model: nn.Module, stats: SplitStats, names: set[str]) -> None:
    """Add this batch's squared gradients of parameters ``names`` (then clear them)."""
    for name, p in model.named_parameters():
        if name in names and p.grad is not None:
            _add(stats.fisher, name, p.grad.detach() ** 2)
        p.grad = None
    stats.batches += 1


def select(score: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """Boolean selection over a flat score: ``score >= threshold`` (ratio), or the top
    ``threshold`` fraction (top_fraction; ties broken by position)."""
    if mode not in MODES:
        raise ValueError(f"threshold mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "ratio":
        return score >= threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"a top_fraction threshold must lie in [0, 1], got {threshold}")
    k = int(round(threshold * score.numel()))
    chosen = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        chosen[torch.topk(score.flatten().double(), k, sorted=False).indices] = True
    return chosen.view_as(score)


def _flat_select(scores: dict[str, torch.Tensor], threshold: float, mode: str) -> dict[str, torch.Tensor]:
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    chosen = select(flat, threshold, mode)
    out, at = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[at:at + size].view_as(scores[n])
        at += size
    return out


def pruned_neurons(forget: SplitStats, retain: SplitStats, threshold: float, mode: str,
                   eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Per neuron module, which input channels to prune: s = I_f / (I_r + eps) selected by
    ``threshold`` and ``mode`` over all visual neurons together."""
    i_f, i_r = forget.mean_importance(), retain.mean_importance()
    if not i_f or set(i_f) != set(i_r):
        raise ValueError("neuron importance is missing for the forget or the retain split")
    return _flat_select({k: i_f[k] / (i_r[k] + eps) for k in i_f}, threshold, mode)


def fisher_mask(forget: SplitStats, retain: SplitStats, threshold: float, mode: str,
                eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Per parameter, 1.0 where F_f / (F_r + eps) is selected (those entries update), else 0."""
    f_f, f_r = forget.mean_fisher(), retain.mean_fisher()
    if not f_f or set(f_f) != set(f_r):
        raise ValueError("Fisher information is missing for the forget or the retain split")
    chosen = _flat_select({k: f_f[k] / (f_r[k] + eps) for k in f_f}, threshold, mode)
    return {k: v.float() for k, v in chosen.items()}


def apply_pruning(adapter: ModelAdapter, pruned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the outgoing weights of the pruned neurons in place; returns the gradient masks
    that keep them at zero ({weight parameter name: 0/1 tensor})."""
    modules = neuron_modules(adapter)
    masks = {}
    with torch.no_grad():
        for name, chosen in pruned.items():
            weight = modules[name].weight
            weight[:, chosen] = 0.0
            keep = torch.ones_like(weight)
            keep[:, chosen] = 0.0
            masks[f"{name}.weight"] = keep
    return masks


def combine_masks(*tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Elementwise product of several {parameter: mask} tables."""
    out: dict[str, torch.Tensor] = {}
    for table in tables:
        for k, v in table.items():
            out[k] = out[k] * v if k in out else v.clone()
    return out


@dataclass
class StatsRequest:
    """What a method asks the statistics pass to measure before it trains, on the forget and
    the retain stream (``batches`` batches of each per worker)."""
    importance: str | None = None            # neuron importance by this criterion (None: none)
    fisher: bool = False                     # the diagonal Fisher of the trained parameters
    teacher_layers: list[int] | None = None  # the teacher's features of every retain image (None: none)
    batches: int = 16


@dataclass
class Statistics:
    """What a statistics pass measured: per split (forget, retain) its SplitStats, and the
    teacher's visual features per retain image key."""
    forget: SplitStats | None = None
    retain: SplitStats | None = None
    teacher: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def measure_split(adapter: ModelAdapter, batches: Iterable[dict[str, torch.Tensor]], fisher_names: list[str],
                  criterion: str | None) -> SplitStats:
    """One split's sums over ``batches`` (model inputs): neuron importance by ``criterion``
    (None: none) and the squared gradients of ``fisher_names``. The tables start at zero, so
    every rank holds the same tensors to all-reduce, even with no batch."""
    from vkd.methods.losses import nll

    model = adapter.model
    params = dict(model.named_parameters())
    st = SplitStats(fisher={n: torch.zeros_like(params[n], dtype=torch.float32) for n in fisher_names})
    modules = neuron_modules(adapter)
    if criterion is not None:
        st.importance = {n: torch.zeros(m.in_features) for n, m in modules.items()}
        st.positions = {n: 0.0 for n in modules}
    wanted = set(fisher_names)
    backward = bool(wanted) or criterion == "taylor"  # activation importance alone needs a forward pass
    with neuron_meter(adapter, st, criterion) if criterion is not None else contextlib.nullcontext():
        for inputs in batches:
            if backward:
                nll(model, inputs).backward()
                accumulate_fisher(model, st, wanted)
            else:
                with torch.no_grad():
                    nll(model, inputs)
    return st


def teacher_features(adapter: ModelAdapter, batches: Iterable[tuple[torch.Tensor, list[int]]],
                     layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The model's visual features (projector output and vision layers ``layers``) of every
    image of ``batches`` ((pixel values, image keys) pairs), once per image key."""
    from vkd.methods.losses import visual_features

    table: dict[int, dict[str, torch.Tensor]] = {}
    for pixels, keys in batches:
        new = [i for i, k in enumerate(keys) if k not in table]
        if not new:
            continue
        feats = visual_features(adapter, pixels[new], layers)
        for j, i in enumerate(new):
            table[keys[i]] = {name: f[j].clone() for name, f in feats.items()}
    return table


def all_reduce(stats: Iterable[SplitStats], teacher: dict[int, Any] | None = None) -> None:
    """Sum every rank's statistics in place (torch.distributed; nothing with one rank), and
    gather the teacher tables into every rank's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for st in stats:
        for table in (st.importance, st.fisher):
            for v in table.values():
                dist.all_reduce(v)
        names = sorted(st.positions)
        counts = torch.tensor([float(st.batches), *[st.positions[n] for n in names]], dtype=torch.float64)
        dist.all_reduce(counts)
        st.batches = int(counts[0])
        st.positions = {n: float(c) for n, c in zip(names, counts[1:].tolist())}
    if teacher is not None:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, teacher)
        for part in parts:
            teacher.update(part)
