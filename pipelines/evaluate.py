"""Stage `evaluate`: batch inference over the benchmark's shards on Ray Data.

    python -m pipelines.evaluate --model MODEL --data DATA --forget forget_10 --out metrics.json

The items (built in the driver when their shards are small, else streamed through one
``read_parquet`` and ``flat_map``) go to an actor pool whose actors each hold one copy of
the model and run :func:`vkd.scoring.score_items`, the same code the in-process evaluation runs.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import ray
import torch

from pipelines.common import parse, parser, refuse_existing, resolve_config, run_main
from pipelines.runtime import init_ray
from vkd.cache import Cache, data_fingerprint, digest, model_fingerprint
from vkd.config import Config, EvalConfig, cache_root
from vkd.data.items import ITEM_COLUMNS, Plan, expand_eval_row, items_for, plan_for, reference_images
from vkd.data.layout import ForgetSet, driver_sized, forget_set, load_meta, shards_holding
from vkd.lookalikes import find_lookalikes
from vkd.metrics import aggregate, counts, format_table
from vkd.model import ModelAdapter, resolve_model
from vkd.scoring import Calibration, score_items



def _plain(value: Any) -> Any:
    """Ray hands nested parquet values over as numpy arrays; make them lists and dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Expand:
    """Rows of one read over every split an evaluation scores -> their items: a row yields
    the items of each (role, entities) its split has in the plan that names its entity."""

    def __init__(self, by_split: dict[str, list[tuple[str, list[str] | None]]], cfg: EvalConfig):
        self.by_split = {split: [(role, set(ids) if ids else None) for role, ids in parts]
                         for split, parts in by_split.items()}
        self.cfg = cfg

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        row = {k: _plain(v) for k, v in row.items()}
        path = row.pop("path", "shard")
        row["_source"] = f"{path}, entity {row['ID']}"
        items: list[dict[str, Any]] = []
        for role, ids in self.by_split.get(Path(path).parent.name, ()):
            if ids is None or row["ID"] in ids:
                items += expand_eval_row(dict(row), role, self.cfg.max_rows, self.cfg.generation, self.cfg.max_open,
                                         self.cfg.max_gen)
        return items


class ScorerActor:
    """One model copy per actor; scores a batch of items."""

    def __init__(self, model_path: str, data: str, forget: ForgetSet, cfg: EvalConfig):
        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.adapter = ModelAdapter.load(model_path)
        self.max_new_tokens = cfg.max_new_tokens
        self.calibration = Calibration(reference_images(data, forget, cfg.references))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        items = [{c: _plain(rec[c]) for c in ITEM_COLUMNS} for rec in batch.to_dict("records")]
        for it in items:
            it["image"] = it["image"] if isinstance(it["image"], (bytes, bytearray)) else None
        return pd.DataFrame(score_items(self.adapter, items, self.calibration, self.max_new_tokens))


def evaluate_on_ray(model_path: str | Path, data: str | Path, forget: str | ForgetSet, cfg: EvalConfig,
                    plan: Plan | None = None, inline: bool | None = None) -> list[dict]:
    """Per-item results of the evaluation (``plan``: which splits, roles and entities;
    default :func:`vkd.data.items.eval_plan`), computed by a Ray Data actor pool.

    Items whose shards fit the driver (``inline`` None: at most ``INLINE_BYTES``; True or
    False forces a path) are built here and handed to the pool as they are; larger
    evaluations stream their shards through one ``read_parquet`` over every split. Ray
    Data's file listing and read tasks cost a small evaluation 5-20 s, most of it starting
    their worker processes, and a union of one read per split pays that per split."""
    fs = forget_set(load_meta(data), forget)
    plan = plan or plan_for(data, fs, cfg)
    by_split: dict[str, list[tuple[str, list[str] | None]]] = {}
    for split, role, ids in plan:
        by_split.setdefault(split, []).append((role, ids))
    shards = sorted({p for split, parts in by_split.items()
                     for p in shards_holding(Path(data), split, _union_ids(parts))})
    if driver_sized(shards) if inline is None else inline:
        items = [{c: it.get(c) for c in ITEM_COLUMNS} for it in items_for(data, fs, cfg, plan)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
    else:
        ds = ray.data.read_parquet([str(p) for p in shards], include_paths=True).flat_map(_Expand(by_split, cfg))
    scored = ds.map_batches(
        ScorerActor, fn_constructor_kwargs={"model_path": str(model_path), "data": str(data), "forget": fs, "cfg": cfg},
        batch_size=cfg.batch_size, batch_format="pandas", num_cpus=cfg.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
    )
    return scored.take_all()


def _union_ids(parts: list[tuple[str, list[str] | None]]) -> list[str] | None:
    """The entities any of a split's plan entries reads (None: all of them)."""
    if any(ids is None for _, ids in parts):
        return None
    return sorted({e for _, ids in parts for e in ids})


ROLE_OF = (("retain_test_", "retain_test"), ("retain_", "retain"), ("test_", "test"), ("forget_", "forget"))


def own_items(results: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """The results of a larger evaluation that ``plan`` holds: each result's role read off
    its key, kept when the plan scores its entity in that role (a batch request's share of
    the batch's one evaluation)."""
    entities: dict[str, set[str] | None] = {}
    for _, role, ids in plan:
        entities[role] = None if ids is None or entities.get(role, set()) is None else entities.get(role, set()) | set(ids)
    out = []
    for r in results:
        role = next((role for prefix, role in ROLE_OF if r["key"].startswith(prefix)), None)
        if role in entities and (entities[role] is None or r["entity"] in entities[role]):
            out.append(r)
    return out


def cached_results(model: str | Path, data: str | Path, forget: str | ForgetSet, cfg: EvalConfig,
                   cache: str | Path) -> list[dict[str, Any]]:
    """Every item's score (key, entity, value) for a model that does not change (the
    vanilla model before each unlearning run), evaluated once per model, benchmark, split
    and evaluation settings and kept in the cache's ``eval``."""
    key = digest({"model": model_fingerprint(model), "data": data_fingerprint(data),
                  "forget": forget_set(load_meta(data), forget).key(), "eval": asdict(cfg)})
    return Cache(cache, "eval", ".json").json(
        f"items-{key}", lambda: [{k: r[k] for k in ("key", "entity", "value")}
                                 for r in evaluate_on_ray(model, data, forget, cfg)])


def cached_evaluation(model: str | Path, data: str | Path, forget: str | ForgetSet, cfg: EvalConfig,
                      cache: str | Path) -> tuple[dict[str, float], dict[str, int]]:
    """The metrics and item counts of ``cached_results``."""
    lookalikes = forget_set(load_meta(data), forget).lookalikes
    results = cached_results(model, data, forget, cfg, cache)
    return aggregate(results, lookalikes), counts(results, lookalikes)


def with_lookalikes(model: str | Path, data: str | Path, fs: ForgetSet, k: int,
                    cache: str | Path) -> tuple[ForgetSet, dict[str, list[str]]]:
    """``fs`` with the lookalikes ``model`` sees (``k`` per forget entity; the table per forget
    entity beside it), chosen once per model, benchmark and forget set and kept in the
    cache's ``lookalikes``: the starting model's, so that every evaluation of a request
    scores the same people."""
    if not k:
        return fs, {}
    key = digest({"model": model_fingerprint(model), "data": data_fingerprint(data), "forget": fs.key(), "k": k})
    table = Cache(cache, "lookalikes", ".json").json(key, lambda: find_lookalikes(ModelAdapter.load(model), data, fs, k))
    return replace(fs, lookalikes=tuple(sorted({e for ids in table.values() for e in ids}))), table


def run_evaluation(cfg: Config, model: str, data: str, forget: str,
                   start_model: str | None = None) -> tuple[dict[str, float], dict[str, int], float]:
    """Evaluate ``model``; the lookalikes are those of ``start_model`` (default: the model itself)."""
    cache = cache_root()
    path = resolve_model(model, cfg.model, data, cache)
    start = resolve_model(start_model, cfg.model, data, cache) if start_model else path
    fs, _ = with_lookalikes(start, data, forget_set(load_meta(data), forget), cfg.eval.lookalikes, cache)
    init_ray(cfg.ray.num_cpus)
    began = time.perf_counter()
    results = evaluate_on_ray(path, data, fs, cfg.eval)
    return aggregate(results, fs.lookalikes), counts(results, fs.lookalikes), time.perf_counter() - began


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("evaluate", "multiple-choice, generation and cloze metrics on Ray Data")
    p.add_argument("--model", required=True, help="tiny or a model folder")
    p.add_argument("--data", required=True, help="a prepared benchmark folder")
    p.add_argument("--forget", required=True, help="forget_5 | forget_10 | forget_15")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--start-model", help="the model whose image features choose the lookalikes (an unlearned "
                                         "model's starting model; default: --model)")
    args = parse(p, argv)
    cfg = resolve_config(args)
    out = refuse_existing(args.out, args.overwrite)
    metrics, n, seconds = run_evaluation(cfg, args.model, args.data, args.forget, args.start_model)
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    cfg.save(out.with_suffix(".config.yaml"))
    print(format_table(metrics, n))
    print(f"{sum(n.values())} items in {seconds:.1f} s; metrics written to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
