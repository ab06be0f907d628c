"""Trainer overhead: samples/s of the Ray Train + DeepSpeed trainer against a bare
single-process PyTorch loop, on the same tiny model, batch size and training rows, measured
side by side in one run (and 2-worker scaling).

    .venv/bin/python benchmarks/trainer_overhead.py [--config configs/demo.yaml] [--steps 300]

Two figures per loop: "from step 1" counts from the end of the first step; "steady" over the
second half of the steps, once the trainer's Ray Data pipeline is past its start-up burst
(it reads and shuffles the rows and decodes ahead while the first steps run, on the same
cores). The trainer's figures are the ones its rank 0 reports (Ray Data decoding and
tokenising in concurrent tasks included); the bare loop tokenises inline, so part of
the trainer's edge at one worker is that its data preparation runs beside the training.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from pipelines.runtime import init_ray
from pipelines.train import TrainJob, run_training, train_datasets
from vkd.config import load_config
from vkd.data import prepare_benchmark
from vkd.data.items import train_sequences
from vkd.data.layout import TRAIN_SPLIT, read_rows
from vkd.model import ModelAdapter, resolve_model
from vkd.train import Tokenize, lm_loss, model_inputs, set_trainable, trainable_names


def bare_loop(model_path: Path, items: list[dict], batch_size: int, steps: int, lr: float,
              threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    adapter = ModelAdapter.load(model_path)
    adapter.model.train()
    params = set_trainable(adapter, trainable_names(adapter, "all"))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokenize = Tokenize(adapter, 128)
    rng = random.Random(0)
    stamps = []
    for step in range(steps):
        batch = {k: torch.from_numpy(v) for k, v in tokenize(rng.sample(items, batch_size)).items()}
        loss, _ = lm_loss(adapter.model, model_inputs(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        stamps.append(time.perf_counter())
    half = len(stamps) // 2
    return ((len(stamps) - 1) * batch_size / (stamps[-1] - stamps[0]),
            (len(stamps) - 1 - half) * batch_size / (stamps[-1] - stamps[half]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    cfg = load_config(args.config)
    work = Path(tempfile.mkdtemp(prefix="vkd-overhead-"))
    try:
        settings = dataclasses.asdict(cfg.benchmark)
        data = work / "data"
        prepare_benchmark(settings.pop("kind"), data, **settings)
        path = resolve_model("tiny", cfg.model, data, cache=work / "models")
        items = [it for r in read_rows(data, TRAIN_SPLIT) for it in train_sequences(r, cfg.train.turns)]
        bs = cfg.train.batch_size
        zero = cfg.train.zero_stage
        # (label, bare-loop threads it compares with, workers, CPUs per worker)
        runs = (("1 worker x 1 CPU", 1, 1, 1.0), ("1 worker x 2 CPU", 2, 1, 2.0), ("2 workers x 1 CPU", 2, 2, 1.0))
        bare = {t: bare_loop(path, items, bs, args.steps, cfg.train.lr, threads=t) for t in (1, 2)}
        init_ray(cfg.ray.num_cpus)
        rates = {}
        for label, _, workers, cpus in runs:
            tcfg = dataclasses.replace(cfg.train, workers=workers, cpus_per_worker=cpus, max_steps=args.steps,
                                       align_steps=0, checkpoint_every=10**9, in_process=False)  # on Ray Train
            job = TrainJob(model_path=str(path), out_dir=str(work / f"trained-{workers}-{cpus}"), cfg=tcfg,
                           total_steps=args.steps, name=f"overhead-{workers}")
            result = run_training(job, train_datasets(data, str(path), tcfg), storage=work / "ray")
            rates[label] = result.metrics["samples_per_s"], result.metrics["steady_samples_per_s"]
        print(f"micro-batch {bs}, {cfg.train.turns} turn(s) per sequence, {args.steps} steps each, "
              f"{cfg.train.precision}, ZeRO-{zero} for the trainer (one worker runs stage 0: nothing to partition); "
              "samples/s (ratio to the bare loop with as many threads)")
        print(f"{'loop':<42}{'from step 1':>20}{'steady':>20}")
        for t, (first, steady) in bare.items():
            print(f"{f'bare PyTorch loop, {t} thread' + 's' * (t > 1):<42}{first:>12.1f} (1.00x){steady:>12.1f} (1.00x)")
        for label, threads, _, _ in runs:
            (first, steady), ref = rates[label], bare[threads]
            print(f"{'vkd trainer, ' + label:<42}{first:>12.1f} ({first / ref[0]:.2f}x){steady:>12.1f} ({steady / ref[1]:.2f}x)")
        one, two = rates["1 worker x 1 CPU"][1], rates["2 workers x 1 CPU"][1]
        print(f"2-worker scaling over 1 worker x 1 CPU, steady: {two / one:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
