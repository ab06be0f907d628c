"""The one trainer: Ray Train workers, each driving a DeepSpeed engine, fed by Ray Data.

The caller gives the model folder, the Ray dataset of train items, which parameter groups
train, an optional per-parameter gradient mask and the loss (a name in
``vkd.train.LOSSES``). Checkpoints go through ``ray.train.report``; a restarted worker
group resumes from the latest one and finishes with the same step count.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vkd.config import TrainConfig


@dataclass
class TrainJob:
    model_path: str
    out_dir: str                       # the final Hugging Face folder
    cfg: TrainConfig
    total_steps: int
    loss: str = "lm"
    masks_path: str | None = None      # torch.save'd {param name: 0/1 tensor}
    mlflow: dict[str, str] = field(default_factory=dict)   # tracking_uri, run_id
    name: str = "train"
    fault_at_step: int = 0             # test-only fault hook: rank 0 dies once at this step,
    fault_marker: str = ""             # leaving this file behind so it dies only once


class TokenizeBatch:
    """map_batches stage: decode and tokenise a batch of train items with the model's processor."""

    def __init__(self, model_path: str, max_length: int):
        import torch

        from vkd.model import ModelAdapter
        from vkd.train import Tokenize

        torch.set_num_threads(1)  # a helper beside the train workers: never take every core

        self.tokenize = Tokenize(ModelAdapter.load(model_path), max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [{"image": batch["image"][i], "questions": list(batch["questions"][i]),
                  "answers": list(batch["answers"][i]), "source": str(batch["source"][i])}
                 for i in range(len(batch["source"]))]
        return self.tokenize(items)


def train_dataset(data: str | Path, model_path: str, cfg: TrainConfig, naming: bool = False):
    """Ray dataset of tokenised train sequences: parquet shards -> sequences of ``cfg.turns``
    question-answer pairs (or, with ``naming``, the pairs that name the entity in its
    picture) -> arrays, streamed."""
    import ray

    from vkd.data.items import naming_sequences, train_sequences
    from vkd.data.layout import TRAIN_SPLIT, load_meta, shard_paths

    names = {e.id: e.name for e in load_meta(data).entities} if naming else {}

    def expand(row: dict[str, Any]) -> list[dict[str, Any]]:
        row = dict(row)
        row["_source"] = f"{row.pop('path', 'ft_Data')}, entity {row.get('ID')}"
        seqs = naming_sequences(row, names.get(row.get("ID"), "")) if naming else train_sequences(row, cfg.turns, cfg.seed)
        return [{k: it[k] for k in ("image", "questions", "answers", "source")} for it in seqs]

    ds = ray.data.read_parquet([str(p) for p in shard_paths(data, TRAIN_SPLIT)], include_paths=True)
    # Rows come grouped by entity; shuffle them globally (a few MB) before they fan out into
    # sequences, so each worker's local shuffle buffer mixes many entities.
    ds = ds.random_shuffle(seed=cfg.seed).flat_map(expand)
    return ds.map_batches(TokenizeBatch, fn_constructor_kwargs={"model_path": model_path, "max_length": cfg.max_length},
                          batch_size=64, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                          num_cpus=0.5)


def train_datasets(data: str | Path, model_path: str, cfg: TrainConfig) -> dict[str, Any]:
    """The datasets of a run: ``train``, and ``align`` (naming pairs) when ``cfg.align_steps``."""
    out = {"train": train_dataset(data, model_path, cfg)}
    if cfg.align_steps:
        out["align"] = train_dataset(data, model_path, cfg, naming=True)
    return out


def _save_hf(engine, adapter, path: Path, rank: int, zero_stage: int) -> None:
    import contextlib

    import deepspeed

    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else contextlib.nullcontext()
    with ctx:
        if rank == 0:
            adapter.save(path)


def worker_loop(job_dict: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train
    import torch

    from vkd.model import ModelAdapter
    from vkd.train import LOSSES, ds_config, model_inputs, set_trainable, skip_shm_comm_build

    job = TrainJob(**{**job_dict, "cfg": TrainConfig(**job_dict["cfg"])})
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    skip_shm_comm_build()

    adapter = ModelAdapter.load(job.model_path)
    model = adapter.model
    model.train()
    params = set_trainable(adapter, cfg.trainable)
    if job.masks_path:
        masks = torch.load(job.masks_path)
        for name, p in model.named_parameters():
            if name in masks and p.requires_grad:
                p.register_hook(lambda g, m=masks[name]: g * m.to(g.dtype))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, job.total_steps))
    loss_fn = LOSSES.get(job.loss)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
            step = json.loads((Path(d) / "state.json").read_text())["step"]
    resumed_from = step

    tracker = None
    if rank == 0 and job.mlflow.get("run_id"):
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(job.mlflow["tracking_uri"])
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=job.total_steps, initial=step, desc=job.name, mininterval=5, ascii=True)

    def batches(phase: str, at_step: int):
        """Endless batches of one dataset shard, pass after pass."""
        shard = ray.train.get_dataset_shard(phase)
        while True:
            count = 0
            for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                                  local_shuffle_buffer_size=cfg.shuffle_buffer,
                                                  local_shuffle_seed=cfg.seed + rank + at_step):
                count += 1
                yield batch
            if count == 0:
                raise RuntimeError(f"a worker got no {phase} batch: use fewer workers or a smaller train.batch_size")
            at_step += 1

    start, seen = None, step  # throughput counts from the end of the first step (pipelines warmed up)
    phase, stream = None, None
    while step < job.total_steps:
        want = "align" if step < cfg.align_steps else "train"
        if want != phase:
            phase, stream = want, batches(want, step)
        batch = next(stream)
        inputs = model_inputs({k: v.to(engine.device) for k, v in batch.items()})
        loss, metrics = loss_fn(engine, inputs)
        # Every trainable parameter takes part in every step on every rank (a text-only
        # batch skips the vision tower), or ZeRO's gradient buckets differ across ranks.
        loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in params)
        engine.backward(loss)
        engine.step()
        if not engine.is_gradient_accumulation_boundary() and cfg.grad_accum > 1:
            continue
        step += 1
        if start is None:
            start, seen = time.perf_counter(), step
        if rank == 0 and step == job.fault_at_step and job.fault_marker and not Path(job.fault_marker).exists():
            Path(job.fault_marker).write_text(str(step))
            time.sleep(5)  # let the controller register the last reported checkpoint first
            os._exit(1)
        done = step >= job.total_steps
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", phase=phase, refresh=False)
        report = {**metrics, "step": step, "resumed_from": resumed_from, "lr": engine.get_lr()[0],
                  "samples_per_s": (step - seen) * cfg.batch_size * cfg.grad_accum * world
                  / max(time.perf_counter() - start, 1e-9)}
        if tracker is not None and (step % cfg.log_every == 0 or done):
            for k, v in report.items():
                if k not in ("step", "resumed_from"):
                    tracker.log_metric(job.mlflow["run_id"], f"train/{k}", float(v), step=step)
        if step % cfg.checkpoint_every == 0 or done:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag="ds")
                if rank == 0:
                    (Path(tmp) / "state.json").write_text(json.dumps({"step": step}))
                if done:
                    _save_hf(engine, adapter, Path(tmp) / "hf", rank, cfg.zero_stage)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if bar is not None:
        bar.close()


def steps_for(n_items: int, cfg: TrainConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.workers * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_items / per_step))


def run_training(job: TrainJob, datasets: dict[str, Any], storage: str | Path, max_failures: int = 1):
    """Train on Ray (``datasets`` from :func:`train_datasets`); copy the final Hugging Face
    folder to ``job.out_dir``; return the Result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.cfg
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={**asdict(job), "cfg": asdict(cfg)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            # Ray Train restores a run from a folder of the same name: each call gets its own,
            # so a new run never resumes an older run's checkpoints.
            name=f"{job.name}-{Path(job.out_dir).name}-{uuid.uuid4().hex[:8]}", storage_path=str(Path(storage).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        hf = Path(d) / "hf"
        if not (hf / "config.json").is_file():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no model")
        tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=Path(job.out_dir).parent))
        shutil.copytree(hf, tmp, dirs_exist_ok=True)
        tmp.rename(job.out_dir)
    return result
