"""Stage `tune`: a sensitivity study over a search space, on Ray Tune.

    python -m pipelines.tune --space tune_spaces/thresholds_grid.yaml --model M --data D --forget forget_10 [--out DIR]

Recipe: resolve the run config with the space's fixed fields and resources (saved as
``DIR/base.yaml``), evaluate the starting model once and measure the statistics every
trial shares once (both cached), open the study's MLflow run, then let Ray Tune run the
trials: each is one unlearning run (``pipelines.unlearn.run_unlearn``) on its own trainer,
evaluated ``reports`` times as it trains, each result reported to Tune so that ASHA can stop
a poor trial early, and recorded as a child MLflow run. The study leaves the table of trials,
the plots, the Pareto front and ``best.yaml``, which ``vkd unlearn --config`` takes as it is.

With ``scheduler: asha`` a grid of one-worker trials runs promotion ASHA (``vkd.study_asha.Ladder``): every
point runs to the first rung; a trial stops at a rung unless it is among the best
1/reduction_factor there, saving its training state, and goes on from that state when the
points recorded there make it one of them. Other ASHA studies (random or Optuna search,
several workers, searched steps) use Ray's ``ASHAScheduler``.

Run the same command again to resume an interrupted study: Tune restores its state from
``DIR/study``, and a trial whose result is in ``DIR/trials/<key>/result.json`` is never
trained again.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from mlflow.tracking import MlflowClient

from pipelines.common import parse, parser, resolve_config, run_main
from pipelines.evaluate import cached_evaluation, with_lookalikes
from pipelines.runtime import embedded_cpus, init_ray
from pipelines.stats import warm_stats
from pipelines.tracking import experiment_id, git_sha, resolved, tracking_uri
from pipelines.tune_search import make_tuner
from pipelines.tune_trial import Study, overrides
from vkd.config import Config, ConfigError, cache_root, load_config
from vkd.data.layout import forget_set, load_meta
from vkd.metrics import KEYS
from vkd.model import resolve_model
from vkd.probe import Probe, ProbeSpec
from vkd.study import SearchSpace, load_space
from vkd.study_asha import asha_rungs, trial_key
from vkd.study_plots import write_outputs


def base_config(cfg: Config, space: SearchSpace) -> Config:
    """The config every trial starts from: the space's fixed fields and resources on top of
    ``cfg``, with the tracking URI written in and the MLflow file paths absolute (trials run
    in other folders)."""
    fixed = {**space.fixed, "train.workers": int(space.resources.get("workers", 1)),
             "train.cpus_per_worker": float(space.resources.get("cpus_per_worker", 1))}
    return resolved(cfg.updated(overrides(fixed)))


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
            row.update({k: m.get(f"eval/{k}") for k in KEYS})
        elif "objective" in m:  # a rung's figures (on a sample, mid-run): not comparable with a finished trial's
            row["last_rung"] = f"step {m.get('step', '?')}: objective {m['objective']:.3f}"
        rows.append(row)
    return rows


def _check_identity(out: Path, identity: dict[str, str]) -> None:
    state = out / "study.json"
    if state.is_file():
        saved = json.loads(state.read_text())
        differs = [k for k in identity if saved.get(k) != identity[k]]
        if differs:
            raise ConfigError(f"{out} holds another study ({differs[0]}: {saved.get(differs[0])}); "
                              "choose another --out")


def _study(cfg: Config, space: SearchSpace, model: str, data: Path, forget: str, out: Path,
           scheduler: str) -> tuple[Config, Study, int | None]:
    """The study's base config (saved as DIR/base.yaml), what its trials share, measured
    once here (the starting model's evaluation and its sample, the statistics every trial
    asks for), and the steps at which ASHA decides (None: FIFO, or searched steps)."""
    base_model = resolve_model(model, cfg.model, data, cache_root())
    identity = {"space": space.name, "model": str(base_model), "data": str(data), "forget": forget,
                "scheduler": scheduler}
    _check_identity(out, identity)
    base = base_config(cfg, space)
    base.save(out / "base.yaml")
    (out / "space.yaml").write_text(yaml.safe_dump({k: getattr(space, k) for k in SearchSpace.__dataclass_fields__},
                                                   sort_keys=False))
    if not os.environ.get("RAY_ADDRESS"):
        base.ray.num_cpus = max(base.ray.num_cpus, embedded_cpus(base.train.workers, base.train.cpus_per_worker,
                                                                 space.concurrency))
    init_ray(base.ray.num_cpus)
    fs, _ = with_lookalikes(base_model, data, forget_set(load_meta(data), forget), base.eval.lookalikes, cache_root())
    before, _ = cached_evaluation(base_model, data, fs, base.eval, cache_root())
    sample_before = None
    if space.reports > 1 and not any(name.startswith("eval.") for name in space.parameters):
        # the starting model on the earlier rungs' sample, scored once here, not in every trial
        sample_before = Probe(ProbeSpec(str(data), fs, base.eval, str(base_model), before, [])).start_scores()
    # ASHA's trials evaluate at its rungs only (unless the steps themselves are searched)
    steps = base.unlearn.steps if scheduler == "asha" and "unlearn.steps" not in space.parameters else None
    points = space.grid_points() if space.search == "grid" else [{}]
    warm_stats([(base.updated(overrides(pt)), fs) for pt in points], base_model, data, out, cache_root())
    study = Study(name=space.name, base=str(out / "base.yaml"), model=str(base_model), data=str(data), forget=fs,
                  out=str(out), cache=str(cache_root()), reports=space.reports,
                  parent_run_id=_study_run(base, space, out, identity), sample_before=sample_before,
                  # promotion ASHA: a grid of one-worker trials (they keep and resume their rung
                  # states in process); Ray's ASHA otherwise
                  promote=bool(steps) and space.search == "grid" and base.train.workers == 1,
                  probe_at=asha_rungs(space, steps) if steps else None)
    return base, study, steps


def _finish(base: Config, space: SearchSpace, out: Path, rows: list[dict[str, Any]], parent: str) -> dict[str, Any]:
    """The outputs, best.yaml, the parent run's metrics and artifacts; trials a scheduler
    stopped ended with their actor: their runs close as killed."""
    for rungs in out.glob("trials/*/rungs"):  # the states of points the study stopped for good
        shutil.rmtree(rungs, ignore_errors=True)
    paths = write_outputs(out, space, rows)
    done = [r for r in rows if r.get("objective") is not None and r["status"] == "finished"]
    client = MlflowClient(tracking_uri(base.mlflow))
    best = max(done, key=lambda r: r["objective"]) if done else None
    if best is not None:
        load_config(out / "base.yaml", overrides({k: best[k] for k in space.parameters})).save(out / "best.yaml")
        paths.append(out / "best.yaml")
        for k in ("objective", "forgetting", "preservation", *KEYS):
            if best.get(k) is not None:
                client.log_metric(parent, f"best/{k}", best[k])
    trial_seconds = sum(r["seconds"] or 0.0 for r in rows)
    client.log_metric(parent, "trial_seconds", trial_seconds)
    for path in paths + [out / "base.yaml", out / "space.yaml"]:
        client.log_artifact(parent, str(path), artifact_path="study")
    for run in client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent)
    return {"best": best, "trial_seconds": trial_seconds}


def run_study(cfg: Config, space: SearchSpace, model: str, data: str | Path, forget: str, out: str | Path,
              scheduler: str | None = None) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns the best trial's row, the rows, the
    total trial-seconds and the wall time."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data).resolve()
    load_meta(data).entity_ids(forget)
    scheduler = scheduler or space.scheduler
    wall = time.perf_counter()
    base, study, steps = _study(cfg, space, model, data, forget, out, scheduler)
    tuner, resumed = make_tuner(space, study, out / "study", scheduler, steps)
    if resumed:
        print(f"resuming the study in {out / 'study'}", flush=True)
    grid = tuner.fit()
    rows = trial_rows(space, grid, out, len(study.probe_at) if study.probe_at else space.reports)
    figures = _finish(base, space, out, rows, study.parent_run_id)
    return {**figures, "rows": rows, "wall_seconds": time.perf_counter() - wall, "parent_run_id": study.parent_run_id}


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
