"""Batch unlearning: manifests validated up front; a batch submitted with `ray job submit` to a
real Ray head, stopped mid-way and resubmitted, does every request exactly once."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipelines.runtime import free_port
from tests.conftest import ROOT, SMALL_MODEL
from vkd.batch import check_result, load_manifest
from vkd.config import ConfigError


def _write(path, body):
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body, sort_keys=False))
    return path


def _manifest(small_data, tiny_path, **extra):
    return {"model": str(tiny_path), "data": str(small_data), "mode": "independent",
            "requests": [{"id": "one", "entities": ["0001"]}, {"id": "two", "entities": ["0002", "0003"]}], **extra}


def test_the_shipped_demo_manifest_is_valid(tmp_path):
    from vkd.config import load_config
    from vkd.data import prepare_benchmark

    # the demo benchmark's entities and splits, with one picture each (names do not depend on pictures)
    settings = dataclasses.asdict(load_config(ROOT / "configs" / "demo.yaml").benchmark)
    kind = settings.pop("kind")
    prepare_benchmark(kind, tmp_path / "demo", **{**settings, "train_images": 1, "test_images": 1, "text_rows": 1})
    m = load_manifest(ROOT / "configs" / "batch_demo.yaml", data=str(tmp_path / "demo"))
    assert len(m.requests) == 3 and m.requests[0].entities == ["0001"]  # a name resolved to its ID
    assert m.request_config(m.requests[2]).unlearn.method == "gd"
    # the manifest names the folder `make demo` prepares from configs/demo.yaml
    from vkd.cache import digest

    shipped = yaml.safe_load((ROOT / "configs" / "batch_demo.yaml").read_text())["data"]
    assert shipped == f"runs/demo/data-{digest(dataclasses.asdict(load_config(ROOT / 'configs' / 'demo.yaml').benchmark))}"


@pytest.mark.parametrize("change, message", [
    (lambda m: m["requests"][1].update(entities=["0002", "Nobody Atall"]), "line 8 (request 'two'): unknown entity 'Nobody Atall'"),
    (lambda m: m["requests"][0].update(colour="red"), "request 'one'): unknown field colour"),
    (lambda m: m["requests"][1].update(id="one"), "id 'one' is used twice"),
    (lambda m: m["requests"][0].update(method="nope"), "unknown unlearning method 'nope'; registered:"),
    (lambda m: m["requests"][0].update(overrides={"unlearn.vkd.beta": "high"}), "unlearn.vkd.beta: expected a number"),
    (lambda m: m["requests"][0].update(accept={"forget_vqa_below": 0.3}), "threshold 'forget_vqa_below'"),
    (lambda m: m.update(mode="parallel"), "mode 'parallel'"),
    (lambda m: m.update(priority=1), "unknown field priority"),
])
def test_a_bad_manifest_fails_before_any_work_naming_the_request(small_data, tiny_path, tmp_path, change, message):
    body = _manifest(small_data, tiny_path)
    change(body)
    path = _write(tmp_path / "m.yaml", body)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_manifest(path)


def test_a_csv_manifest_names_the_line(small_data, tiny_path, tmp_path):
    good = _write(tmp_path / "m.csv", "id,entities,method,overrides,accept\n"
                  "a,0001;0002,vkd,unlearn.vkd.beta=3,forget_vqa_max=0.4\nb,0003,,,\n")
    m = load_manifest(good, model=str(tiny_path), data=str(small_data))
    assert [r.entities for r in m.requests] == [["0001", "0002"], ["0003"]] and m.requests[0].accept == {"forget_vqa_max": 0.4}
    bad = _write(tmp_path / "bad.csv", "id,entities\na,0001\nb,9999\n")
    with pytest.raises(ConfigError, match=r"bad.csv, line 3 \(request 'b'\): unknown entity '9999'"):
        load_manifest(bad, model=str(tiny_path), data=str(small_data))
    done = subprocess.run([sys.executable, "-m", "pipelines.batch", "--manifest", str(bad), "--model", str(tiny_path),
                           "--data", str(small_data), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "line 3" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing may start before the manifest is valid"


def test_thresholds_accept_and_reject_with_reasons():
    before = {"forget_vqa": 0.9, "retain_vqa": 0.9}
    assert check_result({"forget_vqa_max": 0.35, "retain_vqa_min_ratio": 0.9}, before,
                        {"forget_vqa": 0.3, "retain_vqa": 0.85}) == []
    reasons = check_result({"forget_vqa_max": 0.35, "retain_vqa_min_ratio": 0.95}, before,
                           {"forget_vqa": 0.5, "retain_vqa": 0.8})
    assert len(reasons) == 2 and "forget_vqa 0.500 > max 0.35" in reasons[0] and "min_ratio 0.95" in reasons[1]


@pytest.mark.slow
def test_ray_job_submit_stop_and_resubmit_does_each_request_once(small_data, tiny_path, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = {"model": dataclasses.asdict(SMALL_MODEL), "train": {"max_length": 96, "workers": 1},
              # gradient ascent: no statistics pass, the cheapest real unlearning run (VKD has its own tests)
              "unlearn": {"method": "ga", "steps": 3, "lr": 5e-3, "batch_size": 4, "retain_rows": 12},
              "eval": {"retain_entities": 2, "generation": False, "max_rows": 2, "references": 3, "actors": 1,
                       "retain_test_entities": 1, "lookalikes": 1},
              "relearn": {"steps": 2, "batch_size": 4},  # a short attack
              "mlflow": {"sqlite_file": str(tmp_path / "mlflow.db"), "artifact_dir": str(tmp_path / "mlruns")}}
    _write(tmp_path / "run.yaml", config)
    manifest = _write(tmp_path / "batch.yaml", {
        "model": str(tiny_path), "data": str(small_data), "config": str(tmp_path / "run.yaml"), "concurrency": 2,
        # the attack is on by default: the third request runs it, the other two turn it off (time)
        "requests": [{"id": "first", "entities": ["0001"], "overrides": {"unlearn.relearn": False}},
                     {"id": "second", "entities": ["0002", "0003"],
                      "overrides": {"unlearn.lr": 1.0e-3, "unlearn.relearn": False}},
                     {"id": "third", "entities": ["0004"],
                      "accept": {"retain_vqa_min": 1.01, "relearn_ag_max": -1.5}}]})  # a gap is never below -1
    out = tmp_path / "out"
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # the head stops at once when the test ends (by default it drains its node for 30 s first)
    env.update(PYTHONPATH=str(ROOT), VKD_CACHE=str(tmp_path / "cache"), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    bindir = os.path.dirname(sys.executable)
    head = subprocess.Popen([f"{bindir}/ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=6",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--disable-usage-stats",
                             # its own agent ports: another Ray on this machine may hold the defaults
                             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                             f"--ray-client-server-port={free_port()}"],
                            env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        client = None
        for _ in range(90):
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:
                client = None
                time.sleep(1)
        assert client is not None, (tmp_path / "head.log").read_text()[-2000:]
        runtime_env = json.dumps({"env_vars": {"VKD_CACHE": str(tmp_path / "cache"), "PYTHONPATH": "."}})

        def submit() -> str:
            for _ in range(60):  # the head's job agent comes up after its dashboard (on a loaded machine, late)
                done = subprocess.run([f"{bindir}/ray", "job", "submit", "--address", address, "--working-dir",
                                       str(ROOT), "--runtime-env-json", runtime_env, "--no-wait", "--", sys.executable,
                                       "-m", "pipelines.batch", "--manifest", str(manifest), "--out", str(out)],
                                      env=env, capture_output=True, text=True, timeout=120)
                if "try again later" not in done.stdout + done.stderr:
                    break
                time.sleep(2)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            return re.search(r"raysubmit_[A-Za-z0-9]+", done.stdout).group(0)

        mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

        def decided() -> list:
            if not (tmp_path / "mlflow.db").exists() or mlflow.get_experiment_by_name("vkd") is None:
                return []
            runs = mlflow.search_runs([mlflow.get_experiment_by_name("vkd").experiment_id])
            return [r for r in runs if r.data.tags.get("decision")]

        job = submit()
        deadline = time.time() + 420
        while time.time() < deadline and not decided():
            status = client.get_job_status(job)
            assert status not in (JobStatus.FAILED, JobStatus.SUCCEEDED), client.get_job_logs(job)[-3000:]
            time.sleep(2)
        assert decided(), client.get_job_logs(job)[-3000:]
        subprocess.run([f"{bindir}/ray", "job", "stop", "--address", address, job], env=env, capture_output=True,
                       timeout=120)
        while client.get_job_status(job) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
            time.sleep(1)
        assert client.get_job_status(job) == JobStatus.STOPPED
        first_done = {r.data.tags["request_id"] for r in decided()}
        assert 1 <= len(first_done) < 3

        job2 = submit()
        deadline = time.time() + 600
        while time.time() < deadline and client.get_job_status(job2) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            time.sleep(2)
        logs = client.get_job_logs(job2)
        assert client.get_job_status(job2) == JobStatus.SUCCEEDED, logs[-4000:]
        for rid in first_done:
            assert f"request {rid}: skipped: done before" in logs

        runs = decided()
        by_request = {rid: [r for r in runs if r.data.tags["request_id"] == rid] for rid in ("first", "second", "third")}
        assert all(len(v) == 1 for v in by_request.values()), {k: len(v) for k, v in by_request.items()}
        third = by_request["third"][0].data.tags
        assert third["decision"] == "rejected" and "retain_vqa" in third["reason"] and "min 1.01" in third["reason"]
        assert "relearn_ag" in third["reason"] and "> max -1.5" in third["reason"], third["reason"]
        assert "relearn_ag" in by_request["third"][0].data.metrics, "the attack runs by default"
        assert not any("relearn_ag" in by_request[rid][0].data.metrics for rid in ("first", "second"))
        versions = mlflow.search_model_versions("name = 'vkd-synthetic-unlearned'")
        hashes = [v.tags.get("request_hash") for v in versions]
        assert len(hashes) == len(set(hashes)), "a request registered twice"
        accepted = {rid for rid, v in by_request.items() if v[0].data.tags["decision"] == "accepted"}
        assert {v.tags.get("request_id") for v in versions} == accepted and accepted <= {"first", "second"}
        summary = json.loads((out / "batch.json").read_text())
        assert [s["id"] for s in summary] == ["first", "second", "third"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
