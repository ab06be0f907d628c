"""The step loop, plain PyTorch + DeepSpeed: every stage that changes weights runs it, on a
Ray Train worker or in the caller's process alike.

A ``Run`` holds the engine, the method and its context; a ``Feed`` gives each step its
batches; ``Callback``s do everything else, in order, after each optimizer step: the
progress bar, the in-run evaluation (``vkd.probe``), logging, rung states, reports and
checkpoints (``pipelines/train``), and the faults tests inject.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from vkd.config import TrainConfig
from vkd.data.streams import Ahead
from vkd.methods.base import Method, StepContext
from vkd.model import ModelAdapter
from vkd.train import Batch, make_batch


@dataclass
class Timetable:
    """When a run checkpoints and evaluates: checkpoints every ``checkpoint_every`` steps
    (None: only at the end) and at the last step; evaluations (when ``probing``) at the steps
    of ``probe_at`` and at every checkpoint, so that every result carries them."""
    total: int
    checkpoint_every: int | None = None
    probing: bool = False
    probe_at: frozenset[int] = frozenset()

    def checkpoint(self, step: int) -> bool:
        return step >= self.total or bool(self.checkpoint_every and step % self.checkpoint_every == 0)

    def probe(self, step: int) -> bool:
        return self.probing and (step in self.probe_at or self.checkpoint(step))


@dataclass
class Run:
    """What the loop and its callbacks share."""
    engine: Any
    adapter: ModelAdapter
    method: Method
    ctx: StepContext
    cfg: TrainConfig
    timetable: Timetable
    rank: int = 0
    world: int = 1
    step: int = 0
    resumed_from: int = 0
    dangling: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= self.timetable.total


class Callback:
    """Hooks into the loop. ``on_step`` runs after every optimizer step with the step's
    report (it may add to it); ``on_end`` runs however the loop ends."""

    def on_step(self, run: Run, report: dict[str, Any]) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass


Opener = Callable[[str, int, int], Iterator[dict[str, torch.Tensor]]]


class Feed:
    """Each step's batch of every stream the method takes, read ahead. ``open(dataset,
    at_step, drop)`` gives a dataset's endless batches (tensors) from a step on, the first
    ``drop`` passed over; a stream reads the dataset ``route(stream, step)`` names (the
    vanilla run's ``train`` stream reads ``align`` first)."""

    def __init__(self, streams: Sequence[str], open: Opener, route: Callable[[str, int], str] = lambda s, _: s,
                 discard: dict[str, int] | None = None, batch_size: int = 1, device: Any = None):
        self.streams, self.open, self.route = tuple(streams), open, route
        self.discard, self.batch_size, self.device = discard or {}, batch_size, device
        self.sources: dict[str, tuple[str, Ahead]] = {}

    def next(self, step: int, first: bool) -> dict[str, Batch]:
        for stream in self.streams:
            dataset = self.route(stream, step)
            if self.sources.get(stream, ("",))[0] != dataset:
                if stream in self.sources:
                    self.sources[stream][1].close()
                # a resumed run passes over the batches its earlier steps drew (``discard``)
                drop = self.discard.get(dataset, 0) // self.batch_size if first else 0
                self.sources[stream] = (dataset, Ahead(self.open(dataset, step, drop)))
        return {stream: make_batch({k: v.to(self.device) for k, v in next(self.sources[stream][1]).items()})
                for stream in self.streams}

    def source(self, stream: str) -> str:
        return self.sources.get(stream, ("",))[0]

    def close(self) -> None:
        for _, source in self.sources.values():
            source.close()


class Throughput:
    """Samples per second from the end of the first step (pipelines warmed up), "steady"
    over the second half of this run's steps (once the data's start-up burst is over), and
    the share of that time spent waiting for batches."""

    def __init__(self, per_step: int):
        self.per_step, self.stamps, self.waited = per_step, [], 0.0
        self.start: float | None = None
        self.seen = 0

    def wait(self, since: float) -> None:
        if self.start is not None:
            self.waited += time.perf_counter() - since

    def tick(self, step: int) -> dict[str, float]:
        self.stamps.append(time.perf_counter())
        if self.start is None:
            self.start, self.seen = self.stamps[-1], step
        elapsed = max(self.stamps[-1] - self.start, 1e-9)
        half = len(self.stamps) // 2
        steady = (len(self.stamps) - 1 - half) * self.per_step / max(self.stamps[-1] - self.stamps[half], 1e-9)
        out = {"samples_per_s": (step - self.seen) * self.per_step / elapsed, "steady_samples_per_s": steady,
               "data_wait": self.waited / elapsed,
               "seconds_per_step": (self.stamps[-1] - self.stamps[half - 1]) / max(len(self.stamps) - half, 1)
               if half else 0.0}
        if torch.cuda.is_available():
            out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


def dangling_params(adapter: ModelAdapter, world: int) -> list[torch.nn.Parameter]:
    """With several ranks, every trainable parameter must take part in every step on every
    rank, or ZeRO's gradient buckets differ across ranks: a text-only batch skips the vision
    tower and projector, so those join each loss at weight 0 (one rank needs none)."""
    if world == 1:
        return []
    return [p for g in ("vision", "projector") for _, p in adapter.param_groups()[g] if p.requires_grad]


def train(run: Run, feed: Feed, callbacks: Sequence[Callback]) -> None:
    """Optimizer steps until ``run.timetable.total``, from ``run.step``."""
    meter = Throughput(run.cfg.batch_size * run.cfg.grad_accum * run.world)
    try:
        while run.step < run.timetable.total:
            asked = time.perf_counter()
            batches = feed.next(run.step, first=run.step == run.resumed_from)
            meter.wait(asked)
            loss, metrics = run.method.loss(run.engine, batches, run.ctx)
            if run.dangling:
                loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in run.dangling)
            run.engine.backward(loss)
            run.engine.step()
            if not run.engine.is_gradient_accumulation_boundary() and run.cfg.grad_accum > 1:
                continue
            run.step += 1
            report = {**metrics, "step": run.step, "resumed_from": run.resumed_from,
                      "lr": run.engine.get_lr()[0], **meter.tick(run.step)}
            for callback in callbacks:
                callback.on_step(run, report)
    finally:  # also when a Tune scheduler stops the trial at a report (SystemExit there)
        feed.close()
        for callback in callbacks:
            callback.on_end(run)


class Progress(Callback):
    """A progress bar (rank 0): the loss and the dataset the first stream reads."""

    def __init__(self, run: Run, name: str, feed: Feed):
        from tqdm import tqdm

        self.feed = feed
        self.bar = tqdm(total=run.timetable.total, initial=run.step, desc=name, mininterval=5, ascii=True)

    def on_step(self, run, report):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{report['loss']:.3f}", data=self.feed.source(self.feed.streams[0]), refresh=False)

    def on_end(self, run):
        self.bar.close()


def save_state(engine, folder: Path, step: int, rank: int, frozen: bool = True) -> None:
    """The training state (DeepSpeed's checkpoint, every rank's part; without the frozen
    weights unless ``frozen``) and its step, in ``folder``."""
    engine.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=not frozen)
    if rank == 0:
        (folder / "state.json").write_text(json.dumps({"step": step}))


def load_state(engine, folder: str | Path) -> int:
    """Resume the engine from a ``save_state`` folder; returns its step."""
    engine.load_checkpoint(str(folder), tag="ds", load_module_strict=False)  # a rung's holds no frozen weight
    return json.loads((Path(folder) / "state.json").read_text())["step"]


class SaveRungs(Callback):
    """The training state at each of ``steps`` (but the last) in ``folder/<step>``, written
    whole or not at all: a run that resumes from it trains on as if it had never stopped
    (a tune trial stopped at a rung, promoted later)."""

    def __init__(self, steps: Sequence[int], folder: str | Path):
        self.steps, self.folder = set(steps), Path(folder)

    def on_step(self, run, report):
        if run.step not in self.steps or run.done:
            return
        target = self.folder / str(run.step)
        if (target / "state.json").is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=self.folder))
        save_state(run.engine, tmp, run.step, run.rank, frozen=False)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
