"""Typed run configuration: YAML sections, ``key=value`` overrides, validated at the door.

One file (e.g. ``configs/demo.yaml``) may hold a section per concern; every field below is
documented where it is declared. Unknown keys and values of the wrong type are errors that
name the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


@dataclass
class BenchmarkConfig:
    kind: str = "synthetic"          # synthetic | mllmu | clear
    entities: int = 40               # synthetic: number of fictitious entities
    seed: int = 0                    # synthetic: same seed, same bytes
    image_size: int = 48             # synthetic: portrait side in pixels
    train_images: int = 20           # synthetic: portraits per entity in ft_Data
    test_images: int = 5             # synthetic: unseen portraits per entity in Test_Set
    mc_variants: int = 6             # synthetic: multiple-choice questions per attribute and entity
    render_scale: int = 3            # synthetic: drawn this many times larger, then downsampled
    min_trait_distance: int = 3      # synthetic: any two entities differ in at least this many traits
    text_rows: int = 6               # synthetic: text-only rows per entity in ft_Data (each a phrasing of every attribute)
    variation: float = 1.0           # synthetic: scale of pose, lighting, clutter and noise across portraits


@dataclass
class ModelConfig:
    """The tiny LLaVA of ``--model tiny`` (a real checkpoint folder ignores these sizes)."""
    seed: int = 0
    vocab_size: int = 1024           # byte-level BPE trained on the benchmark's text
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    patch_size: int = 8
    image_size: int = 0              # 0: the benchmark's image size (the synthetic one records it)
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    projector_act: str = "gelu"
    max_positions: int = 512


@dataclass
class EvalConfig:
    batch_size: int = 32             # prompts per forward pass (each carries its 4 options)
    generation: bool = True          # compute *_rougeL and *_cloze (greedy decoding)
    max_new_tokens: int = 24
    max_rows: int = 0                # questions per benchmark row and key, evenly spaced (0: all); quick checks, tune trials
    max_open: int = 0                # open questions (generation, cloze) per row and key (0: all)
    actors: int = 1                  # Ray Data actor-pool size, each holding one model copy
    cpus_per_actor: float = 1.0
    references: int = 8              # other entities' images that image questions are calibrated against
    retain_entities: int = 0         # retain entities scored, evenly spaced (0: all); the forget side is always whole


@dataclass
class TrainConfig:
    """One trainer for every stage that changes weights (vanilla, unlearn, relearn)."""
    workers: int = 2                 # Ray Train workers, each driving a DeepSpeed engine
    cpus_per_worker: float = 1.0
    use_gpu: bool = False            # GPU + nccl on a cluster; CPU + gloo otherwise
    zero_stage: int = 2              # DeepSpeed ZeRO stage 0-3
    precision: str = "fp32"          # fp32 | bf16 | fp16
    batch_size: int = 16             # micro-batch per worker
    grad_accum: int = 1
    grad_clip: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 50
    epochs: float = 3.0              # passes over the training sequences (max_steps overrides)
    align_steps: int = 0             # first steps on naming pairs alone (picture -> who it is), within the total
    max_steps: int = 0
    max_length: int = 128            # tokens per sequence, image tokens included
    turns: int = 1                   # question-answer pairs of a row per sequence (multi-turn, as LLaVA trains)
    shuffle_buffer: int = 2048       # rows in each worker's local shuffle buffer
    trainable: str = "all"           # all | visual (vision tower + projector)
    seed: int = 0                    # offset by the worker's rank
    checkpoint_every: int = 200      # steps between checkpoints (and at the end)
    log_every: int = 10


@dataclass
class UnlearnConfig:
    """One unlearning request's method and its settings (ARCHITECTURE.md, "The method").
    Fields marked with a method name matter to that method only."""
    method: str = "vkd"              # vkd | ga | gd | kl | npo | mmunlearner (see vkd.methods)
    steps: int = 120                 # optimizer steps of the unlearning run
    lr: float = 5e-4
    batch_size: int = 8              # per worker and stream: a forget and a retain batch per step
    retain_rows: int = 600           # retain-entity training rows sampled for D_r (0: all of them)
    retain_weight: float = 1.0       # weight of the retain cross-entropy (gd, npo, mmunlearner, vkd) or KL (kl)
    forget_loss: str = "ga"          # vkd: ga (ascent on the answers) | npo | refusal (descent to refusal_answer)
    forget_cap: float = 0.0          # vkd, forget_loss ga: a forget sequence stops being ascended once its mean answer
                                     # NLL reaches this (0: never): forgetting to a level, not ascent without end
    refusal_answer: str = "I don't know."
    npo_beta: float = 0.1            # npo, and vkd with forget_loss=npo
    beta: float = 1.0                # vkd: weight of L_VKD, the distillation to the teacher's visual features
    vkd_distance: str = "mse"        # vkd: mse | cosine
    vkd_layers: list[int] = field(default_factory=list)  # vkd: vision layers distilled besides the projector output
    vision_layers: int = 0           # vkd: train the last N vision layers and the projector (0: every layer)
    importance: str = "activation"   # vkd: neuron importance, activation (mean |a|) | taylor (mean |a dL/da|)
    d_i: float = 0.02                # vkd: pruning threshold on s = I_f / (I_r + eps)
    d_i_mode: str = "top_fraction"   # ratio (prune s >= d_i) | top_fraction (prune the top d_i of neurons)
    d_f: float = 0.3                 # vkd, mmunlearner: Fisher mask threshold on F_f / (F_r + eps)
    d_f_mode: str = "top_fraction"   # ratio (update F_f/F_r >= d_f) | top_fraction (update the top d_f)
    stat_batches: int = 16           # batches per worker and split for importance and Fisher
    eps: float = 1e-8
    seed: int = 0


@dataclass
class RelearnConfig:
    """The relearning attack: fine-tune an unlearned model on some forget entities' data."""
    fraction: float = 0.25           # forget entities whose training rows the attack uses (the rest are held out)
    steps: int = 40
    lr: float = 5e-4
    batch_size: int = 8


@dataclass
class TrackingConfig:
    """MLflow: MLFLOW_TRACKING_URI wins; else a SQLite file in the working folder."""
    experiment: str = "vkd"
    sqlite_file: str = "mlflow.db"
    artifact_dir: str = "mlruns"
    register: bool = True            # register stage models in the model registry


@dataclass
class RayConfig:
    num_cpus: int = 4                # logical CPUs of the embedded Ray (no RAY_ADDRESS)


@dataclass
class Config:
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def updated(self, overrides: list[str] | tuple[str, ...]) -> "Config":
        """This config with ``section.field=value`` overrides applied, validated again."""
        return _build(Config, _apply(self.to_dict(), overrides), "")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown field {prefix}{unknown[0]}; known fields{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                extra: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (YAML), apply ``extra`` (nested dict, e.g. from CLI flags) then the
    ``key=value`` overrides (dotted keys, YAML-typed values), and validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass an existing YAML file to --config")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for dotted, value in flatten(extra or {}).items():
        if value is not None:
            _set_path(tree, dotted, value)
    return _build(Config, _apply(tree, overrides), "")


def _apply(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(value))
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"section.field": value}."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def cache_root() -> Path:
    """Where runs keep what they can reuse (models, evaluations, statistics):
    ``$VKD_CACHE``, by default ``.vkd/cache``, as an absolute path."""
    return Path(os.environ.get("VKD_CACHE", ".vkd/cache")).resolve()


def override(name: str, value: Any) -> str:
    """The ``section.field=value`` override that sets ``name`` to ``value`` (YAML for
    anything but a string)."""
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{name}={text}"
