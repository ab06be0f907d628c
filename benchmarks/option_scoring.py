"""Multiple-choice scoring, side by side in one run (one thread): each prompt run once with
its keys/values shared by its options (the llava family's path), against one full sequence
per option (the path of families with 3-D positions), on the same model and items: a tune
trial's evaluation (its sampled rung and its last, full one). The scores must agree.

    .venv/bin/python benchmarks/option_scoring.py --model VANILLA --data DATA [--forget forget_10]
        [--rows 12] [--retain-entities 12] [--repeats 2]
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from pipelines.runtime import set_environment  # noqa: E402

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from _args import parser  # noqa: E402

from vkd.config import EvalConfig  # noqa: E402
from vkd.data.layout import forget_set, load_meta  # noqa: E402
from vkd.model import ModelAdapter  # noqa: E402
from vkd.probe import Probe, ProbeSpec  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=12, help="questions per row and key (eval.max_rows)")
    ap.add_argument("--retain-entities", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = ProbeSpec(data=args.data, forget=forget_set(load_meta(args.data), args.forget), start_model=args.model,
                     before={}, at=[], eval=EvalConfig(generation=False, max_rows=args.rows,
                                                       retain_entities=args.retain_entities))
    probe = Probe(spec)
    shared = ModelAdapter.load(args.model)
    per_option = ModelAdapter.load(args.model)
    # any family name but llava takes the one-sequence-per-option path
    per_option.family = dataclasses.replace(per_option.family, name="llava (one sequence per option)")
    print(f"model {args.model}: {len(probe.sample)} items on a rung, {len(probe.items)} at the last evaluation")
    print(f"{'items':<6} {'path':<28} {'best s':>7}  scores")
    for label, items in (("rung", probe.sample), ("last", probe.items)):
        seconds, scores = {}, {}
        for name, adapter in (("prompt once, shared", shared), ("one sequence per option", per_option)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                scores[name] = probe.score(adapter, items)
                times.append(time.perf_counter() - start)
            seconds[name] = min(times)
            print(f"{label:<6} {name:<28} {seconds[name]:>7.2f}  "
                  + " ".join(f"{k} {v:.3f}" for k, v in scores[name].items()))
        a, b = scores.values()
        agree = a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a)
        print(f"{label:<6} per-option / shared: {seconds['one sequence per option'] / seconds['prompt once, shared']:.2f}x;"
              f" scores {'agree' if agree else 'DIFFER'}")


if __name__ == "__main__":
    main()
