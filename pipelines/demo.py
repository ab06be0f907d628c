"""Stage `demo`: the main job end to end on the embedded default.

    python -m pipelines.demo --config configs/demo.yaml [--workdir runs/demo]

prepare (the demo benchmark; reused when the same settings made it before) -> vanilla
(Ray Train + DeepSpeed fine-tuning of the tiny model, an MLflow run and a registered model;
reused when the same settings and data made it before) -> evaluate (Ray Data) -> unlearn
(VKD on the forget split, evaluated before and after), ending with the results tables and
how to open the MLflow UI. It says up front how long each stage will take here: the times
measured on a reference machine, scaled by this one's matmul speed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from pipelines.common import parse, parser, resolve_config, run_main
from pipelines.tracking import ui_hint
from pipelines.train import TrainJob
from pipelines.unlearn import options, run_unlearn
from pipelines.vanilla import run_vanilla
from vkd.cache import digest
from vkd.config import Config
from vkd.data import prepare_benchmark
from vkd.metrics import format_table
from vkd.train import engine_config

# seconds of each stage of configs/demo.yaml on a fresh clone where they were measured (2 cores,
# a 2048x2048 fp32 matmul at REFERENCE_GFLOPS with 2 threads); scaled by this machine's speed
REFERENCE_GFLOPS = 147.0
REFERENCE_SECONDS = {"prepare": 3, "vanilla": 250, "evaluate": 35, "unlearn": 100}


def matmul_gflops(threads: int = 2) -> float:
    """This machine's fp32 matmul speed (a 2048x2048 product, ``threads`` threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, n = time.perf_counter(), 4
    for _ in range(n):
        a @ b
    seconds = time.perf_counter() - start
    torch.set_num_threads(saved)
    return 2 * 2048 ** 3 * n / seconds / 1e9


def _plan(gflops: float, cached: dict[str, bool]) -> str:
    scale = REFERENCE_GFLOPS / gflops
    parts = [f"{stage} ~{REFERENCE_SECONDS[stage] * scale / 60:.1f} min" if not cached.get(stage) else f"{stage} reused"
             for stage in REFERENCE_SECONDS]
    return (f"this machine: a 2048x2048 fp32 matmul at {gflops:.0f} GFLOP/s (2 threads); the stages here: "
            + ", ".join(parts))


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("demo", "prepare the demo benchmark, train and evaluate the vanilla model, unlearn, print the tables")
    p.add_argument("--workdir", default="runs/demo", help="where the benchmark, models and results go")
    p.add_argument("--forget", default="forget_10")
    args = parse(p, argv)
    cfg = resolve_config(args)
    work = Path(args.workdir)
    settings = dataclasses.asdict(cfg.benchmark)
    data = work / f"data-{digest(settings)}"
    # the vanilla model's content key: what it is trained from and how (the benchmark's settings name its data;
    # where the loop runs changes no weight, tests/test_trainer.py)
    how = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k != "in_process"}
    out = work / f"vanilla-{digest([settings, dataclasses.asdict(cfg.model), how])}"
    cached = {"prepare": (data / "benchmark.json").is_file(), "vanilla": (out / "metrics.json").is_file()}
    print(_plan(matmul_gflops(), cached), flush=True)
    if not cached["prepare"]:
        start = time.perf_counter()
        kind = settings.pop("kind")
        meta = prepare_benchmark(kind, data, **settings)
        print(f"[1/4 prepare] the {kind} benchmark ({len(meta.entities)} entities) in {data} "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
    else:
        print(f"[1/4 prepare] reusing the benchmark in {data}")
    run_id = vanilla_stage(cfg, data, out, args.forget, cached["vanilla"])
    unlearned = work / f"unlearned-{cfg.unlearn.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"\n[4/4 unlearn] {cfg.unlearn.method} on {args.forget}, {cfg.unlearn.steps} steps -> {unlearned}", flush=True)
    r = run_unlearn(options(cfg, out, data, args.forget, unlearned, tags={"vanilla_run": run_id}))
    print(format_table(r.after, r.counts, {"vanilla": r.before, "unlearned": r.after}))
    print(f"\nunlearned in {r.seconds:.0f} s (statistics pass included); report {unlearned}/report.md")
    if r.version:
        print(f"registered model {r.registered_name} version {r.version}")
    print(ui_hint(cfg.mlflow))


def vanilla_stage(cfg: Config, data: Path, out: Path, forget: str, cached: bool) -> str:
    """Train (or reuse) the vanilla model in ``out`` and print its evaluation; its MLflow run."""
    if cached:
        print(f"[2/4 vanilla] reusing {out}: the same settings and data trained it before")
        meta = json.loads((out / "run.json").read_text())
        print(f"\n[3/4 evaluate] the vanilla model on {forget} (its evaluation then):")
        print(format_table(json.loads((out / "metrics.json").read_text())))
        return meta["run_id"]
    if out.exists():  # an interrupted run's: kept aside, not overwritten
        aside = out.with_name(f"{out.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        print(f"[2/4 vanilla] {out} was incomplete (an interrupted run): moved to {aside}")
    stage = engine_config(cfg.train, cfg.train.workers).zero_stage  # the stage a rank runs
    where = ("in this process (train.in_process: no Ray Train run to start)"
             if TrainJob("", "", cfg.train, 0).in_process else f"on {cfg.train.workers} Ray Train worker(s)")
    print(f"[2/4 vanilla] {where}, DeepSpeed ZeRO-{stage}, {cfg.train.max_steps} steps -> {out}", flush=True)
    figures = run_vanilla(cfg, str(data), out, "tiny", forget)
    (out / "run.json").write_text(json.dumps({"run_id": figures["run_id"], "version": figures["version"]}))
    n = figures["counts"]
    print(f"\n[3/4 evaluate] the vanilla model on {forget} ({sum(n.values())} items through Ray Data):")
    print(format_table(figures["metrics"], n))
    print(f"\nvanilla model: {out} (trained in {figures['train_seconds']:.0f} s, {figures['steps']} steps)")
    version = figures["version"]
    print(f"MLflow run {figures['run_id']}" + (f"; registered model {figures['registered_name']} version {version}, "
                                               "alias vanilla" if version else ""))
    return figures["run_id"]


if __name__ == "__main__":
    sys.exit(run_main(main))
