"""The training loop's pieces, plain PyTorch: batches, trainable groups, losses, DeepSpeed config.

``pipelines/trainer.py`` puts them on Ray Train; everything here also runs in one process
(benchmarks, unit tests).
"""
from __future__ import annotations

import hashlib

from typing import Any, Sequence

import numpy as np
import torch

from vkd.config import TrainConfig
from vkd.data.layout import decode_image
from vkd.model import GROUPS, ModelAdapter

TRAINABLE = {"all": GROUPS, "visual": ("vision", "projector")}


class Tokenize:
    """Train items -> fixed-length arrays. An item holds image bytes (or None) and either one
    ``question``/``answer`` or ``questions``/``answers`` lists (a multi-turn conversation
    about the image); the loss covers every answer.

    Every row is padded to ``max_length`` so batches of any origin stack; the train step
    trims the padding again. A conversation longer than that keeps its first turns that
    fit. Text-only rows carry a zero image and ``has_image`` False."""

    def __init__(self, adapter: ModelAdapter, max_length: int):
        self.adapter, self.max_length = adapter, max_length
        size = adapter.processor.image_processor.crop_size
        self.image_shape = (3, int(size["height"]), int(size["width"]))

    @staticmethod
    def turns(item: dict[str, Any]) -> tuple[list[str], list[str]]:
        if "questions" in item:
            return [str(q) for q in item["questions"]], [str(a) for a in item["answers"]]
        return [str(item["question"])], [str(item["answer"])]

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        n, width = len(items), self.max_length
        tok = self.adapter.tokenizer
        out = {
            "input_ids": np.full((n, width), tok.pad_token_id, dtype=np.int64),
            "attention_mask": np.zeros((n, width), dtype=np.int64),
            "labels": np.full((n, width), -100, dtype=np.int64),
            "pixel_values": np.zeros((n, *self.image_shape), dtype=np.float32),
            "has_image": np.zeros(n, dtype=bool),
            "image_key": np.zeros(n, dtype=np.int64),
        }
        with_image = [i for i, it in enumerate(items) if it["image"] is not None]
        without = [i for i, it in enumerate(items) if it["image"] is None]
        for idx, has in ((with_image, True), (without, False)):
            if not idx:
                continue
            sub = [items[i] for i in idx]
            convs = [self.turns(it) for it in sub]
            texts = [self.adapter.turn_prompts(qs, ans, has) for qs, ans in convs]
            images = [decode_image(it["image"], it.get("source", "train row")) for it in sub] if has else None
            firsts, extra = self.adapter.prompt_inputs([], images, texts=[t[0] for t in texts])
            for j, i in enumerate(idx):
                if len(firsts[j]) >= width:
                    raise ValueError(f"train.max_length={width} is shorter than a prompt ({len(firsts[j])} tokens)")
                targets = self.adapter.target_ids(convs[j][1])
                later = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[j][1:]]
                seq, lab = list(firsts[j]), [-100] * len(firsts[j])
                for k, target in enumerate(targets):
                    prompt = list(later[k - 1]) if k else []
                    if k and len(seq) + len(prompt) + len(target) > width:
                        break
                    seq += prompt + target
                    lab += [-100] * len(prompt) + target
                seq, lab = seq[:width], lab[:width]
                out["input_ids"][i, :len(seq)] = seq
                out["attention_mask"][i, :len(seq)] = 1
                out["labels"][i, :len(lab)] = lab
            if has:
                out["pixel_values"][idx] = extra["pixel_values"].numpy()
                out["has_image"][idx] = True
                out["image_key"][idx] = [image_key(it["image"]) for it in sub]
        return out


def image_key(blob: bytes) -> int:
    """A stable 63-bit key of an image's bytes (teacher features are stored under it)."""
    return int.from_bytes(hashlib.blake2b(bytes(blob), digest_size=8).digest(), "little") >> 1


def row_key(row: dict[str, Any]) -> int:
    """A stable key of an ft_Data row: its image's key, or for a text row its pairs'."""
    image = row.get("image")
    if isinstance(image, dict):
        image = image.get("bytes")
    if image:
        return image_key(image)
    return image_key(str(row.get("metadata", "")).encode() + str(row.get("ID", "")).encode())


def sample_rows(rows: Sequence[dict[str, Any]], n: int, seed: int) -> frozenset[int]:
    """The keys of ``n`` of ``rows`` (all when n is 0 or more than there are), chosen by a
    seeded hash order: the same rows whatever order they are read in."""
    keys = sorted({row_key(r) for r in rows})
    if not n or n >= len(keys):
        return frozenset(keys)
    return frozenset(sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())[:n])


def model_inputs(batch: dict[str, torch.Tensor], keys: bool = False) -> dict[str, torch.Tensor]:
    """Trim padding and keep the images of the rows that have one (with ``keys``, also
    their ``image_key``, which a loss must pop before the forward)."""
    width = int(batch["attention_mask"].sum(1).max())
    inputs = {k: batch[k][:, :width] for k in ("input_ids", "attention_mask", "labels")}
    has = batch["has_image"].bool()
    if has.any():
        inputs["pixel_values"] = batch["pixel_values"][has]
        if keys:
            inputs["image_key"] = batch["image_key"][has]
    return inputs


def trainable_names(adapter: ModelAdapter, which: str, last_vision_layers: int = 0) -> list[str]:
    """Names of the parameters that train: ``all``, or ``visual`` (the projector and the
    vision tower; with ``last_vision_layers`` > 0, the projector and only the vision
    tower's last that many layers)."""
    if which not in TRAINABLE:
        raise ValueError(f"train.trainable={which!r}; choose one of {', '.join(TRAINABLE)}")
    groups = adapter.param_groups()
    names = [n for g in TRAINABLE[which] for n, _ in groups[g]]
    if which == "all" or last_vision_layers <= 0:
        return names
    prefix = adapter.family.vision_layers
    index = {n: int(n[len(prefix):].split(".")[0]) for n, _ in groups["vision"] if n.startswith(prefix)}
    keep = set(sorted(set(index.values()))[-last_vision_layers:])
    vision = {n for n, _ in groups["vision"]}
    return [n for n in names if n not in vision or index.get(n) in keep]


def set_trainable(adapter: ModelAdapter, which: str, last_vision_layers: int = 0) -> list[torch.nn.Parameter]:
    """Freeze every parameter outside ``trainable_names`` (no gradients, so no optimizer
    state either); returns the trainable ones."""
    wanted = set(trainable_names(adapter, which, last_vision_layers))
    params = []
    for n, p in adapter.model.named_parameters():
        p.requires_grad_(n in wanted)
        if n in wanted:
            params.append(p)
    return params


def lm_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the answer tokens (labels are -100 elsewhere)."""
    loss = model(**inputs).loss
    return loss, {"loss": float(loss.detach())}


def ds_config(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """DeepSpeed config of a run. The optimizer is a torch one passed in, so DeepSpeed
    JIT-builds no fused optimizer."""
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": min(cfg.warmup_steps, total_steps),
            "total_num_steps": max(total_steps, 1), "warmup_type": "linear"}},
    }
    if cfg.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        conf["fp16"] = {"enabled": True}
    return conf


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op (30-40 s on a
    fresh machine) that only inference uses; mark it incompatible so gloo does the work."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
