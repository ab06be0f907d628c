"""Stage `tune`: a sensitivity study over a search space, on Ray Tune.

    python -m pipelines.tune --space tune_spaces/thresholds_grid.yaml --model M --data D --forget forget_10 [--out DIR]

Recipe: resolve the run config with the space's fixed fields and resources (saved as
``DIR/base.yaml``), evaluate the starting model once and measure the statistics every
trial shares once (both cached), open the study's MLflow run, then let Ray Tune run the
trials: each is one unlearning run (``pipelines.unlearn.run_unlearn``) on its own trainer,
evaluated ``reports`` times as it trains, each result reported to Tune so that ASHA can stop
a poor trial early, and recorded as a child MLflow run. The study leaves the table of trials,
the plots, the Pareto front and ``best.yaml``, which ``vkd unlearn --config`` takes as it is.

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

from pipelines.common import embedded_cpus, init_ray, parse, parser, resolve_config, run_main
from pipelines.evaluate import cached_evaluation
from pipelines.tracking import experiment_id, git_sha, tracking_uri
from pipelines.trainer import Probe
from vkd.config import Config, ConfigError, cache_root, load_config, override
from vkd.data.layout import load_meta
from vkd.model import resolve_model
from vkd.study import SearchSpace, load_space, write_outputs

METRICS = ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa")


def overrides(params: dict[str, Any]) -> list[str]:
    return [override(k, v) for k, v in sorted(params.items())]


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


def run_trial(params: dict[str, Any], study: dict[str, Any]) -> None:
    """One trial, in its Tune actor: an unlearning run whose in-run evaluations go to Tune.
    A finished trial (its result.json exists) reports its saved result and trains nothing.
    Its seconds count from the start of this function, as Tune's time_total_s of a trial a
    scheduler stopped does (imports included), so that both kinds add up alike."""
    start = time.perf_counter()
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.unlearn import run_unlearn

    os.environ["MLFLOW_TRACKING_URI"] = study["tracking_uri"]
    os.environ["VKD_CACHE"] = study["cache"]
    key = trial_key(params)
    folder = Path(study["out"]) / "trials" / key
    result_file = folder / "result.json"
    if result_file.is_file():
        tune.report(json.loads(result_file.read_text())["metrics"])
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "attempts.log").open("a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} trial {tune.get_context().get_trial_id()}\n")
    shutil.rmtree(folder / "model", ignore_errors=True)  # an interrupted attempt's leftovers
    cfg = load_config(study["base"], overrides(params))
    cfg.save(folder / "config.yaml")
    # one worker trains in this trial's process (run_training's local mode: no controller or
    # worker process to start); several go through Ray Train
    local = cfg.train.workers == 1
    figures = run_unlearn(cfg, study["model"], study["data"], study["forget"], folder / "model",
                          tags={"mlflow.parentRunId": study["parent_run_id"], "study": study["name"], "trial": key},
                          register=False, probes=study["reports"],
                          callbacks=None if local else [TuneReportCallback()], local=local, report_to_tune=local,
                          run_name=f"{study['name']}-{key}", keep_model=False,
                          sample_before=study.get("sample_before"), probe_at=study.get("probe_at"))
    metrics = {"objective": figures["objective"], "forgetting": figures["forgetting"],
               "preservation": figures["preservation"], **{f"eval/{k}": v for k, v in figures["after"].items()}}
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps({"params": params, "metrics": metrics, "seconds": time.perf_counter() - start,
                               "reports": study["reports"], "run_id": figures["run_id"]}, indent=1, sort_keys=True))
    tmp.rename(result_file)
    if local:  # the last result, reported once written down (see run_training)
        tune.report({**metrics, "step": cfg.unlearn.steps})


def _tuner(space: SearchSpace, study: dict[str, Any], path: Path, scheduler: str, steps: int | None):
    from ray import tune

    # a one-worker trial trains in its own process and holds its CPUs; a larger one only
    # drives its trainer's workers
    workers = int(space.resources.get("workers", 1))
    cpus = float(space.resources.get("cpus_per_worker", 1)) if workers == 1 else 0.01
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study), {"cpu": cpus})
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True), True
    sched = None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        rf = int(space.asha.get("reduction_factor", 2))
        if steps:  # rungs in steps (asha_rungs), where the trials evaluate
            sched = ASHAScheduler(time_attr="step", max_t=steps, grace_period=asha_rungs(space, steps)[0],
                                  reduction_factor=rf)
        else:  # the steps are a parameter: rungs in evaluations
            sched = ASHAScheduler(time_attr="training_iteration", max_t=space.reports,
                                  grace_period=min(int(space.asha.get("grace_period", 1)), space.reports),
                                  reduction_factor=rf)
    from ray.tune.search import BasicVariantGenerator

    search, samples = None, space.trials
    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=space.seed)
    elif space.search == "random":  # (Tune's max_concurrent_trials leaves a given one unbounded)
        search = BasicVariantGenerator(random_state=space.seed, max_concurrent=space.concurrency)
    else:
        # the grid's points in an order drawn from the space's seed, not in the file's order:
        # asynchronous ASHA lets the first trials at each rung through for want of others to
        # compare with, and in file order those are always the same corner of the grid
        points = space.grid_points() * space.trials
        random.Random(space.seed).shuffle(points)
        search = BasicVariantGenerator(points_to_evaluate=points, random_state=space.seed,
                                       max_concurrent=space.concurrency)
        samples = len(points)
    tuner = tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=samples, scheduler=sched,
                                    search_alg=search, max_concurrent_trials=space.concurrency),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=1),
    )
    return tuner, False


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
    """One row per trial. A trial with a result.json finished (maybe in an earlier,
    interrupted run of the study: its figures come from there); one without was stopped
    early by the scheduler, or failed."""
    rows = []
    for res in grid:
        params = {k: v for k, v in (res.config or {}).items() if k in space.parameters}
        m = dict(res.metrics or {})
        saved_file = out / "trials" / trial_key(params) / "result.json"
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
        if saved:
            m.update(saved["metrics"], training_iteration=saved["reports"], time_total_s=saved["seconds"])
        # a trial that reached its last evaluation finished, even when the scheduler stopped it
        # right there (ASHA at max_t) before it could write result.json
        done = saved or (res.error is None and m.get("training_iteration", 0) >= last_report)
        status = "finished" if done else ("error" if res.error is not None else "stopped early")
        row = {"trial": trial_key(params), "status": status, **params,
               "reports": m.get("training_iteration", 0), "seconds": m.get("time_total_s")}
        if "objective" in m:
            row.update({k: m[k] for k in ("objective", "forgetting", "preservation")})
            row.update({k: m.get(f"eval/{k}") for k in METRICS})
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
    study = {"base": str(out / "base.yaml"), "model": str(base_model), "data": str(data), "forget": forget,
             "out": str(out), "reports": space.reports, "name": space.name, "parent_run_id": parent,
             "tracking_uri": tracking_uri(base.mlflow),
             "cache": str(cache_root()), "sample_before": sample_before, "probe_at": probe_at}
    tuner, resumed = _tuner(space, study, out / "study", scheduler, steps)
    if resumed:
        print(f"resuming the study in {out / 'study'}", flush=True)
    grid = tuner.fit()
    rows = trial_rows(space, grid, out, len(probe_at) if probe_at else space.reports)
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
