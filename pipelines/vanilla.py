"""Stage `vanilla`: fine-tune the base model on the benchmark's training split, all entities,
so that it knows every entity from its picture and its name (the teacher of unlearning).

    python -m pipelines.vanilla --data DATA --out MODEL [--model tiny|PATH] [--workers N]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import mlflow

from pipelines.common import parse, parser, refuse_existing, resolve_config, run_main
from pipelines.evaluate import cached_evaluation, with_lookalikes
from pipelines.runtime import init_ray
from pipelines.tracking import log_model, stage_run, tracking_uri
from pipelines.train import Tracking, TrainJob, finetune_plans, fitted, run_training, train_datasets
from vkd.config import Config, cache_root
from vkd.data.layout import TRAIN_SPLIT, forget_set, load_meta, read_rows
from vkd.methods import FineTune, FineTuneConfig
from vkd.metrics import format_table
from vkd.model import resolve_model
from vkd.train import steps_for


def count_train_items(data: str | Path, turns: int) -> int:
    """Training sequences per epoch (a row's pairs, ``turns`` to a sequence)."""
    return sum(math.ceil(len(json.loads(r["metadata"])) / turns) for r in read_rows(data, TRAIN_SPLIT))


def run_vanilla(cfg: Config, data: str | Path, out: str | Path, model: str = "tiny", forget: str = "forget_10",
                evaluate: bool = True) -> dict[str, Any]:
    """Train the vanilla model into ``out`` (which must not exist), evaluate it on ``forget``,
    log the run to MLflow and register the model. Returns the run's figures."""
    out = refuse_existing(out, overwrite=False)
    meta = load_meta(data)
    cache = cache_root()
    base = resolve_model(model, cfg.model, data, cache)
    n_items = count_train_items(data, cfg.train.turns)
    total = steps_for(n_items, cfg.train)
    train = fitted(cfg.train, base, data, finetune_plans(data, cfg.train).values())  # before any worker starts
    cfg = replace(cfg, train=train)
    init_ray(cfg.ray.num_cpus)
    tags = {"benchmark": meta.name, "entities": str(len(meta.entities)), "data": str(Path(data).resolve())}
    figures: dict[str, Any] = {"model": str(out), "steps": total, "items": n_items}
    with stage_run(cfg, "vanilla", tags) as run:
        job = TrainJob(model_path=str(base), out_dir=str(out.resolve()), cfg=train, total_steps=total,
                       method=FineTune(FineTuneConfig(trainable=train.trainable)),
                       tracking=Tracking(tracking_uri(cfg.mlflow), run.info.run_id), name="vanilla")
        start = time.perf_counter()
        run_training(job, train_datasets(data, str(base), train), storage=out.parent / ".ray_train")
        figures["train_seconds"] = time.perf_counter() - start
        cfg.save(out / "vkd_config.yaml")
        mlflow.log_metrics({"train_seconds": figures["train_seconds"], "train_items": n_items, "train_steps": total})
        print(f"trained {total} steps on {n_items} sequences in {figures['train_seconds']:.0f} s -> {out}")
        if evaluate:
            # cached: an unlearning run from this model finds its lookalikes and "before" evaluation done
            fs, _ = with_lookalikes(out, data, forget_set(meta, forget), cfg.eval.lookalikes, cache)
            figures["metrics"], figures["counts"] = cached_evaluation(out, data, fs, cfg.eval, cache)
            mlflow.log_metrics({f"eval/{k}": v for k, v in figures["metrics"].items()})
            (out / "metrics.json").write_text(json.dumps(figures["metrics"], indent=1, sort_keys=True))
        name = f"vkd-{meta.name}-vanilla"
        figures["version"] = log_model(run.info.run_id, out, name, ["vanilla"], cfg.mlflow.register)
        figures["run_id"], figures["registered_name"] = run.info.run_id, name
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("vanilla", "fine-tune the base model on every entity: the vanilla model (teacher)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder for the vanilla model (must not exist)")
    p.add_argument("--model", default="tiny", help="tiny or a checkpoint folder")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--forget", default="forget_10", help="split the final evaluation reports on")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    args = parse(p, argv)
    cfg = resolve_config(args, {"train": {"workers": args.workers}})
    figures = run_vanilla(cfg, args.data, args.out, args.model, args.forget, evaluate=not args.no_eval)
    if "metrics" in figures:
        print(format_table(figures["metrics"], figures["counts"]))
    version = figures["version"]
    print(f"MLflow run {figures['run_id']}" + (f", registered {figures['registered_name']} version {version}"
                                               if version else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
