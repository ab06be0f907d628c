"""Batch unlearning manifests: many removal requests, validated before any work.

A manifest (YAML; or CSV with one request per line)::

    model: runs/demo/vanilla-...        # the vanilla model folder (or pass --model)
    data: runs/demo/data-...            # the benchmark folder (or pass --data)
    config: configs/demo.yaml           # the run config every request starts from (or pass --config)
    mode: independent                   # independent | sequential (--mode overrides)
    concurrency: 2                      # independent requests at once (0: as the cluster's CPUs allow)
    defaults: {train.workers: 1}        # config fields every request shares
    requests:
      - id: alice                       # unique; letters, digits, - and _
        entities: [e007, Jane Roe]      # IDs or names from the benchmark's benchmark.json
        method: vkd                     # optional (default: the config's unlearn.method)
        overrides: {unlearn.beta: 3.0}  # optional config fields of this request
        accept: {forget_vqa_max: 0.35, retain_vqa_min_ratio: 0.9}

CSV columns: ``id, entities, method, overrides, accept``; entities separated by ``;``,
overrides and accept as ``key=value`` pairs separated by ``;``; model, data, config, mode
come from the command line.

Acceptance thresholds name a key of ``vkd.metrics.KEYS`` (forget_vqa, test_vqa, forget_qa,
retain_vqa, retain_qa, retain_test_vqa, lookalike_vqa, lookalike_test_vqa and their ``_gen``
twins) and a bound: ``_max`` and ``_min`` on the unlearned model's score, ``_min_ratio`` on
its score over the starting model's; or a relearning gap (relearn_ag, relearn_test_ag and
their ``_gen`` twins: every request runs the attack unless ``unlearn.relearn`` is false)
with ``_max`` or ``_min``. A request whose result misses one is rejected and its model is
not registered.
"""
from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vkd.cache import digest
from vkd.config import Config, ConfigError, load_config, override
from vkd.data.layout import BenchmarkError, load_meta
from vkd.metrics import KEYS, RELEARN_KEYS
from vkd.registry import UnknownName

MODES = ("independent", "sequential")
BOUNDS = ("max", "min", "min_ratio")
REQUEST_FIELDS = ("id", "entities", "method", "overrides", "accept")
TOP_FIELDS = ("model", "data", "config", "mode", "concurrency", "defaults", "requests")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass
class Request:
    id: str
    entities: list[str]                     # entity IDs, resolved from IDs or names
    method: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    accept: dict[str, float] = field(default_factory=dict)
    where: str = ""                         # file and line, for messages

    def spec_hash(self) -> str:
        return digest({k: v for k, v in asdict(self).items() if k != "where"})


@dataclass
class Manifest:
    path: Path
    requests: list[Request]
    model: str | None = None
    data: str | None = None
    config: str | None = None
    mode: str = "independent"
    concurrency: int = 0
    defaults: dict[str, Any] = field(default_factory=dict)

    def batch_entities(self) -> list[str]:
        return sorted({e for r in self.requests for e in r.entities})

    def request_config(self, request: Request) -> Config:
        """The request's resolved config: the config file, the defaults, its method and
        overrides. The relearning attack runs on every request unless they turn it off."""
        fields = {"unlearn.relearn": True, **self.defaults, **request.overrides}
        if request.method:
            fields["unlearn.method"] = request.method
        return load_config(self.config, [override(k, v) for k, v in fields.items()])


def check_result(accept: dict[str, float], before: dict[str, float], after: dict[str, float]) -> list[str]:
    """The reasons a result misses its thresholds (empty: accepted)."""
    reasons = []
    for name, bound in sorted(accept.items()):
        key, kind = _split_threshold(name)
        value = after.get(key)
        if value is None:
            reasons.append(f"{key} was not measured")
        elif kind == "max" and value > bound:
            reasons.append(f"{key} {value:.3f} > max {bound:g}")
        elif kind == "min" and value < bound:
            reasons.append(f"{key} {value:.3f} < min {bound:g}")
        elif kind == "min_ratio" and before.get(key, 0) > 0 and value / before[key] < bound:
            reasons.append(f"{key} {value:.3f} is {value / before[key]:.3f} of the starting {before[key]:.3f} "
                           f"< min_ratio {bound:g}")
    return reasons


def _split_threshold(name: str) -> tuple[str, str]:
    for kind in ("min_ratio", "max", "min"):
        key = name[:-len(kind) - 1]
        if name.endswith("_" + kind) and (key in KEYS or (key in RELEARN_KEYS and kind != "min_ratio")):
            return key, kind
    raise ConfigError(f"threshold {name!r}: write <key>_max, <key>_min or <key>_min_ratio with a key among "
                      f"{', '.join(KEYS)}, or <gap>_max or <gap>_min with a relearning gap among "
                      f"{', '.join(RELEARN_KEYS)}")


def _pairs(text: str, where: str) -> dict[str, Any]:
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        if "=" not in part:
            raise ConfigError(f"{where}: {part!r} must look like key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _yaml_requests(path: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], int]]]:
    """The manifest mapping and each request with its line number."""
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"manifest {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"manifest {path} must be a mapping with a requests list")
    lines: list[int] = []
    for key, value in root.value if root is not None else []:
        if key.value == "requests" and isinstance(value, yaml.SequenceNode):
            lines = [item.start_mark.line + 1 for item in value.value]
    requests = raw.get("requests")
    if not isinstance(requests, list) or not requests:
        raise ConfigError(f"manifest {path}: requests must be a non-empty list")
    return raw, [(r, lines[i] if i < len(lines) else 0) for i, r in enumerate(requests)]


def _csv_requests(path: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], int]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("id", "entities") if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"manifest {path}: the header needs the columns id and entities "
                              f"(and optionally method, overrides, accept); {missing[0]} is missing")
        unknown = [c for c in reader.fieldnames or [] if c not in REQUEST_FIELDS]
        if unknown:
            raise ConfigError(f"manifest {path}, line 1: unknown column {unknown[0]}; known: {', '.join(REQUEST_FIELDS)}")
        rows = []
        for i, row in enumerate(reader):
            line = i + 2
            where = f"{path}, line {line}"
            rows.append(({"id": row["id"], "entities": [e.strip() for e in (row["entities"] or "").split(";") if e.strip()],
                          "method": (row.get("method") or "").strip() or None,
                          "overrides": _pairs(row.get("overrides") or "", where),
                          "accept": _pairs(row.get("accept") or "", where)}, line))
    if not rows:
        raise ConfigError(f"manifest {path}: no requests")
    return {}, rows


def load_manifest(path: str | Path, *, model: str | None = None, data: str | None = None,
                  config: str | None = None, mode: str | None = None) -> Manifest:
    """Read and validate a manifest; any bad request fails the whole manifest, naming the
    file, the line and the request. Arguments given here override the file's fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} not found; pass a YAML or CSV file (see configs/batch_demo.yaml)")
    raw, items = _csv_requests(path) if path.suffix.lower() == ".csv" else _yaml_requests(path)
    manifest = _manifest(path, raw, model=model, data=data, config=config, mode=mode)
    try:
        meta = load_meta(Path(manifest.data))
    except BenchmarkError as err:
        raise ConfigError(f"manifest {path}: data: {err}") from None
    seen: dict[str, str] = {}
    for i, (req, line) in enumerate(items):
        where = f"{path}, line {line}" if line else f"{path}, request {i + 1}"
        manifest.requests.append(_request(req, where, meta, manifest, seen))
    left = set(e.id for e in meta.entities) - set(manifest.batch_entities())
    if not left:
        raise ConfigError(f"manifest {path}: the requests name every entity; none is left to keep")
    return manifest


def _manifest(path: Path, raw: dict[str, Any], **given: str | None) -> Manifest:
    """The manifest's own fields (``given`` ones win), checked; no requests yet."""
    unknown = sorted(set(raw) - set(TOP_FIELDS))
    if unknown:
        raise ConfigError(f"manifest {path}: unknown field {unknown[0]}; known fields: {', '.join(TOP_FIELDS)}")
    manifest = Manifest(path=path, requests=[], model=given["model"] or raw.get("model"),
                        data=given["data"] or raw.get("data"), config=given["config"] or raw.get("config"),
                        mode=given["mode"] or raw.get("mode") or "independent",
                        concurrency=raw.get("concurrency", 0), defaults=raw.get("defaults") or {})
    if manifest.mode not in MODES:
        raise ConfigError(f"manifest {path}: mode {manifest.mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(manifest.concurrency, int) or isinstance(manifest.concurrency, bool) or manifest.concurrency < 0:
        raise ConfigError(f"manifest {path}: concurrency must be 0 (as resources allow) or a positive integer")
    if not isinstance(manifest.defaults, dict):
        raise ConfigError(f"manifest {path}: defaults must map config fields to values")
    for name in ("model", "data"):
        if not getattr(manifest, name):
            raise ConfigError(f"manifest {path}: no {name}; give {name}: in the manifest or --{name}")
    if manifest.config and not Path(manifest.config).is_file():
        raise ConfigError(f"manifest {path}: config file {manifest.config} not found")
    return manifest


def _request(req: Any, where: str, meta: Any, manifest: Manifest, seen: dict[str, str]) -> Request:
    """One request of the manifest, checked (``where``: its file and line)."""
    if not isinstance(req, dict):
        raise ConfigError(f"{where}: a request must be a mapping with id and entities")
    rid = str(req.get("id", "")).strip()
    where += f" (request {rid!r})" if rid else ""
    bad = sorted(set(req) - set(REQUEST_FIELDS))
    if bad:
        raise ConfigError(f"{where}: unknown field {bad[0]}; known fields: {', '.join(REQUEST_FIELDS)}")
    if not ID_PATTERN.match(rid):
        raise ConfigError(f"{where}: id must be 1-64 letters, digits, - or _ (starting with a letter or digit)")
    if rid in seen:
        raise ConfigError(f"{where}: id {rid!r} is used twice (also at {seen[rid]})")
    seen[rid] = where
    names = [req["entities"]] if isinstance(req.get("entities"), str) else req.get("entities")
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{where}: entities must be a non-empty list of entity IDs or names")
    try:
        entities = sorted({meta.entity(str(n)).id for n in names})
    except BenchmarkError as err:
        raise ConfigError(f"{where}: {err}") from None
    overrides, accept = req.get("overrides") or {}, req.get("accept") or {}
    if not isinstance(overrides, dict) or not isinstance(accept, dict):
        raise ConfigError(f"{where}: overrides and accept must be mappings")
    for name, bound in accept.items():
        try:
            _split_threshold(name)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        gap = _split_threshold(name)[0] in RELEARN_KEYS  # a gap may be negative; a score may not
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or (bound < 0 and not gap):
            raise ConfigError(f"{where}: threshold {name} must be a non-negative number, got {bound!r}")
    request = Request(id=rid, entities=entities, method=req.get("method"), overrides=overrides,
                      accept={k: float(v) for k, v in accept.items()}, where=where)
    try:
        manifest.request_config(request)  # the method and every field checked
    except (ConfigError, UnknownName) as err:
        raise ConfigError(f"{where}: {err}") from None
    return request
