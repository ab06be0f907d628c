"""Sensitivity studies: search spaces as YAML files, validated at load, and the study objective.

A space file (``tune_spaces/*.yaml``)::

    name: thresholds_grid
    search: grid                 # grid | random | optuna
    scheduler: fifo              # fifo | asha
    trials: 1                    # samples (a grid runs every combination this many times)
    concurrency: 2               # trials at once
    resources: {workers: 1, cpus_per_worker: 1}
    asha: {grace_period: 1, reduction_factor: 2}   # with scheduler: asha (in reports); trials evaluate at the rungs only
    reports: 2                   # evaluations per trial (FIFO); ASHA's rung unit: steps / reports
    seed: 0                      # the sampler's seed (random, optuna; a grid's order)
    fixed: {unlearn.steps: 60}   # config fields every trial shares
    parameters:                  # dotted config fields -> one distribution each
      unlearn.d_i: {grid: [0.01, 0.02, 0.05]}
      unlearn.d_f: {grid: [0.1, 0.2, 0.3, 0.5]}
      unlearn.beta: {loguniform: [0.1, 30]}
      unlearn.lr: {uniform: [5e-4, 2e-3]}
      unlearn.vision_layers: {choice: [0, 1, 2]}
      unlearn.stat_batches: {randint: [4, 16]}

Every parameter must name a field of the run config with a value of its type (checked by
building the config with each value), so a typo fails at load with the field named.

The study objective (maximised) is documented on :func:`objective`.
"""
from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vkd.config import ConfigError, load_config, override

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
CHANCE = 0.25


@dataclass
class SearchSpace:
    name: str
    parameters: dict[str, dict[str, list[Any]]]
    search: str = "grid"
    scheduler: str = "fifo"
    trials: int = 1
    concurrency: int = 1
    resources: dict[str, float] = field(default_factory=lambda: {"workers": 1, "cpus_per_worker": 1})
    asha: dict[str, int] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    fixed: dict[str, Any] = field(default_factory=dict)
    reports: int = 2
    seed: int = 0

    def grid_size(self) -> int:
        """Trials a grid search runs: the product of the grid sizes, times ``trials``."""
        sizes = [len(spec["grid"]) for spec in self.parameters.values() if "grid" in spec]
        return math.prod(sizes) * self.trials if sizes else self.trials

    def grid_points(self) -> list[dict[str, Any]]:
        names = [n for n, spec in self.parameters.items() if "grid" in spec]
        values = [self.parameters[n]["grid"] for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _fail(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what}")


def load_space(path: str | Path, base_config: str | Path | None = None) -> SearchSpace:
    """Read and validate a space file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} not found; pass a file from tune_spaces/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {path} must be a mapping")
    known = {f for f in SearchSpace.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(f"{path}", f"unknown field {unknown[0]}; known fields: {', '.join(sorted(known))}")
    if not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise _fail(f"{path}", "parameters must map config fields (e.g. unlearn.beta) to distributions")
    space = SearchSpace(name=str(raw.get("name") or path.stem),
                        **{k: v for k, v in raw.items() if k not in ("name",)})
    for key, allowed in (("search", SEARCHES), ("scheduler", SCHEDULERS)):
        if getattr(space, key) not in allowed:
            raise _fail(f"{path}: {key}", f"{getattr(space, key)!r}; choose one of {', '.join(allowed)}")
    for key in ("trials", "concurrency", "reports"):
        value = getattr(space, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(f"{path}: {key}", f"must be a positive integer, got {value!r}")
    res = space.resources
    if not isinstance(res, dict) or set(res) - {"workers", "cpus_per_worker"}:
        raise _fail(f"{path}: resources", "takes workers and cpus_per_worker")
    if int(res.get("workers", 1)) < 1 or float(res.get("cpus_per_worker", 1)) <= 0:
        raise _fail(f"{path}: resources", "workers must be at least 1 and cpus_per_worker positive")
    if space.scheduler == "asha":
        asha = space.asha
        if not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor"}:
            raise _fail(f"{path}: asha", "takes grace_period and reduction_factor")
        if int(asha.get("grace_period", 1)) < 1 or int(asha.get("reduction_factor", 2)) < 2:
            raise _fail(f"{path}: asha", "grace_period must be at least 1 and reduction_factor at least 2")
    if not isinstance(space.fixed, dict):
        raise _fail(f"{path}: fixed", "must map config fields to values")
    for name, spec in space.parameters.items():
        where = f"{path}: parameters.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise _fail(where, f"give exactly one of {', '.join(KINDS)} with its values")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise _fail(where, f"{kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise _fail(where, f"{kind} needs [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                raise _fail(where, "loguniform needs a positive low bound")
        if kind == "grid" and space.search != "grid":
            raise _fail(where, f"grid values need search: grid (this space searches {space.search}); use choice")
        if kind != "grid" and space.search == "grid":
            raise _fail(where, f"search: grid takes grid values only, not {kind}")
        for value in values if kind in ("grid", "choice") else values[:2]:
            _check_value(name, value, where, base_config)
    for name, value in space.fixed.items():
        _check_value(name, value, f"{path}: fixed.{name}", base_config)
    return space


def _check_value(name: str, value: Any, where: str, base_config: str | Path | None) -> None:
    if "." not in name:
        raise _fail(where, "name a config field as section.field, e.g. unlearn.beta")
    try:
        load_config(base_config, [override(name, value)])
    except ConfigError as err:
        raise _fail(where, str(err)) from None


def objective(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The study objective, in [0, 1], higher is better: the mean of *forgetting* and
    *preservation*.

    - forgetting: for forget_vqa and test_vqa, the share of the vanilla model's margin over
      chance that is gone, clamp((v0 - v) / (v0 - 0.25), 0, 1), averaged. Falling below
      chance earns nothing more.
    - preservation: for forget_qa, retain_vqa and retain_qa, min(v / v0, 1), averaged.

    A model that forgets nothing scores 0.5 at best; one that forgets everything and keeps
    everything scores 1."""
    def gone(key: str) -> float:
        margin = before[key] - CHANCE
        if margin <= 0:
            return 0.0
        return min(max((before[key] - after[key]) / margin, 0.0), 1.0)

    forgetting = (gone("forget_vqa") + gone("test_vqa")) / 2
    keys = ("forget_qa", "retain_vqa", "retain_qa")
    preservation = sum(min(after[k] / before[k], 1.0) if before[k] > 0 else 1.0 for k in keys) / len(keys)
    return {"objective": (forgetting + preservation) / 2, "forgetting": forgetting, "preservation": preservation}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return front


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def write_outputs(out: str | Path, space: SearchSpace, rows: list[dict[str, Any]]) -> list[Path]:
    """What a study leaves in ``out``: trials.csv and trials.md (one row per trial, best
    first), sensitivity.png (objective, forget_vqa and the retain metrics against each
    parameter), heatmaps.png (the mean objective over each pair of parameters) and
    pareto.png (forgetting against preservation, the front marked). ``rows``: a dict per
    trial with its parameters (dotted names), objective, forgetting, preservation, the
    evaluation keys, seconds and status (a trial stopped early: its last rung, no objective)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    params = list(space.parameters)
    done = sorted((r for r in rows if r.get("objective") is not None), key=lambda r: -r["objective"])
    front = set(pareto_front([(r["forgetting"], r["preservation"]) for r in done]))
    metrics = ["objective", "forgetting", "preservation", "forget_vqa", "test_vqa", "forget_qa", "retain_vqa",
               "retain_qa"]
    columns = ["trial", "status", *params, *metrics, "reports", "seconds", "pareto", "last_rung"]
    table = [{**r, "pareto": i in front} for i, r in enumerate(done)] + [r for r in rows if r.get("objective") is None]
    with (out / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)

    def cell(v: Any, column: str) -> str:  # parameters as given (a learning rate of 7e-4 stays 7e-4)
        if isinstance(v, float):
            return f"{v:.4g}" if column in params else f"{v:.3f}"
        return "" if v is None else str(v)
    md = [f"# Study {space.name}", "", f"{len(done)} of {len(rows)} trials finished; objective: vkd.study.objective "
          "(higher is better); pareto: on the front of forgetting vs preservation.", "",
          "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in table]
    (out / "trials.md").write_text("\n".join(md) + "\n")
    paths = [out / "trials.csv", out / "trials.md"]
    if not done:
        return paths

    shown = ["objective", "forget_vqa", "test_vqa", "retain_vqa", "retain_qa", "forget_qa"]
    fig, axes = plt.subplots(len(params), 1, figsize=(7, 3.2 * len(params)), squeeze=False)
    for ax, name in zip(axes[:, 0], params):
        values = sorted({r[name] for r in done}, key=lambda v: (isinstance(v, str), v))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs_of = (lambda v: v) if numeric else (lambda v: values.index(v))
        for key in shown:
            xs = [xs_of(r[name]) for r in done]
            ax.scatter(xs, [r.get(key, np.nan) for r in done], s=14, alpha=0.5)
            means = [np.mean([r.get(key, np.nan) for r in done if r[name] == v]) for v in values]
            ax.plot([xs_of(v) for v in values], means, marker="o", label=key, lw=2 if key == "objective" else 1)
        if not numeric:
            ax.set_xticks(range(len(values)), [_label(v) for v in values])
        ax.set_xlabel(name)
        ax.set_ylim(0, 1.05)
        ax.axhline(CHANCE, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(f"{space.name}: sensitivity (lines: mean per value)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=100)
    plt.close(fig)
    paths.append(out / "sensitivity.png")

    pairs = list(itertools.combinations(params, 2))
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
        for ax, (a, b) in zip(axes[0], pairs):
            va = sorted({r[a] for r in done}, key=lambda v: (isinstance(v, str), v))
            vb = sorted({r[b] for r in done}, key=lambda v: (isinstance(v, str), v))
            if len(va) * len(vb) > 400:  # continuous values: bin them
                va, vb = list(np.quantile([r[a] for r in done], [0, .25, .5, .75, 1])), \
                    list(np.quantile([r[b] for r in done], [0, .25, .5, .75, 1]))
                ia = lambda v: min(int(np.searchsorted(va, v, side="right")) - 1, 3)  # noqa: E731
                ib = lambda v: min(int(np.searchsorted(vb, v, side="right")) - 1, 3)  # noqa: E731
                va, vb = [f"q{i + 1}" for i in range(4)], [f"q{i + 1}" for i in range(4)]
            else:
                ia, ib = va.index, vb.index
            grid = np.full((len(vb), len(va)), np.nan)
            for i in range(len(va)):
                for j in range(len(vb)):
                    hits = [r["objective"] for r in done if ia(r[a]) == i and ib(r[b]) == j]
                    grid[j, i] = np.mean(hits) if hits else np.nan
            im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
            for i in range(len(va)):
                for j in range(len(vb)):
                    if not np.isnan(grid[j, i]):
                        ax.text(i, j, f"{grid[j, i]:.2f}", ha="center", va="center", fontsize=7, color="w")
            ax.set_xticks(range(len(va)), [_label(v) for v in va])
            ax.set_yticks(range(len(vb)), [_label(v) for v in vb])
            ax.set_xlabel(a)
            ax.set_ylabel(b)
            fig.colorbar(im, ax=ax, label="mean objective")
        fig.tight_layout()
        fig.savefig(out / "heatmaps.png", dpi=100)
        plt.close(fig)
        paths.append(out / "heatmaps.png")

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter([r["forgetting"] for r in done], [r["preservation"] for r in done], s=18, label="trials")
    line = sorted((done[i]["forgetting"], done[i]["preservation"]) for i in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], color="C3", marker="o", label="Pareto front")
    for i in front:
        ax.annotate(", ".join(_label(done[i][n]) for n in params), (done[i]["forgetting"], done[i]["preservation"]),
                    fontsize=6)
    ax.set_xlabel("forgetting (share of the margin over chance gone)")
    ax.set_ylabel("preservation (kept share of the vanilla scores)")
    ax.set_title(f"{space.name}: forgetting vs preservation", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)
    paths.append(out / "pareto.png")
    return paths
