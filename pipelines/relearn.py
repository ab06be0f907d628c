"""Stage `relearn`: the relearning attack on an unlearned model (also run by `vkd unlearn
--relearn` on its result, and by `vkd batch` on every request).

    python -m pipelines.relearn --model M2 --data D --forget forget_10 [--fraction 0.34] [--steps N] --out metrics.json

The attack fine-tunes the unlearned model (every parameter, plain cross-entropy) for a fixed
budget on part of the forget data and measures what comes back on the rest, which it never
saw: knowledge that unlearning only hid comes back there, knowledge it removed does not.
With several forget entities it trains on the image pairs of a ``fraction`` of them and
scores the others; ``relearn.folds`` attacks rotate the attacked entities (each fold a
disjoint set, as far as there are entities) and the gaps are their mean. With one entity it
trains on a ``fraction`` of that entity's training pictures (never its profile picture) and
scores its profile and unseen pictures. Accuracy Gap = relearned - unlearned score on what
the attack held out: ``relearn_ag`` (forget_vqa), ``relearn_test_ag`` (test_vqa) and their
``_gen`` twins; 0 is best.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np

from pipelines.common import parse, parser, refuse_existing, resolve_config, run_main
from pipelines.evaluate import evaluate_on_ray
from pipelines.runtime import init_ray
from pipelines.tracking import stage_run
from pipelines.train import TrainJob, fitted, run_training, train_dataset
from vkd.config import Config, ConfigError, cache_root
from vkd.data.items import Plan
from vkd.data.layout import TEST_SPLIT, TRAIN_SPLIT, ForgetSet, forget_set, load_meta, read_rows
from vkd.data.streams import RowPlan, image_key, row_key
from vkd.metrics import RELEARN_KEYS, aggregate, format_table
from vkd.model import resolve_model

GAPS = RELEARN_KEYS


@dataclass
class RelearnResult:
    mode: str                                   # entities | pictures
    gaps: dict[str, float]                      # GAPS' keys: the mean over folds
    folds: list[dict[str, Any]] = field(default_factory=list)   # each: attacked, held out, before, after, gaps
    per_entity: dict[str, dict[str, float]] = field(default_factory=dict)   # held-out entity -> its gaps
    seconds: float = 0.0

    def spread(self) -> dict[str, list[float]]:
        """Each gap's [min, max] over the folds."""
        return {k: [min(f["gaps"][k] for f in self.folds), max(f["gaps"][k] for f in self.folds)]
                for k in self.gaps}

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "gaps": self.gaps, "spread": self.spread(), "folds": self.folds,
                "per_entity": self.per_entity, "seconds": self.seconds}


def attack_split(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(attack entities, held-out entities): a seeded ``fraction`` of ``ids`` (at least one,
    and at least one left out)."""
    return attack_folds(ids, fraction, 1, seed)[0]


def attack_folds(ids: Sequence[str], fraction: float, folds: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """``folds`` (attack, held-out) splits of ``ids``: a seeded order cut into attack sets of
    a ``fraction`` each (at least one entity, at least one held out), one after another."""
    if len(ids) < 2:
        raise ConfigError("the relearning attack over entities needs a forget set of at least 2 entities")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"relearn.fraction must lie in (0, 1), got {fraction}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    k = min(max(1, math.ceil(fraction * len(order))), len(order) - 1)
    out = []
    for f in range(folds):
        attack = {order[(f * k + j) % len(order)] for j in range(k)}
        out.append((sorted(attack), sorted(set(order) - attack)))
    return out


def _picture_attack(data: Path, fs: ForgetSet, fraction: float, seed: int) -> frozenset[int]:
    """The training pictures a one-entity attack trains on: a seeded ``fraction`` of the
    entity's image rows, never its profile picture (which forget_vqa asks about)."""
    meta, entity = load_meta(data), fs.forget[0]
    profile = {image_key(r["image"]["bytes"]) for split, ids in fs.sources(meta, "forget")
               for r in read_rows(data, split, ids) if r.get("image")}
    keys = sorted(row_key(r) for r in read_rows(data, TRAIN_SPLIT, [entity]) if r.get("image") is not None)
    keys = [k for k in keys if k not in profile]
    random.Random(seed).shuffle(keys)
    if not keys:
        raise ConfigError(f"entity {entity} has no training picture besides its profile to attack with")
    return frozenset(keys[:max(1, math.ceil(fraction * len(keys)))])


def _plan(data: Path, fs: ForgetSet, held_out: Sequence[str]) -> Plan:
    meta = load_meta(data)
    return [(split, "forget", ids) for split, ids in fs.sources(meta, "forget", held_out)] + \
        [(TEST_SPLIT, "test", list(held_out))]


def _scores(results: list[dict], ids: Sequence[str]) -> dict[str, float]:
    wanted = set(ids)
    return aggregate([r for r in results if r["entity"] in wanted and r["key"] in GAPS.values()])


def _gaps(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {g: after[k] - before[k] for g, k in GAPS.items() if k in before and k in after}


def relearn_attack(cfg: Config, model: Path, data: Path, fs: ForgetSet, work: Path) -> RelearnResult:
    """Attack ``model`` (an unlearned model) as the module says; ``work`` holds the relearned
    models while they are scored."""
    r, ecfg = cfg.relearn, replace(cfg.eval, generation=False)
    tcfg = replace(cfg.train, lr=r.lr, batch_size=r.batch_size, max_steps=r.steps, align_steps=0,
                   warmup_steps=min(cfg.train.warmup_steps, max(1, r.steps // 10)), checkpoint_every=r.steps,
                   grad_accum=1, trainable="all", seed=cfg.unlearn.seed)
    if len(fs.forget) > 1:
        folds = [(a, h, RowPlan(ids=frozenset(a), image_only=True, seed=tcfg.seed))
                 for a, h in attack_folds(fs.forget, r.fraction, r.folds, cfg.unlearn.seed)]
        mode = "entities"
    else:
        e = fs.forget[0]
        folds = [([e], [e], RowPlan(ids=frozenset([e]), image_only=True, seed=tcfg.seed + f,
                                    rows=_picture_attack(data, fs, r.fraction, cfg.unlearn.seed + f)))
                 for f in range(r.folds)]
        mode = "pictures"
    tcfg = fitted(tcfg, model, data, [rows for _, _, rows in folds])  # before any worker starts
    start = time.perf_counter()
    unlearned = evaluate_on_ray(model, data, fs, ecfg, _plan(data, fs, fs.forget))
    result, per_entity = RelearnResult(mode=mode, gaps={}), {}
    for i, (attack, held_out, rows) in enumerate(folds):
        out = work / f"relearned-{i}"
        job = TrainJob(model_path=str(model), out_dir=str(out), cfg=tcfg, total_steps=r.steps, name="relearn")
        run_training(job, {"train": train_dataset(data, str(model), tcfg, rows)}, storage=work / "ray")
        after = evaluate_on_ray(out, data, fs, ecfg, _plan(data, fs, held_out))
        before_s, after_s = _scores(unlearned, held_out), _scores(after, held_out)
        result.folds.append({"attacked": attack, "held_out": held_out, "before": before_s, "after": after_s,
                             "gaps": _gaps(before_s, after_s)})
        for e in held_out:
            per_entity.setdefault(e, []).append(_gaps(_scores(unlearned, [e]), _scores(after, [e])))
        shutil.rmtree(out, ignore_errors=True)
    result.gaps = {k: float(np.mean([f["gaps"][k] for f in result.folds])) for k in result.folds[0]["gaps"]}
    result.per_entity = {e: {k: float(np.mean([g[k] for g in gaps])) for k in gaps[0]}
                         for e, gaps in per_entity.items()}
    result.seconds = time.perf_counter() - start
    return result


def run_relearn(cfg: Config, model: str | Path, data: str | Path, forget: str | ForgetSet) -> RelearnResult:
    """The attack as its own stage: an MLflow run of its own."""
    data = Path(data).resolve()
    meta = load_meta(data)
    fs = forget_set(meta, forget)
    path = resolve_model(str(model), cfg.model, data, cache_root())
    init_ray(cfg.ray.num_cpus)
    work = Path(tempfile.mkdtemp(prefix=".relearn-"))
    try:
        with stage_run(cfg, "relearn", {"benchmark": meta.name, "forget": fs.name, "model": str(path)}):
            result = relearn_attack(cfg, path, data, fs, work)
            mlflow.log_metrics({**result.gaps, "relearn_seconds": result.seconds})
            mlflow.log_dict(result.to_dict(), "relearn.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("relearn", "the relearning attack: fine-tune on part of the forget data, score the rest")
    p.add_argument("--model", required=True, help="the unlearned model folder")
    p.add_argument("--data", required=True)
    p.add_argument("--forget", required=True, help="the forget split the model unlearned")
    p.add_argument("--fraction", type=float, help="share of the forget entities (or pictures) the attack trains on")
    p.add_argument("--steps", type=int, help="optimizer steps of the attack")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parse(p, argv)
    cfg = resolve_config(args, {"relearn": {"fraction": args.fraction, "steps": args.steps}})
    out = refuse_existing(args.out, args.overwrite)
    result = run_relearn(cfg, args.model, args.data, args.forget)
    out.write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True))
    cfg.save(out.with_suffix(".config.yaml"))
    last = result.folds[-1]
    print(format_table(last["after"], None, {"unlearned": last["before"], "relearned": last["after"]}))
    print(f"{len(result.folds)} attack(s) over {result.mode} of {cfg.relearn.steps} steps; "
          + ", ".join(f"{k} {v:+.3f}" for k, v in result.gaps.items()) + f"; written to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
