"""The `vkd` console command dispatches to the stages and rejects what it does not know."""
from __future__ import annotations

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
