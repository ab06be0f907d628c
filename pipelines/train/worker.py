"""One rank of a training run: set up the engine, the feed and the callbacks, then run
``vkd.loop.train``. A rank runs on a Ray Train worker (``worker_loop``) or in the caller's
process (``train_in_process``); the two differ only in their session: where the dataset
shards, the checkpoint to resume from and the reports go."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipelines.train.data import shard_batches
from pipelines.train.job import TrainJob
from vkd.loop import (Callback, Feed, Progress, Run, SaveRungs, Timetable, dangling_params, load_state, save_state,
                      train)
from vkd.methods import StepContext
from vkd.model import ModelAdapter
from vkd.probe import Probe, ProbeCallback
from vkd.train import build_engine, mask_gradients, set_trainable, whole_params

STUDY_KEYS = ("objective", "forgetting", "preservation")


class OnRayTrain:
    """The loop's view of its run on a Ray Train worker."""
    local = False

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def dataset_shard(self, name: str):
        return ray.train.get_dataset_shard(name)

    def resume_from(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint: Any = None, last: bool = False) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


class InProcess:
    """The loop's view of a run in the caller's process: one rank, the datasets as they are
    (a resumed run's start where it stopped), resumed from ``resume_dir`` if any; the last
    result and checkpoint are the run's, and in a Tune trial every result before the last
    also goes to ``ray.tune.report`` (the trial reports the last itself once it has written
    it down: a scheduler may stop a trial at any report). Ray Train's own local mode refuses
    to run inside a Tune trial."""
    local = True
    rank, world = 0, 1

    def __init__(self, datasets: dict[str, Any], report_to_tune: bool, resume_dir: str = ""):
        for ds in datasets.values():  # what Ray Train's DataConfig sets for its workers
            ds.context.execution_options.preserve_order = True
        self.datasets, self.report_to_tune, self.resume_dir = datasets, report_to_tune, resume_dir
        self.metrics: dict[str, Any] = {}
        self.checkpoint: Any = None

    def dataset_shard(self, name: str):
        return self.datasets[name]

    def resume_from(self):
        return ray.train.Checkpoint.from_directory(self.resume_dir) if self.resume_dir else None

    def report(self, metrics: dict[str, Any], checkpoint: Any = None, last: bool = False) -> None:
        self.metrics, self.checkpoint = metrics, checkpoint or self.checkpoint
        if self.report_to_tune and not last:
            from ray import tune

            tune.report(metrics)


class LogToMlflow(Callback):
    """Rank 0's metrics in the run's MLflow run, one database write per step: the training
    metrics every ``log_every`` steps and at the end, the evaluations where they are made."""

    def __init__(self, uri: str, run_id: str, log_every: int):
        self.client, self.run_id, self.every = MlflowClient(uri), run_id, log_every

    def on_step(self, run, report):
        metrics = {}
        if run.step % self.every == 0 or run.done:
            metrics.update({f"train/{k}": v for k, v in report.items()
                            if k not in ("step", "resumed_from", *STUDY_KEYS) and not k.startswith("eval/")})
        if run.timetable.probe(run.step):
            metrics.update({k: v for k, v in report.items() if k.startswith("eval/") or k in STUDY_KEYS})
        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, run.step) for k, v in metrics.items()])


class ReportAndCheckpoint(Callback):
    """Each result to the session: with a checkpoint (the training state, and at the end
    the Hugging Face folder) at the timetable's checkpoints, alone where only a probe ran."""

    def __init__(self, session: Any, job: TrainJob):
        self.session, self.job = session, job

    def on_step(self, run, report):
        due = run.timetable.checkpoint(run.step)
        if run.timetable.probe(run.step) and not due:
            self.session.report(report)
        if not due:
            return
        # Ray Train copies a reported checkpoint to its storage; in process, its folder stays
        with checkpoint_folder(self.job, self.session.local) as tmp:
            save_state(run.engine, Path(tmp), run.step, run.rank)
            if run.done:
                with whole_params(run.engine, run.cfg.zero_stage):
                    if run.rank == 0:
                        run.adapter.save(Path(tmp) / "hf")
            self.session.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), last=run.done)


def checkpoint_folder(job: TrainJob, lasting: bool):
    """A temporary folder for a checkpoint, or a lasting one beside the final model
    (``run_training`` removes it once it has copied the model out)."""
    if not lasting:
        return tempfile.TemporaryDirectory()
    return contextlib.nullcontext(tempfile.mkdtemp(prefix=".checkpoint-", dir=Path(job.out_dir).parent))


def setup_run(job: TrainJob, session: Any) -> Run:
    """The rank's model, engine and method context, resumed where the session says."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed + session.rank)
    np.random.seed(cfg.seed + session.rank)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    adapter = ModelAdapter.load(job.model_path)
    adapter.model.train()
    params = set_trainable(adapter, job.method.trainable(adapter))
    if job.masks_path:
        mask_gradients(adapter.model, torch.load(job.masks_path))
    engine = build_engine(adapter.model, params, cfg, session.world, job.total_steps)
    ctx = StepContext(adapter=adapter)
    if job.method.needs_reference:
        ctx.reference = ModelAdapter.load(job.reference_path or job.model_path).model.to(engine.device)
        ctx.reference.requires_grad_(False)
    if job.teacher_path:
        ctx.teacher = torch.load(job.teacher_path)
    timetable = Timetable(job.total_steps, None if session.local else cfg.checkpoint_every,
                          probing=job.probe is not None, probe_at=frozenset(job.probe.at if job.probe else ()))
    run = Run(engine, adapter, job.method, ctx, cfg, timetable, session.rank, session.world,
              dangling=dangling_params(adapter, session.world))
    checkpoint = session.resume_from()
    if checkpoint:
        with checkpoint.as_directory() as d:
            run.step = load_state(engine, d)
    run.resumed_from = run.step
    return run


def run_rank(job: TrainJob, session: Any) -> None:
    run = setup_run(job, session)
    cfg = job.cfg

    def open_dataset(name: str, at_step: int, drop: int):
        return shard_batches(session.dataset_shard(name), name, cfg, run.rank, at_step, drop)

    def route(stream: str, step: int) -> str:  # the vanilla run's naming pairs first
        return "align" if stream == "train" and step < cfg.align_steps else stream

    feed = Feed(job.method.streams, open_dataset, route, job.discard, cfg.batch_size, run.engine.device)
    callbacks = list(job.callbacks)
    if run.rank == 0:
        callbacks.append(Progress(run, job.name, feed))
    callbacks += _evaluation_and_records(job, run, session)
    train(run, feed, callbacks)


def _evaluation_and_records(job: TrainJob, run: Run, session: Any) -> list[Callback]:
    """The probe, MLflow, rung states and the session's reports, in that order."""
    out: list[Callback] = []
    if job.probe is not None:
        text_fixed = not any(run.adapter.family.group_of(n) == "llm" for n in job.method.trainable(run.adapter))
        out.append(ProbeCallback(Probe(job.probe, text_fixed=text_fixed) if run.rank == 0 else None))
    if job.tracking is not None and run.rank == 0:
        out.append(LogToMlflow(job.tracking.uri, job.tracking.run_id, job.cfg.log_every))
    if job.rungs is not None:
        out.append(SaveRungs(job.rungs.save_at, job.rungs.folder))
    out.append(ReportAndCheckpoint(session, job))
    return out


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    run_rank(config["job"], OnRayTrain())


def train_in_process(job: TrainJob, datasets: dict[str, Any], report_to_tune: bool) -> Any:
    """The loop in this process, as the one rank of a gloo group (DeepSpeed needs a process
    group and the rank variables); returns a Ray Train Result. The group is made once and
    kept for the process's later runs: DeepSpeed keeps handles to the groups it derives from
    it, which a new group would leave dangling."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ValueError(f"a run in this process needs it alone in its process group; it is one of "
                         f"{dist.get_world_size()} ranks: run it on Ray Train (train.workers)")
    session = InProcess(datasets, report_to_tune, job.rungs.resume_dir if job.rungs else "")
    rank_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in rank_env}
    os.environ.update(rank_env)
    try:
        run_rank(job, session)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ray.train.Result(metrics=session.metrics, checkpoint=session.checkpoint, path=None, error=None)
