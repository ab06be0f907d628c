"""Seconds per unlearning step and peak memory of VKD (the visual module trains, the LLM
frozen) and of full fine-tuning (GD: every parameter trains), side by side, on the demo's
model sizes, on the same vision tower with larger LLMs, and on a llava-1.5 geometry (CLIP at
336 px, patch 14: 576 image tokens; vision_feature_layer -2; llava-1.5's width and depth
ratios, scaled down).

    python benchmarks/step_cost.py --data DATA [--config configs/demo.yaml] [--llm 128x2,384x8,768x8]
        [--llava15 8] [--steps 10]

One process, one thread, the real losses (``vkd.methods``: VKD's at the config's settings,
GD's) on real forget and retain batches of the demo's unlearning size, each step a forward,
a backward and a torch AdamW update over the parameters that train. The two methods
alternate step by step (this machine is noisy); the medians are printed. Weights are fresh:
a step's cost does not depend on their values. Peak memory: each method and size once more
in a process of its own (the peak resident memory of its steps, the set-up's high-water mark
reset first, and the part the steps add over the model alone). ``128x2`` is the demo's LLM
(hidden size x layers); LLaVA-1.5-7B's is 4096x32 beside a 0.3B vision tower (1024x24);
``--llava15 K`` scales both widths by 1/K and depths by 1/(K/2).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.runtime import set_environment  # noqa: E402

set_environment()

import torch  # noqa: E402

from vkd.config import load_config  # noqa: E402
from vkd.data.items import benchmark_texts  # noqa: E402
from vkd.data.layout import TRAIN_SPLIT, forget_set, load_meta, read_rows  # noqa: E402
from vkd.methods import StepContext, method_for  # noqa: E402
from vkd.methods.losses import visual_features  # noqa: E402
from vkd.model import build_tiny  # noqa: E402
from vkd.train import Tokenize, fit_length, make_batch, trainable_names  # noqa: E402


def geometry(cfg, size: str):
    """(model config, image size) of a size: ``HxL`` (the demo's vision tower, an LLM of
    hidden H and L layers) or ``llava15/K``."""
    if size.startswith("llava15/"):
        k = int(size.split("/")[1])
        depth = max(1, k // 2)
        return dataclasses.replace(
            cfg.model, vision_hidden=1024 // k, vision_layers=max(2, 24 // depth), vision_heads=max(1, 16 // k),
            vision_intermediate=4096 // k, patch_size=14, feature_layer=-2, chat_template="llava-1.5",
            text_hidden=4096 // k, text_layers=max(1, 32 // depth), text_heads=max(1, 32 // k),
            text_intermediate=11008 // k, max_positions=2048), 336
    hidden, layers = (int(x) for x in size.split("x"))
    return dataclasses.replace(cfg.model, text_hidden=hidden, text_layers=layers, text_heads=max(1, hidden // 48),
                               text_intermediate=hidden * 8 // 3), None


def setup(args, overrides, size: str):
    """The model of ``size``, the two methods ready to step, and the batches."""
    cfg = load_config(args.config, overrides)
    data = Path(args.data)
    mcfg, image_size = geometry(cfg, size)
    image_size = image_size or cfg.model.image_size or int(load_meta(data).extra.get("image_size", 0))
    adapter = build_tiny(mcfg, benchmark_texts(data), image_size)
    vkd, gd = method_for(cfg.unlearn), method_for(cfg.unlearn.with_method("gd"))
    plans = vkd.stream_plans(data, forget_set(load_meta(data), args.forget), cfg.unlearn)
    seqs = {s: [q for r in read_rows(data, TRAIN_SPLIT, p.ids) if p.keep(r) for q in p.sequences(r)]
            for s, p in plans.items()}
    tokenize = Tokenize(adapter, fit_length(cfg.train, adapter, [q for v in seqs.values() for q in v]).max_length)

    def batch(stream, n=cfg.unlearn.batch_size):
        items = list(seqs[stream])
        random.Random(0).shuffle(items)
        return make_batch({k: torch.from_numpy(v) for k, v in tokenize(items[:n]).items()})

    forget, retain = batch("forget"), batch("retain")
    feats = visual_features(adapter, retain.inputs["pixel_values"], list(vkd.cfg.vkd_layers))
    teacher = vkd.teacher_table({int(k): {n: v[i] for n, v in feats.items()} for i, k in enumerate(retain.image_keys)})
    return adapter, {"vkd": vkd, "gd": gd}, forget, retain, teacher


def stepper(adapter, method, teacher):
    """One optimizer step of ``method`` on a copy of ``adapter``'s model, as a function."""
    import copy

    a = copy.deepcopy(adapter)
    wanted = set(method.trainable(a))
    for n, p in a.model.named_parameters():
        p.requires_grad_(n in wanted)
    a.model.train()
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=1e-5)
    ctx = StepContext(adapter=a, teacher=teacher)

    def step(forget, retain):
        loss, _ = method.loss(a.model, {"forget": forget, "retain": retain}, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def peak_memory(args, overrides, size: str, name: str) -> None:
    """In a process of its own: three steps of one method; prints its peak resident memory
    and the part the steps added over the model alone (JSON)."""
    adapter, methods, forget, retain, teacher = setup(args, overrides, size)
    step = stepper(adapter, methods[name], teacher)
    del adapter
    gc.collect()
    # the set-up's own high-water mark (building, copying) would hide the steps': reset it
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    for _ in range(3):
        step(forget, retain)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "steps_mib": (peak - base) / 1024}))


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_of(size: str, name: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--memory", f"{size}:{name}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"peak_mib": float("nan"), "steps_mib": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--forget", default="forget_10")
    ap.add_argument("--llm", default="128x2,384x8,768x8", help="LLM sizes: hidden x layers, comma-separated")
    ap.add_argument("--llava15", type=int, default=8, help="the llava-1.5 geometry scaled down K times (0: none)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method and size (after 2 warm-up steps)")
    ap.add_argument("--memory", help=argparse.SUPPRESS)  # SIZE:METHOD, the memory of one (a child process)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(1)
    if args.memory:
        size, name = args.memory.rsplit(":", 1)
        return peak_memory(args, overrides, size, name)
    sizes = args.llm.split(",") + ([f"llava15/{args.llava15}"] if args.llava15 else [])
    print(f"{'model':>10} {'visual params':>14} {'LLM params':>11} {'VKD s/step':>11} {'GD s/step':>10} "
          f"{'VKD / GD':>9} {'VKD peak MiB':>13} {'GD peak MiB':>12} {'steps add VKD/GD MiB':>21}")
    for size in sizes:
        adapter, methods, forget, retain, teacher = setup(args, overrides, size)
        steps = {name: stepper(adapter, m, teacher) for name, m in methods.items()}
        n_visual = sum(p.numel() for n, p in adapter.model.named_parameters()
                       if n in set(trainable_names(adapter, "visual", 0)))
        n_llm = sum(p.numel() for p in adapter.model.parameters()) - n_visual
        times: dict[str, list[float]] = {"vkd": [], "gd": []}
        for i in range(args.steps + 2):
            for name, step in steps.items():
                start = time.perf_counter()
                step(forget, retain)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
        v, g = statistics.median(times["vkd"]), statistics.median(times["gd"])
        mem = {name: memory_of(size, name) for name in ("vkd", "gd")}
        print(f"{size:>10} {n_visual / 1e6:>13.2f}M {n_llm / 1e6:>10.2f}M {v:>11.3f} {g:>10.3f} {v / g:>8.2f}x "
              f"{mem['vkd']['peak_mib']:>13.0f} {mem['gd']['peak_mib']:>12.0f} "
              f"{mem['vkd']['steps_mib']:>10.0f} / {mem['gd']['steps_mib']:<8.0f}", flush=True)


if __name__ == "__main__":
    main()
