"""A one-worker tune trial's unlearning run trained in its own process against the same run
on a Ray Train worker, side by side in one run, alternating: wall seconds of each (the
whole run: MLflow run, pruning, trainer start, training, the final evaluation on rank 0).

    .venv/bin/python benchmarks/trial_cost.py --model VANILLA --data DATA [--space tune_spaces/thresholds_grid.yaml]
        [--config configs/demo.yaml] [--repeats 2] [key=value ...]

The run is the space's first grid point with its fixed fields, one worker, one evaluation;
the statistics and the starting model's scores are cached before the first timed run. Both
must give the same objective (the same weights: tests/test_trainer.py).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import parser  # noqa: E402
from pipelines.runtime import init_ray, set_environment  # noqa: E402

set_environment()
from pipelines.evaluate import cached_evaluation  # noqa: E402
from pipelines.stats import warm_stats  # noqa: E402
from pipelines.tune import base_config  # noqa: E402
from pipelines.tune_trial import overrides  # noqa: E402
from pipelines.unlearn import TrialHooks, UnlearnOptions, run_unlearn  # noqa: E402
from vkd.config import cache_root, load_config  # noqa: E402
from vkd.data.layout import forget_set, load_meta  # noqa: E402
from vkd.model import resolve_model  # noqa: E402
from vkd.study import load_space  # noqa: E402


def main() -> None:
    ap = parser(__doc__, study=True)
    ap.add_argument("--repeats", type=int, default=2)
    args, extra = ap.parse_known_args()
    space = load_space(args.space, args.config)
    point = space.grid_points()[0]
    cfg = base_config(load_config(args.config, extra), space).updated(overrides({**point, "train.workers": 1}))
    data = Path(args.data).resolve()
    cache = cache_root()
    model = resolve_model(args.model, cfg.model, data, cache)
    fs = forget_set(load_meta(data), args.forget)
    init_ray(cfg.ray.num_cpus)
    before, _ = cached_evaluation(model, data, fs, cfg.eval, cache)
    work = Path(tempfile.mkdtemp(prefix="trial-cost-"))
    try:
        warm_stats([(cfg, fs)], model, data, work, cache)
        seconds: dict[str, list[float]] = {"in process": [], "Ray Train worker": []}
        objective: dict[str, float] = {}
        for i in range(args.repeats):
            for name, local in (("in process", True), ("Ray Train worker", False)):
                start = time.perf_counter()
                r = run_unlearn(UnlearnOptions(cfg=cfg, model=model, data=data, forget=fs, out=work / f"{i}-{local}",
                                               cache=cache, register=False, keep_model=False, before=before,
                                               run_name=f"trial-cost-{name}",
                                               trial=TrialHooks(probe_at=[cfg.unlearn.steps], local=local)))
                seconds[name].append(time.perf_counter() - start)
                objective[name] = r.objective["objective"]
                print(f"{name}: {seconds[name][-1]:.1f} s, objective {objective[name]:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nspace {space.name}, point {point}, {cfg.unlearn.steps} steps, one worker, {args.repeats} runs each")
    for name, values in seconds.items():
        print(f"{name:<18} mean {sum(values) / len(values):6.1f} s  ({', '.join(f'{v:.1f}' for v in values)})"
              f"  objective {objective[name]:.4f}")
    ratio = (sum(seconds["Ray Train worker"]) / sum(seconds["in process"]))
    print(f"Ray Train worker / in process: {ratio:.2f}x")


if __name__ == "__main__":
    main()
