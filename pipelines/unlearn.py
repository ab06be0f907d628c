"""Stage `unlearn`: one request (entities of a forget split + a method) -> an unlearned model.

    python -m pipelines.unlearn --model M --data D --forget forget_10 --method vkd --out M2 [key=value ...]

Recipe: evaluate the starting model (cached), build the forget and retain streams, run the
statistics pass the method needs (Fisher, neuron importance, teacher features) on the
trainer's workers, prune and build the gradient mask, train on the one trainer, evaluate
again, then log both evaluations, a report (markdown and a PNG chart) and the model to
MLflow and register it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines.common import init_ray, parse, parser, refuse_existing, resolve_config, run_main
from pipelines.evaluate import cached_evaluation, evaluate_on_ray, format_table
from pipelines.tracking import log_model, stage_run, tracking_uri
from pipelines.trainer import (RowPlan, StatsJob, TrainJob, items_drawn, run_stats, run_training, starts_mid_way,
                               train_dataset)
from vkd.config import Config, TrainConfig, cache_root
from vkd.data.layout import TRAIN_SPLIT, ForgetSet, forget_set, load_meta, read_rows
from vkd.eval import DIRECTIONS, aggregate, counts
from vkd.methods import Method, method_for
from vkd.study import objective
from vkd.model import resolve_model
from vkd.train import sample_rows


def unlearn_train_config(cfg: Config) -> TrainConfig:
    """The trainer settings of an unlearning run: the train section's workers, ZeRO stage
    and precision, with the unlearn section's steps, learning rate and batch size. No local
    shuffle buffer: its streams come shuffled as sequences (``train_dataset`` with ``items``)."""
    u = cfg.unlearn
    return dataclasses.replace(cfg.train, lr=u.lr, batch_size=u.batch_size, max_steps=u.steps, align_steps=0,
                               warmup_steps=min(cfg.train.warmup_steps, max(1, u.steps // 10)),
                               checkpoint_every=max(u.steps, 1), grad_accum=1, seed=u.seed, shuffle_buffer=0)


def stream_plans(cfg: Config, method: Method, data: str | Path, forget: str | ForgetSet) -> dict[str, RowPlan]:
    """The forget stream (the forget entities' image pairs; answers replaced by the refusal
    target when the forget loss is ``refusal``) and the retain stream (``retain_rows`` rows
    of the other entities, image rows only when the method trains the visual module only)."""
    meta = load_meta(data)
    u = cfg.unlearn
    answer = u.refusal_answer if u.forget_loss == "refusal" else None
    fs = forget_set(meta, forget)
    retain_ids = frozenset(fs.retain)
    candidates = [r for r in read_rows(data, TRAIN_SPLIT, retain_ids)
                  if r.get("image") is not None or method.retain_text]
    return {
        "forget": RowPlan(ids=frozenset(fs.forget), image_only=True, answer=answer, seed=u.seed),
        "retain": RowPlan(ids=retain_ids, image_only=not method.retain_text, seed=u.seed,
                          rows=sample_rows(candidates, u.retain_rows, u.seed)),
    }


def stats_keys(cfg: Config, method: Method, model: Path, data: str | Path, plans: dict[str, RowPlan],
               tcfg: TrainConfig, trainable: list[str]) -> dict[str, str]:
    """Cache keys of what the statistics pass measures, one per part: the forget stream's
    and the retain stream's importance and Fisher, and the teacher's features. A part's key
    holds everything its value depends on (model and data content, the stream's rows, the
    measuring settings) and nothing else, so requests and trials that differ only in, say,
    their forget entities or thresholds share the retain side."""
    import hashlib

    from pipelines.evaluate import model_fingerprint
    from vkd.model import data_fingerprint

    u = cfg.unlearn
    plan = {s: {k: sorted(v) if isinstance(v, frozenset) else v for k, v in dataclasses.asdict(p).items()}
            for s, p in plans.items()}
    common = {"model": model_fingerprint(model), "data": data_fingerprint(data), "max_length": tcfg.max_length}
    measure = {**common, "criterion": u.importance, "importance": method.prunes, "stat_batches": u.stat_batches,
               "fisher": sorted(trainable) if method.needs_fisher else [], "batch_size": tcfg.batch_size,
               "workers": tcfg.workers}
    parts = {"forget": {**measure, "plan": plan["forget"]}, "retain": {**measure, "plan": plan["retain"]}}
    if method.distills:
        parts["teacher"] = {**common, "plan": plan["retain"], "layers": list(u.vkd_layers)}
    return {name: hashlib.sha256(json.dumps({"part": name, **v}, sort_keys=True, default=str).encode()).hexdigest()[:20]
            for name, v in parts.items()}


@dataclasses.dataclass
class StatsNeed:
    """What one run (a request, a trial) asks of the statistics pass: each part's cache key,
    the streams to measure it on, and the pass's settings."""
    job: StatsJob                  # the pass's settings (its splits and teacher layers are filled per pass)
    keys: dict[str, str]           # part (forget, retain, teacher) -> cache key
    plans: dict[str, RowPlan]
    per_split: int                 # rows of each stream the pass reads
    layers: list[int]              # vision layers of the teacher's features


def stats_need(cfg: Config, method: Method, model: Path, data: str | Path, plans: dict[str, RowPlan],
               tcfg: TrainConfig, trainable: list[str]) -> StatsNeed:
    u = cfg.unlearn
    # only the trainer settings the pass depends on, so runs that differ in, say, their
    # learning rate share a pass
    pass_cfg = TrainConfig(workers=tcfg.workers, cpus_per_worker=tcfg.cpus_per_worker, use_gpu=tcfg.use_gpu,
                           batch_size=tcfg.batch_size, max_length=tcfg.max_length, seed=tcfg.seed)
    job = StatsJob(model_path=str(model), cfg=pass_cfg, criterion=u.importance, importance=method.prunes,
                   fisher_names=trainable if method.needs_fisher else [], splits=[])
    return StatsNeed(job, stats_keys(cfg, method, model, data, plans, tcfg, trainable), plans,
                     u.stat_batches * u.batch_size * tcfg.workers, list(u.vkd_layers))


def measure_stats(needs: list[StatsNeed], data: str | Path, work: Path) -> list[list[str]]:
    """Measure every part that these runs need and ``$VKD_CACHE/stats`` lacks, and keep
    each there. Runs whose passes share settings (and teacher) share one pass: each of their
    forget and retain streams is a dataset of the same Ray Train run, so a batch of N
    requests starts one worker group for its statistics, not N. Returns the parts each pass
    measured."""
    import os

    import torch

    root = cache_root() / "stats"
    groups: dict[str, dict[str, Any]] = {}
    planned: set[str] = set()
    for need in needs:
        teacher = need.keys.get("teacher")
        sig = json.dumps([dataclasses.asdict(need.job), teacher], sort_keys=True, default=str)
        group = groups.setdefault(sig, {"need": need, "streams": {}, "teacher": False})
        for part, key in need.keys.items():
            if key in planned or (root / f"{key}.pt").is_file():
                continue
            planned.add(key)
            if part == "teacher":
                group["teacher"] = True
            else:
                group["streams"][f"{part}-{key}"] = (part, key, need.plans[part])
    passes: list[list[str]] = []
    for group in groups.values():
        if not group["streams"] and not group["teacher"]:
            continue
        need = group["need"]
        job = dataclasses.replace(need.job, splits=list(group["streams"]),
                                  teacher_layers=need.layers if group["teacher"] else None)
        datasets = {name: train_dataset(data, job.model_path, job.cfg, plan).limit(need.per_split)
                    for name, (_, _, plan) in group["streams"].items()}
        if group["teacher"]:
            datasets["teacher"] = train_dataset(data, job.model_path, job.cfg, need.plans["retain"])
        stats = run_stats(job, datasets, storage=work / "ray")
        values = {key: stats[name] for name, (_, key, _) in group["streams"].items()}
        if group["teacher"]:
            values[need.keys["teacher"]] = stats["teacher"]
        root.mkdir(parents=True, exist_ok=True)
        for key, value in values.items():
            tmp = root / f"{key}.{os.getpid()}.tmp"
            torch.save(value, tmp)
            tmp.rename(root / f"{key}.pt")
        passes.append(sorted([part for part, _, _ in group["streams"].values()] + ["teacher"] * group["teacher"]))
    return passes


def cached_stats(cfg: Config, method: Method, model: Path, data: str | Path, plans: dict[str, RowPlan],
                 tcfg: TrainConfig, trainable: list[str], work: Path) -> tuple[dict[str, Any], list[str]]:
    """The statistics the method needs, each part taken from ``$VKD_CACHE/stats`` when an
    earlier run measured it and measured otherwise (on the trainer's workers) and kept.
    Returns the parts and the names of those measured now."""
    import torch

    need = stats_need(cfg, method, model, data, plans, tcfg, trainable)
    measured = [part for parts in measure_stats([need], data, work) for part in parts]
    root = cache_root() / "stats"
    return {part: torch.load(root / f"{key}.pt", weights_only=False) for part, key in need.keys.items()}, measured


def warm_stats(runs: Sequence[tuple[Config, str | ForgetSet]], model: Path, data: str | Path,
               work_parent: Path) -> list[list[str]]:
    """Measure, before any of them starts, the statistics that these runs (a study's trials,
    a batch's requests: each a config and a forget set) will ask for, in as few passes as
    their settings allow, so that they find them cached instead of each measuring its own.
    Returns the parts each pass measured."""
    from vkd.model import ModelAdapter
    from vkd.train import trainable_names

    adapter = ModelAdapter.load(model)
    needs = []
    for cfg, forget in runs:
        method = method_for(cfg.unlearn)
        if not (method.needs_fisher or method.prunes or method.distills):
            continue
        trainable = trainable_names(adapter, method.trainable,
                                    cfg.unlearn.vision_layers if method.trainable == "visual" else 0)
        needs.append(stats_need(cfg, method, model, data, stream_plans(cfg, method, data, forget),
                                unlearn_train_config(cfg), trainable))
    work = Path(tempfile.mkdtemp(prefix=".stats-", dir=work_parent))
    try:
        return measure_stats(needs, data, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_method(cfg: Config, method: Method, model: Path, data: str | Path, plans: dict[str, RowPlan],
                   tcfg: TrainConfig, work: Path) -> dict[str, Any]:
    """The statistics pass and what follows from it: the starting model (pruned for VKD),
    the gradient masks and the teacher's features. Returns TrainJob fields and figures."""
    import torch

    from vkd.model import ModelAdapter
    from vkd.saliency import apply_pruning, combine_masks, fisher_mask, pruned_neurons
    from vkd.train import trainable_names

    u = cfg.unlearn
    fields: dict[str, Any] = {"model_path": str(model)}
    figures: dict[str, Any] = {}
    pruning: dict[str, list[int]] = {}
    if not (method.needs_fisher or method.prunes or method.distills):
        return {"fields": fields, "figures": figures, "pruning": pruning}
    adapter = ModelAdapter.load(model)
    trainable = trainable_names(adapter, method.trainable, u.vision_layers if method.trainable == "visual" else 0)
    start = time.perf_counter()
    stats, measured = cached_stats(cfg, method, model, data, plans, tcfg, trainable, work)
    figures["stats_seconds"] = time.perf_counter() - start
    figures["stats_measured"] = ",".join(measured) or "none (cached)"
    masks: dict[str, Any] = {}
    if method.prunes:
        # only the neurons of the layers that train (a frozen layer stays exactly as it was)
        names = set(trainable)
        forget_st, retain_st = (dataclasses.replace(stats[s]) for s in ("forget", "retain"))
        for st in (forget_st, retain_st):
            st.importance = {k: v for k, v in st.importance.items() if f"{k}.weight" in names}
        pruned = pruned_neurons(forget_st, retain_st, u.d_i, u.d_i_mode, u.eps)
        masks = apply_pruning(adapter, pruned)
        pruning = {k: torch.nonzero(v).flatten().tolist() for k, v in pruned.items() if v.any()}
        figures["pruned_neurons"] = int(sum(int(v.sum()) for v in pruned.values()))
        figures["neurons"] = int(sum(v.numel() for v in pruned.values()))
        adapter.save(work / "pruned")
        fields["model_path"] = str(work / "pruned")
    if method.needs_fisher:
        fisher = fisher_mask(stats["forget"], stats["retain"], u.d_f, u.d_f_mode, u.eps)
        masks = combine_masks(masks, fisher)
        figures["updated_fraction"] = float(sum(float(v.sum()) for v in fisher.values())
                                            / max(1, sum(v.numel() for v in fisher.values())))
    if masks:
        torch.save(masks, work / "masks.pt")
        fields["masks_path"] = str(work / "masks.pt")
    if method.distills:
        torch.save(stats["teacher"], work / "teacher.pt")
        fields["teacher_path"] = str(work / "teacher.pt")
        figures["teacher_images"] = len(stats["teacher"])
    return {"fields": fields, "figures": figures, "pruning": pruning}


def write_report(out: Path, title: str, before: dict[str, float], after: dict[str, float],
                 figures: dict[str, Any]) -> list[Path]:
    """report.md (the table of both evaluations and the run's figures) and report.png (a bar
    chart of the multiple-choice keys, vanilla against unlearned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# {title}", "", "| metric | goal | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.3f}" if a is not None and b is not None else ""
        fmt = (lambda v: f"{v:.3f}" if v is not None else "")
        lines.append(f"| {key} | {DIRECTIONS.get(key, '')} | {fmt(b)} | {fmt(a)} | {change} |")
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    keys = [k for k in ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa") if k in before]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [before[k] for k in keys], width=0.4, label="vanilla")
    ax.bar([x + 0.2 for x in xs], [after.get(k, 0.0) for k in keys], width=0.4, label="unlearned")
    ax.set_xticks(list(xs), keys)
    ax.set_ylim(0, 1)
    ax.axhline(0.25, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylabel("multiple-choice accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    return [out / "report.md", out / "report.png"]


def run_unlearn(cfg: Config, model: str, data: str | Path, forget: str | ForgetSet, out: str | Path,
                tags: dict[str, str] | None = None, register: bool = True, probes: int = 0,
                callbacks: list[Any] | None = None, run_name: str | None = None,
                keep_model: bool = True, before: dict[str, float] | None = None,
                sample_before: dict[str, float] | None = None, local: bool = False,
                report_to_tune: bool = False, probe_at: Sequence[int] | None = None,
                rungs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Unlearn ``forget``'s entities from ``model`` into ``out`` (which must not exist).
    Returns the figures: before, after, the study objective, seconds, version, run id.

    ``probes`` > 0 (tune trials): the model is evaluated that many times during training,
    on the trainer's rank 0 (multiple-choice only), each result reported to ``callbacks``;
    the last one is the ``after`` evaluation (``sample_before``: the starting model's scores
    on the earlier evaluations' sample, when the caller has them); ``probe_at``: at these steps
    instead of evenly spaced (ASHA's rungs). Otherwise ``after`` is the full evaluation on
    Ray Data. A ``tags["mlflow.parentRunId"]`` nests the run under a parent (a study).
    ``keep_model=False`` (tune trials): the weights are neither logged nor kept; the folder
    keeps the config, the report and the metrics. ``local`` (one worker): the trainer runs in
    this process (``run_training``), and ``report_to_tune`` sends its results but the last to
    the Tune trial it runs in (the trial reports the last once it has written it down).
    ``rungs`` (a local tune trial under promotion ASHA): {"dir", "save_at", "resume", "run_id"}:
    the training state is saved at the ``save_at`` steps into ``dir/<step>``; ``resume`` > 0
    goes on from ``dir/<resume>`` (its streams start where that step left them), in the MLflow
    run ``run_id``. A resumed run trains what an uninterrupted one does."""
    out = refuse_existing(out, overwrite=False).resolve()  # workers run elsewhere: absolute paths only
    method = method_for(cfg.unlearn)
    meta = load_meta(data)
    fs = forget_set(meta, forget)
    base = resolve_model(model, cfg.model, data)
    data = Path(data).resolve()
    init_ray(cfg)
    tcfg = unlearn_train_config(cfg)
    plans = stream_plans(cfg, method, data, forget)
    run_tags = {"benchmark": meta.name, "forget": fs.name, "method": cfg.unlearn.method,
                "entities": ",".join(fs.forget), "base_model": str(base), **(tags or {})}
    figures: dict[str, Any] = {"method": cfg.unlearn.method, "model": str(out)}
    work = Path(tempfile.mkdtemp(prefix=f".unlearn-{out.name}-", dir=out.parent))
    try:
        rungs = rungs or {}
        resume = int(rungs.get("resume", 0))
        if rungs and not local:
            raise ValueError("rung checkpoints need the trainer in this process (one worker, local)")
        with stage_run(cfg, "unlearn", run_tags, run_name=run_name or f"unlearn-{cfg.unlearn.method}-{fs.name}",
                       run_id=rungs.get("run_id") if resume else None) as run:
            import mlflow

            if before is None:  # the starting model's scores (a batch passes them in)
                before, _ = cached_evaluation(base, data, forget, cfg.eval)
            start = time.perf_counter()
            prep = prepare_method(cfg, method, base, data, plans, tcfg, work)
            figures.update(prep["figures"])
            # a resumed run's streams start after what the steps before it drew: cut off, or
            # passed over in the run when too large to start mid-way
            drawn = resume * tcfg.batch_size * tcfg.grad_accum
            cut = {s: drawn if starts_mid_way(data, plans[s]) else 0 for s in method.streams}
            datasets = {s: train_dataset(data, prep["fields"]["model_path"], tcfg, plans[s],
                                         items=items_drawn(tcfg, tcfg.max_steps), skip=cut[s]) for s in method.streams}
            probe = {}
            if probes:
                every = max(1, tcfg.max_steps // probes)
                probe = {"data": str(data), "forget": forget, "eval": dataclasses.asdict(cfg.eval), "before": before,
                         "start_model": str(base), "sample_before": sample_before,
                         "at": sorted(set(probe_at or range(every, tcfg.max_steps + 1, every)))}
            job = TrainJob(out_dir=str(out), cfg=tcfg, total_steps=tcfg.max_steps, method=cfg.unlearn.method,
                           unlearn=dataclasses.asdict(cfg.unlearn), reference_path=str(base),
                           mlflow={"tracking_uri": tracking_uri(cfg.mlflow), "run_id": run.info.run_id},
                           probe=probe, name=f"unlearn-{cfg.unlearn.method}", local=local,
                           save_at=list(rungs.get("save_at", [])), rung_dir=str(rungs.get("dir", "")),
                           resume_dir=str(Path(rungs["dir"]) / str(resume)) if resume else "",
                           discard={s: drawn - cut[s] for s in method.streams if drawn > cut[s]}, **prep["fields"])
            result = run_training(job, datasets, storage=work / "ray", callbacks=callbacks,
                                  report_to_tune=report_to_tune)
            figures["unlearn_seconds"] = time.perf_counter() - start
            cfg.save(out / "vkd_config.yaml")
            if method.prunes:  # {neuron module: pruned input channels}, kept at zero through training
                (out / "pruning.json").write_text(json.dumps(prep["pruning"], indent=1))
            if probes:
                after = {k[len("eval/"):]: v for k, v in result.metrics.items() if k.startswith("eval/")}
                n_after: dict[str, int] = {}
            else:
                results = evaluate_on_ray(out, data, forget, cfg.eval)
                after, n_after = aggregate(results), counts(results)
            figures.update(before=before, after=after, counts=n_after, **objective(before, after))
            (out / "metrics.json").write_text(json.dumps({"before": before, "after": after}, indent=1, sort_keys=True))
            mlflow.log_metrics({f"before/{k}": v for k, v in before.items()})
            mlflow.log_metrics({f"after/{k}": v for k, v in after.items()})
            mlflow.log_metrics({k: float(v) for k, v in figures.items() if isinstance(v, (int, float))})
            title = f"{cfg.unlearn.method} on {fs.name} of {meta.name}"
            scalars = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
            for path in write_report(out, title, before, after, scalars):
                mlflow.log_artifact(str(path), artifact_path="report")
            name = f"vkd-{meta.name}-unlearned"
            figures["run_id"], figures["registered_name"] = run.info.run_id, name
            if keep_model:
                figures["version"] = log_model(run.info.run_id, out, name, [f"{cfg.unlearn.method}_{fs.name}"],
                                               cfg.mlflow.register and register)
            else:
                for f in out.glob("*.safetensors"):
                    f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("unlearn", "make a model forget what the forget split's entities look like")
    p.add_argument("--model", required=True, help="the vanilla model folder (tiny for an untrained one)")
    p.add_argument("--data", required=True)
    p.add_argument("--forget", required=True, help="forget_5 | forget_10 | forget_15")
    p.add_argument("--method", help="vkd | ga | gd | kl | npo | mmunlearner (default: the config's unlearn.method)")
    p.add_argument("--out", required=True, help="folder for the unlearned model (must not exist)")
    args = parse(p, argv)
    cfg = resolve_config(args, {"unlearn": {"method": args.method}})
    figures = run_unlearn(cfg, args.model, args.data, args.forget, args.out)
    print(format_table(figures["after"], figures["counts"], {"before": figures["before"], "after": figures["after"]}))
    secs = figures["unlearn_seconds"]
    print(f"study objective {figures['objective']:.4f} (forgetting {figures['forgetting']:.3f}, "
          f"preservation {figures['preservation']:.3f}; vkd.study.objective)")
    print(f"{figures['method']}: unlearned in {secs:.0f} s -> {figures['model']}; report: {figures['model']}/report.md")
    if figures.get("version"):
        print(f"MLflow run {figures['run_id']}, registered {figures['registered_name']} version {figures['version']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
