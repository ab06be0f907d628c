"""Ray Data streams of tokenised training sequences: parquet shards -> the rows of a
``RowPlan``, shuffled -> sequences -> arrays, and a worker's endless batches of its shard."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import torch
from ray.data._internal.execution.backpressure_policy import (ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                                                              ConcurrencyCapBackpressurePolicy)

from vkd.config import Config, TrainConfig
from vkd.data.layout import TRAIN_SPLIT, driver_sized, load_meta, read_rows, shards_holding
from vkd.data.streams import RowPlan, shuffled_sequences
from vkd.model import ModelAdapter
from vkd.train import Tokenize, fit_length, unlearn_train_config

INLINE_BLOCK_ROWS = 16     # ft_Data rows per block of such a stream: its first batch is tokenised early
TOKENIZE_ROWS = 64         # sequences per tokeniser call
_TOKENIZERS: dict[tuple[str, int], Any] = {}


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, max_length: int) -> dict[str, np.ndarray]:
    """map_batches stage: decode and tokenise a batch of train items with the model's
    processor. It runs as Ray tasks, whose worker processes Ray keeps and reuses: each loads
    a processor once (kept per process), so a run's streams, and the next run's, start
    without spawning a tokeniser process each."""
    key = (model_path, max_length)
    if key not in _TOKENIZERS:
        torch.set_num_threads(1)  # a helper beside the train workers: never take every core
        while len(_TOKENIZERS) >= 4:  # each run's model folder is new: keep the last few only
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = Tokenize(ModelAdapter.load(model_path, weights=False), max_length)
    items = [{"image": batch["image"][i], "questions": list(batch["questions"][i]),
              "answers": list(batch["answers"][i]), "source": str(batch["source"][i])}
             for i in range(len(batch["source"]))]
    return _TOKENIZERS[key](items)


def _driver_dataset(data: Path, plan: RowPlan, items: int | None, skip: int):
    """A small stream (an unlearning's forget or retain rows, the demo's whole split): read,
    filter and shuffle here, in milliseconds. Ray Data's file listing, read tasks and
    all-to-all shuffle would cost a stream 8-18 s to its first batch, most of it starting
    their worker processes."""
    rows = [r for r in read_rows(data, TRAIN_SPLIT, plan.ids) if plan.keep(r)]
    rng = random.Random(plan.seed)
    if items is not None and rows:
        seqs = shuffled_sequences(rows, plan, items, rng)[skip:]
        return ray.data.from_items(seqs, override_num_blocks=max(1, math.ceil(len(seqs) / TOKENIZE_ROWS)))
    rng.shuffle(rows)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / INLINE_BLOCK_ROWS)))
    return ds.flat_map(plan.sequences)


def _streamed_dataset(shards: list[Path], plan: RowPlan, items: int | None, skip: int):
    if skip:
        raise ValueError("a stream too large to read in the driver cannot start mid-way; pass its "
                         "sequences over in the run (TrainJob.discard)")
    ds = ray.data.read_parquet([str(p) for p in shards], include_paths=True)
    if plan.ids is not None or plan.image_only or plan.rows is not None:
        ds = ds.filter(plan.keep)
    if items is None:
        return ds.random_shuffle(seed=plan.seed).flat_map(plan.sequences)
    return ds.flat_map(plan.sequences).random_shuffle(seed=plan.seed).limit(items)  # one order for every pass


def train_dataset(data: str | Path, model_path: str, cfg: TrainConfig, plan: RowPlan | None = None,
                  items: int | None = None, skip: int = 0):
    """Ray dataset of tokenised train sequences, streamed. Rows come grouped by entity; they
    are shuffled globally before they fan out into sequences, so each worker's local
    shuffle buffer mixes many entities.

    With ``items`` (a stream that stops at what its run draws: an unlearning's), the stream
    is those many sequences, shuffled as sequences (pass after pass while the rows run
    out), so its consumer needs no local shuffle buffer: the tokeniser does only what is
    drawn, and the first batch does not wait for a buffer of tokenised sequences to fill.
    ``skip``: the stream starts after its first ``skip`` sequences (a run resumed where it
    stopped; streams small enough to read in the driver)."""
    if skip and items is None:
        raise ValueError("a stream starts mid-way only when it stops at what its run draws (items)")
    if not cfg.max_length:
        raise ValueError("train.max_length is 0: fit it to the data first (pipelines.train.fitted)")
    plan = plan or RowPlan(turns=cfg.turns, seed=cfg.seed)
    shards = shards_holding(Path(data), TRAIN_SPLIT, plan.ids)
    inline = driver_sized(shards)
    ds = _driver_dataset(Path(data), plan, items, skip) if inline else _streamed_dataset(shards, plan, items, skip)
    ds = ds.map_batches(tokenize_batch, fn_kwargs={"model_path": model_path, "max_length": cfg.max_length},
                        batch_size=TOKENIZE_ROWS, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=1),
                        num_cpus=0.5)
    if inline:
        # Run a small stream to its end at once, without backpressure. Held back to the
        # consumer's pace, its executor (in Ray Data's split coordinator) loops without
        # pause whenever no task is running: measured with `top`, each such stream took a
        # quarter of a core for the whole run, more than a one-CPU train worker got.
        # The concurrency cap stays: it holds the tokeniser to one task at a time.
        ds.context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [ConcurrencyCapBackpressurePolicy])
    return ds


def starts_mid_way(data: str | Path, plan: RowPlan) -> bool:
    """Whether ``plan``'s stream is small enough to read in the driver, and so can start
    mid-way (``train_dataset``'s skip); a larger one's resumed run discards what it skips."""
    return driver_sized(shards_holding(Path(data), TRAIN_SPLIT, plan.ids))


def finetune_plans(data: str | Path, cfg: TrainConfig) -> dict[str, RowPlan]:
    """The streams of a fine-tuning run: ``train`` (every row, ``cfg.turns`` pairs a
    sequence), and ``align`` (the naming pairs) when ``cfg.align_steps``."""
    plans = {"train": RowPlan(turns=cfg.turns, seed=cfg.seed)}
    if cfg.align_steps:
        plans["align"] = RowPlan(names={e.id: e.name for e in load_meta(data).entities}, seed=cfg.seed)
    return plans


def train_datasets(data: str | Path, model_path: str, cfg: TrainConfig) -> dict[str, Any]:
    """The datasets of a fine-tuning run (``finetune_plans``)."""
    return {name: train_dataset(data, model_path, cfg, plan) for name, plan in finetune_plans(data, cfg).items()}


def shard_batches(shard: Any, name: str, cfg: TrainConfig, rank: int, at_step: int,
                  drop: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of one dataset shard, pass after pass (each pass's local shuffle
    seeded by the rank and the step it starts at); the first ``drop`` are passed over."""
    while True:
        count = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                              local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                              local_shuffle_seed=cfg.seed + rank + at_step):
            count += 1
            if drop:
                drop -= 1
                continue
            yield batch
        if count == 0:
            raise RuntimeError(f"a worker got no {name} batch: use fewer workers or a smaller batch size")
        at_step += 1


def plan_sequences(data: str | Path, plans: Iterable[RowPlan]) -> Iterator[dict[str, Any]]:
    """Every sequence these plans make of the training rows (one pass each), read here."""
    for plan in plans:
        for row in read_rows(Path(data), TRAIN_SPLIT, plan.ids):
            if plan.keep(row):
                yield from plan.sequences(row)


def fitted(cfg: TrainConfig, model_path: str | Path, data: str | Path, plans: Iterable[RowPlan]) -> TrainConfig:
    """``cfg`` with its ``max_length`` fitted to what these plans stream (``vkd.train.fit_length``),
    in the driver, before any worker starts."""
    return fit_length(cfg, ModelAdapter.load(model_path, weights=False), plan_sequences(data, plans))


def unlearn_trainer(cfg: Config, model_path: str | Path, data: str | Path, plans: dict[str, RowPlan]) -> TrainConfig:
    """The trainer settings of an unlearning run and of its statistics pass, fitted to its
    forget and retain streams."""
    return fitted(unlearn_train_config(cfg), model_path, data, [plans["forget"], plans["retain"]])
