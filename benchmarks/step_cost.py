"""Seconds per unlearning step of VKD (the visual module trains, the LLM frozen) and of full
fine-tuning (GD: every parameter trains), side by side, on the demo's model sizes and on the
same vision tower with larger LLMs: how much of the GD/VKD speed-up a step can give grows
with the LLM's share of the model.

    python benchmarks/step_cost.py --data DATA [--config configs/demo.yaml] [--llm 192x4,384x8,768x8] [--steps 10]

One process, one thread, the real losses (``vkd.methods``: VKD's with its cap and teacher
term, GD's) on real forget and retain batches of the demo's unlearning size, each step a
forward, a backward and a torch AdamW update over the parameters that train. The two
methods alternate step by step (this machine is noisy); the medians are printed. Weights
are fresh: a step's cost does not depend on their values. ``192x4`` is the demo's LLM
(hidden size x layers); a LLaVA-1.5-7B LLM is 4096x32 beside a 0.3B vision tower.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.runtime import set_environment  # noqa: E402

set_environment()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--forget", default="forget_10")
    ap.add_argument("--llm", default="192x4,384x8,768x8", help="LLM sizes: hidden x layers, comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method and size (after 2 warm-up steps)")
    args, overrides = ap.parse_known_args()

    import dataclasses
    import random

    import torch

    from vkd.config import load_config
    from vkd.data.items import benchmark_texts
    from vkd.data.layout import TRAIN_SPLIT, forget_set, load_meta, read_rows
    from vkd.methods import StepContext, method_for
    from vkd.methods.losses import visual_features
    from vkd.model import build_tiny
    from vkd.train import Tokenize, make_batch, trainable_names

    torch.set_num_threads(1)
    cfg = load_config(args.config, overrides)
    data = Path(args.data)
    image_size = cfg.model.image_size or int(load_meta(data).extra.get("image_size", 0))
    texts = list(benchmark_texts(data))
    vkd = method_for(cfg.unlearn)
    gd = method_for(cfg.unlearn.with_method("gd"))
    plans = vkd.stream_plans(data, forget_set(load_meta(data), args.forget), cfg.unlearn)

    print(f"{'LLM':>8} {'visual params':>14} {'LLM params':>11} {'VKD s/step':>11} {'GD s/step':>10} {'GD / VKD':>9}")
    for size in args.llm.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        mcfg = dataclasses.replace(cfg.model, text_hidden=hidden, text_layers=layers, text_heads=max(1, hidden // 48),
                                   text_intermediate=hidden * 8 // 3)
        adapter = build_tiny(mcfg, texts, image_size)
        tokenize = Tokenize(adapter, cfg.train.max_length)

        def batch(plan, n=cfg.unlearn.batch_size):
            rows = [r for r in read_rows(data, TRAIN_SPLIT, plan.ids) if plan.keep(r)]
            random.Random(0).shuffle(rows)
            seqs = [s for r in rows[:n] for s in plan.sequences(r)][:n]
            return make_batch({k: torch.from_numpy(v) for k, v in tokenize(seqs).items()})

        forget, retain = batch(plans["forget"]), batch(plans["retain"])
        teacher_feats = visual_features(adapter, retain.inputs["pixel_values"], list(vkd.cfg.vkd_layers))
        teacher = {int(k): {n: v[i] for n, v in teacher_feats.items()} for i, k in enumerate(retain.image_keys)}
        runs = {}
        for name, method in (("vkd", vkd), ("gd", gd)):
            a = copy.deepcopy(adapter)
            wanted = set(method.trainable(a))
            for n, p in a.model.named_parameters():
                p.requires_grad_(n in wanted)
            a.model.train()
            opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=1e-5)
            runs[name] = (a, method, opt, StepContext(adapter=a, teacher=teacher))
        n_visual = sum(p.numel() for n, p in adapter.model.named_parameters()
                       if n in set(trainable_names(adapter, "visual", 0)))
        n_llm = sum(p.numel() for p in adapter.model.parameters()) - n_visual
        times: dict[str, list[float]] = {"vkd": [], "gd": []}
        for step in range(args.steps + 2):
            for name, (a, method, opt, ctx) in runs.items():
                start = time.perf_counter()
                loss, _ = method.loss(a.model, {"forget": forget, "retain": retain}, ctx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step >= 2:
                    times[name].append(time.perf_counter() - start)
        v, g = statistics.median(times["vkd"]), statistics.median(times["gd"])
        print(f"{size:>8} {n_visual / 1e6:>13.2f}M {n_llm / 1e6:>10.2f}M {v:>11.3f} {g:>10.3f} {g / v:>8.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
