"""Every unlearning method on the same split and budget, side by side in one run, and how much
longer full fine-tuning (GD) takes than VKD to forget as much.

    .venv/bin/python benchmarks/methods.py --model VANILLA --data DATA [--config configs/demo.yaml]
        [--forget forget_10] [--methods vkd,ga,gd,kl,npo,mmunlearner] [key=value ...]

For each method: `unlearn` (the same steps, batch size, retain rows and evaluation for all;
the learning rate of ``--lr-full`` for the full-model methods, the config's for vkd), then the
relearning attack on its result. The table: the five multiple-choice keys, ROUGE-L of the
image questions, unlearning wall time (statistics pass included) and the attack's Accuracy
Gap. Then GD runs with fewer steps (1/2, 1/4, ... while it still forgets as much) or more (2x,
4x, ... until it does) to find its smallest budget whose forget_vqa is at most VKD's; the
ratio of that run's wall time to VKD's is the speed-up.

VANILLA and DATA: `make demo` leaves them under runs/demo/.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from pipelines.common import init_ray
from pipelines.relearn import run_relearn
from pipelines.unlearn import run_unlearn
from vkd.config import load_config

KEYS = ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--forget", default="forget_10")
    ap.add_argument("--methods", default="vkd,ga,gd,kl,npo,mmunlearner")
    ap.add_argument("--lr-full", type=float, default=1e-4, help="learning rate of the full-model methods")
    ap.add_argument("--max-scale", type=int, default=8, help="largest GD budget multiple tried")
    args, overrides = ap.parse_known_args()
    base = load_config(args.config, overrides)
    init_ray(base)
    work = Path(tempfile.mkdtemp(prefix="vkd-methods-", dir="runs" if Path("runs").is_dir() else None))
    rows = {}

    def unlearn(method: str, scale: float = 1) -> dict:
        u = dataclasses.replace(base.unlearn, method=method, steps=max(1, round(base.unlearn.steps * scale)),
                                lr=base.unlearn.lr if method == "vkd" else args.lr_full)
        cfg = dataclasses.replace(base, unlearn=u)
        return run_unlearn(cfg, args.model, args.data, args.forget, work / f"{method}-x{scale}",
                           tags={"benchmark_script": "methods"}, register=False)

    try:
        for method in args.methods.split(","):
            figures = unlearn(method)
            attack = run_relearn(base, figures["model"], args.data, args.forget)
            rows[method] = {**figures, "ag": attack["accuracy_gap"]}
            print(f"done: {method} in {figures['unlearn_seconds']:.0f} s", flush=True)
        before = next(iter(rows.values()))["before"]
        head = f"{'method':<12}" + "".join(f"{k:>11}" for k in KEYS) + f"{'vqa_rougeL':>11}{'seconds':>9}{'AG':>8}"
        print(f"\n{args.forget}, {base.unlearn.steps} steps of {base.unlearn.batch_size} per worker and stream, "
              f"{base.train.workers} workers")
        print(head)
        print(f"{'vanilla':<12}" + "".join(f"{before[k]:>11.3f}" for k in KEYS)
              + f"{before.get('forget_vqa_rougeL', float('nan')):>11.3f}")
        for method, r in rows.items():
            a = r["after"]
            print(f"{method:<12}" + "".join(f"{a[k]:>11.3f}" for k in KEYS)
                  + f"{a.get('forget_vqa_rougeL', float('nan')):>11.3f}{r['unlearn_seconds']:>9.0f}{r['ag']:>+8.3f}")
        if "vkd" in rows and "gd" in rows:
            target, vkd_s = rows["vkd"]["after"]["forget_vqa"], rows["vkd"]["unlearn_seconds"]
            scale, gd = 1.0, rows["gd"]
            reached = gd["after"]["forget_vqa"] <= target
            step = 0.5 if reached else 2.0
            while (step < 1 and scale * step * base.unlearn.steps >= 4) or (step > 1 and scale < args.max_scale):
                trial = unlearn("gd", scale * step)
                print(f"gd x{scale * step:g}: forget_vqa {trial['after']['forget_vqa']:.3f} "
                      f"in {trial['unlearn_seconds']:.0f} s", flush=True)
                if (trial["after"]["forget_vqa"] <= target) != (step < 1):
                    if step > 1:
                        scale, gd, reached = scale * step, trial, True
                    break
                scale, gd = scale * step, trial
            ratio = gd["unlearn_seconds"] / vkd_s
            print(f"\nVKD reaches forget_vqa {target:.3f} in {vkd_s:.0f} s; GD (full model) "
                  + (f"reaches {gd['after']['forget_vqa']:.3f} with {scale:g}x the steps in {gd['unlearn_seconds']:.0f} s"
                     if reached else f"is still at {gd['after']['forget_vqa']:.3f} after {scale:g}x the steps "
                                     f"({gd['unlearn_seconds']:.0f} s)")
                  + f": time ratio GD/VKD {'' if reached else '> '}{ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
