"""Stage `vanilla`: fine-tune the base model on the benchmark's training split, all entities,
so that it knows every entity from its picture and its name (the teacher of unlearning).

    python -m pipelines.vanilla --data DATA --out MODEL [--model tiny|PATH] [--workers N]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from pipelines.common import init_ray, parse, parser, refuse_existing, resolve_config, run_main
from pipelines.evaluate import evaluate_on_ray, format_table
from pipelines.tracking import log_model, stage_run, tracking_uri
from pipelines.trainer import TrainJob, run_training, steps_for, train_dataset
from vkd.data.layout import TRAIN_SPLIT, load_meta, read_rows
from vkd.eval import aggregate, counts
from vkd.model import resolve_model


def count_train_items(data: str | Path) -> int:
    return sum(len(json.loads(r["metadata"])) for r in read_rows(data, TRAIN_SPLIT))


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
    out = refuse_existing(args.out, overwrite=False)
    meta = load_meta(args.data)
    base = resolve_model(args.model, cfg.model, args.data)
    n_items = count_train_items(args.data)
    total = steps_for(n_items, cfg.train)
    init_ray(cfg)
    tags = {"benchmark": meta.name, "entities": str(len(meta.entities)), "data": str(Path(args.data).resolve())}
    with stage_run(cfg, "vanilla", tags) as run:
        import mlflow

        job = TrainJob(model_path=str(base), out_dir=str(out.resolve()), cfg=cfg.train, total_steps=total,
                       mlflow={"tracking_uri": tracking_uri(cfg.mlflow), "run_id": run.info.run_id}, name="vanilla")
        start = time.perf_counter()
        run_training(job, train_dataset(args.data, str(base), cfg.train), storage=out.parent / ".ray_train")
        seconds = time.perf_counter() - start
        cfg.save(out / "vkd_config.yaml")
        mlflow.log_metrics({"train_seconds": seconds, "train_items": n_items, "train_steps": total})
        print(f"trained {total} steps on {n_items} items in {seconds:.0f} s -> {out}")
        if not args.no_eval:
            results = evaluate_on_ray(out, args.data, args.forget, cfg.eval)
            metrics = aggregate(results)
            mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
            print(format_table(metrics, counts(results)))
        version = log_model(run.info.run_id, out, f"vkd-{meta.name}-vanilla", ["vanilla"], cfg.mlflow.register)
        print(f"MLflow run {run.info.run_id}" + (f", registered version {version}" if version else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
