"""Stage `demo`: the main job end to end on the embedded default.

    python -m pipelines.demo --config configs/demo.yaml [--workdir runs/demo]

prepare (the demo benchmark; reused when the same settings made it before) -> vanilla
(Ray Train + DeepSpeed fine-tuning of the tiny model, an MLflow run and a registered model)
-> evaluate (Ray Data) -> unlearn (VKD on the forget split, evaluated before and after),
ending with the results tables and how to open the MLflow UI.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

from pipelines.common import parse, parser, resolve_config, run_main
from pipelines.tracking import ui_hint
from pipelines.unlearn import options, run_unlearn
from pipelines.vanilla import run_vanilla
from vkd.cache import digest
from vkd.data import prepare_benchmark
from vkd.metrics import format_table


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("demo", "prepare the demo benchmark, train and evaluate the vanilla model, unlearn, print the tables")
    p.add_argument("--workdir", default="runs/demo", help="where the benchmark, models and results go")
    p.add_argument("--forget", default="forget_10")
    args = parse(p, argv)
    cfg = resolve_config(args)
    work = Path(args.workdir)
    settings = dataclasses.asdict(cfg.benchmark)
    tag = digest(settings)
    data = work / f"data-{tag}"
    if not (data / "benchmark.json").is_file():
        start = time.perf_counter()
        kind = settings.pop("kind")
        meta = prepare_benchmark(kind, data, **settings)
        print(f"[1/4 prepare] the {kind} benchmark ({len(meta.entities)} entities) in {data} "
              f"in {time.perf_counter() - start:.1f} s")
    else:
        print(f"[1/4 prepare] reusing the benchmark in {data}")
    out = work / f"vanilla-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[2/4 vanilla] {cfg.train.workers} Ray Train workers, DeepSpeed ZeRO-{cfg.train.zero_stage} -> {out}")
    figures = run_vanilla(cfg, str(data), out, "tiny", args.forget)
    n = figures["counts"]
    print(f"\n[3/4 evaluate] the vanilla model on {args.forget} ({sum(n.values())} items through Ray Data):")
    print(format_table(figures["metrics"], n))
    print(f"\nvanilla model: {out} (trained in {figures['train_seconds']:.0f} s, {figures['steps']} steps)")
    version = figures["version"]
    print(f"MLflow run {figures['run_id']}" + (f"; registered model {figures['registered_name']} version {version}, "
                                               "alias vanilla" if version else ""))
    unlearned = work / f"unlearned-{cfg.unlearn.method}-{out.name.split('-', 1)[1]}"
    print(f"\n[4/4 unlearn] {cfg.unlearn.method} on {args.forget}, {cfg.unlearn.steps} steps -> {unlearned}")
    r = run_unlearn(options(cfg, out, data, args.forget, unlearned))
    print(format_table(r.after, r.counts, {"vanilla": r.before, "unlearned": r.after}))
    print(f"\nunlearned in {r.seconds:.0f} s (statistics pass included); report {unlearned}/report.md")
    if r.version:
        print(f"registered model {r.registered_name} version {r.version}")
    print(ui_hint(cfg.mlflow))


if __name__ == "__main__":
    sys.exit(run_main(main))
