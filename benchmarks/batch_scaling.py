"""Wall time of a 1-entity and a 10-entity independent batch, side by side in one run.

    python benchmarks/batch_scaling.py --model VANILLA --data DATA [--config configs/demo.yaml]
        [--entities 10] [key=value ...]

The 10-entity batch is 10 requests of one entity each; the 1-entity batch is the first of
them alone. Each batch starts from empty caches and its own MLflow store, so each pays its
shared work (the starting model's evaluation, the retain-side statistics and teacher
features) once. Goal: the 10-entity batch in at most 4x the 1-entity batch's wall time.
Requests use the defaults of configs/batch_demo.yaml (1 worker each; multiple-choice scores
on a sample), plus any key=value given here.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.runtime import set_environment  # noqa: E402

set_environment()

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--entities", type=int, default=10)
    ap.add_argument("--out", help="work folder (default: a temporary folder)")
    args, overrides = ap.parse_known_args()

    import ray

    from pipelines.batch import run_batch
    from vkd.batch import load_manifest
    from vkd.data.layout import load_meta

    meta = load_meta(Path(args.data))
    entities = [e.id for e in meta.entities][:: max(1, len(meta.entities) // args.entities)][: args.entities]
    defaults = yaml.safe_load((ROOT / "configs" / "batch_demo.yaml").read_text())["defaults"]
    defaults.update(dict(o.split("=", 1) for o in overrides))
    root = Path(args.out or tempfile.mkdtemp(prefix="batch-scaling-")).resolve()
    figures = {}
    for n in (1, len(entities)):
        work = root / f"batch-{n}"
        work.mkdir(parents=True, exist_ok=True)
        os.environ["VKD_CACHE"] = str(work / "cache")
        # MLFLOW_TRACKING_URI wins over a config's SQLite file (and MLflow exports it once
        # set), so each batch names its own store: the second must not find the first's runs
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        manifest = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
                    "config": args.config, "mode": "independent", "defaults": defaults,
                    "requests": [{"id": f"e{e}", "entities": [e]} for e in entities[:n]]}
        path = work / "manifest.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        m = load_manifest(path)
        m.defaults = {**m.defaults, "mlflow.sqlite_file": str(work / "mlflow.db"),
                      "mlflow.artifact_dir": str(work / "mlruns")}
        figures[n] = run_batch(m, work / "out")
        ray.shutdown()
        f = figures[n]
        print(f"{n}-entity batch: {f['wall_seconds']:.0f} s wall, {f['shared_seconds']:.0f} s shared work", flush=True)

    print(f"\n{'batch':<16} {'requests':>8} {'wall s':>8} {'shared s':>9} {'request s (sum)':>16} {'per request':>12}")
    for n, f in figures.items():
        secs = [r["seconds"] for r in f["requests"]]
        print(f"{f'{n}-entity':<16} {len(secs):>8} {f['wall_seconds']:>8.0f} {f['shared_seconds']:>9.0f} "
              f"{sum(secs):>16.0f} {sum(secs) / len(secs):>12.0f}")
    one, many = figures[1]["wall_seconds"], figures[len(entities)]["wall_seconds"]
    print(f"\n{len(entities)}-entity / 1-entity wall time: {many / one:.2f}x (goal <= 4x)")
    decided = [(r["id"], r["decision"]) for r in figures[len(entities)]["requests"]]
    print("decisions:", ", ".join(f"{i} {d}" for i, d in decided))
    print(f"work in {root}")


if __name__ == "__main__":
    main()
