"""The `vkd` console command dispatches to the stages and rejects what it does not know."""
from __future__ import annotations

import os
import subprocess
import sys

from pipelines.cli import STAGES
from tests.conftest import ROOT


def _vkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_stage_and_unknown_stages_fail():
    done = _vkd("--help")
    assert done.returncode == 0 and all(stage in done.stdout for stage in STAGES)
    bad = _vkd("unlearnify")
    assert bad.returncode == 2 and "unknown stage 'unlearnify'" in bad.stderr


def test_a_stage_takes_config_flags_and_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("benchmark:\n  entities: 9\n  train_images: 1\n  test_images: 1\n  mc_variants: 1\n")
    done = _vkd("prepare", "synthetic", "--config", str(config), "--out", str(tmp_path / "d"), "--seed", "3",
                "benchmark.image_size=16", "benchmark.render_scale=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "9 entities" in done.stdout
    unknown = _vkd("prepare", "synthetic", "--out", str(tmp_path / "e"), "--bogus")
    assert unknown.returncode == 2 and "unrecognized arguments: --bogus" in unknown.stderr


def test_each_config_records_to_its_own_store_in_one_process(tmp_path, monkeypatch):
    """MLflow exports the URI it is given; a second config in the same process (a benchmark,
    a test, a batch) must still record to its own store, and child processes inherit nothing."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id
    from vkd.config import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = (TrackingConfig(sqlite_file=str(tmp_path / f"{n}.db"), artifact_dir=str(tmp_path / n),
                                    experiment=f"exp-{n}") for n in ("one", "two"))
    experiment_id(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    experiment_id(second)
    assert MlflowClient(f"sqlite:///{tmp_path / 'two.db'}").get_experiment_by_name("exp-two") is not None
    assert MlflowClient(f"sqlite:///{tmp_path / 'one.db'}").get_experiment_by_name("exp-two") is None
