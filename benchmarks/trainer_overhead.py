"""Trainer overhead: samples/s of the Ray Train + DeepSpeed trainer against a bare
single-process PyTorch loop, on the same tiny model, batch size and training rows, measured
side by side in one run (and 2-worker scaling).

    .venv/bin/python benchmarks/trainer_overhead.py [--config configs/demo.yaml] [--steps 150]

Both count from the end of their first step; the trainer's figure is the one its rank 0
reports (Ray Data decoding and tokenising in a concurrent actor included).
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

from pipelines.common import init_ray
from pipelines.trainer import TrainJob, run_training, train_datasets
from vkd.config import load_config
from vkd.data import prepare_benchmark
from vkd.data.items import train_sequences
from vkd.data.layout import TRAIN_SPLIT, read_rows
from vkd.model import ModelAdapter, resolve_model
from vkd.train import Tokenize, lm_loss, model_inputs, set_trainable


def bare_loop(model_path: Path, items: list[dict], batch_size: int, steps: int, lr: float, threads: int) -> float:
    torch.set_num_threads(threads)
    adapter = ModelAdapter.load(model_path)
    adapter.model.train()
    params = set_trainable(adapter, "all")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokenize = Tokenize(adapter, 128)
    rng = random.Random(0)
    start = None
    for step in range(steps):
        batch = {k: torch.from_numpy(v) for k, v in tokenize(rng.sample(items, batch_size)).items()}
        loss, _ = lm_loss(adapter.model, model_inputs(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if start is None:
            start = time.perf_counter()
    return (steps - 1) * batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=150)
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
        bare = bare_loop(path, items, bs, args.steps, cfg.train.lr, threads=2)
        init_ray(cfg)
        rates = {}
        runs = ((1, 2.0, 0), (1, 2.0, cfg.train.zero_stage), (2, 1.0, cfg.train.zero_stage))
        for workers, cpus, zero in runs:
            tcfg = dataclasses.replace(cfg.train, workers=workers, cpus_per_worker=cpus, zero_stage=zero,
                                       max_steps=args.steps, align_steps=0, checkpoint_every=10**9)
            out = work / f"trained-{workers}-{zero}"
            job = TrainJob(model_path=str(path), out_dir=str(out), cfg=tcfg, total_steps=args.steps,
                           name=f"overhead-{workers}")
            result = run_training(job, train_datasets(data, str(path), tcfg), storage=work / "ray")
            rates[workers, zero] = result.metrics["samples_per_s"]
        print(f"micro-batch {bs}, {args.steps} steps each, {cfg.train.precision}")
        print(f"bare PyTorch loop, 1 process, 2 threads:      {bare:8.1f} samples/s")
        for (workers, zero), rate in rates.items():
            label = f"vkd trainer, {workers} worker{'s' if workers > 1 else ''} x {2 // workers} CPU, ZeRO-{zero}:"
            print(f"{label:<46}{rate:8.1f} samples/s  ratio {rate / bare:.2f}x")
        one, two = rates[1, cfg.train.zero_stage], rates[2, cfg.train.zero_stage]
        print(f"2-worker scaling vs 1 worker at ZeRO-{cfg.train.zero_stage}: {two / one:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
