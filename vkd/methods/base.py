"""What an unlearning method is: a small class whose settings are its config dataclass and
whose difference is which parameters train, which streams a step takes, what it prepares
from the statistics pass, and its loss.

The trainer (``vkd/loop.py``) runs every method, and ``FineTune`` (vanilla training and the
relearning attack), the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vkd.config import Section, UnlearnConfig, option
from vkd.data.layout import TRAIN_SPLIT, ForgetSet, read_rows
from vkd.data.streams import RowPlan, sample_rows
from vkd.methods.losses import nll
from vkd.model import ModelAdapter
from vkd.registry import Registry
from vkd.saliency import Statistics, StatsRequest
from vkd.train import Batch, trainable_names


@dataclass
class MethodConfig(Section):
    """A method's own settings: YAML ``unlearn.<method>`` (the registry names the section)."""
    section: ClassVar[str] = "unlearn"


@dataclass
class StepContext:
    """What a method's loss may use besides the model and the batches."""
    adapter: ModelAdapter
    reference: nn.Module | None = None                       # frozen starting model (methods that need one)
    teacher: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)   # image key -> visual features


@dataclass
class Preparation:
    """What a method made of the statistics before training: gradient masks of trained
    parameters (0/1), the pruned neurons (module -> input channels; the model was changed in
    place), the teacher's features, and figures for the report."""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    pruned: dict[str, list[int]] = field(default_factory=dict)
    teacher: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> tuple[str | None, str | None]:
        """The masks and the teacher table as files in ``folder`` (what the trainer's workers
        load); their paths, None for what is empty."""
        masks = teacher = None
        if self.masks:
            masks = str(folder / "masks.pt")
            torch.save(self.masks, masks)
        if self.teacher:
            teacher = str(folder / "teacher.pt")
            torch.save(self.teacher, teacher)
        return masks, teacher


class Method:
    """Base class. Subclasses set ``Config`` and override what differs."""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""
    streams: ClassVar[tuple[str, ...]] = ("forget", "retain")  # the batches each step takes
    retain_text: ClassVar[bool] = True   # the retain stream holds text-only pairs too
    needs_reference: ClassVar[bool] = False  # a frozen copy of the starting model (KL, NPO)

    def __init__(self, cfg: MethodConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def trainable(self, adapter: ModelAdapter) -> list[str]:
        """Names of the parameters that train (the rest are frozen: no gradient, no optimizer state)."""
        return trainable_names(adapter, "all")

    def forget_answer(self) -> str | None:
        """The answer every forget pair is trained towards instead of its own (None: its own)."""
        return None

    def stream_plans(self, data: str | Path, fs: ForgetSet, unlearn: UnlearnConfig) -> dict[str, RowPlan]:
        """The forget stream (the forget entities' image pairs) and the retain stream
        (``unlearn.retain_rows`` rows of the other entities, image rows only when the method
        keeps no text in it), chosen by the request's seed."""
        retain_ids = frozenset(fs.retain)
        candidates = [r for r in read_rows(Path(data), TRAIN_SPLIT, retain_ids)
                      if r.get("image") is not None or self.retain_text]
        return {
            "forget": RowPlan(ids=frozenset(fs.forget), image_only=True, answer=self.forget_answer(), seed=unlearn.seed),
            "retain": RowPlan(ids=retain_ids, image_only=not self.retain_text, seed=unlearn.seed,
                              rows=sample_rows(candidates, unlearn.retain_rows, unlearn.seed)),
        }

    def statistics(self) -> StatsRequest | None:
        """What the statistics pass measures before training (None: no pass)."""
        return None

    def prepare(self, adapter: ModelAdapter, stats: Statistics, trainable: list[str], seed: int = 0,
                data: str | Path | None = None, plans: dict[str, RowPlan] | None = None) -> Preparation:
        """Masks, pruning (of ``adapter``, in place) and teacher features from the statistics
        (``seed``: the request's, for what the preparation draws; ``data`` and ``plans``: the
        benchmark and the run's streams, for a preparation that reads their rows)."""
        return Preparation()

    def loss(self, model: nn.Module, batches: dict[str, Batch],
             ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("unlearning method")


def register(name: str):
    """Register a method class under ``name``; its config becomes YAML section
    ``unlearn.<name>`` (each method has a config class of its own)."""
    def add(cls: type[Method]) -> type[Method]:
        if "section" in cls.Config.__dict__:
            raise ValueError(f"method {name}: its config class {cls.Config.__name__} belongs to another method")
        cls.Config.section = f"unlearn.{name}"
        cls.name = name
        return METHODS.register(name)(cls)
    return add


def method_for(cfg: UnlearnConfig) -> Method:
    """The method of ``cfg.method`` with its (validated) settings."""
    return METHODS.get(cfg.method)(cfg.options)


@dataclass
class FineTuneConfig(Section):
    section: ClassVar[str] = "train"
    trainable: str = option("all", "what trains: all, or visual (vision tower + projector)", choices=("all", "visual"))


class FineTune(Method):
    """Plain fine-tuning on the ``train`` stream: the vanilla model and the relearning attack
    (not an unlearning method: not registered)."""
    Config = FineTuneConfig
    name = "finetune"
    streams = ("train",)

    def trainable(self, adapter: ModelAdapter) -> list[str]:
        return trainable_names(adapter, self.cfg.trainable)

    def loss(self, model, batches, ctx):
        loss = nll(model, batches["train"].inputs)
        return loss, {"loss": float(loss.detach())}
