"""The trainer: 2-worker DeepSpeed on Ray Train lowers the loss, resumes after a worker dies,
and a stage never overwrites a model folder or registered version. MLflow: the SQLite default
and a real `mlflow server` on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.runtime import free_port
from pipelines.train import Rungs, TrainJob, run_training, train_dataset, train_datasets
from tests.conftest import ROOT, SMALL_MODEL
from tests.faults import DieOnce
from vkd.cache import DIGEST_CHARS
from vkd.config import TrainConfig
from vkd.data import layout
from vkd.data.items import expand_train_row
from vkd.data.layout import TRAIN_SPLIT, read_rows
from vkd.data.streams import RowPlan
from vkd.methods import FineTune, FineTuneConfig
from vkd.model import ModelAdapter
from vkd.train import Tokenize, items_drawn, lm_loss, model_inputs

SMALL_TRAIN = TrainConfig(workers=2, cpus_per_worker=1, zero_stage=2, batch_size=8, lr=3e-3, warmup_steps=5,
                          max_steps=30, checkpoint_every=10, log_every=5, max_length=96, align_steps=5)
MODEL_OVERRIDES = [f"model.{k}={v}" for k, v in dataclasses.asdict(SMALL_MODEL).items()]


def _mean_loss(path: Path, data: Path) -> float:
    adapter = ModelAdapter.load(path)
    items = [it for r in read_rows(data, TRAIN_SPLIT) for it in expand_train_row(r)][::7][:48]
    batch = {k: torch.from_numpy(v) for k, v in Tokenize(adapter, 96)(items).items()}
    with torch.no_grad():
        return float(lm_loss(adapter.model, model_inputs(batch))[0])


def _train(small_data, tiny_path, out: Path, **job_fields):
    cfg = job_fields.pop("cfg", SMALL_TRAIN)
    job = TrainJob(model_path=str(tiny_path), out_dir=str(out), cfg=cfg, total_steps=cfg.max_steps,
                   method=FineTune(FineTuneConfig(trainable=cfg.trainable)), **job_fields)
    return run_training(job, train_datasets(small_data, str(tiny_path), cfg), storage=out.parent / "ray")


@pytest.mark.slow
def test_the_embedded_ray_tells_its_processes_its_own_address(ray_local):
    """Ray Train's placement-group cleaner asks the cluster at RAY_ADDRESS (else the last
    `ray start` in /tmp/ray) whether the controller lives: the embedded Ray must name itself."""
    seen = ray_local.get(ray_local.remote(lambda: os.environ.get("RAY_ADDRESS")).remote())
    assert seen == ray_local.get_runtime_context().gcs_address
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # borrowed for the start only


def test_a_single_worker_runs_zero_stage_0_and_several_keep_theirs():
    from vkd.train import engine_config

    assert engine_config(SMALL_TRAIN, 1).zero_stage == 0 and SMALL_TRAIN.zero_stage == 2
    assert engine_config(SMALL_TRAIN, 2).zero_stage == 2
    assert engine_config(dataclasses.replace(SMALL_TRAIN, zero_stage=3), 1).zero_stage == 3


def test_streams_read_ahead_keep_their_order_start_side_by_side_and_pass_errors_on():
    from vkd.data.streams import Ahead

    def slow(tag: str, n: int, fail: bool = False):
        time.sleep(0.5)  # a stream's start
        for i in range(n):
            yield (tag, i)
        if fail:
            raise OSError(f"shard of {tag} unreadable")

    t0 = time.perf_counter()
    a, b = Ahead(slow("a", 5)), Ahead(slow("b", 3, fail=True))
    assert next(a) == ("a", 0) and next(b) == ("b", 0)
    assert time.perf_counter() - t0 < 0.9  # both started at once, not 0.5 s after each other
    assert list(a) == [("a", i) for i in range(1, 5)]
    assert [next(b), next(b)] == [("b", 1), ("b", 2)]
    try:
        next(b)
        raise AssertionError("the producer's error was lost")
    except OSError as error:
        assert "shard of b" in str(error)

    def endless():
        i = 0
        while True:
            i += 1
            yield i

    c = Ahead(endless(), depth=2)
    assert next(c) == 1
    c.close()
    c._thread.join(timeout=3)
    assert not c._thread.is_alive()  # closing stops a producer of an endless stream


@pytest.mark.slow
def test_a_small_stream_read_in_the_driver_holds_what_the_streamed_read_holds(small_data, tiny_path, ray_local,
                                                                              monkeypatch):
    from vkd.data.layout import load_meta

    meta = load_meta(small_data)
    plan = RowPlan(ids=frozenset(meta.entity_ids("forget_10")), image_only=True, seed=3)

    def content(ds) -> list[tuple]:
        rows = ds.take_all()
        return sorted((tuple(r["input_ids"].tolist()), tuple(r["labels"].tolist())) for r in rows)

    inline = train_dataset(small_data, str(tiny_path), SMALL_TRAIN, plan)
    monkeypatch.setattr(layout, "INLINE_BYTES", 0)
    streamed = train_dataset(small_data, str(tiny_path), SMALL_TRAIN, plan)
    assert "RandomShuffle" not in str(inline) and "RandomShuffle" in str(streamed)
    got = content(inline)
    assert got and got == content(streamed)
    assert train_dataset(small_data, str(tiny_path), SMALL_TRAIN, plan, items=7).count() == 7


@pytest.mark.slow
def test_a_stream_that_stops_at_what_its_run_draws_comes_shuffled_as_sequences(small_data, tiny_path, ray_local):
    """An unlearning's stream (``items``) holds exactly ``items`` sequences, pass after pass
    (each pass every sequence once, in a new order), so its consumer needs no shuffle buffer."""
    from vkd.data.layout import TRAIN_SPLIT, load_meta, read_rows

    meta = load_meta(small_data)
    plan = RowPlan(ids=frozenset(meta.entity_ids("forget_10")), image_only=True, seed=3)
    one_pass = [s for r in read_rows(small_data, TRAIN_SPLIT, plan.ids) if plan.keep(r) for s in plan.sequences(r)]
    n = len(one_pass)
    assert n > 8
    ds = train_dataset(small_data, str(tiny_path), SMALL_TRAIN, plan, items=2 * n + 5)
    assert "FlatMap" not in str(ds) and "RandomShuffle" not in str(ds)
    rows = ds.take_all()
    assert len(rows) == 2 * n + 5
    seqs = [(tuple(r["input_ids"].tolist()), tuple(r["labels"].tolist())) for r in rows]
    first, second = seqs[:n], seqs[n:2 * n]
    assert sorted(first) == sorted(second) and len(set(first)) == len(set(map(tuple, first)))
    assert first != second  # each pass in its own order
    plain = sorted((tuple(r["input_ids"].tolist()), tuple(r["labels"].tolist()))
                   for r in train_dataset(small_data, str(tiny_path), SMALL_TRAIN, plan).take_all())
    assert sorted(first) == plain
    # the sequences of one picture are spread, not side by side as its row gives them
    keys = [int(r["image_key"]) for r in rows[:n]]
    side_by_side = sum(a == b for a, b in zip(keys, keys[1:]))
    pictures = len(set(keys))
    assert pictures < n and side_by_side < (n - pictures) / 2


@pytest.mark.slow
def test_local_mode_trains_what_one_ray_train_worker_trains(small_data, tiny_path, tmp_path, ray_local):
    """A one-worker tune trial trains in its own process (local mode); `vkd unlearn --config
    best.yaml` reruns it on a Ray Train worker: both must give the same weights. So does a
    run with train.in_process (the demo's), which only a one-worker CPU run takes."""
    from safetensors.torch import load_file

    cfg = dataclasses.replace(SMALL_TRAIN, workers=1, max_steps=8, checkpoint_every=4)
    worker = _train(small_data, tiny_path, tmp_path / "worker", name="worker", cfg=cfg)
    local = _train(small_data, tiny_path, tmp_path / "local", name="local", cfg=cfg, local=True)
    # a second run in the same process (DeepSpeed keeps handles to the first run's groups)
    again = _train(small_data, tiny_path, tmp_path / "again", name="again", cfg=cfg, local=True)
    configured = _train(small_data, tiny_path, tmp_path / "configured", name="configured",
                        cfg=dataclasses.replace(cfg, in_process=True))
    assert configured.path is None  # no Ray Train run (its Result would name its storage)
    assert local.metrics["step"] == worker.metrics["step"] == again.metrics["step"] == configured.metrics["step"] == 8
    a, b, c, d = (load_file(tmp_path / d / "model.safetensors") for d in ("worker", "local", "again", "configured"))
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], load_file(tiny_path / "model.safetensors")[k])]
    assert moved, "the runs trained nothing"
    for wider in (dict(workers=2), dict(use_gpu=True)):  # these go to Ray Train whatever in_process says
        assert not TrainJob(model_path="m", out_dir="o", cfg=dataclasses.replace(cfg, in_process=True, **wider),
                            total_steps=8).in_process
    for other in (b, c, d):
        assert all(torch.allclose(a[k], other[k], atol=1e-6) for k in a), [k for k in a if not torch.allclose(a[k], other[k])]
    # no checkpoint folder and no rank variables are left behind
    assert "LOCAL_RANK" not in os.environ and not list(tmp_path.glob(".checkpoint-*"))


@pytest.mark.slow
def test_a_run_resumed_from_a_rung_trains_what_an_uninterrupted_run_trains(small_data, tiny_path, tmp_path, ray_local,
                                                                          monkeypatch):
    """Promotion ASHA stops a tune trial at a rung and may resume it later from the state it
    saved there: the resumed run must end where the uninterrupted one ends, whether its
    stream starts mid-way (read in the driver) or passes over what it drew (streamed)."""
    from safetensors.torch import load_file

    cfg = dataclasses.replace(SMALL_TRAIN, workers=1, max_steps=8, checkpoint_every=8, align_steps=0, shuffle_buffer=0)
    start = load_file(tiny_path / "model.safetensors")

    def run(out: str, rungs: str, skip: int = 0, save_at=(), resume: int = 0, **fields):
        ds = {"train": train_dataset(small_data, str(tiny_path), cfg, items=items_drawn(cfg, 8), skip=skip)}
        job = TrainJob(model_path=str(tiny_path), out_dir=str(tmp_path / out), cfg=cfg, total_steps=8, local=True,
                       rungs=Rungs(str(tmp_path / rungs), list(save_at), resume), **fields)
        return run_training(job, ds, storage=tmp_path / "ray"), load_file(tmp_path / out / "model.safetensors")

    def same(a, b):
        return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    _, straight = run("straight", "inline", save_at=[3, 5])
    assert json.loads((tmp_path / "inline" / "5" / "state.json").read_text()) == {"step": 5}
    assert sorted(p.name for p in (tmp_path / "inline").iterdir()) == ["3", "5"], "one whole folder per rung"
    result, resumed = run("resumed", "inline", skip=5 * cfg.batch_size, resume=5)
    assert result.metrics["resumed_from"] == 5 and result.metrics["step"] == 8
    assert any(not torch.equal(straight[k], start[k]) for k in straight), "the run trained nothing"
    assert same(straight, resumed), [k for k in straight if not torch.allclose(straight[k], resumed[k])]

    monkeypatch.setattr(layout, "INLINE_BYTES", 0)  # streamed from its shards: no cutting it short
    _, straight = run("straight-streamed", "streamed", save_at=[5])
    result, resumed = run("resumed-streamed", "streamed", discard={"train": 5 * cfg.batch_size}, resume=5)
    assert result.metrics["resumed_from"] == 5
    assert same(straight, resumed), [k for k in straight if not torch.allclose(straight[k], resumed[k])]


@pytest.mark.slow
def test_a_two_worker_zero2_run_resumes_a_dead_worker_from_its_checkpoint_and_lowers_the_loss(
        small_data, tiny_path, tmp_path, ray_local):
    marker = tmp_path / "fault.txt"
    result = _train(small_data, tiny_path, tmp_path / "resumed", name="fault", callbacks=[DieOnce(15, str(marker))])
    assert marker.read_text() == "15", "the fault hook fired"
    assert result.metrics["step"] == SMALL_TRAIN.max_steps
    assert result.metrics["resumed_from"] == 10, "restarted from the step-10 checkpoint, not from scratch"
    with result.checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "state.json").read_text())["step"] == SMALL_TRAIN.max_steps
    assert (tmp_path / "resumed" / "model.safetensors").is_file()
    before, after = _mean_loss(tiny_path, small_data), _mean_loss(tmp_path / "resumed", small_data)
    assert after < before * 0.8, (before, after)
    # the finished run lets its controller and dataset coordinators go (none left polling)
    from ray.util.state import list_actors

    lingering = ["?"]
    for _ in range(40):
        lingering = [a.class_name for a in list_actors(address=ray_local.get_runtime_context().gcs_address,
                                                       filters=[("state", "=", "ALIVE")], limit=1000)
                     if a.class_name in ("TrainController", "SplitCoordinator", "DatasetManager")]
        if not lingering:
            break
        time.sleep(0.5)
    assert not lingering, lingering


def _vanilla(data: Path, out: Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.vanilla", "--data", str(data), "--out", str(out), "--no-eval",
           *MODEL_OVERRIDES, "train.max_steps=6", "train.batch_size=4", "train.checkpoint_every=3",
           "train.workers=2", "train.max_length=96"]
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store is the test's
    full_env = {**inherited, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=full_env)


def _check_run(client, name: str, version: int, entities: int) -> None:
    mv = client.get_model_version(name, str(version))
    run = client.get_run(mv.run_id)
    assert run.data.tags["stage"] == "vanilla" and run.data.tags["benchmark"] == "synthetic"
    assert run.data.tags["entities"] == str(entities) and len(run.data.tags["config_hash"]) == DIGEST_CHARS
    assert "git_sha" in run.data.tags
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.text_hidden"] == "64"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history][-1] == 6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/vkd_config.yaml"} <= artifacts
    assert str(client.get_model_version_by_alias(name, "vanilla").version) == str(version)


@pytest.mark.slow
def test_vanilla_on_the_sqlite_default_never_overwrites(small_data, tmp_path):
    from mlflow.tracking import MlflowClient

    first = _vanilla(small_data, tmp_path / "vanilla", tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "registered vkd-synthetic-vanilla version 1" in first.stdout
    weights = (tmp_path / "vanilla" / "model.safetensors").read_bytes()
    again = _vanilla(small_data, tmp_path / "vanilla", tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    assert (tmp_path / "vanilla" / "model.safetensors").read_bytes() == weights
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _check_run(client, "vkd-synthetic-vanilla", 1, 12)
    assert len(client.search_model_versions("name='vkd-synthetic-vanilla'")) == 1


@pytest.mark.slow
def test_vanilla_against_a_real_mlflow_server(small_data, tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        done = _vanilla(small_data, tmp_path / "vanilla", tmp_path, {"MLFLOW_TRACKING_URI": uri})
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (tmp_path / "mlflow.db").exists(), "the server, not a local file, holds the run"
        _check_run(MlflowClient(uri), "vkd-synthetic-vanilla", 1, 12)
    finally:  # the server and its uvicorn worker at once (a graceful stop takes 5 s)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.mark.slow
def test_frozen_groups_and_masked_entries_do_not_move(small_data, tiny_path, tmp_path, ray_local):
    def weights(path):
        return {k: v.detach().clone() for k, v in ModelAdapter.load(path).model.named_parameters()}

    name = "model.multi_modal_projector.linear_1.weight"
    before = weights(tiny_path)
    mask = torch.zeros_like(before[name])
    mask[::2] = 1.0
    torch.save({name: mask}, tmp_path / "masks.pt")
    cfg = dataclasses.replace(SMALL_TRAIN, workers=1, max_steps=8, trainable="visual", lr=1e-2)
    _train(small_data, tiny_path, tmp_path / "masked", cfg=cfg, name="masked", masks_path=str(tmp_path / "masks.pt"))
    after = weights(tmp_path / "masked")
    for key, value in before.items():
        if key.startswith(("model.language_model.", "lm_head.")):
            assert torch.equal(after[key], value), f"frozen {key} changed"
    assert torch.equal(after[name][1::2], before[name][1::2]), "masked entries changed"
    assert not torch.equal(after[name][::2], before[name][::2]), "unmasked entries did not train"


@pytest.mark.slow
def test_bf16_trains_on_the_cpu(small_data, tiny_path, tmp_path, ray_local):
    """train.precision=bf16 on DeepSpeed's CPU accelerator (what a GPU run uses, here without
    one): the loss stays finite, every group trains, the model saves and loads."""
    import math

    cfg = dataclasses.replace(SMALL_TRAIN, workers=1, max_steps=6, checkpoint_every=6, align_steps=0,
                              precision="bf16", lr=1e-2)
    result = _train(small_data, tiny_path, tmp_path / "bf16", name="bf16", cfg=cfg, local=True)
    assert result.metrics["step"] == 6 and math.isfinite(result.metrics["loss"])
    before = dict(ModelAdapter.load(tiny_path).model.named_parameters())
    after = ModelAdapter.load(tmp_path / "bf16")
    for group, params in after.param_groups().items():
        assert any(not torch.equal(p.float(), before[n].float()) for n, p in params), f"the {group} did not train"
