"""A checkpoint folder of llava-1.5's exact shape (CLIP at 336 px, patch 14, 576 image tokens,
vision_feature_layer -2, the llava-1.5 chat template; tiny widths, random weights), the way
a user brings one: `vkd unlearn` with no size override fits the sequence length from the
model and the data, keeps the LLM bit-identical and never touches the layer the LLM does not
see; a user error, in the driver or in a worker, is one line and exit status 2."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, SMALL_MODEL
from vkd.data.items import benchmark_texts
from vkd.data.layout import TRAIN_SPLIT, load_meta, shard_paths
from vkd.model import ModelAdapter, build_tiny

LLAVA15 = dataclasses.replace(SMALL_MODEL, vision_layers=3, vision_hidden=32, vision_intermediate=64, vision_heads=2,
                              patch_size=14, feature_layer=-2, chat_template="llava-1.5", max_positions=1024)
RUN = ["unlearn.steps=3", "unlearn.batch_size=2", "unlearn.retain_rows=6", "unlearn.vkd.stat_batches=1",
       "unlearn.vkd.vision_layers=1", "train.workers=1", "eval.retain_entities=1", "eval.generation=false",
       "eval.max_rows=1", "eval.max_gen=1", "eval.references=2", "eval.retain_test_entities=1", "eval.lookalikes=1"]


@pytest.fixture(scope="module")
def llava15(small_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava15") / "model"
    build_tiny(LLAVA15, benchmark_texts(small_data), 336).save(folder)
    return folder


def _unlearn(model, data, out, cwd, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VKD_CACHE": str(cwd / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.unlearn", "--model", str(model), "--data", str(data),
                           "--forget", "forget_10", "--method", "vkd", "--out", str(out), *RUN, *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_llava15_shaped_checkpoint_unlearns_without_a_size_override(llava15, small_data, tmp_path):
    done = _unlearn(llava15, small_data, tmp_path / "out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    base, after = ModelAdapter.load(llava15), ModelAdapter.load(tmp_path / "out")
    b, a = dict(base.model.named_parameters()), dict(after.model.named_parameters())
    for name, _ in after.param_groups()["llm"]:
        assert torch.equal(a[name], b[name]), f"LLM weight {name} changed"
    unseen = base.unseen_visual()
    assert any(n.startswith(base.family.vision_layers + "2.") for n in unseen), "the last layer feeds nothing"
    for name in unseen:
        assert torch.equal(a[name], b[name]), f"{name}, which the LLM never sees, changed"
    changed = [n for n, _ in after.param_groups()["vision"] if not torch.equal(a[n], b[n])]
    assert changed and all(n.startswith(base.family.vision_layers + "1.") for n in changed), changed
    pruning = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert pruning and not any(".layers.2." in m or ".layers.0." in m for m in pruning)
    saved = (tmp_path / "out" / "vkd_config.yaml").read_text()
    assert "max_length: 0" in saved  # the request as given; the trainer fitted it: 576 image tokens and the text
    fitted = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
                  if line.startswith("| max_length |"))
    assert 576 < int(fitted.split("|")[2]) < 700, fitted


@pytest.mark.slow
def test_a_sequence_that_does_not_fit_is_one_line_before_any_worker(llava15, small_data, tmp_path):
    done = _unlearn(llava15, small_data, tmp_path / "out", tmp_path, "train.max_length=128")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.max_length=128 is shorter than a prompt" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def _truncated(png: bytes) -> bytes:
    """A PNG whose header reads (so its size is known) and whose pixels do not."""
    from PIL import Image

    Image.open(io.BytesIO(png)).size  # the header is whole
    return png[: len(png) // 2]


@pytest.mark.slow
def test_a_corrupt_picture_met_in_a_worker_is_one_line(llava15, small_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    victim = load_meta(data).entity_ids("forget_10")[0]
    shard = shard_paths(data, TRAIN_SPLIT)[0]
    rows = pq.read_table(shard).to_pylist()
    for row in rows:
        if row["ID"] == victim and row["image"] is not None:
            row["image"] = {"bytes": _truncated(row["image"]["bytes"])}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    done = _unlearn(llava15, data, tmp_path / "out", tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt image bytes" in errors[0] and "ft_Data" in errors[0], done.stderr[-3000:]
    assert "raised in a worker; traceback in" in errors[0]
