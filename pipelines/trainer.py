"""The one trainer: Ray Train workers, each driving a DeepSpeed engine, fed by Ray Data.

The caller gives the model folder, a Ray dataset per stream of train items, the method (a
name in ``vkd.methods.METHODS``: which parameters train, which streams a step takes, the
loss) and an optional per-parameter gradient mask. Checkpoints go through ``ray.train.report``; a restarted worker
group resumes from the latest one and finishes with the same step count.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vkd.config import TrainConfig


@dataclass
class TrainJob:
    model_path: str                    # the starting weights
    out_dir: str                       # the final Hugging Face folder
    cfg: TrainConfig
    total_steps: int
    method: str = "finetune"           # a name in vkd.methods.METHODS
    unlearn: dict[str, Any] = field(default_factory=dict)  # UnlearnConfig fields of an unlearning method
    masks_path: str | None = None      # torch.save'd {param name: 0/1 tensor}
    reference_path: str | None = None  # frozen reference model (methods that need one)
    teacher_path: str | None = None    # torch.save'd {image key: {feature name: tensor}}
    mlflow: dict[str, str] = field(default_factory=dict)   # tracking_uri, run_id
    probe: dict[str, Any] = field(default_factory=dict)    # in-run evaluation (see Probe): data, forget, eval, before,
                                                           # start_model, at (steps; the last step always)
    name: str = "train"
    fault_at_step: int = 0             # test-only fault hook: rank 0 dies once at this step,
    fault_marker: str = ""             # leaving this file behind so it dies only once
    local: bool = False                # one rank in the caller's process (see run_training)
    # in process only (a tune trial's rungs, see pipelines.tune): save the training state at
    # these steps into rung_dir/<step>, and resume from such a folder
    save_at: list[int] = field(default_factory=list)
    rung_dir: str = ""
    resume_dir: str = ""
    # per dataset, sequences a resumed run passes over before its first batch (a stream too
    # large to start mid-way, see train_dataset's skip)
    discard: dict[str, int] = field(default_factory=dict)


_TOKENIZERS: dict[tuple[str, int], Any] = {}


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, max_length: int) -> dict[str, np.ndarray]:
    """map_batches stage: decode and tokenise a batch of train items with the model's
    processor. It runs as Ray tasks, whose worker processes Ray keeps and reuses: each loads
    a processor once (kept per process), so a run's streams, and the next run's, start
    without spawning a tokeniser process each."""
    key = (model_path, max_length)
    if key not in _TOKENIZERS:
        import torch

        from vkd.model import ModelAdapter
        from vkd.train import Tokenize

        torch.set_num_threads(1)  # a helper beside the train workers: never take every core
        while len(_TOKENIZERS) >= 4:  # each run's model folder is new: keep the last few only
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = Tokenize(ModelAdapter.load(model_path, weights=False), max_length)
    items = [{"image": batch["image"][i], "questions": list(batch["questions"][i]),
              "answers": list(batch["answers"][i]), "source": str(batch["source"][i])}
             for i in range(len(batch["source"]))]
    return _TOKENIZERS[key](items)


class Ahead:
    """Iterates ``items`` in a background thread, up to ``depth`` items ahead of the consumer.
    A step that draws from several Ray Data streams starts them side by side instead of one
    after the other (each stream's start costs seconds), and a statistics pass starts its
    next stream while it works on the current one. The producer's errors reach the consumer."""
    _END = object()

    def __init__(self, items: Any, depth: int = 2):
        import queue
        import threading

        self._queue: Any = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), daemon=True)
        self._thread.start()

    def _produce(self, items: Any) -> None:
        import queue

        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((self._END, None))
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put((self._END, error))

    def __iter__(self) -> "Ahead":
        return self

    def __next__(self) -> Any:
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it may hold an endless stream)."""
        self._stop.set()


INLINE_BLOCK_ROWS = 16     # ft_Data rows per block of such a stream: its first batch is tokenised early
TOKENIZE_ROWS = 64         # sequences per tokeniser call


@dataclass
class RowPlan:
    """Which ft_Data rows a stream reads and how each becomes training sequences."""
    ids: frozenset[str] | None = None    # entities whose rows it reads (None: all)
    image_only: bool = False             # skip text-only rows
    names: dict[str, str] | None = None  # entity id -> name: only the pairs that name the entity (alignment)
    answer: str | None = None            # replace every answer (a refusal target)
    turns: int = 1
    seed: int = 0
    rows: frozenset[int] | None = None   # only the rows with these keys (vkd.train.row_key); None: all

    def keep(self, row: dict[str, Any]) -> bool:
        from vkd.train import row_key

        return ((self.ids is None or row.get("ID") in self.ids) and not (self.image_only and row.get("image") is None)
                and (self.rows is None or row_key(row) in self.rows))

    def sequences(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from vkd.data.items import naming_sequences, train_sequences

        row = dict(row)
        where = row.pop("path", None)  # a streamed read names the shard; a read in the driver, the shard and row
        if where or "_source" not in row:
            row["_source"] = f"{where or 'ft_Data'}, entity {row.get('ID')}"
        if self.names is not None:
            seqs = naming_sequences(row, self.names.get(row.get("ID"), ""))
        else:
            seqs = train_sequences(row, self.turns, self.seed)
        if self.answer is not None:
            seqs = [{**s, "answers": [self.answer] * len(s["answers"])} for s in seqs]
        return [{k: it[k] for k in ("image", "questions", "answers", "source")} for it in seqs]


def shuffled_sequences(rows: list[dict[str, Any]], plan: RowPlan, items: int, rng: Any) -> list[dict[str, Any]]:
    """The first ``items`` sequences of ``rows`` pass after pass, each pass's sequences in a
    new random order."""
    seqs: list[dict[str, Any]] = []
    while len(seqs) < items:
        one_pass = [s for r in rows for s in plan.sequences(r)]
        if not one_pass:
            break
        rng.shuffle(one_pass)
        seqs += one_pass
    return seqs[:items]


def train_dataset(data: str | Path, model_path: str, cfg: TrainConfig, plan: RowPlan | None = None,
                  items: int | None = None, skip: int = 0):
    """Ray dataset of tokenised train sequences: parquet shards -> the rows of ``plan``,
    shuffled -> sequences -> arrays, streamed.

    With ``items`` (a stream that stops at what its run draws: an unlearning's), the stream
    is those many sequences, shuffled as sequences (pass after pass while the rows run
    out), so its consumer needs no local shuffle buffer (see ``unlearn_train_config``): the
    tokeniser does only what is drawn, and the first batch does not wait for a buffer of
    tokenised sequences to fill. ``skip``: the stream starts after its first ``skip``
    sequences (a run resumed where it stopped; streams small enough to read in the driver)."""
    import ray

    from vkd.data.layout import TRAIN_SPLIT, driver_sized, read_rows, shards_holding

    if skip and items is None:
        raise ValueError("a stream starts mid-way only when it stops at what its run draws (items)")

    plan = plan or RowPlan(turns=cfg.turns, seed=cfg.seed)
    shards = shards_holding(Path(data), TRAIN_SPLIT, plan.ids)
    # Rows come grouped by entity; shuffle them globally before they fan out into sequences,
    # so each worker's local shuffle buffer mixes many entities.
    inline = driver_sized(shards)
    if inline:
        # A small stream (an unlearning's forget or retain rows, the demo's whole split):
        # read, filter and shuffle here, in milliseconds. Ray Data's file listing, read
        # tasks and all-to-all shuffle would cost a stream 8-18 s to its first batch, most
        # of it starting their worker processes.
        import random

        rows = [r for r in read_rows(Path(data), TRAIN_SPLIT, plan.ids) if plan.keep(r)]
        rng = random.Random(plan.seed)
        if items is not None and rows:
            seqs = shuffled_sequences(rows, plan, items, rng)[skip:]
            ds = ray.data.from_items(seqs, override_num_blocks=max(1, math.ceil(len(seqs) / TOKENIZE_ROWS)))
        else:
            rng.shuffle(rows)
            ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / INLINE_BLOCK_ROWS)))
            ds = ds.flat_map(plan.sequences)
    else:
        if skip:
            raise ValueError("a stream too large to read in the driver cannot start mid-way; pass its "
                             "sequences over in the run (TrainJob.discard)")
        ds = ray.data.read_parquet([str(p) for p in shards], include_paths=True)
        if plan.ids is not None or plan.image_only or plan.rows is not None:
            ds = ds.filter(plan.keep)
        if items is None:
            ds = ds.random_shuffle(seed=plan.seed).flat_map(plan.sequences)
        else:  # shuffled as sequences, as above (one order for every pass)
            ds = ds.flat_map(plan.sequences).random_shuffle(seed=plan.seed).limit(items)
    ds = ds.map_batches(tokenize_batch, fn_kwargs={"model_path": model_path, "max_length": cfg.max_length},
                        batch_size=TOKENIZE_ROWS, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=1),
                        num_cpus=0.5)
    if inline:
        # Run a small stream to its end at once, without backpressure. Held back to the
        # consumer's pace, its executor (in Ray Data's split coordinator) loops without
        # pause whenever no task is running: measured with `top`, each such stream took a
        # quarter of a core for the whole run, more than a one-CPU train worker got.
        # The concurrency cap stays: it holds the tokeniser to one task at a time.
        from ray.data._internal.execution.backpressure_policy import (
            ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ConcurrencyCapBackpressurePolicy)

        ds.context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [ConcurrencyCapBackpressurePolicy])
    return ds


def starts_mid_way(data: str | Path, plan: RowPlan) -> bool:
    """Whether ``plan``'s stream is small enough to read in the driver, and so can start
    mid-way (``train_dataset``'s skip); a larger one's resumed run discards what it skips."""
    from vkd.data.layout import TRAIN_SPLIT, driver_sized, shards_holding

    return driver_sized(shards_holding(Path(data), TRAIN_SPLIT, plan.ids))


def train_datasets(data: str | Path, model_path: str, cfg: TrainConfig) -> dict[str, Any]:
    """The datasets of a fine-tuning run: ``train``, and ``align`` (naming pairs) when
    ``cfg.align_steps``."""
    from vkd.data.layout import load_meta

    out = {"train": train_dataset(data, model_path, cfg)}
    if cfg.align_steps:
        names = {e.id: e.name for e in load_meta(data).entities}
        out["align"] = train_dataset(data, model_path, cfg, RowPlan(names=names, seed=cfg.seed))
    return out


def _whole_params(engine, zero_stage: int):
    """Every rank enters: under ZeRO-3 the full parameters are gathered for the block."""
    import contextlib

    import deepspeed

    if zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _save_hf(engine, adapter, path: Path, rank: int, zero_stage: int) -> None:
    with _whole_params(engine, zero_stage):
        if rank == 0:
            adapter.save(path)


class Probe:
    """Rank 0's evaluation during a run (a tune trial's intermediate results): the
    multiple-choice items of ``eval`` (its ``max_rows`` and ``retain_entities``; generation
    is skipped, the objective needs none) scored on the model as it trains, with the study
    objective against ``before``, the starting model's scores on the same items. Results
    before the last step score every ``SAMPLE``-th item of each key (cheap rungs for ASHA, the
    same items at every rung, against ``before`` scored on those items); the last scores all."""

    SAMPLE = 4

    def __init__(self, spec: dict[str, Any], text_fixed: bool = False):
        from vkd.config import EvalConfig
        from vkd.data.items import eval_items, eval_plan, reference_images

        cfg = EvalConfig(**spec["eval"])
        data, forget = spec["data"], spec["forget"]
        self.items = eval_items(data, forget, cfg.max_rows, generation=False,
                                plan=eval_plan(data, forget, cfg.retain_entities))
        self.references = reference_images(data, forget, cfg.references)
        self.before, self.batch_size = spec["before"], cfg.batch_size
        by_key: dict[str, list[dict]] = {}
        for it in self.items:
            by_key.setdefault(it["key"], []).append(it)
        # every SAMPLE-th item of each key (at least one), so every key is scored at every rung
        self.sample = [it for group in by_key.values() for it in group[::self.SAMPLE]]
        # a run that trains the visual module alone cannot move a text-only answer: the
        # earlier rungs take those keys from the starting model (the last result scores them)
        self.rung_items = [it for it in self.sample if it["image"] is not None] if text_fixed else self.sample
        self.start_model = spec["start_model"]
        # the starting model's scores on the sample: given (a study scores them once for
        # all its trials) or scored at the first rung
        self.sample_before: dict[str, float] | None = spec.get("sample_before")

    def start_scores(self) -> dict[str, float]:
        """The starting model's scores on the sample."""
        from vkd.model import ModelAdapter

        return self.score(ModelAdapter.load(self.start_model), self.sample)

    def score(self, adapter, items: list[dict]) -> dict[str, float]:
        import torch

        from vkd.eval import aggregate, evaluate_items

        model = adapter.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            scores = aggregate(evaluate_items(adapter, items, self.references, self.batch_size))
        model.train(was_training)
        return scores

    def __call__(self, adapter, final: bool) -> dict[str, float]:
        from vkd.study import objective

        if final:
            after = self.score(adapter, self.items)
            return {**{f"eval/{k}": v for k, v in after.items()}, **objective(self.before, after)}
        if self.sample_before is None:
            self.sample_before = self.start_scores()
        after = {**self.sample_before, **self.score(adapter, self.rung_items)}
        return {**{f"eval/{k}": v for k, v in after.items()}, **objective(self.sample_before, after)}


class _OnRayTrain:
    """The loop's view of its run on a Ray Train worker."""
    local = False

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def resume_from(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint: Any = None, last: bool = False) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)


class _InProcess:
    """The loop's view of a run in the caller's process: one rank, the datasets as they are
    (a resumed run's start where it stopped), resumed from ``job.resume_dir`` if any; the
    last result and checkpoint are the run's, and in a Tune trial every result before the
    last also goes to ``ray.tune.report`` (the trial reports the last itself once it has
    written it down: a scheduler may stop a trial at any report). Ray Train's own local mode
    refuses to run inside a Tune trial."""
    local = True
    rank, world = 0, 1

    def __init__(self, datasets: dict[str, Any], report_to_tune: bool, resume_dir: str = ""):
        self.datasets, self.report_to_tune, self.resume_dir = datasets, report_to_tune, resume_dir
        self.metrics: dict[str, Any] = {}
        self.checkpoint: Any = None

    def dataset_shard(self, name: str):
        return self.datasets[name]

    def resume_from(self):
        import ray.train

        return ray.train.Checkpoint.from_directory(self.resume_dir) if self.resume_dir else None

    def report(self, metrics: dict[str, Any], checkpoint: Any = None, last: bool = False) -> None:
        self.metrics, self.checkpoint = metrics, checkpoint or self.checkpoint
        if self.report_to_tune and not last:
            from ray import tune

            tune.report(metrics)


def worker_loop(job_dict: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    job = TrainJob(**{**job_dict, "cfg": TrainConfig(**job_dict["cfg"])})
    _train(job, _OnRayTrain())


def _train_in_process(job: TrainJob, datasets: dict[str, Any], report_to_tune: bool) -> Any:
    """The loop in this process, as the one rank of a gloo group (DeepSpeed needs a process
    group and the rank variables); returns a Ray Train Result. The group is made once and
    kept for the process's later runs: DeepSpeed keeps handles to the groups it derives from
    it, which a new group would leave dangling."""
    import ray.train
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ValueError(f"a run in this process needs it alone in its process group; it is one of "
                         f"{dist.get_world_size()} ranks: run it on Ray Train (train.workers)")
    for ds in datasets.values():  # what Ray Train's DataConfig sets for its workers
        ds.context.execution_options.preserve_order = True
    session = _InProcess(datasets, report_to_tune, job.resume_dir)
    rank_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in rank_env}
    os.environ.update(rank_env)
    try:
        _train(job, session)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ray.train.Result(metrics=session.metrics, checkpoint=session.checkpoint, path=None, error=None)


def _train(job: TrainJob, session: Any) -> None:
    import deepspeed
    import ray.train
    import torch

    from vkd.config import UnlearnConfig
    from vkd.methods import METHODS, StepContext
    from vkd.model import ModelAdapter
    from vkd.train import ds_config, model_inputs, set_trainable, skip_shm_comm_build, trainable_names

    cfg = job.cfg
    rank, world = session.rank, session.world
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    skip_shm_comm_build()

    ucfg = UnlearnConfig(**job.unlearn)
    method = METHODS.get(job.method)(ucfg)
    adapter = ModelAdapter.load(job.model_path)
    model = adapter.model
    model.train()
    if job.method == "finetune":
        params = set_trainable(adapter, cfg.trainable)
    else:
        params = set_trainable(adapter, method.trainable, ucfg.vision_layers if method.trainable == "visual" else 0)
    if job.masks_path:
        masks = torch.load(job.masks_path)
        for name, p in model.named_parameters():
            if name in masks and p.requires_grad:
                p.register_hook(lambda g, m=masks[name]: g * m.to(g.dtype))
    # With several ranks, every trainable parameter must take part in every step on every
    # rank, or ZeRO's gradient buckets differ across ranks: a text-only batch skips the
    # vision tower and projector, so those join each loss at weight 0 (one rank needs none).
    visual = set(trainable_names(adapter, "visual"))
    dangling = [p for n, p in model.named_parameters() if p.requires_grad and n in visual] if world > 1 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(engine_config(cfg, world), job.total_steps))
    if world == 1:  # nothing to all-reduce: one rank holds the whole gradient
        engine.enable_backward_allreduce = False
    step_ctx = StepContext(adapter=adapter, cfg=ucfg)
    if method.needs_reference:
        step_ctx.reference = ModelAdapter.load(job.reference_path or job.model_path).model.to(engine.device)
        step_ctx.reference.requires_grad_(False)
    if job.teacher_path:
        step_ctx.teacher = torch.load(job.teacher_path)

    step = 0
    checkpoint = session.resume_from()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="ds", load_module_strict=False)  # a rung's holds no frozen weight
            step = json.loads((Path(d) / "state.json").read_text())["step"]
    resumed_from = step

    tracker = None
    if rank == 0 and job.mlflow.get("run_id"):
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(job.mlflow["tracking_uri"])
    probe = Probe(job.probe, text_fixed=method.trainable == "visual") if job.probe and rank == 0 else None
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=job.total_steps, initial=step, desc=job.name, mininterval=5, ascii=True)

    def batches(dataset: str, at_step: int, drop: int = 0):
        """Endless batches of one dataset shard, pass after pass; the first ``drop`` are
        passed over."""
        shard = session.dataset_shard(dataset)
        while True:
            count = 0
            for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                                  local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                                  local_shuffle_seed=cfg.seed + rank + at_step):
                count += 1
                if drop:
                    drop -= 1
                    continue
                yield batch
            if count == 0:
                raise RuntimeError(f"a worker got no {dataset} batch: use fewer workers or a smaller batch size")
            at_step += 1

    # Throughput counts from the end of the first step (pipelines warmed up); "steady" over
    # the second half of this run's steps, once Ray Data's start-up burst is over.
    start, seen, stamps = None, step, []
    waited = 0.0               # seconds spent waiting for batches since the first step
    sources: dict[str, tuple[str, Any]] = {}  # stream -> (dataset it reads now, its batches)
    try:
        while step < job.total_steps:
            ask = time.perf_counter()
            inputs = {}
            for stream in method.streams:
                dataset = "align" if stream == "train" and step < cfg.align_steps else stream
                if sources.get(stream, ("",))[0] != dataset:
                    if stream in sources:
                        sources[stream][1].close()
                    # a resumed run passes over the batches its earlier steps drew (job.discard)
                    drop = job.discard.get(dataset, 0) // cfg.batch_size if step == resumed_from else 0
                    sources[stream] = (dataset, Ahead(batches(dataset, step, drop)))
            for stream in method.streams:
                batch = next(sources[stream][1])
                inputs[stream] = model_inputs({k: v.to(engine.device) for k, v in batch.items()}, keys=method.distills)
            if start is not None:
                waited += time.perf_counter() - ask
            loss, metrics = method.loss(engine, inputs, step_ctx)
            if dangling:
                loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in dangling)
            engine.backward(loss)
            engine.step()
            if not engine.is_gradient_accumulation_boundary() and cfg.grad_accum > 1:
                continue
            step += 1
            stamps.append(time.perf_counter())
            if start is None:
                start, seen = stamps[-1], step
            if rank == 0 and step == job.fault_at_step and job.fault_marker and not Path(job.fault_marker).exists():
                Path(job.fault_marker).write_text(str(step))
                time.sleep(5)  # let the controller register the last reported checkpoint first
                os._exit(1)
            done = step >= job.total_steps
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", data=sources[method.streams[0]][0], refresh=False)
            per_step = cfg.batch_size * cfg.grad_accum * world
            elapsed = max(stamps[-1] - start, 1e-9)
            half = len(stamps) // 2
            report = {**metrics, "step": step, "resumed_from": resumed_from, "lr": engine.get_lr()[0],
                      "samples_per_s": (step - seen) * per_step / elapsed,
                      "steady_samples_per_s": (len(stamps) - 1 - half) * per_step / max(stamps[-1] - stamps[half], 1e-9),
                      "data_wait": waited / elapsed}
            if tracker is not None and (step % cfg.log_every == 0 or done):
                _log(tracker, job.mlflow["run_id"], {f"train/{k}": v for k, v in report.items()
                                                     if k not in ("step", "resumed_from")}, step)
            # a run in this process has no restart to resume from: it saves the final checkpoint only
            checkpoint_due = done or (not session.local and step % cfg.checkpoint_every == 0)
            # with a probe, every result carries the objective (Tune's schedulers insist)
            probe_due = bool(job.probe) and (step in job.probe["at"] or checkpoint_due)
            if probe_due:
                with _whole_params(engine, cfg.zero_stage):
                    if probe is not None:
                        report.update(probe(adapter, final=done))
                if tracker is not None:
                    _log(tracker, job.mlflow["run_id"], {k: v for k, v in report.items() if k.startswith("eval/")
                                                         or k in ("objective", "forgetting", "preservation")}, step)
            if step in job.save_at and not done:
                _save_rung(engine, Path(job.rung_dir) / str(step), step)  # before the report: Tune may stop there
            if probe_due and not checkpoint_due:
                session.report(report)
            if checkpoint_due:
                # Ray Train copies a reported checkpoint to its storage; in process, its folder stays
                with _checkpoint_folder(job, session.local) as tmp:
                    engine.save_checkpoint(tmp, tag="ds")
                    if rank == 0:
                        (Path(tmp) / "state.json").write_text(json.dumps({"step": step}))
                    if done:
                        _save_hf(engine, adapter, Path(tmp) / "hf", rank, cfg.zero_stage)
                    session.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), last=done)
    finally:  # also when a Tune scheduler stops the trial at a report (SystemExit there)
        for _, source in sources.values():
            source.close()
        if bar is not None:
            bar.close()


def _save_rung(engine, folder: Path, step: int) -> None:
    """The training state at a rung (trainable weights, optimizer and schedule; the frozen
    weights are the starting model's), written whole or not at all: a trial that resumes
    from it trains on as if it had never stopped."""
    if (folder / "state.json").is_file():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    engine.save_checkpoint(str(tmp), tag="ds", exclude_frozen_parameters=True)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _checkpoint_folder(job: TrainJob, lasting: bool):
    """A temporary folder for a checkpoint, or a lasting one beside the final model
    (``run_training`` removes it once it has copied the model out)."""
    import contextlib

    if not lasting:
        return tempfile.TemporaryDirectory()
    return contextlib.nullcontext(tempfile.mkdtemp(prefix=".checkpoint-", dir=Path(job.out_dir).parent))


def engine_config(cfg: TrainConfig, world: int) -> TrainConfig:
    """The settings a rank's DeepSpeed engine runs with. ZeRO stages 1 and 2 partition
    optimizer state and gradients across ranks; a single rank has nothing to partition, so
    it runs stage 0 (the same updates, without the partitioning's per-step copies)."""
    if world == 1 and cfg.zero_stage in (1, 2):
        return replace(cfg, zero_stage=0)
    return cfg


def _log(tracker: Any, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log metrics at a step in one MLflow call (one database write, not one per metric)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracker.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def items_drawn(cfg: TrainConfig, steps: int) -> int:
    """Sequences a run of ``steps`` draws from a stream, over all workers: its batches, and
    each worker's local shuffle buffer filled first, and a few batches read ahead."""
    return cfg.workers * (steps * cfg.batch_size * cfg.grad_accum + cfg.shuffle_buffer + 4 * cfg.batch_size)


def steps_for(n_items: int, cfg: TrainConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.workers * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_items / per_step))


def _torch_trainer(loop, job: Any, datasets: dict[str, Any], storage: str | Path, name: str, **run_options):
    """A TorchTrainer running ``loop(job)`` on ``job.cfg``'s workers. Ray Train restores a
    run from a folder of the same name, so each call gets its own: a new run never resumes
    an older run's checkpoints. Datasets keep their order (a seed gives the same batches, so
    a tune trial and its rerun from best.yaml train alike)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.cfg
    return TorchTrainer(
        loop,
        train_loop_config={**asdict(job), "cfg": asdict(cfg)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"{name}-{uuid.uuid4().hex[:8]}", storage_path=str(Path(storage).resolve()),
                                       **run_options),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )


def _fit(trainer):
    """``trainer.fit()``, then let go of its controller. In the main thread Ray Train installs
    a SIGINT handler that holds the controller's handle, which keeps the controller, its
    dataset manager and every split coordinator of the run alive (each polling at about 1%
    of a core) until the next run replaces the handler: a batch's statistics pass left 15
    such actors running beside all of its requests. The handler before the run comes back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, saved)


def run_training(job: TrainJob, datasets: dict[str, Any], storage: str | Path, max_failures: int = 1,
                 callbacks: list[Any] | None = None, report_to_tune: bool = False):
    """Train on Ray (``datasets`` from :func:`train_datasets`); copy the final Hugging Face
    folder to ``job.out_dir``; return the Result. ``callbacks``: Ray Train callbacks (a tune
    trial on several workers passes Tune's report callback).

    ``job.local`` (one worker): the loop runs in this process on the same data, with the
    same results, without Ray Train: no controller, worker process, placement group or
    split coordinators to start (most of a tune trial's fixed cost), and no restart on
    failure. ``report_to_tune``: it runs in a Tune trial, which gets every result but the
    last (the trial reports that one once it has written it down)."""
    import ray.train

    if job.local:
        if job.cfg.workers != 1:
            raise ValueError(f"a run in this process has one worker; train.workers is {job.cfg.workers}")
        result = _train_in_process(job, datasets, report_to_tune)
    else:
        trainer = _torch_trainer(worker_loop, job, datasets, storage, f"{job.name}-{Path(job.out_dir).name}",
                                 failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                 checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                 callbacks=callbacks or [])
        result = _fit(trainer)
    with result.checkpoint.as_directory() as d:
        hf = Path(d) / "hf"
        if not (hf / "config.json").is_file():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no model")
        tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=Path(job.out_dir).parent))
        shutil.copytree(hf, tmp, dirs_exist_ok=True)
        tmp.rename(job.out_dir)
    if job.local:
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return result


@dataclass
class StatsJob:
    """A streaming pass before unlearning, on the trainer's workers: neuron importance and
    Fisher statistics of the forget and retain streams, and the teacher's visual features
    of every retain image the training will see."""
    model_path: str
    cfg: TrainConfig                   # workers, CPUs, batch size, seed
    criterion: str = "activation"      # neuron importance: activation | taylor
    importance: bool = False
    fisher_names: list[str] = field(default_factory=list)   # parameters to collect Fisher on
    teacher_layers: list[int] | None = None                 # None: no teacher features
    splits: list[str] = field(default_factory=lambda: ["forget", "retain"])  # which streams to measure


def stats_loop(job_dict: dict[str, Any]) -> None:
    """Runs on every worker: sums over this worker's shards, all-reduced; rank 0 reports them."""
    import contextlib

    import ray.train
    import torch
    import torch.distributed as dist

    from vkd.methods import nll, visual_features
    from vkd.model import ModelAdapter
    from vkd.saliency import SplitStats, accumulate_fisher, neuron_meter, neuron_modules
    from vkd.train import model_inputs, set_trainable

    job = StatsJob(**{**job_dict, "cfg": TrainConfig(**job_dict["cfg"])})
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(job.cfg.seed + rank)
    if not job.cfg.use_gpu:
        torch.set_num_threads(max(1, int(job.cfg.cpus_per_worker)))
    adapter = ModelAdapter.load(job.model_path)
    model = adapter.model
    set_trainable(adapter, "visual")  # activations of the visual module carry gradients (taylor)
    wanted = set(job.fisher_names)
    for n, p in model.named_parameters():
        p.requires_grad_(p.requires_grad or n in wanted)
    modules = neuron_modules(adapter)
    params = dict(model.named_parameters())

    # every stream starts now, side by side; each is read to its end in turn below
    streams = {split: Ahead(ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=job.cfg.batch_size))
               for split in job.splits}
    if job.teacher_layers is not None:
        streams["teacher"] = Ahead(ray.train.get_dataset_shard("teacher").iter_torch_batches(batch_size=64))
    stats = {}
    for split in job.splits:
        # zeros first, so every rank all-reduces the same tensors even with an empty shard
        st = SplitStats(fisher={n: torch.zeros_like(params[n], dtype=torch.float32) for n in job.fisher_names})
        if job.importance:
            st.importance = {n: torch.zeros(m.in_features) for n, m in modules.items()}
            st.positions = {n: 0.0 for n in modules}
        meter = neuron_meter(adapter, st, job.criterion) if job.importance else contextlib.nullcontext()
        with meter:
            for batch in streams[split]:
                nll(model, model_inputs(batch)).backward()
                accumulate_fisher(model, st, wanted)
        stats[split] = st

    teacher: dict[int, dict[str, torch.Tensor]] = {}
    if job.teacher_layers is not None:
        for batch in streams["teacher"]:
            has = batch["has_image"].bool()
            keys = batch["image_key"][has].tolist()
            new = [i for i, k in enumerate(keys) if k not in teacher]
            if not new:
                continue
            pixels = batch["pixel_values"][has][new]
            feats = visual_features(adapter, pixels, job.teacher_layers)
            for j, i in enumerate(new):
                teacher[keys[i]] = {name: f[j].clone() for name, f in feats.items()}

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for st in stats.values():
            for table in (st.importance, st.fisher):
                for v in table.values():
                    dist.all_reduce(v)
            counts = torch.tensor([float(st.batches), *[st.positions[n] for n in sorted(st.positions)]],
                                  dtype=torch.float64)
            dist.all_reduce(counts)
            st.batches = int(counts[0])
            st.positions = {n: float(c) for n, c in zip(sorted(st.positions), counts[1:].tolist())}
        if job.teacher_layers is not None:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, teacher)
            for part in parts:
                teacher.update(part)
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            torch.save({**stats, "teacher": teacher}, Path(tmp) / "stats.pt")
        ray.train.report({**{f"{s}_batches": st.batches for s, st in stats.items()}, "teacher_images": len(teacher)},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def run_stats(job: StatsJob, datasets: dict[str, Any], storage: str | Path) -> dict[str, Any]:
    """Run the statistics pass; returns {split: SplitStats for each of ``job.splits``,
    "teacher": {image key: features}}."""
    import torch

    trainer = _torch_trainer(stats_loop, job, datasets, storage, "stats")
    result = _fit(trainer)
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "stats.pt", weights_only=False)
