"""One tune trial, in its Tune actor: an unlearning run whose in-run evaluations go to Tune
and to the point's MLflow run, its result written down so that a resumed study never
trains it again."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.train import Rungs
from pipelines.unlearn import TrialHooks, UnlearnOptions, run_unlearn
from vkd.config import load_config, override
from vkd.data.layout import ForgetSet
from vkd.study_asha import RESUME, point_of, report_steps, trial_key


@dataclass
class Study:
    """What every trial of a study shares, as the trials get it."""
    name: str
    base: str                      # DIR/base.yaml: the run config every trial starts from
    model: str
    data: str
    forget: ForgetSet
    out: str                       # the study folder
    cache: str
    reports: int
    parent_run_id: str
    promote: bool = False          # promotion ASHA: trials save and resume rung states
    probe_at: list[int] | None = None   # the evaluation steps (None: ``reports`` evenly spaced over the trial's steps)
    sample_before: dict[str, float] | None = None

    def trial_folder(self, key: str) -> Path:
        return Path(self.out) / "trials" / key


def overrides(params: dict[str, Any]) -> list[str]:
    return [override(k, v) for k, v in sorted(params.items())]


def run_trial(config: dict[str, Any], study: Study) -> None:
    """One trial. A finished one (its result.json exists) reports its saved result and trains
    nothing. Under promotion ASHA a trial is one segment of its point's run: it saves the
    training state at each rung and goes on from ``config[RESUME]``'s, in the point's MLflow
    run. A study counts Tune's seconds of each trial (``time_total_s``: from the start of
    this function, for trials that finish as for trials a scheduler stops)."""
    # a reused actor waits this long for a stopped trial to unwind before it takes the next
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "10")
    params, resume = point_of(config), int(config.get(RESUME, 0))
    key = trial_key(params)
    folder = study.trial_folder(key)
    cfg = load_config(study.base, overrides(params))
    if (folder / "result.json").is_file():
        saved = json.loads((folder / "result.json").read_text())
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
    probe_at = study.probe_at or report_steps(cfg.unlearn.steps, study.reports)
    hooks = TrialHooks(probe_at=probe_at, sample_before=study.sample_before, local=local, report_to_tune=local,
                       callbacks=[] if local else [TuneReportCallback()])
    if study.promote:
        hooks.rungs = Rungs(str(folder / "rungs"), save_at=probe_at[:-1], resume=resume)
        hooks.run_id = trial_run(study, key) if resume else None
    r = run_unlearn(UnlearnOptions(
        cfg=cfg, model=Path(study.model), data=Path(study.data), forget=study.forget, out=folder / "model",
        cache=Path(study.cache), register=False, keep_model=False, run_name=f"{study.name}-{key}", trial=hooks,
        tags={"mlflow.parentRunId": study.parent_run_id, "study": study.name, "trial": key}))
    metrics = {**r.objective, **{f"eval/{k}": v for k, v in r.after.items()}}
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps({"params": params, "metrics": metrics, "seconds": time.perf_counter() - start,
                               "reports": study.reports, "run_id": r.run_id}, indent=1, sort_keys=True))
    tmp.rename(folder / "result.json")
    shutil.rmtree(folder / "rungs", ignore_errors=True)
    if local:  # the last result, reported once written down (see run_training)
        tune.report({**metrics, "step": cfg.unlearn.steps})


def trial_run(study: Study, key: str) -> str | None:
    """The MLflow run a point's earlier segments ran in."""
    cfg = load_config(study.base)
    client = MlflowClient(cfg.mlflow.uri)
    exp = client.get_run(study.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{study.parent_run_id}' "
                                                   f"and tags.trial = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None
