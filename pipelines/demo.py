"""Stage `demo`: the main job end to end on the embedded default, printing a results table.

    python -m pipelines.demo --config configs/demo.yaml [--workdir runs/demo]

Prepares the demo benchmark (reused when the same settings made it before), builds the
tiny model and evaluates it through Ray Data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from pipelines.common import parse, parser, resolve_config, run_main
from pipelines.evaluate import format_table, run_evaluation
from vkd.data import prepare_benchmark


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("demo", "prepare the demo benchmark, evaluate the tiny model, print a table")
    p.add_argument("--workdir", default="runs/demo", help="where the benchmark and results go")
    p.add_argument("--forget", default="forget_10")
    args = parse(p, argv)
    cfg = resolve_config(args)
    work = Path(args.workdir)
    settings = dataclasses.asdict(cfg.benchmark)
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    data = work / f"data-{tag}"
    if not (data / "benchmark.json").is_file():
        start = time.perf_counter()
        kind = settings.pop("kind")
        meta = prepare_benchmark(kind, data, **settings)
        print(f"prepared the {kind} benchmark ({len(meta.entities)} entities) in {data} "
              f"in {time.perf_counter() - start:.1f} s")
    else:
        print(f"reusing the benchmark in {data}")
    metrics, n, seconds = run_evaluation(cfg, "tiny", str(data), args.forget)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = work / f"metrics-untrained-{stamp}.json"
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    cfg.save(out.with_suffix(".config.yaml"))
    print(f"\nuntrained tiny model on {args.forget} ({sum(n.values())} items, {seconds:.1f} s through Ray Data):")
    print(format_table(metrics, n))
    print(f"\nmetrics: {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
