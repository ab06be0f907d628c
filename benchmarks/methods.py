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
ratio of that run's wall time to VKD's is the speed-up, printed twice: at the same
forget_vqa alone, and quality-matched (GD must also keep retain_vqa at ``--keep`` of
vanilla's, lowering its learning rate until it does; see ``speedup``). VKD is timed cold: its statistics pass
runs in the timed call (the benchmark starts from an empty statistics cache; evaluations,
which no timed figure includes, come from the usual cache). A last line times VKD again
with the statistics cached, as a batch's requests after the first see them.

VANILLA and DATA: `make demo` leaves them under runs/demo/.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from pipelines.runtime import init_ray
from pipelines.relearn import run_relearn
from pipelines.unlearn import options, run_unlearn
from vkd.config import cache_root, load_config

KEYS = ("forget_vqa", "test_vqa", "forget_qa", "retain_vqa", "retain_qa")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--forget", default="forget_10")
    ap.add_argument("--methods", default="vkd,ga,gd,kl,npo,mmunlearner")
    ap.add_argument("--lr-full", type=float, default=1e-4, help="learning rate of the full-model methods")
    ap.add_argument("--max-scale", type=int, default=4, help="largest GD budget multiple tried")
    ap.add_argument("--keep", type=float, default=0.90,
                    help="the quality-matched comparison: GD must keep retain_vqa at this fraction of vanilla's")
    args, overrides = ap.parse_known_args()
    base = load_config(args.config, overrides)
    init_ray(base.ray.num_cpus)
    work = Path(tempfile.mkdtemp(prefix="vkd-methods-", dir="runs" if Path("runs").is_dir() else None))
    # statistics cold (an empty cache), evaluations from the usual cache (they are not timed)
    shared = cache_root()
    (work / "cache").mkdir()
    (shared / "eval").mkdir(parents=True, exist_ok=True)
    (work / "cache" / "eval").symlink_to(shared / "eval", target_is_directory=True)
    rows = {}

    def unlearn(method: str, scale: float = 1, name: str = "", lr: float | None = None) -> dict:
        u = dataclasses.replace(base.unlearn.with_method(method), steps=max(1, round(base.unlearn.steps * scale)),
                                lr=lr or (base.unlearn.lr if method == "vkd" else args.lr_full))
        cfg = dataclasses.replace(base, unlearn=u)
        out = work / (name or f"{method}-x{scale}-lr{lr or 0:g}")
        r = run_unlearn(options(cfg, args.model, args.data, args.forget, out, cache=work / "cache",
                                tags={"benchmark_script": "methods"}, register=False))
        return {"model": r.model, "before": r.before, "after": r.after, "unlearn_seconds": r.seconds}

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
            speedup(rows, unlearn, base.unlearn.steps, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def speedup(rows: dict, unlearn, steps: int, args: argparse.Namespace) -> None:
    """How much longer GD (the full model) takes than VKD to forget as much.

    Plain: GD at ``--lr-full``, its smallest budget (steps x 1/2, 1/4, ... or x 2, 4, ...)
    whose forget_vqa is at most VKD's. Quality-matched: the same, but a GD run counts only
    if it also keeps retain_vqa at ``--keep`` of vanilla's (VKD's own floor): forgetting by
    breaking the model is not forgetting. GD's learning rate is lowered (1/2, 1/4 of
    ``--lr-full``) until its smallest sufficient budget keeps retain. Both ratios are
    printed; wall times are unlearning only (VKD's statistics pass included)."""
    vkd = rows["vkd"]
    target, vkd_s = vkd["after"]["forget_vqa"], vkd["unlearn_seconds"]
    keep = args.keep * vkd["before"]["retain_vqa"]
    runs = {(args.lr_full, 1.0): rows["gd"]}

    def run(lr: float, scale: float) -> dict:
        if (lr, scale) not in runs:
            runs[(lr, scale)] = unlearn("gd", scale, lr=lr)
            a = runs[(lr, scale)]["after"]
            print(f"gd lr {lr:g} x{scale:g}: forget_vqa {a['forget_vqa']:.3f}, retain_vqa {a['retain_vqa']:.3f} "
                  f"in {runs[(lr, scale)]['unlearn_seconds']:.0f} s", flush=True)
        return runs[(lr, scale)]

    def smallest(lr: float) -> tuple[float, dict] | None:
        """GD's smallest budget at ``lr`` that forgets as much as VKD (None: not within --max-scale)."""
        scale = 1.0
        if run(lr, scale)["after"]["forget_vqa"] <= target:
            while scale * steps / 2 >= 4 and run(lr, scale / 2)["after"]["forget_vqa"] <= target:
                scale /= 2
            return scale, run(lr, scale)
        while scale < args.max_scale:
            scale *= 2
            if run(lr, scale)["after"]["forget_vqa"] <= target:
                return scale, run(lr, scale)
        return None

    def line(label: str, found: tuple[float, dict] | None, lr: float) -> None:
        if found is None:
            longest = runs[(lr, float(args.max_scale))] if (lr, float(args.max_scale)) in runs else None
            secs = longest["unlearn_seconds"] if longest else float("nan")
            print(f"{label}: GD at lr {lr:g} does not reach it within {args.max_scale}x the steps: "
                  f"time ratio GD/VKD > {secs / vkd_s:.2f}x")
            return
        scale, gd = found
        print(f"{label}: GD at lr {lr:g} reaches forget_vqa {gd['after']['forget_vqa']:.3f} (retain_vqa "
              f"{gd['after']['retain_vqa']:.3f}) with {scale:g}x the steps in {gd['unlearn_seconds']:.0f} s: "
              f"time ratio GD/VKD {gd['unlearn_seconds'] / vkd_s:.2f}x")

    print(f"\nVKD: forget_vqa {target:.3f}, retain_vqa {vkd['after']['retain_vqa']:.3f} in {vkd_s:.0f} s "
          f"(statistics pass included)")
    plain = smallest(args.lr_full)
    line("same forget_vqa", plain, args.lr_full)
    lr, matched, lowered = args.lr_full, plain, 0
    while matched is None or matched[1]["after"]["retain_vqa"] < keep:
        if lowered == 2:
            matched = None
            break
        lr, lowered = lr / 2, lowered + 1
        matched = smallest(lr)
    line(f"same forget_vqa, retain_vqa >= {args.keep:g}x vanilla ({keep:.3f})", matched, lr)
    warm = unlearn("vkd", name="vkd-warm")  # a second VKD run: its statistics now come from the cache
    print(f"VKD with its statistics cached: forget_vqa {warm['after']['forget_vqa']:.3f} in "
          f"{warm['unlearn_seconds']:.0f} s")


if __name__ == "__main__":
    main()
