"""How fast the tiny model learns the demo benchmark: a bare in-process training loop (no Ray,
no DeepSpeed) for a fixed number of steps, then the multiple-choice metrics on a sample.
A quick probe for choosing model sizes and training settings before a full `vkd vanilla`.

    .venv/bin/python benchmarks/vanilla_probe.py --data DATA [--steps 1500] [--lr 2e-3]
        [--batch 32] [--attributes-only] [--align-steps N] [key=value ...]

``train.seed=S`` also seeds the sampling of the batches (on the demo at lr 3e-3 the outcome
swung with it; at 2e-3 it did not). ``--attributes-only`` trains image rows on their attribute questions alone (no description
or cloze pairs); ``key=value`` overrides the config (e.g. model.patch_size=12,
train.turns=7). Sequences are drawn as the trainer builds them (``train.turns`` pairs of a
row per sequence).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from vkd.config import load_config
from vkd.data.items import eval_items, naming_sequences, reference_images, train_sequences
from vkd.data.layout import TRAIN_SPLIT, load_meta, read_rows
from vkd.metrics import aggregate
from vkd.scoring import evaluate_items
from vkd.model import ModelAdapter, resolve_model
from vkd.train import Tokenize, fit_length, model_inputs, set_trainable, trainable_names

EXTRA_PREFIXES = ("Fill in the blank", "Describe the person")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--attributes-only", action="store_true")
    ap.add_argument("--save", help="folder to save the trained model in")
    ap.add_argument("--align-steps", type=int, default=0, help="first steps on the naming pairs alone")
    ap.add_argument("--sample", type=int, default=6, help="questions per row and key in the evaluation")
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(2)
    adapter = ModelAdapter.load(resolve_model("tiny", cfg.model, args.data, cache=tempfile.mkdtemp()))
    items, naming = [], []
    names = {e.id: e.name for e in load_meta(args.data).entities}
    for row in read_rows(args.data, TRAIN_SPLIT):
        naming += naming_sequences(row, names.get(row["ID"], ""))
        if args.attributes_only and row["image"] is not None:
            pairs = [p for p in json.loads(row["metadata"]) if not p["Question"].startswith(EXTRA_PREFIXES)]
            row = {**row, "metadata": json.dumps(pairs)}
        items += train_sequences(row, cfg.train.turns, cfg.train.seed)
    tokenize = Tokenize(adapter, fit_length(cfg.train, adapter, items + naming).max_length)
    params = set_trainable(adapter, trainable_names(adapter, "all"))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.train.warmup_steps) * max(0.0, 1 - s / args.steps))
    rng = random.Random(cfg.train.seed)
    adapter.model.train()
    start = time.perf_counter()
    recent: list[float] = []  # the last 100 steps' losses (a single batch's loss is noisy)
    for step in range(args.steps):
        pool = naming if step < args.align_steps else items
        batch = {k: torch.from_numpy(v) for k, v in tokenize(rng.sample(pool, args.batch)).items()}
        loss = adapter.model(**model_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        recent = (recent + [loss.item()])[-100:]
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s", flush=True)
    adapter.model.eval()
    if args.save:
        adapter.save(args.save)
    sample = eval_items(args.data, "forget_10", limit=args.sample, generation=False)
    metrics = aggregate(evaluate_items(adapter, sample, reference_images(args.data, "forget_10", 8), 64))
    print(f"{len(items)} training sequences, {args.steps} steps of {args.batch} in {time.perf_counter() - start:.0f} s; "
          f"mean loss of the last {len(recent)} steps {sum(recent) / max(len(recent), 1):.3f}")
    print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
