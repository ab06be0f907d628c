"""The pipeline on real hardware, one short script: vanilla, unlearn (vkd and gd) and evaluate
on a llava-1.5-shaped model (CLIP at 336 px, patch 14, 576 image tokens, vision_feature_layer
-2, the llava-1.5 chat template; widths scaled down) with ``train.use_gpu=true`` (nccl),
bf16, as many Ray Train workers as the machine has GPUs (2 at most); it prints the seconds
per step and the peak GPU memory of VKD and GD. Never in CI (CI has no GPU).

    python benchmarks/gpu_check.py [--out DIR] [--steps 20] [--hidden 512] [--layers 8]

Needs a CUDA build of torch and a GPU; without one it says so and exits 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.runtime import set_environment  # noqa: E402

set_environment()

import torch  # noqa: E402

from pipelines.evaluate import run_evaluation  # noqa: E402
from pipelines.unlearn import options, run_unlearn  # noqa: E402
from pipelines.vanilla import run_vanilla  # noqa: E402
from vkd.config import ModelConfig, load_config  # noqa: E402
from vkd.data import prepare_benchmark  # noqa: E402
from vkd.data.items import benchmark_texts  # noqa: E402
from vkd.metrics import format_table  # noqa: E402
from vkd.model import build_tiny  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each run")
    ap.add_argument("--hidden", type=int, default=512, help="LLM width (vision: half of it)")
    ap.add_argument("--layers", type=int, default=8, help="LLM layers (vision: as many)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: this check needs a GPU (and a CUDA build of torch)", file=sys.stderr)
        return 1
    gpus = min(2, torch.cuda.device_count())
    work = Path(args.out or tempfile.mkdtemp(prefix="vkd-gpu-")).resolve()
    data, model = work / "data", work / "llava15"
    if not (data / "benchmark.json").is_file():
        prepare_benchmark("synthetic", data, entities=20, seed=0, image_size=64, train_images=4, test_images=2,
                          mc_variants=2, text_rows=2)
    h, n = args.hidden, args.layers
    shape = ModelConfig(vision_hidden=h // 2, vision_layers=n, vision_heads=max(1, h // 128),
                        vision_intermediate=2 * h, patch_size=14, text_hidden=h, text_layers=n,
                        text_heads=max(1, h // 64), text_intermediate=8 * h // 3, feature_layer=-2,
                        chat_template="llava-1.5", max_positions=2048)
    if not (model / "config.json").is_file():
        build_tiny(shape, benchmark_texts(data), 336).save(model)
    zero = 2 if gpus > 1 else 0
    cfg = load_config(None, [
        "train.use_gpu=true", "train.precision=bf16", f"train.workers={gpus}", f"train.zero_stage={zero}",
        "train.cpus_per_worker=2", f"train.max_steps={args.steps}", "train.batch_size=4", "train.turns=1",
        "train.checkpoint_every=1000", f"unlearn.steps={args.steps}", "unlearn.batch_size=4", "unlearn.retain_rows=20",
        "unlearn.vkd.stat_batches=2", "eval.max_rows=2", "eval.max_gen=2", "eval.generation=false",
        "eval.retain_entities=4", "eval.retain_test_entities=2", "eval.actors=1", "eval.cpus_per_actor=2",
        f"mlflow.sqlite_file={work / 'mlflow.db'}", f"mlflow.artifact_dir={work / 'mlruns'}",
        f"ray.num_cpus={max(4, 4 * gpus + 2)}"])
    stamp = time.strftime("%H%M%S")
    start = time.perf_counter()
    van = run_vanilla(cfg, data, work / f"vanilla-{stamp}", str(model), evaluate=False)
    print(f"vanilla: {van['steps']} steps on {gpus} GPU(s), bf16, ZeRO-{zero}, in {van['train_seconds']:.0f} s")
    rows = {}
    for method in ("vkd", "gd"):
        u = dataclasses.replace(cfg.unlearn.with_method(method), lr=5e-4 if method == "vkd" else 1e-4)
        r = run_unlearn(options(dataclasses.replace(cfg, unlearn=u), van["model"], data, "forget_10",
                                work / f"{method}-{stamp}", register=False))
        rows[method] = r
        print(f"{method}: {r.figures.get('seconds_per_step', float('nan')):.3f} s/step, peak GPU memory "
              f"{r.figures.get('peak_gpu_gib', float('nan')):.2f} GiB (a rank's), {r.seconds:.0f} s", flush=True)
    metrics, n_items, secs = run_evaluation(cfg, str(rows["vkd"].model), str(data), "forget_10", van["model"])
    print(format_table(metrics, n_items))
    print(f"evaluate: {sum(n_items.values())} items in {secs:.0f} s")
    v, g = rows["vkd"].figures, rows["gd"].figures
    print(f"\nVKD / GD seconds per step: {v['seconds_per_step'] / g['seconds_per_step']:.2f}x; peak GPU memory "
          f"{v['peak_gpu_gib']:.2f} / {g['peak_gpu_gib']:.2f} GiB; all in {time.perf_counter() - start:.0f} s; "
          f"work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
