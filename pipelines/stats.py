"""The statistics pass before unlearning, on the trainer's workers (Ray Train, streaming over
Ray Data, sums all-reduced; a one-worker pass on CPU: in this process), cached: neuron
importance and Fisher statistics of the forget and retain streams, and the teacher's visual
features of every retain image the training will see (the maths is ``vkd.saliency``'s).

Each part (forget, retain, teacher) is kept under a content key of everything it depends
on, so requests and trials that differ only in, say, their forget entities or thresholds
share the retain side; runs whose passes share settings share one Ray Train run.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import ray.train
import torch

from pipelines.train import fit, torch_trainer, train_dataset, unlearn_trainer
from pipelines.train.worker import InProcess, OnRayTrain
from vkd.cache import Cache, data_fingerprint, digest, model_fingerprint
from vkd.config import Config, TrainConfig
from vkd.data.layout import ForgetSet
from vkd.data.streams import Ahead, RowPlan
from vkd.methods import Method, method_for
from vkd.model import ModelAdapter
from vkd.saliency import Statistics, StatsRequest, all_reduce, measure_split, teacher_features
from vkd.train import model_inputs, set_trainable, trainable_names


@dataclass
class StatsPass:
    """One pass's settings, as its workers get them: the datasets ``splits`` it measures,
    and the teacher's features of the ``teacher`` dataset when ``teacher_layers`` is given."""
    model_path: str
    cfg: TrainConfig                   # workers, CPUs, batch size, seed
    criterion: str | None = None       # neuron importance (None: none)
    fisher_names: list[str] = field(default_factory=list)
    teacher_layers: list[int] | None = None
    splits: list[str] = field(default_factory=list)


@dataclass
class StatsNeed:
    """What one run (a request, a trial) asks of the statistics pass: each part's cache key,
    the streams to measure it on, and the pass's settings."""
    job: StatsPass                 # the pass's settings (its splits and teacher are filled per pass)
    keys: dict[str, str]           # part (forget, retain, teacher) -> cache key
    plans: dict[str, RowPlan]
    per_split: int                 # rows of each stream the pass reads
    layers: list[int]              # vision layers of the teacher's features


def measure_rank(job: StatsPass, session: Any) -> dict[str, Any]:
    """One rank's part of a pass (``session``: where its dataset shards come from), summed
    over the ranks: {split: SplitStats, "teacher": {image key: features}}."""
    torch.manual_seed(job.cfg.seed + session.rank)
    adapter = ModelAdapter.load(job.model_path)
    # the visual module's activations carry gradients (taylor importance), and the Fisher parameters
    set_trainable(adapter, set(trainable_names(adapter, "visual")) | set(job.fisher_names))
    # every stream starts now, side by side; each is read to its end in turn below
    streams = {split: Ahead(session.dataset_shard(split).iter_torch_batches(batch_size=job.cfg.batch_size))
               for split in job.splits}
    if job.teacher_layers is not None:
        streams["teacher"] = Ahead(session.dataset_shard("teacher").iter_torch_batches(batch_size=64))
    stats = {split: measure_split(adapter, (model_inputs(b) for b in streams[split]), job.fisher_names, job.criterion)
             for split in job.splits}
    teacher = None
    if job.teacher_layers is not None:
        images = ((b["pixel_values"][b["has_image"].bool()], b["image_key"][b["has_image"].bool()].tolist())
                  for b in streams["teacher"])
        teacher = teacher_features(adapter, images, job.teacher_layers)
    all_reduce(stats.values(), teacher)
    return {**stats, "teacher": teacher or {}}


def stats_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: sums over this worker's shards, all-reduced; rank 0 reports them."""
    job: StatsPass = config["job"]
    session = OnRayTrain()
    if not job.cfg.use_gpu:
        torch.set_num_threads(max(1, int(job.cfg.cpus_per_worker)))
    stats = measure_rank(job, session)
    with tempfile.TemporaryDirectory() as tmp:
        if session.rank == 0:
            torch.save(stats, Path(tmp) / "stats.pt")
        counts = {f"{s}_batches": stats[s].batches for s in job.splits} | {"teacher_images": len(stats["teacher"])}
        ray.train.report(counts, checkpoint=ray.train.Checkpoint.from_directory(tmp) if session.rank == 0 else None)


def run_stats(job: StatsPass, datasets: dict[str, Any], storage: str | Path) -> dict[str, Any]:
    """Run one pass; returns {split: SplitStats for each of ``job.splits``, "teacher": {image key: features}}.
    A one-worker pass on CPU runs in this process, on the same datasets in the same order:
    a Ray Train run (controller, worker process, placement group, split coordinators) cost
    more than the pass itself on the demo."""
    if job.cfg.workers == 1 and not job.cfg.use_gpu:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(job.cfg.cpus_per_worker)))
        try:
            with torch.random.fork_rng(devices=[]):
                return measure_rank(job, InProcess(datasets, report_to_tune=False))
        finally:
            torch.set_num_threads(threads)
    result = fit(torch_trainer(stats_loop, job, job.cfg, datasets, storage, "stats"))
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "stats.pt", weights_only=False)


def stats_need(request: StatsRequest, model: Path, data: str | Path, plans: dict[str, RowPlan], tcfg: TrainConfig,
               trainable: list[str]) -> StatsNeed:
    """The parts a run needs and their keys: a part's key holds everything its value depends
    on (model and data content, the stream's rows, the measuring settings) and nothing else."""
    # only the trainer settings the pass depends on, so runs that differ in, say, their
    # learning rate share a pass
    pass_cfg = TrainConfig(workers=tcfg.workers, cpus_per_worker=tcfg.cpus_per_worker, use_gpu=tcfg.use_gpu,
                           batch_size=tcfg.batch_size, max_length=tcfg.max_length, seed=tcfg.seed)
    fisher = list(trainable) if request.fisher else []
    job = StatsPass(model_path=str(model), cfg=pass_cfg, criterion=request.importance, fisher_names=fisher)
    common = {"model": model_fingerprint(model), "data": data_fingerprint(data), "max_length": tcfg.max_length}
    measure = {**common, "criterion": request.importance, "stat_batches": request.batches, "fisher": sorted(fisher),
               "batch_size": tcfg.batch_size, "workers": tcfg.workers}
    parts = {s: {**measure, "plan": plans[s].to_key()} for s in ("forget", "retain")}
    if request.teacher_layers is not None:
        parts["teacher"] = {**common, "plan": plans["retain"].to_key(), "layers": list(request.teacher_layers)}
    keys = {name: digest({"part": name, **v}) for name, v in parts.items()}
    return StatsNeed(job, keys, plans, request.batches * tcfg.batch_size * tcfg.workers,
                     list(request.teacher_layers or []))


def _groups(needs: Sequence[StatsNeed], cache: Cache) -> list[dict[str, Any]]:
    """The passes these needs take: one per signature (settings and teacher), each with the
    streams and teacher it measures that the cache lacks (each part once)."""
    groups: dict[str, dict[str, Any]] = {}
    planned: set[str] = set()
    for need in needs:
        group = groups.setdefault(digest([asdict(need.job), need.keys.get("teacher")]),
                                  {"need": need, "streams": {}, "teacher": False})
        for part, key in need.keys.items():
            if key in planned or key in cache:
                continue
            planned.add(key)
            if part == "teacher":
                group["teacher"] = True
            else:
                group["streams"][f"{part}-{key}"] = (part, key, need.plans[part])
    return [g for g in groups.values() if g["streams"] or g["teacher"]]


def measure_stats(needs: Sequence[StatsNeed], data: str | Path, work: Path, cache: Cache) -> list[list[str]]:
    """Measure every part that these runs need and the cache lacks, and keep each there.
    Runs whose passes share settings (and teacher) share one pass: each of their forget and
    retain streams is a dataset of the same Ray Train run, so a batch of N requests starts
    one worker group for its statistics, not N. Returns the parts each pass measured."""
    passes: list[list[str]] = []
    for group in _groups(needs, cache):
        need = group["need"]
        job = replace(need.job, splits=list(group["streams"]), teacher_layers=need.layers if group["teacher"] else None)
        datasets = {name: train_dataset(data, job.model_path, job.cfg, plan).limit(need.per_split)
                    for name, (_, _, plan) in group["streams"].items()}
        if group["teacher"]:
            datasets["teacher"] = train_dataset(data, job.model_path, job.cfg, need.plans["retain"])
        stats = run_stats(job, datasets, storage=work / "ray")
        for name, (_, key, _) in group["streams"].items():
            cache.put_torch(key, stats[name])
        if group["teacher"]:
            cache.put_torch(need.keys["teacher"], stats["teacher"])
        passes.append(sorted([part for part, _, _ in group["streams"].values()] + ["teacher"] * group["teacher"]))
    return passes


def stats_cache(root: str | Path) -> Cache:
    return Cache(root, "stats", ".pt")


def cached_stats(need: StatsNeed, data: str | Path, work: Path, root: str | Path) -> tuple[Statistics, list[str]]:
    """The statistics a run needs, each part from the cache under ``root`` when an earlier run
    measured it, else measured now (on the trainer's workers) and kept. Returns them and the
    names of the parts measured now."""
    cache = stats_cache(root)
    measured = [part for parts in measure_stats([need], data, work, cache) for part in parts]
    parts = {part: cache.torch(key) for part, key in need.keys.items()}
    return Statistics(forget=parts.get("forget"), retain=parts.get("retain"), teacher=parts.get("teacher", {})), measured


def run_need(method: Method, model: Path, data: str | Path, plans: dict[str, RowPlan], tcfg: TrainConfig,
             adapter: ModelAdapter) -> StatsNeed | None:
    """What a run of ``method`` on these streams asks of the statistics pass (None: nothing)."""
    request = method.statistics()
    if request is None:
        return None
    return stats_need(request, model, data, plans, tcfg, method.trainable(adapter))


def warm_stats(runs: Sequence[tuple[Config, ForgetSet]], model: Path, data: str | Path, work_parent: Path,
               root: str | Path) -> list[list[str]]:
    """Measure, before any of them starts, the statistics that these runs (a study's trials,
    a batch's requests: each a config and a forget set) will ask for, in as few passes as
    their settings allow, so that they find them cached instead of each measuring its own.
    Returns the parts each pass measured."""
    adapter = ModelAdapter.load(model)
    needs = []
    for cfg, fs in runs:
        method = method_for(cfg.unlearn)
        plans = method.stream_plans(data, fs, cfg.unlearn)
        need = run_need(method, model, data, plans, unlearn_trainer(cfg, model, data, plans), adapter)
        needs += [need] if need else []
    work = Path(tempfile.mkdtemp(prefix=".stats-", dir=work_parent))
    try:
        return measure_stats(needs, data, work, stats_cache(root))
    finally:
        shutil.rmtree(work, ignore_errors=True)
