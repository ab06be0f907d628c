"""The training loop's pieces, plain PyTorch: tokenised batches, trainable groups, gradient
masks, the DeepSpeed engine and its config, step counts.

``vkd/loop.py`` runs the steps; ``pipelines/train`` puts them on Ray Train. Everything here
also runs in one process (benchmarks, unit tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from vkd.config import Config, ConfigError, TrainConfig
from vkd.data.layout import BenchmarkError, decode_image
from vkd.data.streams import image_key
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
                    raise ConfigError(f"train.max_length={width} is shorter than a prompt ({len(firsts[j])} tokens); "
                                      "set it to 0 (from the model and the data)")
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


class Lengths:
    """Token counts of training sequences as ``Tokenize`` makes them, without decoding or
    processing a single picture: the text's tokens (each string counted once) and, for a
    sequence with a picture, the tokens its picture expands into (measured once per picture
    size on a blank picture of that size)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter, self.tok = adapter, adapter.tokenizer
        self.texts: dict[str, int] = {}
        self.answers: dict[str, int] = {}
        self.pictures: dict[tuple[int, int], int] = {}

    def _text(self, text: str) -> int:
        if text not in self.texts:
            self.texts[text] = len(self.tok(text, add_special_tokens=False)["input_ids"])
        return self.texts[text]

    def _picture(self, blob: bytes, source: str) -> int:
        """Tokens a picture adds to its prompt beyond the placeholder's (its size read off its
        header; a picture whose header cannot be read is named)."""
        import io

        from PIL import Image

        try:
            size = Image.open(io.BytesIO(blob)).size
        except (OSError, ValueError) as err:
            raise BenchmarkError(f"{source}: corrupt image bytes ({err}); fix or drop that row") from err
        if size not in self.pictures:
            text = self.adapter.prompt("q", True)
            ids, _ = self.adapter.prompt_inputs([], [Image.new("RGB", size)], texts=[text])
            self.pictures[size] = len(ids[0]) - self._text(text)
        return self.pictures[size]

    def __call__(self, item: dict[str, Any]) -> tuple[int, int]:
        """(the whole sequence's tokens, its first prompt's)."""
        questions, answers = Tokenize.turns(item)
        has = item.get("image") is not None
        texts = self.adapter.turn_prompts(questions, answers, has)
        first = self._text(texts[0]) + (self._picture(item["image"], item.get("source", "a row")) if has else 0)
        if self.tok.bos_token_id is not None and not self.adapter.chat:
            first += 1
        later = sum(self._text(t) for t in texts[1:])
        for a in answers:
            if a not in self.answers:
                self.answers[a] = len(self.adapter.target_ids([a])[0])
        answered = sum(self.answers[a] for a in answers)
        return first + later + answered, first


@dataclass
class Batch:
    """One stream's batch as a loss takes it: the model's keyword arguments (labels
    included) and the key of each of its images (``vkd.data.streams.image_key``), under which
    a teacher's features of that image are kept."""
    inputs: dict[str, torch.Tensor]
    image_keys: torch.Tensor | None = None


def make_batch(arrays: dict[str, torch.Tensor]) -> Batch:
    """Tokenised arrays (``Tokenize``'s, as tensors) -> a Batch: padding trimmed, the images
    of the rows that have one."""
    width = int(arrays["attention_mask"].sum(1).max())
    inputs = {k: arrays[k][:, :width] for k in ("input_ids", "attention_mask", "labels")}
    has = arrays["has_image"].bool()
    keys = None
    if has.any():
        inputs["pixel_values"] = arrays["pixel_values"][has]
        keys = arrays["image_key"][has]
    return Batch(inputs, keys)


def model_inputs(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments of tokenised arrays (see ``make_batch``)."""
    return make_batch(arrays).inputs


def trainable_names(adapter: ModelAdapter, which: str, last_vision_layers: int = 0) -> list[str]:
    """Names of the parameters that train: ``all``, or ``visual`` (the projector and the
    vision tower, without what the LLM never sees: ``ModelAdapter.unseen_visual``; with
    ``last_vision_layers`` > 0, the projector and only the last that many vision layers the
    LLM sees, counted from the feature layer down)."""
    if which not in TRAINABLE:
        raise ValueError(f"train.trainable={which!r}; choose one of {', '.join(TRAINABLE)}")
    groups = adapter.param_groups()
    names = [n for g in TRAINABLE[which] for n, _ in groups[g]]
    if which == "all":
        return names
    unseen = adapter.unseen_visual()
    names = [n for n in names if n not in unseen]
    if last_vision_layers <= 0:
        return names
    prefix = adapter.family.vision_layers
    index = {n: int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)}
    keep = set(sorted(set(index.values()))[-last_vision_layers:])
    vision = {n for n, _ in groups["vision"]}
    return [n for n in names if n not in vision or index.get(n) in keep]


def set_trainable(adapter: ModelAdapter, names: Iterable[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter but ``names`` (no gradients, so no optimizer state either);
    returns the trainable ones."""
    wanted = set(names)
    params = []
    for n, p in adapter.model.named_parameters():
        p.requires_grad_(n in wanted)
        if n in wanted:
            params.append(p)
    return params


def mask_gradients(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Multiply each masked parameter's gradient by its 0/1 mask, every step: a masked entry
    never moves (a pruned neuron stays at zero, an entry outside the Fisher mask stays as it
    was)."""
    for name, p in model.named_parameters():
        if name in masks and p.requires_grad:
            p.register_hook(lambda g, m=masks[name]: g * m.to(g.dtype))


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


def engine_config(cfg: TrainConfig, world: int) -> TrainConfig:
    """The settings a rank's DeepSpeed engine runs with. ZeRO stages 1 and 2 partition
    optimizer state and gradients across ranks; a single rank has nothing to partition, so
    it runs stage 0 (the same updates, without the partitioning's per-step copies)."""
    if world == 1 and cfg.zero_stage in (1, 2):
        return replace(cfg, zero_stage=0)
    return cfg


def build_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: TrainConfig, world: int,
                 total_steps: int):
    """A DeepSpeed engine over ``model`` training ``params`` with a torch AdamW (no JIT-built
    op). One rank has nothing to all-reduce: its backward skips the all-reduce."""
    import deepspeed

    skip_shm_comm_build()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(engine_config(cfg, world), total_steps))
    if world == 1:
        engine.enable_backward_allreduce = False
    return engine


def whole_params(engine, zero_stage: int):
    """A block in which every parameter is whole (under ZeRO-3 they are gathered: every rank
    must enter it)."""
    import contextlib

    import deepspeed

    if zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def items_drawn(cfg: TrainConfig, steps: int) -> int:
    """Sequences a run of ``steps`` draws from a stream, over all workers: its batches, and
    each worker's local shuffle buffer filled first, and a few batches read ahead."""
    return cfg.workers * (steps * cfg.batch_size * cfg.grad_accum + cfg.shuffle_buffer + 4 * cfg.batch_size)


def steps_for(n_items: int, cfg: TrainConfig) -> int:
    """Optimizer steps of a fine-tuning run: ``max_steps``, else ``epochs`` passes."""
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.workers * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_items / per_step))


def unlearn_train_config(cfg: Config) -> TrainConfig:
    """The trainer settings of an unlearning run: the train section's workers, ZeRO stage
    and precision, with the unlearn section's steps, learning rate and batch size. No local
    shuffle buffer: its streams come shuffled as sequences (``train_dataset`` with ``items``)."""
    u = cfg.unlearn
    return replace(cfg.train, lr=u.lr, batch_size=u.batch_size, max_steps=u.steps, align_steps=0,
                   warmup_steps=min(cfg.train.warmup_steps, max(1, u.steps // 10)),
                   checkpoint_every=max(u.steps, 1), grad_accum=1, seed=u.seed, shuffle_buffer=0)


def fit_length(cfg: TrainConfig, adapter: ModelAdapter, sequences: Iterable[dict[str, Any]]) -> TrainConfig:
    """``cfg`` with ``max_length`` fitted to these sequences: 0 means from the model and the
    data (the longest sequence: its picture's tokens and its text); a length given must hold
    every first prompt (a longer conversation keeps the first turns that fit). Checked here,
    before any worker starts: the error names the field and the length that fits."""
    measure = Lengths(adapter)
    whole, first = 0, 0
    for item in sequences:
        w, f = measure(item)
        whole, first = max(whole, w), max(first, f)
    if cfg.max_length == 0:
        return replace(cfg, max_length=max(whole, 1))
    if first >= cfg.max_length:
        raise ConfigError(f"train.max_length={cfg.max_length} is shorter than a prompt ({first} tokens, its picture's "
                          f"included); set train.max_length={whole} (every sequence whole) or 0 (from the model and "
                          "the data)")
    return cfg
