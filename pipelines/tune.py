"""Stage `tune`: a sensitivity study over a search space, on Ray Tune.

    python -m pipelines.tune --space tune_spaces/thresholds_grid.yaml --model M --data D --forget forget_10 [--out DIR]

Recipe: resolve the run config with the space's fixed fields and resources (saved as
``DIR/base.yaml``), evaluate the starting model once and measure the statistics every
trial shares once (both cached), open the study's MLflow run, then let Ray Tune run the
trials: each is one unlearning run (``pipelines.unlearn.run_unlearn``) on its own trainer,
evaluated ``reports`` times as it trains, each result reported to Tune so that ASHA can stop
a poor trial early, and recorded as a child MLflow run. The study leaves the table of trials,
the plots, the Pareto front and ``best.yaml``, which ``vkd unlearn --config`` takes as it is.

With ``scheduler: asha`` a grid of one-worker trials runs promotion ASHA (``Ladder``): every
point runs to the first rung; a trial stops at a rung unless it is among the best
1/reduction_factor there, saving its training state, and goes on from that state when the
points recorded there make it one of them. Other ASHA studies (random or Optuna search,
several workers, searched steps) use Ray's ``ASHAScheduler``.

Run the same command again to resume an interrupted study: Tune restores its state from
``DIR/study``, and a trial whose result is in ``DIR/trials/<key>/result.json`` is never
trained again.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import yaml
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from pipelines.common import embedded_cpus, init_ray, parse, parser, resolve_config, run_main
from pipelines.evaluate import cached_evaluation
from pipelines.tracking import experiment_id, git_sha, tracking_uri
from pipelines.trainer import Probe
from vkd.config import Config, ConfigError, cache_root, load_config, override
from vkd.data.layout import load_meta
from vkd.model import resolve_model
from vkd.study import SearchSpace, load_space, write_outputs

METRICS = ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa")
RESUME = "resume_step"  # in a promotion ASHA trial's config: the rung it goes on from (0: a new point)


def overrides(params: dict[str, Any]) -> list[str]:
    return [override(k, v) for k, v in sorted(params.items())]


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's parameters without promotion ASHA's ``RESUME``: the point it trains."""
    return {k: v for k, v in config.items() if k != RESUME}


def trial_key(params: dict[str, Any]) -> str:
    """A trial's folder name: its parameters' hash (a rerun finds a finished trial by it)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_config(cfg: Config, space: SearchSpace) -> Config:
    """The config every trial starts from: the space's fixed fields and resources on top of
    ``cfg``, with the MLflow file paths made absolute (trials run in other folders)."""
    fixed = {**space.fixed, "train.workers": int(space.resources.get("workers", 1)),
             "train.cpus_per_worker": float(space.resources.get("cpus_per_worker", 1))}
    base = cfg.updated(overrides(fixed))
    base.mlflow.sqlite_file = str(Path(base.mlflow.sqlite_file).resolve())
    base.mlflow.artifact_dir = str(Path(base.mlflow.artifact_dir).resolve())
    return base


def param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # [low, high], both included
    return {name: make[kind](values) for name, spec in space.parameters.items() for kind, values in spec.items()}


def asha_rungs(space: SearchSpace, steps: int) -> list[int]:
    """The steps at which ASHA decides: grace_period reports of ``steps / reports`` steps
    each, times reduction_factor at each rung (Ray's rung formula), and the last step (which
    fills a rung within its last report's steps). A trial evaluates there and nowhere else:
    an evaluation between rungs decides nothing."""
    import numpy as np

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


class Ladder(Searcher):
    """Asynchronous successive halving over the points of a grid, promoting as ASHA does
    (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning", Algorithm 2),
    as a Tune searcher; ``RungStop``, its scheduler, records each trial's objective at each
    rung here.

    A point goes on past a rung when it is among the best ``len(rung) // rf`` recorded
    there. A trial that reaches a rung goes on at once if it is and no new point waits;
    otherwise it stops, keeping its training state (``run_unlearn``'s rungs), and a later
    Tune trial of the same point goes on from that state when the point becomes one of them.
    Each Tune trial is one such segment of a point. A free slot takes a new point while any
    is left, then promotions, highest rung first: unlike the paper's ASHA, which promotes
    first (to find a good configuration early in an endless stream), every point of the
    grid reaches the first rung before any goes past it, so each promotion is decided among
    all the points the rung will see but the few still running. Nothing waits for
    stragglers. When nothing runs and nothing is left to start and no point has reached the
    last step, the best point not yet promoted at the highest rung goes on, so that a study
    always finishes a point.

    Ray's ``ASHAScheduler`` instead lets a trial through a rung unless it falls below the
    (1 - 1/rf) quantile of the trials recorded there before it: the first always passes, the
    second whenever it beats the first, and of a dozen trials three to five ran to the end
    in this project's benchmark runs."""

    def __init__(self, points: list[dict[str, Any]], rungs: Sequence[int], steps: int, rf: int, concurrency: int,
                 metric: str = "objective", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.queue = [dict(p) for p in points]        # points not started, in order
        self.rungs, self.steps, self.rf, self.concurrency = list(rungs), steps, rf, concurrency
        self.records: dict[int, dict[str, float]] = {r: {} for r in self.rungs}  # rung -> {point: objective}
        self.promoted: dict[int, list[str]] = {r: [] for r in self.rungs}        # rung -> points past it
        self.points: dict[str, dict[str, Any]] = {}   # point key -> its parameters
        self.finished: list[str] = []                 # points that reached the last step
        self.live: dict[str, str] = {}                # Tune trial id -> point key

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

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
        if len(self.live) >= self.concurrency:
            return None
        job = self._next()
        if job is None:
            if self.live:  # what runs may yet promote a point
                return None
            job = self._last_resort()
            if job is None:
                return Searcher.FINISHED
        key, rung = job
        self.live[trial_id] = key
        return {**self.points[key], RESUME: rung}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.live.pop(trial_id, None)
        if key is not None and result and not error and result.get("step", 0) >= self.steps:
            self.finished.append(key)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({k: getattr(self, k) for k in self._STATE}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        for name in ("records", "promoted"):  # JSON keys are strings; rungs are steps
            state[name] = {int(r): v for r, v in state[name].items()}
        self.__dict__.update(state)

    _STATE = ("queue", "records", "promoted", "points", "finished", "live")


class RungStop(FIFOScheduler):
    """Promotion ASHA's scheduler: at a rung, a trial goes on only if its ``Ladder`` says so."""

    def __init__(self, ladder: Ladder):
        super().__init__()
        self.ladder = ladder

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        step, value = result.get("step"), result.get(self.ladder.metric)
        if step in self.ladder.records and value is not None:
            if not self.ladder.record(trial_key(point_of(trial.config)), step, float(value)):
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def run_trial(config: dict[str, Any], study: dict[str, Any]) -> None:
    """One trial, in its Tune actor: an unlearning run whose in-run evaluations go to Tune.
    A finished trial (its result.json exists) reports its saved result and trains nothing.
    Under promotion ASHA (``study["promote"]``) a trial is one segment of its point's run:
    it saves the training state at each rung and goes on from ``config[RESUME]``'s, in the
    point's MLflow run. A study counts Tune's seconds of each trial (``time_total_s``: from
    the start of this function, imports included, for trials that finish as for trials a
    scheduler stops)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.unlearn import run_unlearn

    # a reused actor waits this long for a stopped trial to unwind before it takes the next
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "10")
    os.environ["MLFLOW_TRACKING_URI"] = study["tracking_uri"]
    os.environ["VKD_CACHE"] = study["cache"]
    params = point_of(config)
    resume = int(config.get(RESUME, 0))
    key = trial_key(params)
    folder = Path(study["out"]) / "trials" / key
    result_file = folder / "result.json"
    cfg = load_config(study["base"], overrides(params))
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        tune.report({**saved["metrics"], "step": cfg.unlearn.steps, "restored_seconds": saved["seconds"]})
        return
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "attempts.log").open("a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} trial {tune.get_context().get_trial_id()} from step {resume}\n")
    shutil.rmtree(folder / "model", ignore_errors=True)  # an interrupted attempt's leftovers
    cfg.save(folder / "config.yaml")
    # one worker trains in this trial's process (run_training's local mode: no controller or
    # worker process to start); several go through Ray Train
    local = cfg.train.workers == 1
    tags = {"mlflow.parentRunId": study["parent_run_id"], "study": study["name"], "trial": key}
    rungs = None
    if study.get("promote"):
        rungs = {"dir": str(folder / "rungs"), "save_at": study["probe_at"][:-1], "resume": resume,
                 "run_id": _trial_run(study, key) if resume else None}
    figures = run_unlearn(cfg, study["model"], study["data"], study["forget"], folder / "model", tags=tags,
                          register=False, probes=study["reports"],
                          callbacks=None if local else [TuneReportCallback()], local=local, report_to_tune=local,
                          run_name=f"{study['name']}-{key}", keep_model=False,
                          sample_before=study.get("sample_before"), probe_at=study.get("probe_at"), rungs=rungs)
    metrics = {"objective": figures["objective"], "forgetting": figures["forgetting"],
               "preservation": figures["preservation"], **{f"eval/{k}": v for k, v in figures["after"].items()}}
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps({"params": params, "metrics": metrics, "seconds": time.perf_counter() - start,
                               "reports": study["reports"], "run_id": figures["run_id"]}, indent=1, sort_keys=True))
    tmp.rename(result_file)
    shutil.rmtree(folder / "rungs", ignore_errors=True)
    if local:  # the last result, reported once written down (see run_training)
        tune.report({**metrics, "step": cfg.unlearn.steps})


def _trial_run(study: dict[str, Any], key: str) -> str | None:
    """The MLflow run a point's earlier segments ran in."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(study["tracking_uri"])
    exp = client.get_run(study["parent_run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{study['parent_run_id']}' "
                                                   f"and tags.trial = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _tuner(space: SearchSpace, study: dict[str, Any], path: Path, scheduler: str, steps: int | None):
    from ray import tune

    # a one-worker trial trains in its own process and holds its CPUs; a larger one only
    # drives its trainer's workers
    workers = int(space.resources.get("workers", 1))
    cpus = float(space.resources.get("cpus_per_worker", 1)) if workers == 1 else 0.01
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study), {"cpu": cpus})
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True), True
    rf = int(space.asha.get("reduction_factor", 2))
    if study["promote"]:  # the searcher gives each trial its point, and caps the trials at once itself
        points = grid_order(space)
        search = Ladder(points, study["probe_at"][:-1], steps, rf, space.concurrency)
        sched, samples, params, cap = RungStop(search), len(points) * len(study["probe_at"]), {}, None
    else:
        sched = _ray_scheduler(space, scheduler, steps, rf)
        search, samples = _search(space)
        params, cap = param_space(space), space.concurrency
    tuner = tune.Tuner(
        trainable, param_space=params,
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=samples, scheduler=sched,
                                    search_alg=search, max_concurrent_trials=cap,
                                    reuse_actors=workers == 1),  # a one-worker trial's imports, once per actor
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=1),
    )
    return tuner, False


def _ray_scheduler(space: SearchSpace, scheduler: str, steps: int | None, rf: int):
    """Ray's ASHAScheduler for ``scheduler: asha`` (None: FIFO)."""
    if scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    if steps:  # rungs in steps (asha_rungs), where the trials evaluate
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=asha_rungs(space, steps)[0],
                             reduction_factor=rf)
    # the steps are a parameter: rungs in evaluations
    return ASHAScheduler(time_attr="training_iteration", max_t=space.reports,
                         grace_period=min(int(space.asha.get("grace_period", 1)), space.reports), reduction_factor=rf)


def _search(space: SearchSpace):
    """The space's search algorithm and its number of trials (Tune's max_concurrent_trials
    leaves a search algorithm it is given unbounded: each takes the space's concurrency)."""
    from ray.tune.search import BasicVariantGenerator

    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=space.seed), space.trials
    if space.search == "random":
        return BasicVariantGenerator(random_state=space.seed, max_concurrent=space.concurrency), space.trials
    points = grid_order(space)
    return BasicVariantGenerator(points_to_evaluate=points, random_state=space.seed,
                                 max_concurrent=space.concurrency), len(points)


def _study_run(cfg: Config, space: SearchSpace, out: Path, tags: dict[str, str]) -> str:
    """The study's parent MLflow run: made once, its id kept in ``out/study.json`` so that a
    resumed study goes on in the same run."""
    from mlflow.tracking import MlflowClient

    state = out / "study.json"
    saved = json.loads(state.read_text()) if state.is_file() else {}
    client = MlflowClient(tracking_uri(cfg.mlflow))
    if saved.get("parent_run_id"):
        client.update_run(saved["parent_run_id"], status="RUNNING")
        return saved["parent_run_id"]
    run = client.create_run(experiment_id(cfg.mlflow), run_name=f"tune-{space.name}",
                            tags={"stage": "tune", "config_hash": cfg.hash(), "git_sha": git_sha(), **tags})
    for name, spec in space.parameters.items():
        client.log_param(run.info.run_id, f"space/{name}", json.dumps(spec))
    for k in ("search", "scheduler", "trials", "concurrency", "reports", "seed"):
        client.log_param(run.info.run_id, f"space/{k}", str(getattr(space, k)))
    state.write_text(json.dumps({**saved, **tags, "parent_run_id": run.info.run_id}, indent=1))
    return run.info.run_id


def trial_rows(space: SearchSpace, grid, out: Path, last_report: int) -> list[dict[str, Any]]:
    """One row per point of the space. A point with a result.json finished (maybe in an
    earlier, interrupted run of the study: its figures come from there); one without was
    stopped early by the scheduler, or failed. Under promotion ASHA a point may have run as
    several Tune trials: its seconds and evaluations add up over them, and its figures are
    those of its furthest one."""
    points: dict[str, dict[str, Any]] = {}
    for res in grid:
        params = {k: v for k, v in (res.config or {}).items() if k in space.parameters}
        m = dict(res.metrics or {})
        p = points.setdefault(trial_key(params), {"params": params, "seconds": 0.0, "reports": 0, "error": False,
                                                   "last": {}})
        # Tune's seconds of the trial; a trial that found its result written by an earlier,
        # interrupted run of the study reports the seconds that run took
        p["seconds"] += m.get("restored_seconds", m.get("time_total_s")) or 0.0
        p["reports"] += m.get("training_iteration", 0)
        p["error"] |= res.error is not None
        if "objective" in m and m.get("step", 0) >= p["last"].get("step", 0):
            p["last"] = m
    rows = []
    for key, p in points.items():
        m = dict(p["last"])
        saved_file = out / "trials" / key / "result.json"
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
        if saved:
            m.update(saved["metrics"])
        # a trial that reached its last evaluation finished, even when the scheduler stopped it
        # right there (Ray's ASHA at max_t) before it could write result.json
        done = saved or (not p["error"] and p["reports"] >= last_report)
        status = "finished" if done else ("error" if p["error"] else "stopped early")
        row = {"trial": key, "status": status, **p["params"], "reports": saved["reports"] if saved else p["reports"],
               "seconds": p["seconds"]}
        if done and "objective" in m:
            row.update({k: m[k] for k in ("objective", "forgetting", "preservation")})
            row.update({k: m.get(f"eval/{k}") for k in METRICS})
        elif "objective" in m:  # a rung's figures (on a sample, mid-run): not comparable with a finished trial's
            row["last_rung"] = f"step {m.get('step', '?')}: objective {m['objective']:.3f}"
        rows.append(row)
    return rows


def run_study(cfg: Config, space: SearchSpace, model: str, data: str | Path, forget: str, out: str | Path,
              scheduler: str | None = None) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns the best trial's row, the rows, the
    total trial-seconds and the wall time."""
    from mlflow.tracking import MlflowClient

    from pipelines.unlearn import warm_stats

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data).resolve()
    load_meta(data).entity_ids(forget)
    base_model = resolve_model(model, cfg.model, data)
    identity = {"space": space.name, "model": str(base_model), "data": str(data), "forget": forget,
                "scheduler": scheduler or space.scheduler}
    state = out / "study.json"
    if state.is_file():
        saved = json.loads(state.read_text())
        differs = [k for k in identity if saved.get(k) != identity[k]]
        if differs:
            raise ConfigError(f"{out} holds another study ({differs[0]}: {saved.get(differs[0])}); "
                              "choose another --out")
    base = base_config(cfg, space)
    base.save(out / "base.yaml")
    space_file = out / "space.yaml"
    space_file.write_text(yaml.safe_dump({k: getattr(space, k) for k in SearchSpace.__dataclass_fields__},
                                         sort_keys=False))
    if not os.environ.get("RAY_ADDRESS"):
        base.ray.num_cpus = max(base.ray.num_cpus, embedded_cpus(base, space.concurrency))
    init_ray(base)
    wall = time.perf_counter()
    before, _ = cached_evaluation(base_model, data, forget, base.eval)
    sample_before = None
    if space.reports > 1 and not any(name.startswith("eval.") for name in space.parameters):
        # the starting model on the earlier rungs' sample, scored once here, not in every trial
        probe = Probe({"data": str(data), "forget": forget, "eval": asdict(base.eval), "before": before,
                       "start_model": str(base_model)})
        sample_before = probe.start_scores()
    # ASHA's trials evaluate at its rungs only (unless the steps themselves are searched)
    scheduler = scheduler or space.scheduler
    steps = base.unlearn.steps if scheduler == "asha" and "unlearn.steps" not in space.parameters else None
    probe_at = asha_rungs(space, steps) if steps else None
    points = space.grid_points() if space.search == "grid" else [{}]
    warm_stats([(base.updated(overrides(pt)), forget) for pt in points], base_model, data, out)
    parent = _study_run(base, space, out, identity)
    # promotion ASHA: a grid of one-worker trials (they keep and resume their rung states in
    # process); Ray's ASHA otherwise
    promote = bool(steps) and space.search == "grid" and base.train.workers == 1
    study = {"base": str(out / "base.yaml"), "model": str(base_model), "data": str(data), "forget": forget,
             "out": str(out), "reports": space.reports, "name": space.name, "parent_run_id": parent,
             "tracking_uri": tracking_uri(base.mlflow), "promote": promote,
             "cache": str(cache_root()), "sample_before": sample_before, "probe_at": probe_at}
    tuner, resumed = _tuner(space, study, out / "study", scheduler, steps)
    if resumed:
        print(f"resuming the study in {out / 'study'}", flush=True)
    grid = tuner.fit()
    rows = trial_rows(space, grid, out, len(probe_at) if probe_at else space.reports)
    for rungs in out.glob("trials/*/rungs"):  # the states of points the study stopped for good
        shutil.rmtree(rungs, ignore_errors=True)
    paths = write_outputs(out, space, rows)
    done = [r for r in rows if r.get("objective") is not None and r["status"] == "finished"]
    client = MlflowClient(tracking_uri(base.mlflow))
    best = max(done, key=lambda r: r["objective"]) if done else None
    if best is not None:
        best_cfg = load_config(out / "base.yaml", overrides({k: best[k] for k in space.parameters}))
        best_cfg.save(out / "best.yaml")
        paths.append(out / "best.yaml")
        client.log_metric(parent, "best/objective", best["objective"])
        for k in ("forgetting", "preservation", *METRICS):
            if best.get(k) is not None:
                client.log_metric(parent, f"best/{k}", best[k])
    trial_seconds = sum(r["seconds"] or 0.0 for r in rows)
    client.log_metric(parent, "trial_seconds", trial_seconds)
    for path in paths + [out / "base.yaml", space_file]:
        client.log_artifact(parent, str(path), artifact_path="study")
    # trials a scheduler stopped ended with their actor: close their runs as killed
    for run in client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent)
    return {"best": best, "rows": rows, "trial_seconds": trial_seconds, "wall_seconds": time.perf_counter() - wall,
            "parent_run_id": parent}


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("tune", "a sensitivity study over a search space (tune_spaces/*.yaml) on Ray Tune")
    p.add_argument("--space", required=True, help="a search space file, e.g. tune_spaces/thresholds_grid.yaml")
    p.add_argument("--model", required=True, help="the vanilla model folder")
    p.add_argument("--data", required=True)
    p.add_argument("--forget", required=True, help="forget_5 | forget_10 | forget_15")
    p.add_argument("--out", help="the study folder (default runs/tune/<space name>); rerun to resume")
    args = parse(p, argv)
    cfg = resolve_config(args)
    space = load_space(args.space, args.config)
    out = Path(args.out or f"runs/tune/{space.name}")
    figures = run_study(cfg, space, args.model, args.data, args.forget, out)
    print((out / "trials.md").read_text())
    best = figures["best"]
    print(f"{len(figures['rows'])} trials, {figures['trial_seconds']:.0f} trial-seconds, "
          f"{figures['wall_seconds']:.0f} s wall; MLflow run {figures['parent_run_id']}")
    if best is None:
        print("no trial finished; nothing to recommend")
        return
    print(f"best trial {best['trial']}: objective {best['objective']:.4f}; config {out / 'best.yaml'}\n"
          f"reproduce: vkd unlearn --config {out / 'best.yaml'} --model {args.model} --data {args.data} "
          f"--forget {args.forget} --out MODEL2\nplots: {out}/sensitivity.png, heatmaps.png, pareto.png")


if __name__ == "__main__":
    sys.exit(run_main(main))
