"""Stage `batch`: many removal requests from a manifest, resumable, as one Ray job.

    python -m pipelines.batch --manifest configs/batch_demo.yaml [--mode independent|sequential] [--out DIR]
    ray job submit --working-dir . -- python -m pipelines.batch --manifest ...

Recipe: validate the whole manifest (vkd.batch) before any work. Every request forgets its
entities and keeps the entities no request names (the batch's shared retain set), so what
depends only on the model and the retain side is done once: the starting model's
evaluation (one pass over every request's entities and the shared retain sample, split per
request) and the retain-side statistics and teacher features (cached by model and data
hashes, see pipelines.unlearn.cached_stats). ``independent`` runs each request from the
starting model, as many at once as the cluster's CPUs allow, each as a Ray task driving its
own trainer; ``sequential`` applies them one after another, each from the previous accepted
model, recording the lineage in MLflow tags.

Each request is one MLflow run tagged with its id and a hash of everything it depends on.
A run with that hash and a decision tag is done: a resubmitted batch skips it. A result that
misses the request's thresholds is tagged rejected, with the reason, and is not registered;
an accepted one is registered once (a retry finds the version by its hash).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import ray
from mlflow.tracking import MlflowClient

from pipelines.common import parse, parser, run_main
from pipelines.evaluate import cached_results, own_items, with_lookalikes
from pipelines.runtime import embedded_cpus, init_ray
from pipelines.stats import warm_stats
from pipelines.tracking import experiment_id, register_version, registered_model, resolved, tracking_uri
from pipelines.unlearn import UnlearnOptions, run_unlearn
from vkd.batch import Manifest, Request, check_result, load_manifest
from vkd.cache import data_fingerprint, digest, model_fingerprint
from vkd.config import Config, cache_root
from vkd.data.layout import ForgetSet, load_meta
from vkd.data.items import plan_for
from vkd.metrics import aggregate
from vkd.model import resolve_model

SHOWN = ("forget_vqa", "test_vqa", "forget_vqa_gen", "forget_qa", "retain_vqa", "retain_test_vqa", "lookalike_vqa")
COLUMNS = (*SHOWN, "relearn_ag")


def forget_sets(manifest: Manifest) -> dict[str, ForgetSet]:
    """Each request's entities against the batch's shared retain set."""
    meta = load_meta(Path(manifest.data))
    named = set(manifest.batch_entities())
    retain = tuple(e.id for e in meta.entities if e.id not in named)
    return {r.id: ForgetSet(r.id, tuple(r.entities), retain) for r in manifest.requests}


def shared_before(model: Path, data: Path, manifest: Manifest, sets: dict[str, ForgetSet],
                  configs: dict[str, Config], cache: Path) -> dict[str, dict[str, float]]:
    """The starting model's scores for every request with the batch's evaluation settings,
    from one evaluation over all their entities, lookalikes and the shared retain sample
    (kept in the cache's ``eval``, so a resubmitted batch does not redo it), each request's
    the items its own evaluation scores."""
    first = configs[manifest.requests[0].id].eval
    same = [r for r in manifest.requests if configs[r.id].eval == first]
    union = ForgetSet("batch", tuple(sorted({e for r in same for e in r.entities})), sets[same[0].id].retain,
                      lookalikes=tuple(sorted({e for r in same for e in sets[r.id].lookalikes})))
    results = cached_results(model, data, union, first, cache)
    return {r.id: aggregate(own_items(results, plan_for(data, sets[r.id], first)), sets[r.id].lookalikes)
            for r in same}


def request_hash(request: Request, cfg: Config, model: Path, data: Path, mode: str) -> str:
    return digest({"request": request.spec_hash(), "config": cfg.hash(), "model": model_fingerprint(model),
                   "data": data_fingerprint(data), "mode": mode})


def finished_run(cfg: Config, request_digest: str):
    """The MLflow run that already did this request (same hash, a decision recorded)."""
    client = MlflowClient(tracking_uri(cfg.mlflow))
    runs = client.search_runs([experiment_id(cfg.mlflow)],
                              filter_string=f"tags.request_hash = '{request_digest}' and attributes.status = 'FINISHED'")
    done = [r for r in runs if r.data.tags.get("decision")]
    return done[0] if done else None


def _summary(request: Request, run, status: str, seconds: float, model: str | None) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    return {"id": request.id, "entities": request.entities, "status": status, "decision": tags.get("decision"),
            "reason": tags.get("reason", ""), "version": tags.get("registered_version") or None,
            "run_id": run.info.run_id, "seconds": seconds, "model": model,
            "before": {k: metrics.get(f"before/{k}") for k in SHOWN},
            "after": {**{k: metrics.get(f"after/{k}") for k in SHOWN}, "relearn_ag": metrics.get("relearn_ag")}}


def run_request(request: Request, cfg: Config, model: str, data: str, fs: ForgetSet, before: dict | None,
                out: str, request_digest: str, tags: dict[str, str], cache: str) -> dict[str, Any]:
    """One request (in a Ray task, or in the driver): skip it if done, else unlearn, decide,
    register an accepted model once, and record the decision last."""
    start = time.perf_counter()
    folder = Path(out) / request.id
    done = finished_run(cfg, request_digest)
    if done is not None:
        return _summary(request, done, "skipped: done before", 0.0, str(folder) if folder.is_dir() else None)
    if folder.exists():  # an interrupted attempt of this request left it; it holds nothing decided
        shutil.rmtree(folder)
    for stale in Path(out).glob(f".unlearn-{request.id}-????????"):  # and its work folder (mkdtemp: 8 characters)
        shutil.rmtree(stale, ignore_errors=True)
    fs, table = with_lookalikes(Path(model), Path(data), replace(fs, lookalikes=()), cfg.eval.lookalikes, cache)
    r = run_unlearn(UnlearnOptions(
        cfg=cfg, model=Path(model), data=Path(data), forget=fs, out=folder, cache=Path(cache), register=False,
        before=before, score_in_trainer=True, run_name=f"batch-{request.id}", lookalikes=table,
        tags={"request_id": request.id, "request_hash": request_digest, **tags}))
    reasons = check_result(request.accept, r.before, {**r.after, **(r.relearn.gaps if r.relearn else {})})
    client = MlflowClient(tracking_uri(cfg.mlflow))
    if not reasons:
        version = register_version(r.run_id, r.registered_name, [f"request-{request.id}"],
                                   tags={"request_id": request.id, "request_hash": request_digest},
                                   unique_tag="request_hash")
        client.set_tag(r.run_id, "registered_version", str(version))
    client.set_tag(r.run_id, "reason", "; ".join(reasons) or "meets every threshold")
    client.set_tag(r.run_id, "decision", "rejected" if reasons else "accepted")  # last: the request is done
    return _summary(request, client.get_run(r.run_id), "ran", time.perf_counter() - start, str(folder))


def _slots(manifest: Manifest, first: Config) -> int:
    """Requests at once: the manifest's concurrency, else on the embedded Ray one per core's
    worth of workers (its CPUs raised to hold them), else as many as the cluster's CPUs hold,
    leaving one for Ray Data's tasks. Starts Ray."""
    t = first.train
    slots = manifest.concurrency
    if not os.environ.get("RAY_ADDRESS"):
        slots = slots or max(1, int((os.cpu_count() or 1) // (t.workers * t.cpus_per_worker)))
        first.ray.num_cpus = max(first.ray.num_cpus, embedded_cpus(t.workers, t.cpus_per_worker, slots))
    init_ray(first.ray.num_cpus)
    if not slots:
        cpus = ray.cluster_resources().get("CPU", 1)
        slots = max(1, int((cpus - 1) // (t.workers * t.cpus_per_worker + 1)))
    return slots


def _sequential(manifest: Manifest, configs: dict[str, Config], model: Path, data: Path, sets: dict[str, ForgetSet],
                out: Path, tags: dict[str, str], cache: Path) -> list[dict[str, Any]]:
    """Each request from the previous accepted model, one after another; the lineage in tags."""
    summaries, current, lineage = [], model, []
    for r in manifest.requests:
        request_digest = request_hash(r, configs[r.id], current, data, manifest.mode)
        summary = run_request(r, configs[r.id], str(current), str(data), sets[r.id], None, str(out), request_digest,
                              {**tags, "lineage": ">".join(lineage + [r.id]), "start_model": str(current)}, str(cache))
        summaries.append(summary)
        if summary["decision"] == "accepted":
            current = _local_model(summary, out / r.id, configs[r.id])
            lineage.append(r.id)
        print(_line(summary), flush=True)
    return summaries


def _independent(manifest: Manifest, configs: dict[str, Config], model: Path, data: Path, sets: dict[str, ForgetSet],
                 out: Path, tags: dict[str, str], cache: Path, slots: int) -> tuple[list[dict[str, Any]], float]:
    """Each request from the starting model, ``slots`` at once, after the shared work (the
    starting model's evaluation, every request's statistics in one pass); returns the
    summaries and the seconds of the shared work."""
    digests = {r.id: request_hash(r, configs[r.id], model, data, manifest.mode) for r in manifest.requests}
    todo = [r for r in manifest.requests if finished_run(configs[r.id], digests[r.id]) is None]
    sets = {rid: with_lookalikes(model, data, fs, configs[rid].eval.lookalikes, cache)[0] for rid, fs in sets.items()}
    shared = time.perf_counter()
    before = shared_before(model, data, manifest, sets, configs, cache) if todo else {}
    if todo:  # every request's statistics in one pass; the retain side (and teacher) once for all
        warm_stats([(configs[r.id], sets[r.id]) for r in todo], model, data, out, cache)
    shared = time.perf_counter() - shared
    task = ray.remote(num_cpus=0.01, max_retries=0)(run_request)
    pending: dict[Any, Request] = {}
    queue, summaries = list(manifest.requests), []
    while queue or pending:
        while queue and len(pending) < slots:
            r = queue.pop(0)
            pending[task.remote(r, configs[r.id], str(model), str(data), sets[r.id], before.get(r.id), str(out),
                                digests[r.id], tags, str(cache))] = r
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            summaries.append(ray.get(ref))
            print(_line(summaries[-1]), flush=True)
    return summaries, shared


def run_batch(manifest: Manifest, out: str | Path) -> dict[str, Any]:
    """Run (or resume) the batch into ``out``. Returns the request summaries (manifest
    order), the seconds spent on the shared work and the wall seconds."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, cache = Path(manifest.data).resolve(), cache_root()
    configs = {r.id: resolved(manifest.request_config(r)) for r in manifest.requests}
    first = configs[manifest.requests[0].id]
    if str(manifest.model).startswith("models:/"):
        model = registered_model(str(manifest.model), first.mlflow, cache)
    else:
        model = resolve_model(manifest.model, first.model, data, cache)
    sets = forget_sets(manifest)
    tags = {"batch": manifest.path.stem, "batch_mode": manifest.mode}
    slots = _slots(manifest, first)
    wall = time.perf_counter()
    shared = 0.0
    if manifest.mode == "sequential":
        summaries = _sequential(manifest, configs, model, data, sets, out, tags, cache)
    else:
        summaries, shared = _independent(manifest, configs, model, data, sets, out, tags, cache, slots)
    order = {r.id: i for i, r in enumerate(manifest.requests)}
    return {"requests": sorted(summaries, key=lambda s: order[s["id"]]), "shared_seconds": shared,
            "wall_seconds": time.perf_counter() - wall}


def _local_model(summary: dict[str, Any], folder: Path, cfg: Config) -> Path:
    """An accepted request's model: its folder, or its MLflow artifact when the folder is gone."""
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}-download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    MlflowClient(tracking_uri(cfg.mlflow)).download_artifacts(summary["run_id"], "model", str(tmp))
    (tmp / "model").rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _line(s: dict[str, Any]) -> str:
    after = ", ".join(f"{k} {s['after'][k]:.3f}" for k in COLUMNS if s["after"].get(k) is not None)
    version = f", registered version {s['version']}" if s.get("version") else ""
    return f"request {s['id']}: {s['status']}; {s['decision']} ({s['reason']}){version}; {after}"


def format_summary(summaries: list[dict[str, Any]]) -> str:
    head = f"{'request':<14} {'entities':<18} {'status':<20} {'decision':<9} {'version':>7} " + \
        " ".join(f"{k[:15]:>15}" for k in COLUMNS)
    lines = [head, "-" * len(head)]
    for s in summaries:
        vals = " ".join(f"{s['after'][k]:>15.3f}" if s["after"].get(k) is not None else f"{'':>15}" for k in COLUMNS)
        lines.append(f"{s['id']:<14} {','.join(s['entities'])[:18]:<18} {s['status'][:20]:<20} "
                     f"{s['decision'] or '':<9} {s['version'] or '':>7} {vals}")
    rejected = [s for s in summaries if s["decision"] == "rejected"]
    lines += [f"rejected {s['id']}: {s['reason']}" for s in rejected]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("batch", "unlearn many removal requests from a manifest, resumably")
    p.add_argument("--manifest", required=True, help="YAML or CSV manifest (see configs/batch_demo.yaml)")
    p.add_argument("--mode", choices=("independent", "sequential"), help="default: the manifest's mode")
    p.add_argument("--model", help="the starting (vanilla) model folder; default: the manifest's model")
    p.add_argument("--data", help="the benchmark folder; default: the manifest's data")
    p.add_argument("--out", help="folder for the unlearned models (default runs/batch/<manifest name>)")
    args = parse(p, argv)
    manifest = load_manifest(args.manifest, model=args.model, data=args.data, config=args.config, mode=args.mode)
    if args.overrides:
        manifest = replace(manifest, defaults={**manifest.defaults,
                                               **dict(o.split("=", 1) for o in args.overrides)})
        for r in manifest.requests:
            manifest.request_config(r)
    out = Path(args.out or f"runs/batch/{manifest.path.stem}")
    figures = run_batch(manifest, out)
    summaries = figures["requests"]
    (out / "batch.json").write_text(json.dumps(summaries, indent=1))
    print(format_summary(summaries))
    ran = sum(s["status"] == "ran" for s in summaries)
    print(f"{len(summaries)} requests ({ran} ran, {len(summaries) - ran} done before) in {figures['wall_seconds']:.0f} s "
          f"({figures['shared_seconds']:.0f} s shared work); summary: {out / 'batch.json'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
