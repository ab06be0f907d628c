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
from vkd.config import load_config
from vkd.model import ModelAdapter, build_tiny
from vkd.saliency import neuron_modules
from vkd.train import trainable_names

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
def test_a_llava15_shaped_checkpoint_unlearns_without_a_size_override(llava15, small_data, tmp_path, ray_local,
                                                                      monkeypatch):
    """VKD end to end on 2 DeepSpeed workers, no size override: the sequence length fitted from
    the model and the data; the LLM bit-identical; the last vision layer (after the feature
    layer: the LLM never sees it) neither trained nor pruned, the layer below the trained one
    frozen; pruned neurons stay zero; updates confined to the Fisher mask; before/after
    metrics, report and a registered model."""
    from pipelines.unlearn import options, run_unlearn

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [o for o in RUN if o != "train.workers=1"] + [
        "train.workers=2", "unlearn.lr=5e-3", "unlearn.vkd.d_i=0.05", "unlearn.vkd.d_f=0.2",
        f"mlflow.sqlite_file={tmp_path / 'mlflow.db'}", f"mlflow.artifact_dir={tmp_path / 'mlruns'}"])
    out = tmp_path / "out"
    figures = run_unlearn(options(cfg, str(llava15), small_data, "forget_10", out))

    base, after_adapter = ModelAdapter.load(llava15), ModelAdapter.load(out)
    b, a = dict(base.model.named_parameters()), dict(after_adapter.model.named_parameters())
    for name, _ in after_adapter.param_groups()["llm"]:
        assert torch.equal(a[name], b[name]), f"LLM weight {name} changed"
    unseen = base.unseen_visual()
    assert any(n.startswith(base.family.vision_layers + "2.") for n in unseen), "the last layer feeds nothing"
    for name in unseen:
        assert torch.equal(a[name], b[name]), f"{name}, which the LLM never sees, changed"
    changed = [n for n, _ in after_adapter.param_groups()["vision"] if not torch.equal(a[n], b[n])]
    assert changed and all(n.startswith(base.family.vision_layers + "1.") for n in changed), changed

    pruning = json.loads((out / "pruning.json").read_text())
    assert 0 < sum(len(v) for v in pruning.values())
    assert not any(".layers.2." in m or ".layers.0." in m for m in pruning)
    modules = neuron_modules(after_adapter)
    for module, neurons in pruning.items():
        assert torch.all(modules[module].weight[:, neurons] == 0), f"a pruned neuron of {module} came back"
        assert not torch.all(b[f"{module}.weight"][:, neurons] == 0)
    trainable = trainable_names(after_adapter, "visual", 1)
    moved = sum(int((a[n] != b[n]).sum()) for n in trainable)
    total = sum(a[n].numel() for n in trainable)
    zeroed = sum(len(v) * modules[m].weight.shape[0] for m, v in pruning.items())
    assert 0 < moved <= 0.2 * total + zeroed + 1, (moved, total, zeroed)

    assert set(figures.before) == set(figures.after) >= {"forget_vqa", "retain_vqa", "forget_qa"}
    assert figures.after["forget_qa"] == figures.before["forget_qa"]  # text path untouched
    assert (out / "report.md").is_file() and (out / "report.png").stat().st_size > 1000
    assert figures.version == 1 and figures.registered_name.endswith("-unlearned")
    assert "max_length: 0" in (out / "vkd_config.yaml").read_text()  # the request as given; the trainer fitted it
    fitted = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| max_length |"))
    assert 576 < int(fitted.split("|")[2]) < 700, fitted  # 576 image tokens and the text


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
def test_a_corrupt_picture_met_in_a_worker_is_one_line(tiny_path, small_data, tmp_path):
    """Met by a Ray Data task feeding a Ray Train worker (gradient ascent: the first training
    batch reads it; any model shows it, the tiny one is the cheapest)."""
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
    done = _unlearn(tiny_path, data, tmp_path / "out", tmp_path, "--method", "ga")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    seen = f"error lines: {errors}\nstderr head:\n{done.stderr[:2000]}\nstderr tail:\n{done.stderr[-2000:]}"
    assert len(errors) == 1 and "corrupt image bytes" in errors[0] and "ft_Data" in errors[0], seen
    assert "raised in a worker; traceback in" in errors[0], seen
