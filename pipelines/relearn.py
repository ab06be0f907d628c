"""Stage `relearn`: the relearning attack on an unlearned model.

    python -m pipelines.relearn --model M2 --data D --forget forget_10 [--fraction 0.25] [--steps N] --out metrics.json

The attack fine-tunes the unlearned model (every parameter, plain cross-entropy) on the image
pairs of a ``fraction`` of the forget entities for a fixed budget, then measures forget_vqa
and test_vqa on the *other* forget entities, which it never saw. Knowledge that unlearning
only hid comes back there; knowledge it removed does not. Accuracy Gap AG = recovered -
unlearned forget_vqa on those held-out entities (0 is best).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import mlflow

from pipelines.common import parse, parser, refuse_existing, resolve_config, run_main
from pipelines.evaluate import evaluate_on_ray
from pipelines.runtime import init_ray
from pipelines.tracking import stage_run
from pipelines.train import TrainJob, run_training, train_dataset
from vkd.config import Config, ConfigError, cache_root
from vkd.data.layout import TEST_SPLIT, load_meta
from vkd.data.streams import RowPlan
from vkd.metrics import aggregate, format_table
from vkd.model import resolve_model


def attack_split(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(attack entities, held-out entities): a seeded ``fraction`` of ``ids`` (at least one,
    and at least one left out)."""
    if len(ids) < 2:
        raise ConfigError("the relearning attack needs a forget split of at least 2 entities")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"relearn.fraction must lie in (0, 1), got {fraction}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    k = min(max(1, math.ceil(fraction * len(order))), len(order) - 1)
    return sorted(order[:k]), sorted(order[k:])


def run_relearn(cfg: Config, model: str | Path, data: str | Path, forget: str) -> dict[str, Any]:
    """Attack ``model``; returns the figures written to metrics.json."""
    meta = load_meta(data)
    path = resolve_model(str(model), cfg.model, data, cache_root())
    r = cfg.relearn
    if r.steps < 1:
        raise ConfigError(f"relearn.steps must be at least 1, got {r.steps}")
    attack, held_out = attack_split(meta.entity_ids(forget), r.fraction, cfg.unlearn.seed)
    plan = [(forget, "forget", held_out), (TEST_SPLIT, "test", held_out)]
    ecfg = dataclasses.replace(cfg.eval, generation=False)
    init_ray(cfg.ray.num_cpus)
    tcfg = dataclasses.replace(cfg.train, lr=r.lr, batch_size=r.batch_size, max_steps=r.steps, align_steps=0,
                               warmup_steps=min(cfg.train.warmup_steps, max(1, r.steps // 10)),
                               checkpoint_every=r.steps, grad_accum=1, trainable="all")
    work = Path(tempfile.mkdtemp(prefix=".relearn-"))
    try:
        with stage_run(cfg, "relearn", {"benchmark": meta.name, "forget": forget, "model": str(path),
                                         "attack_entities": ",".join(attack)}) as run:
            before = aggregate(evaluate_on_ray(path, data, forget, ecfg, plan))
            start = time.perf_counter()
            job = TrainJob(model_path=str(path), out_dir=str(work / "relearned"), cfg=tcfg, total_steps=r.steps,
                           name="relearn")
            plan_rows = RowPlan(ids=frozenset(attack), image_only=True, seed=tcfg.seed)
            run_training(job, {"train": train_dataset(data, str(path), tcfg, plan_rows)}, storage=work / "ray")
            seconds = time.perf_counter() - start
            after = aggregate(evaluate_on_ray(work / "relearned", data, forget, ecfg, plan))
            figures = {"attack_entities": attack, "held_out_entities": held_out, "steps": r.steps,
                       "relearn_seconds": seconds, "before": before, "after": after,
                       "accuracy_gap": after["forget_vqa"] - before["forget_vqa"],
                       "test_accuracy_gap": after["test_vqa"] - before["test_vqa"], "run_id": run.info.run_id}
            mlflow.log_metrics({f"before/{k}": v for k, v in before.items()})
            mlflow.log_metrics({f"after/{k}": v for k, v in after.items()})
            mlflow.log_metrics({"accuracy_gap": figures["accuracy_gap"], "test_accuracy_gap": figures["test_accuracy_gap"],
                                "relearn_seconds": seconds})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("relearn", "the relearning attack: fine-tune on some forget entities, test the others")
    p.add_argument("--model", required=True, help="the unlearned model folder")
    p.add_argument("--data", required=True)
    p.add_argument("--forget", required=True, help="the forget split the model unlearned")
    p.add_argument("--fraction", type=float, help="share of the forget entities the attack trains on")
    p.add_argument("--steps", type=int, help="optimizer steps of the attack")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parse(p, argv)
    cfg = resolve_config(args, {"relearn": {"fraction": args.fraction, "steps": args.steps}})
    out = refuse_existing(args.out, args.overwrite)
    figures = run_relearn(cfg, args.model, args.data, args.forget)
    out.write_text(json.dumps(figures, indent=1, sort_keys=True))
    cfg.save(out.with_suffix(".config.yaml"))
    print(format_table(figures["after"], None, {"unlearned": figures["before"], "relearned": figures["after"]}))
    print(f"attack on {', '.join(figures['attack_entities'])} for {figures['steps']} steps; held out "
          f"{', '.join(figures['held_out_entities'])}")
    print(f"accuracy gap (forget_vqa, held-out entities): {figures['accuracy_gap']:+.3f}; written to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
