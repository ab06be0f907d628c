"""`vkd tune`: a real Ray Tune study of real unlearning runs, killed mid-way and resumed."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, SMALL_MODEL
from vkd.config import load_config
from vkd.study_asha import point_of, trial_key


def _study(tmp_path, small_data, tiny_path, steps: int = 4, **space_fields):
    """A tiny run config and grid space in ``tmp_path`` (``space_fields`` replace the space's);
    returns the `vkd tune` command, its environment and its output folder."""
    config = {
        "model": dataclasses.asdict(SMALL_MODEL),
        "train": {"max_length": 96},
        # gradient difference: no statistics pass, a cheap real unlearning run (the study code is method-blind)
        "unlearn": {"method": "gd", "steps": steps, "lr": 5e-3, "batch_size": 4, "retain_rows": 12},
        "eval": {"retain_entities": 2, "generation": False, "max_rows": 2, "references": 3, "actors": 1},
        "mlflow": {"sqlite_file": str(tmp_path / "mlflow.db"), "artifact_dir": str(tmp_path / "mlruns")},
        "ray": {"num_cpus": 4},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    space = {"name": "tiny_grid", "search": "grid", "scheduler": "fifo", "concurrency": 1, "reports": 2,
             "resources": {"workers": 1, "cpus_per_worker": 1}, "fixed": {"unlearn.method": "gd"},
             "parameters": {"unlearn.lr": {"grid": [1.0e-3, 5.0e-3]}}, **space_fields}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "pipelines.tune", "--config", str(tmp_path / "run.yaml"), "--space",
           str(tmp_path / "space.yaml"), "--model", str(tiny_path), "--data", str(small_data), "--forget", "forget_10",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VKD_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return cmd, env, out


@pytest.mark.slow
def test_a_killed_study_resumes_without_rerunning_finished_trials(small_data, tiny_path, tmp_path):
    # three points one at a time; the study is killed as soon as the first finishes. A trial on
    # a reused actor takes about a second here, so the later two are almost always unfinished
    # then, but no assertion below depends on how many were
    lrs = [1.0e-3, 5.0e-3, 2.0e-2]
    cmd, env, out = _study(tmp_path, small_data, tiny_path, parameters={"unlearn.lr": {"grid": lrs}})
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 420
    while time.time() < deadline and first.poll() is None and not list(out.glob("trials/*/result.json")):
        time.sleep(0.1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    assert list(out.glob("trials/*/result.json")), "no trial finished in time"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and every Ray process it started
    first.wait()
    finished_first = {p.parent.name for p in out.glob("trials/*/result.json")}

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = sorted(p for p in (out / "trials").iterdir() if p.is_dir())
    assert len(trials) == 3 and all((t / "result.json").is_file() for t in trials)
    for t in trials:
        attempts = (t / "attempts.log").read_text().splitlines()
        if t.name in finished_first:
            assert len(attempts) == 1, f"finished trial {t.name} was trained again"
        assert not list(t.glob("model/*.safetensors")), "trial weights are not kept"

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"finished"}
    assert {float(r["unlearn.lr"]) for r in rows} == set(lrs)
    for r in rows:
        assert 0.0 <= float(r["objective"]) <= 1.0
    for name in ("trials.md", "sensitivity.png", "pareto.png", "best.yaml", "base.yaml"):
        assert (out / name).is_file(), name
    best = load_config(out / "best.yaml")
    top = max(rows, key=lambda r: float(r["objective"]))
    assert best.unlearn.lr == float(top["unlearn.lr"]) and best.train.workers == 1
    assert "best trial" in again.stdout and "reproduce: vkd unlearn --config" in again.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    done = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.data.tags["trial"] for c in done) == [t.name for t in trials]  # each trial once
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert client.get_run(parent).info.status == "FINISHED"
    assert "best/objective" in client.get_run(parent).data.metrics
    arts = {a.path for a in client.list_artifacts(parent, "study")}
    assert {"study/best.yaml", "study/trials.csv", "study/pareto.png"} <= arts
    assert any(k.startswith("eval/") for k in done[0].data.metrics), "trials log their in-run evaluations"
    # every trial logged both of its evaluations (steps 2 and 4) in its run, and a trial trained
    # in the second run gave Tune both as they came, each with the objective (what ASHA decides
    # on); one that had finished gave Tune its saved result alone
    for c in done:
        assert {2, 4} <= {m.step for m in client.get_metric_history(c.info.run_id, "objective")}, c.data.tags["trial"]
    for folder in (out / "study").glob("*/"):
        if not (folder / "result.json").is_file():
            continue
        reports = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        key = trial_key(point_of(json.loads((folder / "params.json").read_text())))
        expected = [4] if key in finished_first else [2, 4]
        assert [r["step"] for r in reports][-len(expected):] == expected, (key, reports)
        assert all("objective" in r for r in reports)


def test_asha_trials_evaluate_at_the_rungs_ray_decides_on_and_at_their_last_step():
    from ray.tune.schedulers.async_hyperband import _Bracket

    from vkd.study_asha import asha_rungs
    from vkd.study import SearchSpace

    for steps, reports, grace, rf in ((200, 9, 1, 3), (200, 8, 1, 4), (200, 16, 1, 4), (60, 4, 1, 2), (200, 9, 3, 3)):
        space = SearchSpace(name="s", parameters={"unlearn.d_f": {"grid": [0.1]}}, scheduler="asha", reports=reports,
                            asha={"grace_period": grace, "reduction_factor": rf})
        at = asha_rungs(space, steps)
        milestones = sorted(m for m, _ in _Bracket(at[0], steps, rf, 0)._rungs)
        assert at[-1] == steps and at[0] == grace * (steps // reports)
        # every rung but one the last step reaches within its last report's steps is evaluated, nothing else
        assert at[:-1] == [m for m in milestones if m <= steps - steps // reports], (steps, reports, at, milestones)



def test_promotion_asha_goes_on_with_the_best_of_each_rung_and_always_finishes_a_point(tmp_path):
    """Ladder promotes as ASHA does (Li et al. 2020, Algorithm 2): past a rung go the best
    len(rung) // rf recorded there. Every point reaches the first rung before any goes past
    it; then a free slot takes a promotion, highest rung first; a study ends with at least
    one point at the last step."""
    from ray.tune.search import Searcher

    from vkd.study_asha import RESUME, Ladder, trial_key

    assert Ladder.FINISHED == Searcher.FINISHED  # what Tune's searcher adapter passes on

    x = [trial_key({"x": i}) for i in range(6)]

    def done(ladder, trial, step):
        ladder.on_trial_complete(trial, {"step": step})

    ladder = Ladder([{"x": i} for i in range(6)], rungs=[10, 30], steps=90, rf=3, concurrency=2)
    assert ladder.suggest("t0") == {"x": 0, RESUME: 0} and ladder.suggest("t1") == {"x": 1, RESUME: 0}
    assert ladder.suggest("t2") is None, "two trials at once at most"
    # while new points wait, every trial stops at the first rung, the best of those there too
    for i, (trial, value) in enumerate((("t0", 0.5), ("t1", 0.4), ("t2", 0.3), ("t3", 0.9))):
        assert ladder.record(x[i], 10, value) is False
        done(ladder, trial, 10)
        assert ladder.suggest(f"t{i + 2}") == {"x": i + 2, RESUME: 0}
    assert ladder.record(x[4], 10, 0.1) is False, "not the best of five"
    done(ladder, "t4", 10)
    # nothing new is left: the best of five goes on from its rung
    assert ladder.suggest("t6") == {"x": 3, RESUME: 10}
    assert ladder.record(x[5], 10, 0.8) is True, "second of six: the best two go on, this one at once"
    assert ladder.record(x[5], 10, 0.0) is True, "a trial rerun after an interrupted study passes again"
    assert ladder.record(x[5], 30, 0.2) is False, "the first at the second rung has no one to beat"
    done(ladder, "t5", 30)
    assert ladder.suggest("t7") is None, "nothing to promote while x=3 runs"
    assert ladder.record(x[3], 30, 0.7) is False
    done(ladder, "t6", 30)

    saved = tmp_path / "ladder.json"
    ladder.save(str(saved))
    again = Ladder([{"x": i} for i in range(6)], rungs=[10, 30], steps=90, rf=3, concurrency=2)
    again.restore(str(saved))
    for lad in (ladder, again):  # the restored one decides alike
        # two at the second rung and none among the best third: nothing else can run, so the
        # best of them goes on
        assert lad.suggest("t7") == {"x": 3, RESUME: 30}
        assert lad.suggest("t8") is None
        done(lad, "t7", 90)
        assert lad.suggest("t8") == Searcher.FINISHED

    few = Ladder([{"x": i} for i in range(3)], rungs=[10], steps=90, rf=4, concurrency=3)
    for i in range(3):
        assert few.suggest(f"t{i}") == {"x": i, RESUME: 0}
    for i, value in enumerate((0.2, 0.7, 0.4)):
        assert few.record(x[i], 10, value) is False
        done(few, f"t{i}", 10)
    assert few.suggest("t3") == {"x": 1, RESUME: 10}
    assert few.suggest("t4") is None
    done(few, "t3", 90)
    assert few.suggest("t4") == Searcher.FINISHED


@pytest.mark.slow
def test_a_promotion_asha_study_resumes_stopped_points_from_their_rungs(small_data, tiny_path, tmp_path):
    """A real grid study under promotion ASHA, one trial at a time: points stop at rungs,
    promoted ones go on from their saved state in the same MLflow run, and the study
    finishes at least one point and cleans the rung states up."""
    # 8 steps: rungs at steps 2 and 4, the last at 8. One at a time, the first three points
    # stop at step 2 while a point waits, and the best two of four there include one of them:
    # a resume whatever the objectives (two at a time, two late points may beat both early ones)
    cmd, env, out = _study(tmp_path, small_data, tiny_path, steps=8, scheduler="asha", concurrency=1, reports=4,
                           asha={"grace_period": 1, "reduction_factor": 2},
                           parameters={"unlearn.lr": {"grid": [1.0e-4, 1.0e-3, 5.0e-3, 2.0e-2]}})
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"finished", "stopped early"}
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(r["objective"] for r in finished)
    assert all(r["objective"] == "" and r["last_rung"].startswith("step ") for r in rows if r not in finished)
    starts = {}
    for folder in (out / "trials").iterdir():
        starts[folder.name] = [int(line.rsplit(" ", 1)[1]) for line in (folder / "attempts.log").read_text().splitlines()]
        assert starts[folder.name][0] == 0 and starts[folder.name] == sorted(set(starts[folder.name]))
        assert set(starts[folder.name]) <= {0, 2, 4}, "a point goes on from a rung"
        assert not (folder / "rungs").exists(), "rung states are removed at the end"
    resumed = [k for k, s in starts.items() if len(s) > 1]
    assert resumed, starts

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.data.tags["trial"] for c in children) == sorted(starts), "one MLflow run per point"
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "objective")]
        finished_here = c.data.tags["trial"] in {r["trial"] for r in finished}
        assert c.info.status == ("FINISHED" if finished_here else "KILLED")
        if c.data.tags["trial"] in resumed and finished_here:
            assert {2, 4, 8} <= set(steps), "a resumed point's evaluations all land in its one run"
