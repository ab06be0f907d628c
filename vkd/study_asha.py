"""Promotion ASHA for grid studies, Ray-free: the rungs a study evaluates at, the seeded
order of a grid's points, and the promotion rule (``Ladder``). ``pipelines/tune.py`` puts
``Ladder`` behind a Tune searcher and scheduler."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vkd.cache import digest
from vkd.study import SearchSpace

RESUME = "resume_step"  # in a promotion ASHA trial's config: the rung it goes on from (0: a new point)


def trial_key(params: dict[str, Any]) -> str:
    """A point's folder name: its parameters' digest (a rerun finds a finished trial by it)."""
    return digest(params)


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters without promotion ASHA's ``RESUME``: the point it trains."""
    return {k: v for k, v in config.items() if k != RESUME}


def report_steps(steps: int, reports: int) -> list[int]:
    """``reports`` evaluation steps evenly spaced over ``steps`` (FIFO's; the last step is
    always evaluated too, as every run's last result)."""
    every = max(1, steps // reports)
    return list(range(every, steps + 1, every))


def asha_rungs(space: SearchSpace, steps: int) -> list[int]:
    """The steps at which ASHA decides: grace_period reports of ``steps / reports`` steps
    each, times reduction_factor at each rung (Ray's rung formula), and the last step (which
    fills a rung within its last report's steps). A trial evaluates there and nowhere else:
    an evaluation between rungs decides nothing."""
    rf = int(space.asha.get("reduction_factor", 2))
    unit = max(1, steps // space.reports)
    first = min(int(space.asha.get("grace_period", 1)), space.reports) * unit
    rungs = [first * rf ** k for k in range(int(np.log(steps / first) / np.log(rf) + 1))]
    return sorted({m for m in rungs if m <= steps - unit} | {steps})


def grid_order(space: SearchSpace) -> list[dict[str, Any]]:
    """The grid's points (``trials`` times over) in an order drawn from the space's seed, not
    in the file's: the first trials at a rung meet few others there, and in file order those
    would always be the same corner of the grid."""
    points = space.grid_points() * space.trials
    random.Random(space.seed).shuffle(points)
    return points


class Ladder:
    """Asynchronous successive halving over the points of a grid, promoting as ASHA does
    (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning", Algorithm 2).

    A point goes on past a rung when it is among the best ``len(rung) // rf`` recorded
    there. A trial that reaches a rung goes on at once if it is and no new point waits;
    otherwise it stops, keeping its training state, and a later trial of the same point
    goes on from that state when the point becomes one of them. Each trial is one such
    segment of a point. A free slot takes a new point while any is left, then promotions,
    highest rung first: unlike the paper's ASHA, which promotes first (to find a good
    configuration early in an endless stream), every point of the grid reaches the first
    rung before any goes past it, so each promotion is decided among all the points the
    rung will see but the few still running. Nothing waits for stragglers. When nothing
    runs and nothing is left to start and no point has reached the last step, the best
    point not yet promoted at the highest rung goes on, so that a study always finishes a
    point."""

    FINISHED = "FINISHED"  # what ``suggest`` says when the study is over (Tune's Searcher.FINISHED)

    def __init__(self, points: list[dict[str, Any]], rungs: Sequence[int], steps: int, rf: int, concurrency: int,
                 mode: str = "max"):
        self.queue = [dict(p) for p in points]        # points not started, in order
        self.rungs, self.steps, self.rf, self.concurrency, self.mode = list(rungs), steps, rf, concurrency, mode
        self.records: dict[int, dict[str, float]] = {r: {} for r in self.rungs}  # rung -> {point: objective}
        self.promoted: dict[int, list[str]] = {r: [] for r in self.rungs}        # rung -> points past it
        self.points: dict[str, dict[str, Any]] = {}   # point key -> its parameters
        self.finished: list[str] = []                 # points that reached the last step
        self.live: dict[str, str] = {}                # trial id -> point key

    def _ranked(self, rung: int) -> list[str]:
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted(self.records[rung], key=lambda k: (sign * self.records[rung][k], k))

    def _top(self, rung: int) -> list[str]:
        return self._ranked(rung)[: len(self.records[rung]) // self.rf]

    def record(self, key: str, rung: int, value: float) -> bool:
        """A point's objective at a rung; True: it goes on now."""
        if key in self.promoted[rung]:  # a trial rerun after an interrupted study passes again
            return True
        self.records[rung][key] = value
        go_on = not self.queue and key in self._top(rung)
        if go_on:
            self.promoted[rung].append(key)
        return go_on

    def _next(self) -> tuple[str, int] | None:
        if self.queue:
            point = self.queue.pop(0)
            key = trial_key(point)
            self.points[key] = point
            return key, 0
        for rung in reversed(self.rungs):
            for key in self._top(rung):
                if key not in self.promoted[rung]:
                    self.promoted[rung].append(key)
                    return key, rung
        return None

    def _last_resort(self) -> tuple[str, int] | None:
        if self.finished:
            return None
        for rung in reversed(self.rungs):
            waiting = [k for k in self._ranked(rung) if k not in self.promoted[rung]]
            if waiting:
                self.promoted[rung].append(waiting[0])
                return waiting[0], rung
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next trial's config (its point and the rung it goes on from), None when it
        must wait, or FINISHED."""
        if len(self.live) >= self.concurrency:
            return None
        job = self._next()
        if job is None:
            if self.live:  # what runs may yet promote a point
                return None
            job = self._last_resort()
            if job is None:
                return self.FINISHED
        key, rung = job
        self.live[trial_id] = key
        return {**self.points[key], RESUME: rung}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.live.pop(trial_id, None)
        if key is not None and result and not error and result.get("step", 0) >= self.steps:
            self.finished.append(key)

    _STATE = ("queue", "records", "promoted", "points", "finished", "live")

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({k: getattr(self, k) for k in self._STATE}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        for name in ("records", "promoted"):  # JSON keys are strings; rungs are steps
            state[name] = {int(r): v for r, v in state[name].items()}
        self.__dict__.update(state)
