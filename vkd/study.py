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
      unlearn.vkd.d_i: {grid: [0.01, 0.02, 0.05]}
      unlearn.vkd.d_f: {grid: [0.1, 0.2, 0.3, 0.5]}
      unlearn.vkd.beta: {loguniform: [0.1, 30]}
      unlearn.lr: {uniform: [5e-4, 2e-3]}
      unlearn.vkd.vision_layers: {choice: [0, 1, 2]}
      unlearn.vkd.stat_batches: {randint: [4, 16]}

Every parameter must name a field of the run config with a value of its type (checked by
building the config with each value), so a typo fails at load with the field named.

The study objective (maximised) is documented on :func:`objective`; the outputs a study
leaves are written by ``vkd.study_plots``; promotion ASHA is ``vkd.study_asha``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vkd.config import ConfigError, load_config, override
from vkd.metrics import CHANCE

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


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


FORGETTING = ("forget_vqa", "test_vqa", "forget_vqa_gen", "test_vqa_gen")
TEXT = ("forget_qa", "forget_qa_gen", "retain_qa", "retain_qa_gen")
RETAIN = ("retain_vqa", "retain_vqa_gen", "retain_test_vqa", "retain_test_vqa_gen")
LOOKALIKE = ("lookalike_vqa", "lookalike_vqa_gen", "lookalike_test_vqa", "lookalike_test_vqa_gen")


def objective(before: dict[str, float], after: dict[str, float],
              chance: dict[str, float] | None = None) -> dict[str, float]:
    """The study objective, in [0, 1], higher is better: the mean of *forgetting* and
    *preservation*, over the keys both evaluations hold.

    - forgetting: for forget_vqa, test_vqa and their ``_gen`` twins, the share of the
      starting model's margin over chance that is gone, clamp((v0 - v) / (v0 - c), 0, 1)
      (c: 0.25 for multiple choice; for generation, ``chance`` where it gives the key,
      the stranger's guess rate of :func:`vkd.metrics.guess_chance`, else 0), averaged.
      Falling below chance earns nothing more.
    - preservation: for each keep key, min(v / v0, 1), averaged with weights: 1 for the
      text keys (forget_qa, retain_qa and their twins) and for the other retain keys
      (retain_vqa, retain_test_vqa and their twins); the lookalike keys share as much weight
      as those other retain keys together (the people who look like a forgotten one are the
      hardest case of keeping everyone else).

    A model that forgets nothing scores 0.5 at best; one that forgets everything and keeps
    everything scores 1."""
    levels = {**CHANCE, **(chance or {})}

    def gone(key: str) -> float:
        margin = before[key] - levels.get(key, 0.0)
        if margin <= 0:
            return 0.0
        return min(max((before[key] - after[key]) / margin, 0.0), 1.0)

    def kept(key: str) -> float:
        return min(after[key] / before[key], 1.0) if before[key] > 0 else 1.0

    both = [k for k in (*FORGETTING, *TEXT, *RETAIN, *LOOKALIKE) if k in before and k in after]
    lost = [gone(k) for k in FORGETTING if k in both]
    forgetting = sum(lost) / len(lost) if lost else 0.0
    weights = {k: 1.0 for k in (*TEXT, *RETAIN) if k in both}
    looks = [k for k in LOOKALIKE if k in both]
    others = sum(1.0 for k in RETAIN if k in both) or 1.0
    weights.update({k: others / len(looks) for k in looks})
    preservation = sum(w * kept(k) for k, w in weights.items()) / sum(weights.values()) if weights else 1.0
    return {"objective": (forgetting + preservation) / 2, "forgetting": forgetting, "preservation": preservation}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return front
