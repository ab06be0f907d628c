"""Stage `prepare`: make the synthetic benchmark or ingest MLLMU-Bench / CLEAR into shards.

    python -m pipelines.prepare synthetic --out DATA [--entities N] [--seed S] [--overwrite]
    python -m pipelines.prepare mllmu --src DIR --out DATA
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

from pipelines.common import parse, parser, resolve_config, run_main
from vkd.data import prepare_benchmark


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("prepare", "make or ingest a benchmark into parquet shards")
    p.add_argument("kind", choices=["synthetic", "mllmu", "clear"])
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--src", help="folder of the published dataset (mllmu, clear)")
    p.add_argument("--entities", type=int, help="synthetic: number of entities")
    p.add_argument("--seed", type=int, help="seed of the benchmark")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parse(p, argv)
    flags = {"kind": args.kind, "entities": args.entities, "seed": args.seed}
    cfg = resolve_config(args, {"benchmark": flags})
    settings = dataclasses.asdict(cfg.benchmark)
    kind = settings.pop("kind")
    start = time.perf_counter()
    meta = prepare_benchmark(kind, args.out, src=args.src, overwrite=args.overwrite, **settings)
    print(f"prepared {kind} benchmark with {len(meta.entities)} entities in {args.out} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    sys.exit(run_main(main))
