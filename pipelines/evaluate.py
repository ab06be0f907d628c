"""Stage `evaluate`: batch inference over the benchmark's shards on Ray Data.

    python -m pipelines.evaluate --model MODEL --data DATA --forget forget_10 --out metrics.json

The shards stream through ``flat_map`` (rows -> items) into an actor pool whose actors each
hold one copy of the model and run :func:`vkd.eval.score_items`, the same code the
in-process evaluation runs.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from pipelines.common import parse, init_ray, parser, refuse_existing, resolve_config, run_main
from vkd.config import Config, EvalConfig
from vkd.data.items import ITEM_COLUMNS, eval_plan, expand_eval_row
from vkd.data.layout import shard_paths
from vkd.eval import DIRECTIONS, aggregate, counts
from vkd.model import resolve_model


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
    def __init__(self, role: str, ids: list[str] | None, cfg: EvalConfig):
        self.role, self.ids, self.cfg = role, set(ids) if ids else None, cfg

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        row = {k: _plain(v) for k, v in row.items()}
        if self.ids is not None and row["ID"] not in self.ids:
            return []
        row["_source"] = f"{row.pop('path', 'shard')}, entity {row['ID']}"
        return expand_eval_row(row, self.role, self.cfg.max_rows, self.cfg.generation, self.cfg.max_open)


class ScorerActor:
    """One model copy per actor; scores a batch of items."""

    def __init__(self, model_path: str, max_new_tokens: int, threads: int):
        import torch

        from vkd.model import ModelAdapter

        torch.set_num_threads(max(1, threads))
        self.adapter = ModelAdapter.load(model_path)
        self.max_new_tokens = max_new_tokens
        self.ref_cache: dict = {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from vkd.eval import score_items

        items = [{c: _plain(rec[c]) for c in ITEM_COLUMNS} for rec in batch.to_dict("records")]
        for it in items:
            it["image"] = it["image"] if isinstance(it["image"], (bytes, bytearray)) else None
        return pd.DataFrame(score_items(self.adapter, items, self.max_new_tokens, self.ref_cache))


def evaluate_on_ray(model_path: str | Path, data: str | Path, forget: str, cfg: EvalConfig) -> list[dict]:
    """Per-item results of the evaluation, computed by a Ray Data actor pool."""
    import ray

    parts = []
    for split, role, ids in eval_plan(data, forget):
        ds = ray.data.read_parquet([str(p) for p in shard_paths(data, split)], include_paths=True)
        parts.append(ds.flat_map(_Expand(role, ids, cfg)))
    items = parts[0].union(*parts[1:])
    scored = items.map_batches(
        ScorerActor, fn_constructor_kwargs={"model_path": str(model_path), "max_new_tokens": cfg.max_new_tokens,
                                            "threads": int(cfg.cpus_per_actor)},
        batch_size=cfg.batch_size, batch_format="pandas", num_cpus=cfg.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
    )
    return scored.take_all()


def format_table(metrics: dict[str, float], n: dict[str, int] | None = None,
                 columns: dict[str, dict[str, float]] | None = None) -> str:
    """A plain-text table: one row per metric, its direction, and one or more value columns."""
    columns = columns or {"value": metrics}
    head = f"{'metric':<22} {'goal':<6}" + "".join(f" {c:>10}" for c in columns) + (f" {'n':>6}" if n else "")
    lines = [head, "-" * len(head)]
    for key in sorted(set().union(*[set(c) for c in columns.values()])):
        vals = "".join(f" {c[key]:>10.3f}" if key in c else f" {'':>10}" for c in columns.values())
        lines.append(f"{key:<22} {DIRECTIONS.get(key, ''):<6}{vals}" + (f" {n.get(key, 0):>6}" if n else ""))
    return "\n".join(lines)


def run_evaluation(cfg: Config, model: str, data: str, forget: str) -> tuple[dict[str, float], dict[str, int], float]:
    eval_plan(data, forget)
    path = resolve_model(model, cfg.model, data)
    init_ray(cfg)
    start = time.perf_counter()
    results = evaluate_on_ray(path, data, forget, cfg.eval)
    return aggregate(results), counts(results), time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("evaluate", "multiple-choice, generation and cloze metrics on Ray Data")
    p.add_argument("--model", required=True, help="tiny or a model folder")
    p.add_argument("--data", required=True, help="a prepared benchmark folder")
    p.add_argument("--forget", required=True, help="forget_5 | forget_10 | forget_15")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parse(p, argv)
    cfg = resolve_config(args)
    out = refuse_existing(args.out, args.overwrite)
    metrics, n, seconds = run_evaluation(cfg, args.model, args.data, args.forget)
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    cfg.save(out.with_suffix(".config.yaml"))
    print(format_table(metrics, n))
    print(f"{sum(n.values())} items in {seconds:.1f} s; metrics written to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
