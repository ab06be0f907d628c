"""Typed run configuration: YAML sections, ``key=value`` overrides, validated at the door.

One file (e.g. ``configs/demo.yaml``) may hold a section per concern. Every field is declared with
:func:`option`: its help, and the choices or bounds it must meet, checked whenever the section is built
(from YAML or in code). Unknown keys, values of the wrong type and non-finite numbers name the field.

The ``unlearn`` section holds what every method shares (steps, learning rate, batch size, retain
sample, seed) and one sub-section per method, ``unlearn.<method>.<field>``, declared by that method's
config class (``vkd.methods``). The flat keys of earlier versions (``unlearn.beta``) still work,
with a deprecation line naming the new key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vkd.fields import ConfigError, Section, check_fields, deprecated, option  # noqa: F401  (re-exported)


@dataclass
class BenchmarkConfig(Section):
    section: ClassVar[str] = "benchmark"
    kind: str = option("synthetic", "which benchmark `vkd prepare` makes", choices=("synthetic", "mllmu", "clear"))
    entities: int = option(40, "synthetic: number of fictitious entities", low=8)
    seed: int = option(0, "synthetic: same seed, same bytes")
    image_size: int = option(48, "synthetic: portrait side in pixels", low=8)
    train_images: int = option(20, "synthetic: portraits per entity in ft_Data", low=1)
    test_images: int = option(5, "synthetic: unseen portraits per entity in Test_Set", low=1)
    mc_variants: int = option(6, "synthetic: multiple-choice questions per attribute and entity", low=1)
    render_scale: int = option(3, "synthetic: drawn this many times larger, then downsampled", low=1)
    min_trait_distance: int = option(3, "synthetic: any two entities differ in at least this many traits", low=0)
    text_rows: int = option(6, "synthetic: text-only rows per entity in ft_Data (each a phrasing of every attribute)",
                            low=1)
    variation: float = option(1.0, "synthetic: scale of pose, lighting, clutter and noise across portraits", low=0)


@dataclass
class ModelConfig(Section):
    """The tiny LLaVA of ``--model tiny`` (a real checkpoint folder ignores these sizes)."""
    section: ClassVar[str] = "model"
    seed: int = option(0, "seed of the tiny model's initial weights")
    vocab_size: int = option(1024, "byte-level BPE vocabulary trained on the benchmark's text", low=300)
    vision_hidden: int = option(128, "vision tower width", low=8)
    vision_layers: int = option(4, "vision transformer layers", low=1)
    vision_heads: int = option(4, "vision attention heads", low=1)
    vision_intermediate: int = option(256, "vision MLP width", low=8)
    patch_size: int = option(8, "vision patch side in pixels", low=1)
    image_size: int = option(0, "0: the benchmark's image size (the synthetic one records it)", low=0)
    text_hidden: int = option(192, "LLM width", low=8)
    text_layers: int = option(4, "LLM layers", low=1)
    text_heads: int = option(4, "LLM attention heads", low=1)
    text_intermediate: int = option(512, "LLM MLP width", low=8)
    projector_act: str = option("gelu", "projector activation", choices=("gelu", "relu", "silu"))
    feature_layer: int = option(-1, "vision layer whose output the projector takes (-1: the last; llava-1.5: -2)")
    chat_template: str = option("plain", "prompt format: plain (Question: ... Answer:) or llava-1.5's chat template",
                                choices=("plain", "llava-1.5"))
    max_positions: int = option(512, "LLM position limit", low=16)


@dataclass
class EvalConfig(Section):
    section: ClassVar[str] = "eval"
    batch_size: int = option(32, "prompts per forward pass (each carries its 4 options)", low=1)
    generation: bool = option(True, "compute *_rougeL and *_cloze (greedy decoding)")
    max_new_tokens: int = option(24, "greedy decoding length of the open questions", low=1)
    max_rows: int = option(0, "questions per benchmark row and key, evenly spaced (0: all); quick checks, tune trials",
                           low=0)
    max_open: int = option(0, "open questions (generation, cloze) per row and key (0: all)", low=0)
    actors: int = option(1, "Ray Data actor-pool size, each holding one model copy", low=1)
    cpus_per_actor: float = option(1.0, "CPUs of each scoring actor", above=0)
    references: int = option(8, "other entities' images that image questions are calibrated against", low=1)
    retain_entities: int = option(0, "retain entities scored, evenly spaced (0: all); the forget side is always whole",
                                  low=0)
    max_gen: int = option(12, "short open questions (the *_gen keys) per row and key, evenly spaced (0: all)", low=0)
    retain_test_entities: int = option(12, "retain entities whose unseen images are scored (retain_test_*), evenly "
                                           "spaced (0: none); the lookalikes always are", low=0)
    lookalikes: int = option(2, "retain entities nearest each forget entity by the starting model's image features "
                                "(lookalike_*; 0: none)", low=0)


@dataclass
class TrainConfig(Section):
    """One trainer for every stage that changes weights (vanilla, unlearn, relearn)."""
    section: ClassVar[str] = "train"
    workers: int = option(2, "Ray Train workers, each driving a DeepSpeed engine", low=1)
    cpus_per_worker: float = option(1.0, "CPUs of each train worker", above=0)
    use_gpu: bool = option(False, "GPU + nccl on a cluster; CPU + gloo otherwise")
    in_process: bool = option(False, "one CPU worker: the loop runs in this process on the same streams, no Ray "
                                     "Train run to start; no restart after a failure, one checkpoint, at the end")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    precision: str = option("fp32", "training precision", choices=("fp32", "bf16", "fp16"))
    batch_size: int = option(16, "micro-batch per worker", low=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1)
    grad_clip: float = option(1.0, "gradient norm clip", low=0)
    lr: float = option(1e-3, "peak learning rate", above=0)
    warmup_steps: int = option(50, "linear warm-up steps", low=0)
    epochs: float = option(3.0, "passes over the training sequences (max_steps overrides)", above=0)
    align_steps: int = option(0, "first steps on naming pairs alone (picture -> who it is), within the total", low=0)
    max_steps: int = option(0, "optimizer steps (0: from epochs)", low=0)
    max_length: int = option(0, "tokens per sequence, image tokens included (0: from the model and the data, the "
                                "longest sequence; checked before any worker starts)", low=0)
    turns: int = option(1, "question-answer pairs of a row per sequence (multi-turn, as LLaVA trains)", low=1)
    shuffle_buffer: int = option(2048, "rows in each worker's local shuffle buffer", low=0)
    trainable: str = option("all", "what fine-tuning trains: all, or visual (vision tower + projector)",
                            choices=("all", "visual"))
    seed: int = option(0, "offset by the worker's rank")
    checkpoint_every: int = option(200, "steps between checkpoints (and at the end)", low=1)
    log_every: int = option(10, "steps between logged training metrics", low=1)


@dataclass
class UnlearnConfig(Section):
    """One unlearning request: the method, what every method shares, and each method's own
    settings (``sections``: ``unlearn.<method>``, built by that method's config class; the
    chosen method's is always there, with its defaults when not given)."""
    section: ClassVar[str] = "unlearn"
    method: str = option("vkd", "the unlearning method, a name registered in vkd.methods "
                                "(vkd, ga, gd, kl, npo, mmunlearner)")
    steps: int = option(120, "optimizer steps of the unlearning run", low=1)
    lr: float = option(5e-4, "peak learning rate", above=0)
    batch_size: int = option(8, "per worker and stream: a forget and a retain batch per step", low=1)
    retain_rows: int = option(600, "retain-entity training rows sampled for D_r (0: all of them)", low=0)
    seed: int = option(0, "seed of the streams, the retain sample and the trainer")
    relearn: bool = option(False, "run the relearning attack (the relearn section) on the result and record its gaps")
    sections: dict[str, Any] = option(factory=dict, help="unlearn.<method>: each method's own settings")

    def check(self) -> None:
        from vkd.methods import METHODS  # the registry: a method's config class is declared beside it

        config_of = METHODS.get(self.method).Config  # an unknown method lists the registered ones
        for name, value in list(self.sections.items()):
            cls = METHODS.get(name).Config
            if isinstance(value, dict):
                self.sections[name] = _build(cls, value, f"unlearn.{name}")
            elif not isinstance(value, cls):
                raise ConfigError(f"unlearn.{name}: expected the settings of method {name}, got {value!r}")
        if self.method not in self.sections:
            self.sections[self.method] = config_of()

    @property
    def options(self) -> Any:
        """The chosen method's settings (its config dataclass)."""
        return self.sections[self.method]

    def with_method(self, method: str, **options: Any) -> "UnlearnConfig":
        """The same request with another method (and some of its settings)."""
        from vkd.methods import METHODS

        sections = dict(self.sections)
        sections[method] = dataclasses.replace(sections.get(method) or METHODS.get(method).Config(), **options)
        return dataclasses.replace(self, method=method, sections=sections)

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str) -> "UnlearnConfig":
        """Build from a YAML mapping: the shared fields, ``<method>:`` sub-sections, and the
        flat method fields of earlier versions (each set in every method section that has
        it, with a deprecation line)."""
        from vkd.methods import METHODS

        shared = {f.name for f in dataclasses.fields(cls) if f.name != "sections"}
        flat = {k: v for k, v in raw.items() if k in shared}
        sections = {k: dict(v or {}) for k, v in raw.items() if k in METHODS}
        for key in sorted(set(raw) - shared - set(sections)):
            owners = [m for m in METHODS.names() if key in {f.name for f in dataclasses.fields(METHODS.get(m).Config)}]
            if not owners:
                known = sorted(shared) + [f"{m}.<field>" for m in METHODS.names()]
                raise ConfigError(f"unknown field {where}.{key}; known fields of {where}: {', '.join(known)}")
            names = ", ".join(f"{where}.{m}.{key}" for m in owners)
            deprecated(f"{where}.{key} is deprecated: write {names} (applied to each)")
            for m in owners:
                sections.setdefault(m, {})[key] = raw[key]
        built = {}
        for name, value in sections.items():
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping of that method's fields, got {value!r}")
            built[name] = _build(METHODS.get(name).Config, value, f"{where}.{name}")
        return _build_fields(cls, flat, where, sections=built)


@dataclass
class RelearnConfig(Section):
    """The relearning attack: fine-tune an unlearned model on some forget entities' data."""
    section: ClassVar[str] = "relearn"
    fraction: float = option(0.25, "forget entities whose training rows the attack uses (the rest are held out)",
                             above=0, high=1)
    steps: int = option(40, "optimizer steps of the attack", low=1)
    lr: float = option(5e-4, "the attack's learning rate", above=0)
    batch_size: int = option(8, "the attack's micro-batch per worker", low=1)
    folds: int = option(1, "attacks, each on another share of the forget data; the gaps are their mean", low=1)


@dataclass
class TrackingConfig(Section):
    """MLflow: ``uri`` when given, else MLFLOW_TRACKING_URI, else a SQLite file in the
    working folder."""
    section: ClassVar[str] = "mlflow"
    experiment: str = option("vkd", "experiment of every run")
    uri: str = option("", "tracking URI (empty: MLFLOW_TRACKING_URI, else the SQLite file)")
    sqlite_file: str = option("mlflow.db", "the SQLite store when no URI is given")
    artifact_dir: str = option("mlruns", "artifact folder of the SQLite store")
    register: bool = option(True, "register stage models in the model registry")


@dataclass
class RayConfig(Section):
    section: ClassVar[str] = "ray"
    num_cpus: int = option(4, "logical CPUs of the embedded Ray (no RAY_ADDRESS)", low=1)


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
        """Nested sections as YAML writes them (``unlearn.<method>`` beside the shared fields)."""
        tree = dataclasses.asdict(self)
        tree["unlearn"].update(tree["unlearn"].pop("sections"))
        return tree

    def hash(self) -> str:
        from vkd.cache import digest

        return digest(self.to_dict())

    def updated(self, overrides: list[str] | tuple[str, ...]) -> "Config":
        """This config with ``section.field=value`` overrides applied, validated again."""
        return _build(Config, _apply(self.to_dict(), overrides), "")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
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


def _coerce_number(value: Any, tp: type, where: str) -> Any:
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
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
    if tp in (int, float):
        return _coerce_number(value, tp, where)
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
    if hasattr(cls, "from_raw"):
        return cls.from_raw(raw, where)
    return _build_fields(cls, raw, where)


def _build_fields(cls: type, raw: dict[str, Any], where: str, **given: Any) -> Any:
    """``cls`` from a mapping of its fields (each coerced to its declared type), and ``given``
    values as they are."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown field {prefix}{unknown[0]}; known fields{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs, **given)


def build_section(cls: type, raw: dict[str, Any], where: str) -> Any:
    """A config dataclass from a mapping, with the same checks and messages as a YAML file's."""
    return _build(cls, raw, where)


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
    ``$VKD_CACHE``, by default ``.vkd/cache``, as an absolute path. Read by the entry
    points, which pass it on."""
    return Path(os.environ.get("VKD_CACHE", ".vkd/cache")).resolve()


def override(name: str, value: Any) -> str:
    """The ``section.field=value`` override that sets ``name`` to ``value`` (YAML for
    anything but a string)."""
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{name}={text}"
