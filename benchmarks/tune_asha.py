"""The same study with FIFO and with ASHA, side by side in one run: best objective and total
trial-seconds of each.

    python benchmarks/tune_asha.py --model VANILLA --data DATA [--space tune_spaces/thresholds_grid.yaml]
        [--reports 4] [--fifo-reports N] [--reduction-factor 3] [--config configs/demo.yaml] [key=value ...]

Both studies run every trial of the space (a grid gives both the same trials); ASHA stops
the trials whose objective at a rung is not in the top 1/reduction_factor. The goal: ASHA's
best objective within 5% of FIFO's with at most 40% of its trial-seconds. The evaluation
of the starting model and the statistics pass are cached before either study starts, so
neither pays them. ``--fifo-reports 1`` gives FIFO only the final evaluation it needs (the
strict baseline; by default it evaluates as often as ASHA). It also prints, for each rung,
how well the objectives there rank the points against their final objectives under FIFO
(Spearman's rho): a rung that ranks them no better than chance decides on noise.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import parser  # noqa: E402
from pipelines.runtime import set_environment  # noqa: E402

set_environment()
from pipelines.tune import run_study  # noqa: E402
from vkd.config import load_config  # noqa: E402
from vkd.study import load_space  # noqa: E402


def rung_ranks(cfg, space, fifo: dict, asha: dict) -> None:
    """How well each ASHA rung ranks the points: the Spearman correlation of their objectives
    there with their final objectives in the FIFO study (which finishes every point)."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    final = {r["trial"]: r["objective"] for r in fifo["rows"] if r.get("objective") is not None}
    client = MlflowClient(tracking_uri(cfg.mlflow))
    exp = client.get_run(asha["parent_run_id"]).info.experiment_id
    at: dict[int, dict[str, float]] = {}
    for run in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{asha['parent_run_id']}'"):
        for m in client.get_metric_history(run.info.run_id, "objective"):
            if 0 < m.step < cfg.unlearn.steps:
                at.setdefault(m.step, {})[run.data.tags["trial"]] = m.value

    def ranks(v):
        return np.argsort(np.argsort(v))

    for step, values in sorted(at.items()):
        keys = [k for k in values if k in final]
        if len(keys) < 3:
            continue
        rho = np.corrcoef(ranks([values[k] for k in keys]), ranks([final[k] for k in keys]))[0, 1]
        print(f"rung at step {step}: {len(keys)} points, Spearman rho with their final objective (FIFO) {rho:+.2f}")


def main() -> None:
    ap = parser(__doc__, study=True)
    ap.add_argument("--reports", type=int, default=4, help="evaluations per trial (ASHA's rungs)")
    ap.add_argument("--fifo-reports", type=int,
                    help="evaluations per FIFO trial (default: --reports; 1 is the strict baseline, which "
                         "pays for no intermediate evaluation it does not use)")
    ap.add_argument("--grace", type=int, default=1)
    ap.add_argument("--reduction-factor", type=int, default=3)
    ap.add_argument("--out", help="folder for both studies (default: a temporary folder)")
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    space = load_space(args.space, args.config)
    # key=value given here win over the space's fixed fields too
    fixed = {**space.fixed, **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}}
    space = dataclasses.replace(space, reports=args.reports, fixed=fixed,
                                asha={"grace_period": args.grace, "reduction_factor": args.reduction_factor})
    root = Path(args.out or tempfile.mkdtemp(prefix="tune-asha-"))
    figures = {}
    for scheduler in ("fifo", "asha"):
        start = time.perf_counter()
        reports = (args.fifo_reports or args.reports) if scheduler == "fifo" else args.reports
        figures[scheduler] = run_study(cfg, dataclasses.replace(space, reports=reports), args.model, args.data,
                                       args.forget, root / scheduler, scheduler)
        figures[scheduler]["wall"] = time.perf_counter() - start
        print(f"{scheduler}: done in {figures[scheduler]['wall']:.0f} s", flush=True)

    print(f"\nspace {space.name}: {len(figures['fifo']['rows'])} trials, {args.fifo_reports or args.reports} "
          f"evaluations per FIFO trial, {space.reports} per ASHA trial, "
          f"ASHA grace {args.grace}, reduction factor {args.reduction_factor}")
    print(f"{'scheduler':<10} {'finished':>8} {'best objective':>15} {'trial-seconds':>14} {'wall s':>8}  best trial")
    for name, f in figures.items():
        best = f["best"] or {}
        finished = sum(r["status"] == "finished" for r in f["rows"])
        params = ", ".join(f"{k}={best.get(k)}" for k in space.parameters)
        print(f"{name:<10} {finished:>8} {best.get('objective', float('nan')):>15.4f} {f['trial_seconds']:>14.0f} "
              f"{f['wall']:>8.0f}  {params}")
    fifo, asha = figures["fifo"], figures["asha"]
    rung_ranks(cfg, space, fifo, asha)
    ratio_obj = asha["best"]["objective"] / fifo["best"]["objective"]
    ratio_sec = asha["trial_seconds"] / fifo["trial_seconds"]
    print(f"\nASHA / FIFO: best objective {ratio_obj:.3f} (goal >= 0.95), trial-seconds {ratio_sec:.3f} (goal <= 0.40)")
    print(f"studies in {root}")


if __name__ == "__main__":
    main()
