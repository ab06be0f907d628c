"""Search spaces load and validate with errors that name the field; the study objective."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from vkd.config import ConfigError
from vkd.study import load_space, objective


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads(path):
    space = load_space(path)
    assert space.parameters and space.name == path.stem


def test_the_thresholds_grid_has_twelve_trials():
    space = load_space(ROOT / "tune_spaces" / "thresholds_grid.yaml")
    assert space.grid_size() == 12 and len(space.grid_points()) == 12
    assert {"unlearn.vkd.d_i", "unlearn.vkd.d_f"} == set(space.parameters)


@pytest.mark.parametrize("body, message", [
    ("parameters: {unlearn.betta: {grid: [1.0]}}", "unknown field unlearn.betta"),
    ("parameters: {unlearn.vkd.beta: {grid: [high]}}", "unlearn.vkd.beta: expected a number"),
    ("parameters: {unlearn.vkd.beta: {normal: [0, 1]}}", "parameters.unlearn.vkd.beta: give exactly one of"),
    ("search: random\nparameters: {unlearn.lr: {uniform: [2.0e-3, 1.0e-3]}}", "low < high"),
    ("search: optuna\nparameters: {unlearn.vkd.d_f: {grid: [0.1]}}", "use choice"),
    ("scheduler: hyperband\nparameters: {unlearn.vkd.beta: {grid: [1.0]}}", "scheduler: 'hyperband'"),
    ("trials: 0\nparameters: {unlearn.vkd.beta: {grid: [1.0]}}", "trials: must be a positive integer"),
    ("sampler: tpe\nparameters: {unlearn.vkd.beta: {grid: [1.0]}}", "unknown field sampler"),
    ("parameters: {unlearn.vkd.beta: {grid: [1.0]}}\nfixed: {unlearn.steps: many}", "fixed.unlearn.steps"),
])
def test_a_bad_space_names_the_field(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_space(path)
    with pytest.raises(ConfigError, match="not found"):
        load_space(Path(tmp_path / "missing.yaml"))


def test_the_objective_rewards_forgetting_and_keeping():
    before = {"forget_vqa": 0.85, "test_vqa": 0.85, "forget_qa": 0.9, "retain_vqa": 0.9, "retain_qa": 0.9}
    assert objective(before, before)["objective"] == pytest.approx(0.5)
    ideal = {**before, "forget_vqa": 0.25, "test_vqa": 0.25}
    assert objective(before, ideal)["objective"] == pytest.approx(1.0)
    below = {**before, "forget_vqa": 0.05, "test_vqa": 0.1}
    assert objective(before, below)["objective"] == pytest.approx(1.0)  # no extra credit below chance
    damaged = {**ideal, "retain_vqa": 0.45}
    assert objective(before, damaged)["preservation"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_the_pareto_front_keeps_only_undominated_trials():
    from vkd.study import pareto_front

    points = [(0.9, 0.5), (0.5, 0.9), (0.4, 0.4), (0.9, 0.6), (0.5, 0.9)]
    assert pareto_front(points) == [1, 3, 4]


def test_a_study_leaves_its_table_and_plots(tmp_path):
    import csv

    from vkd.study_plots import write_outputs

    space = load_space(ROOT / "tune_spaces" / "thresholds_grid.yaml")
    rows = []
    for i, (d_i, d_f) in enumerate((a, b) for a in (0.0, 0.02) for b in (0.1, 0.3)):
        f, p = 0.2 + 0.3 * d_f + 5 * d_i, 1.0 - d_f / 2
        rows.append({"trial": f"t{i}", "status": "finished", "unlearn.vkd.d_i": d_i, "unlearn.vkd.d_f": d_f,
                     "objective": (f + p) / 2, "forgetting": f, "preservation": p, "forget_vqa": 0.8 - f / 2,
                     "test_vqa": 0.8, "forget_qa": 0.9, "retain_vqa": 0.9 * p, "retain_qa": 0.9, "reports": 2,
                     "seconds": 10.0})
    rows.append({"trial": "t9", "status": "stopped early", "unlearn.vkd.d_i": 0.0007, "unlearn.vkd.d_f": 0.5,
                 "reports": 1})
    paths = write_outputs(tmp_path, space, rows)
    assert {p.name for p in paths} == {"trials.csv", "trials.md", "sensitivity.png", "heatmaps.png", "pareto.png"}
    table = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["trial"] for r in table][:4] == [r["trial"] for r in sorted(rows[:4], key=lambda r: -r["objective"])]
    assert table[-1]["status"] == "stopped early" and table[-1]["objective"] == ""
    md = (tmp_path / "trials.md").read_text()
    assert "| t9 | stopped early | 0.0007 | 0.5 |" in md  # parameters as given, not rounded to 0.001
    assert all((tmp_path / n).stat().st_size > 5000 for n in ("sensitivity.png", "heatmaps.png", "pareto.png"))
