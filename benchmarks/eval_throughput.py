"""Foundation figures, measured side by side in one run:

- generation time and size of the demo benchmark (configs/demo.yaml);
- evaluation items/s of the same untrained tiny model on the same items, in-process and
  through the Ray Data actor pool, its items built in the driver (a small evaluation's
  path) and streamed from the shards (a large one's), and the metric tables (they must agree);
- what the keys of what a user sees cost: the in-process evaluation of the keys before them
  (multiple choice, ROUGE-L, cloze) against all of today's (their ``_gen`` twins, the unseen
  pictures of retain entities, the lookalikes), timed alternately ``--repeat`` times, the
  fastest of each counting; ``--model``/``--data`` time them on a trained model (the demo's
  vanilla: answers that stop where a trained model stops), ``--keys-only`` stops there.

    .venv/bin/python benchmarks/eval_throughput.py [--config configs/demo.yaml] [--rows N]
        [--model MODEL --data DATA] [--repeat 2] [--keys-only]
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from pipelines.evaluate import evaluate_on_ray  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from vkd.config import load_config
from vkd.data import prepare_benchmark
from vkd.data.items import items_for, reference_images
from vkd.data.layout import forget_set, load_meta
from vkd.lookalikes import find_lookalikes
from vkd.metrics import aggregate, counts, format_table
from vkd.scoring import evaluate_items
from vkd.model import ModelAdapter, resolve_model


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rows", type=int, default=3, help="questions per row and key (eval.max_rows)")
    ap.add_argument("--forget", default="forget_10")
    ap.add_argument("--model", help="a trained model to time the keys on (default: the untrained tiny model)")
    ap.add_argument("--data", help="its benchmark (default: the demo benchmark, generated here)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating timings of the two key sets (the fastest counts)")
    ap.add_argument("--keys-only", action="store_true", help="only the cost of the keys, not the Ray Data paths")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"eval.max_rows={args.rows}"])
    work = Path(tempfile.mkdtemp(prefix="vkd-bench-"))
    try:
        data = Path(args.data) if args.data else work / "data"
        if not args.data:
            settings = dataclasses.asdict(cfg.benchmark)
            start = time.perf_counter()
            meta = prepare_benchmark(settings.pop("kind"), data, **settings)
            gen_s = time.perf_counter() - start
            print(f"demo benchmark: {len(meta.entities)} entities, generated in {gen_s:.1f} s, "
                  f"{folder_size(data) / 2**20:.1f} MiB on disk")

        path = Path(args.model) if args.model else resolve_model("tiny", cfg.model, data, cache=work / "models")
        import torch

        torch.set_num_threads(int(cfg.eval.actors * cfg.eval.cpus_per_actor))
        adapter = ModelAdapter.load(path)
        fs = forget_set(load_meta(data), args.forget)
        fs = replace(fs, lookalikes=tuple(sorted({e for ids in find_lookalikes(adapter, data, fs,
                                                                                cfg.eval.lookalikes).values()
                                                  for e in ids})))
        items = items_for(data, fs, cfg.eval)
        earlier = [it for it in items if it["task"] != "short" and not it["key"].startswith("retain_test")]
        refs = reference_images(data, args.forget, cfg.eval.references)
        earlier_s = local_s = float("inf")
        for _ in range(args.repeat):  # alternating: a noisy neighbour slows both alike
            start = time.perf_counter()
            evaluate_items(adapter, earlier, refs, cfg.eval.batch_size, cfg.eval.max_new_tokens)
            earlier_s = min(earlier_s, time.perf_counter() - start)
            start = time.perf_counter()
            local = evaluate_items(adapter, items, refs, cfg.eval.batch_size, cfg.eval.max_new_tokens)
            local_s = min(local_s, time.perf_counter() - start)
        print(f"{len(items)} items in-process ({torch.get_num_threads()} threads), fastest of {args.repeat}: "
              f"{local_s:.1f} s; the earlier keys alone: {len(earlier)} items in {earlier_s:.1f} s; "
              f"all keys / earlier keys (seconds): {local_s / earlier_s:.2f}x", flush=True)
        if args.keys_only:
            return

        init_ray(cfg.ray.num_cpus)
        on_ray, ray_s = {}, {}
        for label, inline in (("driver items", True), ("streamed", False)):
            start = time.perf_counter()
            on_ray[label] = evaluate_on_ray(path, data, fs, cfg.eval, inline=inline)
            ray_s[label] = time.perf_counter() - start

        looks = fs.lookalikes
        print(format_table({}, counts(local, looks), {"in-process": aggregate(local, looks),
                                                      **{f"ray {k}": aggregate(v, looks) for k, v in on_ray.items()}}))
        print(f"\n{len(items)} items ({cfg.eval.actors} actors x {cfg.eval.cpus_per_actor} CPU vs in-process "
              f"with {torch.get_num_threads()} threads)")
        print(f"in-process:            {len(local) / local_s:7.1f} items/s ({local_s:.1f} s)")
        for label, seconds in ray_s.items():
            print(f"ray data, {label + ':':<13}{len(on_ray[label]) / seconds:7.1f} items/s ({seconds:.1f} s, "
                  f"actor start-up included; in-process/ray {local_s / seconds:.2f}x)")
        print(f"ratio streamed/driver items (seconds): {ray_s['streamed'] / ray_s['driver items']:.2f}x")
        same = all(aggregate(local, looks) == aggregate(v, looks) for v in on_ray.values())
        print(f"same metrics: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
