"""Does Ray Tune's synchronous HyperBandScheduler (trials paused at a rung, resumed from their
checkpoint) make the promotion decisions of this project's promotion ASHA (``Ladder``) on a
grid study? Both run side by side in one run on the same grid (the thresholds grid's 12
points) and the same objectives: a table of one value per point and rung, so that the two
decide on the same numbers and no training is needed.

    .venv/bin/python benchmarks/hyperband_decisions.py [--space tune_spaces/thresholds_grid.yaml]
        [--reports 4] [--rf 2] [--seed 0]

Prints, for each rung, the points each one lets through, and the points each one runs to
the last evaluation. HyperBand deals the points into brackets of different sizes and
starting budgets and halves each bracket on its own (a point is compared with its
bracket's, and a bracket that starts at the full budget halves nothing), where the Ladder
compares every point at a rung with every other.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.runtime import set_environment  # noqa: E402

set_environment()

from ray import tune  # noqa: E402
from ray.tune.schedulers import HyperBandScheduler  # noqa: E402

from pipelines.runtime import init_ray  # noqa: E402
from vkd.study import load_space  # noqa: E402
from vkd.study_asha import Ladder, grid_order, trial_key  # noqa: E402


def objectives(points: list[dict], reports: int, seed: int) -> dict[str, list[float]]:
    """A value per point and evaluation: a point's own level plus noise that shrinks as it
    trains (what rungs see of a run)."""
    rng = random.Random(seed)
    table = {}
    for p in points:
        level = rng.uniform(0.4, 0.9)
        table[trial_key(p)] = [round(level + rng.gauss(0, 0.1 / (k + 1)), 4) for k in range(reports)]
    return table


def ladder_decisions(points: list[dict], table: dict[str, list[float]], reports: int, rf: int,
                     concurrency: int) -> tuple[dict[int, set[str]], set[str]]:
    """The Ladder on this table: rungs at evaluations 1, rf, rf^2, ... below the last; each
    trial runs from its rung to the next one it must stop at (or the end)."""
    rungs = [r for r in (rf ** k for k in range(reports)) if r < reports]
    ladder = Ladder(points, rungs, reports, rf, concurrency)
    passed: dict[int, set[str]] = {r: set() for r in rungs}
    live: dict[str, tuple[str, int]] = {}  # trial id -> (point key, evaluation it starts after)
    n = 0
    while True:
        while len(live) < concurrency:
            job = ladder.suggest(f"t{n}")
            if not isinstance(job, dict):
                break
            live[f"t{n}"] = (trial_key({k: v for k, v in job.items() if k != "resume_step"}), job["resume_step"])
            n += 1
        if not live:
            break
        trial, (key, start) = next(iter(live.items()))  # the oldest trial runs to its next stop
        step = start
        for rung in [r for r in rungs if r > start] + [reports]:
            step = rung
            if rung == reports or not ladder.record(key, rung, table[key][rung - 1]):
                break
            passed[rung].add(key)
        del live[trial]
        ladder.on_trial_complete(trial, {"step": step})
    return passed, set(ladder.finished)


def hyperband_decisions(points: list[dict], table: dict[str, list[float]], reports: int, rf: int,
                        work: Path) -> tuple[dict[int, set[str]], set[str]]:
    """Ray's HyperBandScheduler on the same table: a trainable that reports a point's value
    at each evaluation, checkpointing so that a paused trial resumes where it stopped."""
    def trainable(config):
        key = trial_key(config)
        start = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                start = json.loads((Path(d) / "at.json").read_text())
        for k in range(start, reports):
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "at.json").write_text(json.dumps(k + 1))
                tune.report({"objective": table[key][k], "evaluation": k + 1},
                            checkpoint=tune.Checkpoint.from_directory(d))

    sched = HyperBandScheduler(time_attr="evaluation", max_t=reports, reduction_factor=rf)
    tuner = tune.Tuner(trainable, param_space={name: tune.grid_search(sorted({p[name] for p in points}))
                                               for name in points[0]},
                       tune_config=tune.TuneConfig(metric="objective", mode="max", scheduler=sched),
                       run_config=tune.RunConfig(storage_path=str(work), name="hyperband", verbose=0))
    grid = tuner.fit()
    reached: dict[str, int] = {}
    for res in grid:
        reached[trial_key({k: res.config[k] for k in points[0]})] = int(res.metrics.get("evaluation", 0))
    passed = {r: {k for k, e in reached.items() if e > r} for r in sorted({e for e in reached.values() if e < reports})}
    return passed, {k for k, e in reached.items() if e >= reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="tune_spaces/thresholds_grid.yaml")
    ap.add_argument("--reports", type=int, default=4)
    ap.add_argument("--rf", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    space = load_space(args.space)
    points = grid_order(space)
    table = objectives(points, args.reports, args.seed)
    names = {trial_key(p): ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in p.items()) for p in points}
    ladder = ladder_decisions(points, table, args.reports, args.rf, space.concurrency)
    init_ray(4)
    with tempfile.TemporaryDirectory() as work:
        hyper = hyperband_decisions(points, table, args.reports, args.rf, Path(work))
    best = sorted(table, key=lambda k: -table[k][-1])
    print(f"{len(points)} points of {space.name}, {args.reports} evaluations, reduction factor {args.rf}")
    for label, (passed, finished) in (("promotion ASHA (Ladder)", ladder), ("Ray HyperBandScheduler", hyper)):
        print(f"\n{label}:")
        for rung, keys in sorted(passed.items()):
            print(f"  past evaluation {rung}: {len(keys)} points")
        print(f"  to the last evaluation ({len(finished)}): " + "; ".join(names[k] for k in sorted(finished)))
        print(f"  holds the best final point: {best[0] in finished}")
    print(f"\nsame points to the end: {ladder[1] == hyper[1]}")


if __name__ == "__main__":
    main()
