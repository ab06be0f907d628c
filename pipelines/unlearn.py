"""Stage `unlearn`: one request (entities of a forget split + a method) -> an unlearned model.

    python -m pipelines.unlearn --model M --data D --forget forget_10 --method vkd --out M2 [key=value ...]

Recipe (``run_unlearn``): evaluate the starting model (cached); build the method's forget
and retain streams; run the statistics pass it needs (Fisher, neuron importance, teacher
features) on the trainer's workers and let the method prepare from it (pruning, gradient
masks); train on the one trainer; evaluate again; record both evaluations, the report
(markdown and a PNG chart) and the model in MLflow, and register it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlflow

from pipelines.common import parse, parser, refuse_existing, resolve_config, run_main
from pipelines.evaluate import cached_evaluation, evaluate_on_ray, with_lookalikes
from pipelines.relearn import RelearnResult, relearn_attack
from pipelines.runtime import init_ray
from pipelines.stats import cached_stats, run_need
from pipelines.tracking import log_model, stage_run, tracking_uri
from pipelines.train import Rungs, Tracking, TrainJob, run_training, starts_mid_way, train_dataset, unlearn_trainer
from vkd.config import Config, TrainConfig, cache_root
from vkd.data.items import items_for
from vkd.data.layout import ForgetSet, forget_set, load_meta
from vkd.data.streams import RowPlan
from vkd.methods import METHODS, Method, method_for
from vkd.metrics import aggregate, counts, format_table, guess_chance
from vkd.model import ModelAdapter, resolve_model
from vkd.probe import ProbeSpec
from vkd.report import write_report
from vkd.study import objective
from vkd.train import items_drawn


@dataclass
class TrialHooks:
    """What a Tune trial asks of an unlearning run beyond a request: evaluations on the
    trainer's rank 0 at ``probe_at`` (multiple choice; the last is the run's ``after``,
    ``sample_before``: the starting model on the earlier ones' sample, when the study has
    it), training in this process (``local``, one worker) with every result but the last
    sent to Tune (``report_to_tune``), Ray Train callbacks (several workers), and rung
    states (promotion ASHA: a run resumed from ``rungs.resume`` goes on in MLflow run
    ``run_id`` and trains what an uninterrupted run trains)."""
    probe_at: list[int]
    sample_before: dict[str, float] | None = None
    local: bool = False
    report_to_tune: bool = False
    callbacks: list[Any] = field(default_factory=list)
    rungs: Rungs | None = None
    run_id: str | None = None


@dataclass
class UnlearnOptions:
    """One unlearning run, resolved at the door: the config, the starting model folder, the
    benchmark, whom to forget, the output folder (which must not exist) and the cache."""
    cfg: Config
    model: Path
    data: Path
    forget: ForgetSet
    out: Path
    cache: Path
    tags: dict[str, str] = field(default_factory=dict)   # a "mlflow.parentRunId" nests the run (a study)
    register: bool = True
    keep_model: bool = True        # False (tune trials): the weights are neither logged nor kept
    run_name: str | None = None
    before: dict[str, float] | None = None   # the starting model's scores, when the caller has them
    score_in_trainer: bool = False           # final scores on the trainer's rank 0 (multiple choice), not Ray Data
    trial: TrialHooks | None = None
    lookalikes: dict[str, list[str]] = field(default_factory=dict)   # each forget entity's (forget.lookalikes: all)


@dataclass
class UnlearnResult:
    method: str
    model: Path
    before: dict[str, float]
    after: dict[str, float]
    counts: dict[str, int]
    objective: dict[str, float]                # objective, forgetting, preservation (vkd.study.objective)
    seconds: float                             # statistics pass and training
    figures: dict[str, Any]                    # the preparation's and the run's figures (the report's)
    run_id: str
    registered_name: str
    version: int | None = None
    relearn: RelearnResult | None = None       # the relearning attack on the result (unlearn.relearn)


def options(cfg: Config, model: str | Path, data: str | Path, forget: str | ForgetSet, out: str | Path,
            cache: str | Path | None = None, **fields: Any) -> UnlearnOptions:
    """``UnlearnOptions`` from what a command line gives: the model resolved (``tiny``
    built), the forget split resolved with the lookalikes the starting model sees, paths
    absolute (workers run elsewhere)."""
    data = Path(data).resolve()
    cache = Path(cache or cache_root()).resolve()
    model = resolve_model(model, cfg.model, data, cache)
    fs, table = with_lookalikes(model, data, forget_set(load_meta(data), forget), cfg.eval.lookalikes, cache)
    return UnlearnOptions(cfg=cfg, model=model, data=data, forget=fs, out=Path(out).resolve(), cache=cache,
                          lookalikes=table, **fields)


@dataclass
class Prepared:
    """The trainer's starting point: the model folder (pruned, for VKD), the masks and the
    teacher table as files, and the preparation's figures."""
    model_path: str
    masks_path: str | None = None
    teacher_path: str | None = None
    pruned: dict[str, list[int]] | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def prepare(opts: UnlearnOptions, method: Method, plans: dict[str, RowPlan], tcfg: TrainConfig,
            work: Path) -> Prepared:
    """The statistics pass the method needs (cached) and what the method makes of it."""
    adapter = ModelAdapter.load(opts.model)
    need = run_need(method, opts.model, opts.data, plans, tcfg, adapter)
    if need is None:
        return Prepared(str(opts.model))
    start = time.perf_counter()
    stats, measured = cached_stats(need, opts.data, work, opts.cache)
    figures = {"stats_seconds": time.perf_counter() - start, "stats_measured": ",".join(measured) or "none (cached)"}
    prep = method.prepare(adapter, stats, method.trainable(adapter), opts.cfg.unlearn.seed, opts.data, plans)
    model_path = str(opts.model)
    if prep.pruned is not None:
        adapter.save(work / "pruned")
        model_path = str(work / "pruned")
    masks, teacher = prep.save(work)
    return Prepared(model_path, masks, teacher, prep.pruned, {**figures, **prep.figures})


def train_job(opts: UnlearnOptions, method: Method, plans: dict[str, RowPlan], tcfg: TrainConfig,
              prepared: Prepared, before: dict[str, float], run_id: str) -> tuple[TrainJob, dict[str, Any]]:
    """The trainer's job and its datasets. A resumed run's streams start after what the steps
    before it drew: cut off, or passed over in the run when too large to start mid-way."""
    cfg, trial = opts.cfg, opts.trial
    resume = trial.rungs.resume if trial and trial.rungs else 0
    drawn = resume * tcfg.batch_size * tcfg.grad_accum
    cut = {s: drawn if starts_mid_way(opts.data, plans[s]) else 0 for s in method.streams}
    datasets = {s: train_dataset(opts.data, prepared.model_path, tcfg, plans[s], items=items_drawn(tcfg, tcfg.max_steps),
                                 skip=cut[s]) for s in method.streams}
    probe = None
    if trial or opts.score_in_trainer:
        probe = ProbeSpec(data=str(opts.data), forget=opts.forget, eval=cfg.eval, start_model=str(opts.model),
                          before=before, at=sorted(set(trial.probe_at if trial else [tcfg.max_steps])),
                          sample_before=trial.sample_before if trial else None)
    job = TrainJob(model_path=prepared.model_path, out_dir=str(opts.out), cfg=tcfg, total_steps=tcfg.max_steps,
                   method=method, masks_path=prepared.masks_path, reference_path=str(opts.model),
                   teacher_path=prepared.teacher_path, tracking=Tracking(tracking_uri(cfg.mlflow), run_id),
                   probe=probe, name=f"unlearn-{method.name}", local=bool(trial and trial.local),
                   rungs=trial.rungs if trial else None,
                   discard={s: drawn - cut[s] for s in method.streams if drawn > cut[s]})
    return job, datasets


def record(opts: UnlearnOptions, method: Method, run: Any, before: dict[str, float], after: dict[str, float],
           n_after: dict[str, int], prepared: Prepared, seconds: float,
           attack: RelearnResult | None = None) -> UnlearnResult:
    """metrics.json, the config and the pruning in the model folder; both evaluations, the
    lookalikes, the relearning attack, the figures and the report in MLflow; the model
    logged and registered (or its weights dropped, a tune trial's)."""
    cfg, out, bench = opts.cfg, opts.out, load_meta(opts.data).name
    cfg.save(out / "vkd_config.yaml")
    if prepared.pruned is not None:  # {neuron module: pruned input channels}, kept at zero through training
        (out / "pruning.json").write_text(json.dumps(prepared.pruned, indent=1))
    chance = guess_chance(items_for(opts.data, opts.forget, cfg.eval))  # the open questions' chance levels
    scores = objective(before, after, chance)
    relearn = attack.to_dict() if attack else None
    (out / "metrics.json").write_text(json.dumps({"before": before, "after": after, "lookalikes": opts.lookalikes,
                                                  "relearn": relearn, "chance": chance}, indent=1, sort_keys=True))
    figures = {**prepared.figures, "unlearn_seconds": seconds, **scores, **(attack.gaps if attack else {}),
               **{f"chance/{k}": v for k, v in chance.items()}}
    scalars = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
    mlflow.log_metrics({f"before/{k}": v for k, v in before.items()})
    mlflow.log_metrics({f"after/{k}": v for k, v in after.items()})
    mlflow.log_metrics({k: float(v) for k, v in scalars.items()})
    if opts.forget.lookalikes:
        mlflow.set_tag("lookalikes", ",".join(opts.forget.lookalikes))
    title = f"{method.name} on {opts.forget.name} of {bench}"
    for path in write_report(out, title, before, after, scalars, opts.lookalikes, relearn):
        mlflow.log_artifact(str(path), artifact_path="report")
    name = f"vkd-{bench}-unlearned"
    version = None
    if opts.keep_model:
        version = log_model(run.info.run_id, out, name, [f"{method.name}_{opts.forget.name}"],
                            cfg.mlflow.register and opts.register)
    else:
        for f in out.glob("*.safetensors"):
            f.unlink()
    return UnlearnResult(method.name, out, before, after, n_after, scores, seconds, figures, run.info.run_id, name,
                         version, attack)


def run_unlearn(opts: UnlearnOptions) -> UnlearnResult:
    """Unlearn ``opts.forget``'s entities from ``opts.model`` into ``opts.out``."""
    refuse_existing(opts.out, overwrite=False)
    cfg, fs = opts.cfg, opts.forget
    method = method_for(cfg.unlearn)
    plans = method.stream_plans(opts.data, fs, cfg.unlearn)
    tcfg = unlearn_trainer(cfg, opts.model, opts.data, plans)  # max_length fitted here, before any worker
    init_ray(cfg.ray.num_cpus)
    trial = opts.trial
    tags = {"benchmark": load_meta(opts.data).name, "forget": fs.name, "method": method.name,
            "entities": ",".join(fs.forget), "base_model": str(opts.model), **opts.tags}
    work = Path(tempfile.mkdtemp(prefix=f".unlearn-{opts.out.name}-", dir=opts.out.parent))
    resumed = bool(trial and trial.rungs and trial.rungs.resume)
    try:
        with stage_run(cfg, "unlearn", tags, run_name=opts.run_name or f"unlearn-{method.name}-{fs.name}",
                       run_id=trial.run_id if resumed else None) as run:
            before = opts.before or cached_evaluation(opts.model, opts.data, fs, cfg.eval, opts.cache)[0]
            start = time.perf_counter()
            prepared = prepare(opts, method, plans, tcfg, work)
            prepared.figures["max_length"] = tcfg.max_length
            job, datasets = train_job(opts, method, plans, tcfg, prepared, before, run.info.run_id)
            result = run_training(job, datasets, storage=work / "ray", callbacks=trial.callbacks if trial else None,
                                  report_to_tune=bool(trial and trial.report_to_tune))
            seconds = time.perf_counter() - start
            prepared.figures.update({k: result.metrics[k] for k in ("seconds_per_step", "peak_gpu_gib")
                                     if k in result.metrics})
            if job.probe is not None:
                after = {k[len("eval/"):]: v for k, v in result.metrics.items() if k.startswith("eval/")}
                n_after: dict[str, int] = {}
            else:
                results = evaluate_on_ray(opts.out, opts.data, fs, cfg.eval)
                after, n_after = aggregate(results, fs.lookalikes), counts(results, fs.lookalikes)
            attack = relearn_attack(cfg, opts.out, opts.data, fs, work) if cfg.unlearn.relearn else None
            return record(opts, method, run, before, after, n_after, prepared, seconds, attack)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("unlearn", "make a model forget what the forget split's entities look like")
    p.add_argument("--model", required=True, help="the vanilla model folder (tiny for an untrained one)")
    p.add_argument("--data", required=True)
    p.add_argument("--forget", required=True, help="forget_5 | forget_10 | forget_15")
    p.add_argument("--method", help=f"{' | '.join(METHODS.names())} (default: the config's unlearn.method)")
    p.add_argument("--out", required=True, help="folder for the unlearned model (must not exist)")
    p.add_argument("--relearn", action=argparse.BooleanOptionalAction, default=None,
                   help="run the relearning attack on the result and record its gaps (default: unlearn.relearn)")
    args = parse(p, argv)
    cfg = resolve_config(args, {"unlearn": {"method": args.method, "relearn": args.relearn}})
    refuse_existing(args.out, overwrite=False)
    r = run_unlearn(options(cfg, args.model, args.data, args.forget, args.out))
    print(format_table(r.after, r.counts, {"before": r.before, "after": r.after}))
    print(f"study objective {r.objective['objective']:.4f} (forgetting {r.objective['forgetting']:.3f}, "
          f"preservation {r.objective['preservation']:.3f}; vkd.study.objective)")
    print(f"{r.method}: unlearned in {r.seconds:.0f} s -> {r.model}; report: {r.model}/report.md")
    if r.relearn:
        print(f"relearning attack ({len(r.relearn.folds)} over {r.relearn.mode}): "
              + ", ".join(f"{k} {v:+.3f}" for k, v in r.relearn.gaps.items()))
    if r.version:
        print(f"MLflow run {r.run_id}, registered {r.registered_name} version {r.version}")


if __name__ == "__main__":
    sys.exit(run_main(main))
