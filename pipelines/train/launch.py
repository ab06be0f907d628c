"""Launching a training run: on Ray Train (a TorchTrainer of ``train.workers`` workers, each
driving a DeepSpeed engine, restarted from its last checkpoint when a worker dies) or, for
one worker, in the caller's process; the final Hugging Face folder is copied to the job's
``out_dir``."""
from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import ray.train
from ray.data import ExecutionOptions
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.train.job import TrainJob
from pipelines.train.worker import train_in_process, worker_loop
from vkd.config import TrainConfig


def torch_trainer(loop: Callable[[dict], None], job: Any, cfg: TrainConfig, datasets: dict[str, Any],
                  storage: str | Path, name: str, **run_options: Any) -> TorchTrainer:
    """A TorchTrainer running ``loop({"job": job})`` on ``cfg``'s workers. Ray Train restores
    a run from a folder of the same name, so each call gets its own: a new run never resumes
    an older run's checkpoints. Datasets keep their order (a seed gives the same batches, so
    a tune trial and its rerun from best.yaml train alike)."""
    return TorchTrainer(
        loop,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"{name}-{uuid.uuid4().hex[:8]}", storage_path=str(Path(storage).resolve()),
                                       **run_options),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )


def fit(trainer: TorchTrainer):
    """``trainer.fit()``, then let go of its controller. In the main thread Ray Train installs
    a SIGINT handler that holds the controller's handle, which keeps the controller, its
    dataset manager and every split coordinator of the run alive (each polling at about 1%
    of a core) until the next run replaces the handler: a batch's statistics pass left 15
    such actors running beside all of its requests. The handler before the run comes back."""
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, saved)


def run_training(job: TrainJob, datasets: dict[str, Any], storage: str | Path, max_failures: int = 1,
                 callbacks: list[Any] | None = None, report_to_tune: bool = False):
    """Train on Ray (``datasets`` from ``pipelines.train.data``); copy the final Hugging Face
    folder to ``job.out_dir``; return the Result. ``callbacks``: Ray Train callbacks (a tune
    trial on several workers passes Tune's report callback).

    ``job.in_process`` (one worker: a tune trial's, or ``train.in_process``): the loop runs
    in this process on the same data, with the same results, without Ray Train: no
    controller, worker process, placement group or split coordinators to start (most of a
    tune trial's fixed cost), and no restart on failure. ``report_to_tune``: it runs in a
    Tune trial, which gets every result but the last (the trial reports that one once it
    has written it down)."""
    if job.in_process:
        if job.cfg.workers != 1:
            raise ValueError(f"a run in this process has one worker; train.workers is {job.cfg.workers}")
        result = train_in_process(job, datasets, report_to_tune)
    else:
        trainer = torch_trainer(worker_loop, job, job.cfg, datasets, storage, f"{job.name}-{Path(job.out_dir).name}",
                                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                callbacks=callbacks or [])
        result = fit(trainer)
    with result.checkpoint.as_directory() as d:
        hf = Path(d) / "hf"
        if not (hf / "config.json").is_file():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no model")
        tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=Path(job.out_dir).parent))
        shutil.copytree(hf, tmp, dirs_exist_ok=True)
        tmp.rename(job.out_dir)
    if job.in_process:
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return result
