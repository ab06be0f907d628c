"""The Ray Tune side of a study: the search algorithm, the scheduler and the Tuner.

Promotion ASHA (a grid of one-worker trials under ``scheduler: asha``) is ``vkd.study_asha``'s
``Ladder`` behind a thin searcher (which trial runs next, from which rung) and scheduler
(stop a trial at a rung unless the ladder promotes it). Ray's ``HyperBandScheduler`` does
not make the same decisions: it deals trials into brackets of different sizes and budgets
and halves each bracket on its own, so a point is compared only with its bracket's
(``benchmarks/hyperband_decisions.py`` shows it on the thresholds grid). Other ASHA
studies (random or Optuna search, several workers, searched steps) use Ray's
``ASHAScheduler``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from pipelines.tune_trial import Study, run_trial
from vkd.study import SearchSpace
from vkd.study_asha import Ladder, asha_rungs, grid_order, point_of, trial_key


class LadderSearcher(Searcher):
    """Tune's view of a ``Ladder``: it suggests each trial's point and rung."""

    def __init__(self, ladder: Ladder):
        super().__init__(metric="objective", mode=ladder.mode)
        self.ladder = ladder

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        return self.ladder.suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ladder.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        self.ladder.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.ladder.restore(checkpoint_path)


class RungStop(FIFOScheduler):
    """Promotion ASHA's scheduler: at a rung, a trial goes on only if its ``Ladder`` says so."""

    def __init__(self, ladder: Ladder, metric: str = "objective"):
        super().__init__()
        self.ladder, self.key = ladder, metric  # TrialScheduler.metric is a read-only property

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        step, value = result.get("step"), result.get(self.key)
        if step in self.ladder.records and value is not None:
            if not self.ladder.record(trial_key(point_of(trial.config)), step, float(value)):
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def param_space(space: SearchSpace) -> dict[str, Any]:
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # [low, high], both included
    return {name: make[kind](values) for name, spec in space.parameters.items() for kind, values in spec.items()}


def ray_scheduler(space: SearchSpace, scheduler: str, steps: int | None, rf: int):
    """Ray's ASHAScheduler for ``scheduler: asha`` (None: FIFO)."""
    if scheduler != "asha":
        return None
    if steps:  # rungs in steps (asha_rungs), where the trials evaluate
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=asha_rungs(space, steps)[0],
                             reduction_factor=rf)
    # the steps are a parameter: rungs in evaluations
    return ASHAScheduler(time_attr="training_iteration", max_t=space.reports,
                         grace_period=min(int(space.asha.get("grace_period", 1)), space.reports), reduction_factor=rf)


def search_algorithm(space: SearchSpace):
    """The space's search algorithm and its number of trials (Tune's max_concurrent_trials
    leaves a search algorithm it is given unbounded: each takes the space's concurrency)."""
    if space.search == "optuna":
        return OptunaSearch(seed=space.seed), space.trials
    if space.search == "random":
        return BasicVariantGenerator(random_state=space.seed, max_concurrent=space.concurrency), space.trials
    points = grid_order(space)
    return BasicVariantGenerator(points_to_evaluate=points, random_state=space.seed,
                                 max_concurrent=space.concurrency), len(points)


def make_tuner(space: SearchSpace, study: Study, path: Path, scheduler: str, steps: int | None):
    """The study's Tuner, restored from ``path`` when an earlier run of it was interrupted;
    returns it and whether it was restored."""
    # a one-worker trial trains in its own process and holds its CPUs; a larger one only
    # drives its trainer's workers
    workers = int(space.resources.get("workers", 1))
    cpus = float(space.resources.get("cpus_per_worker", 1)) if workers == 1 else 0.01
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study), {"cpu": cpus})
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True), True
    rf = int(space.asha.get("reduction_factor", 2))
    if study.promote:  # the searcher gives each trial its point, and caps the trials at once itself
        points = grid_order(space)
        ladder = Ladder(points, study.probe_at[:-1], steps, rf, space.concurrency)
        sched, search, samples = RungStop(ladder), LadderSearcher(ladder), len(points) * len(study.probe_at)
        params, cap = {}, None
    else:
        sched = ray_scheduler(space, scheduler, steps, rf)
        search, samples = search_algorithm(space)
        params, cap = param_space(space), space.concurrency
    tuner = tune.Tuner(
        trainable, param_space=params,
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=samples, scheduler=sched,
                                    search_alg=search, max_concurrent_trials=cap,
                                    reuse_actors=workers == 1),  # a one-worker trial's imports, once per actor
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=1),
    )
    return tuner, False
