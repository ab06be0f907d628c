"""Chance level of untrained tiny models on the demo benchmark: the multiple-choice keys of
forget_10 for several model seeds, to see how far an untrained model strays from 0.25.

    .venv/bin/python benchmarks/chance_level.py [--config configs/demo.yaml] [--seeds 6]
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from vkd.config import load_config
from vkd.data import prepare_benchmark
from vkd.data.items import eval_items, reference_images
from vkd.metrics import aggregate
from vkd.scoring import evaluate_items
from vkd.model import ModelAdapter, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=6)
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="vkd-chance-"))
    try:
        settings = dataclasses.asdict(cfg.benchmark)
        data = work / "data"
        prepare_benchmark(settings.pop("kind"), data, **settings)
        items = [it for it in eval_items(data, "forget_10", generation=False) if not it["key"].startswith("retain")]
        refs = reference_images(data, "forget_10", cfg.eval.references)
        worst = 0.0
        for seed in range(args.seeds):
            model = dataclasses.replace(cfg.model, seed=seed)
            adapter = ModelAdapter.load(resolve_model("tiny", model, data, cache=work / "models"))
            metrics = aggregate(evaluate_items(adapter, items, refs, 64))
            worst = max([worst, *(abs(v - 0.25) for v in metrics.values())])
            print(f"seed {seed}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        print(f"largest distance from 0.25 over {args.seeds} seeds: {worst:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
