"""The internal benchmark layout: MLLMU-Bench's parquet schema, one folder per split.

Every benchmark (synthetic, MLLMU-Bench, CLEAR) is stored as::

    DATA/
      benchmark.json            name, entities (id, name, profile), splits (entity ids), seed
      ft_Data/part-*.parquet    training rows: image {bytes} (null for text-only), ID, metadata
      forget_5/ forget_10/ forget_15/ retain_95/ retain_90/ retain_85/
                part-*.parquet  evaluation rows: image, ID, name, biography, question, answer,
                                Classification_Task, Generation_Task, Mask_Task
      Test_Set/part-*.parquet   ID, name, images [{bytes}], Classification_Task,
                                Generation_Task, Mask_Task (images never used for training)

``metadata`` is a JSON list of {Question, Answer}. Classification_Task holds
Image_Textual_Questions and Pure_Text_Questions, each a list of
{Question, Options {A, B, C, D}, Correct_Answer}. Generation_Task and Mask_Task are lists of
{Type ("Image_Textual" | "Pure_Text"), Question, Ground_Truth}; cloze blanks are ``__``.
"""
from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

LAYOUT_VERSION = 1
FORGET_SPLITS = ("forget_5", "forget_10", "forget_15")
RETAIN_OF = {"forget_5": "retain_95", "forget_10": "retain_90", "forget_15": "retain_85"}
EVAL_SPLITS = FORGET_SPLITS + tuple(RETAIN_OF.values())
TRAIN_SPLIT = "ft_Data"
TEST_SPLIT = "Test_Set"
ALL_SPLITS = (TRAIN_SPLIT,) + EVAL_SPLITS + (TEST_SPLIT,)
LETTERS = ("A", "B", "C", "D")

IMAGE = pa.struct([("bytes", pa.binary())])
MC_QUESTION = pa.struct([
    ("Question", pa.string()),
    ("Options", pa.struct([(letter, pa.string()) for letter in LETTERS])),
    ("Correct_Answer", pa.string()),
])
CLASSIFICATION = pa.struct([
    ("Image_Textual_Questions", pa.list_(MC_QUESTION)),
    ("Pure_Text_Questions", pa.list_(MC_QUESTION)),
])
OPEN_QUESTION = pa.struct([("Type", pa.string()), ("Question", pa.string()), ("Ground_Truth", pa.string())])
TASKS = [
    ("Classification_Task", CLASSIFICATION),
    ("Generation_Task", pa.list_(OPEN_QUESTION)),
    ("Mask_Task", pa.list_(OPEN_QUESTION)),
]
TRAIN_SCHEMA = pa.schema([("image", IMAGE), ("ID", pa.string()), ("metadata", pa.string())])
EVAL_SCHEMA = pa.schema([
    ("image", IMAGE), ("ID", pa.string()), ("name", pa.string()), ("biography", pa.string()),
    ("question", pa.string()), ("answer", pa.string()), *TASKS,
])
TEST_SCHEMA = pa.schema([("ID", pa.string()), ("name", pa.string()), ("images", pa.list_(IMAGE)), *TASKS])


def schema_of(split: str) -> pa.Schema:
    if split == TRAIN_SPLIT:
        return TRAIN_SCHEMA
    if split == TEST_SPLIT:
        return TEST_SCHEMA
    if split in EVAL_SPLITS:
        return EVAL_SCHEMA
    raise BenchmarkError(f"unknown split {split!r}; known splits: {', '.join(ALL_SPLITS)}")


class BenchmarkError(ValueError):
    """Bad benchmark input: the message names the file, row or column and what to do."""


@dataclass
class Entity:
    id: str
    name: str
    profile: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkMeta:
    name: str
    entities: list[Entity]
    splits: dict[str, list[str]]
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = LAYOUT_VERSION

    def entity_ids(self, split: str) -> list[str]:
        if split not in self.splits:
            raise BenchmarkError(
                f"unknown split {split!r} in benchmark {self.name!r}; it has: {', '.join(sorted(self.splits))}"
            )
        return list(self.splits[split])

    def entity(self, key: str) -> Entity:
        for e in self.entities:
            if key in (e.id, e.name):
                return e
        raise BenchmarkError(
            f"unknown entity {key!r} in benchmark {self.name!r}; give an ID or name listed in benchmark.json"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "name": self.name, "seed": self.seed,
            "entities": [vars(e) for e in self.entities], "splits": self.splits, "extra": self.extra,
        }


@dataclass(frozen=True)
class ForgetSet:
    """Whom a run forgets and whom it keeps: a benchmark forget split (``forget_10`` and
    its ``retain_90``) or any entities (a batch request: its entities, against the entities
    no request of the batch names). ``lookalikes``: the retain entities that look most like
    a forget entity to the starting model (``vkd.lookalikes``), chosen once so that before
    and after score the same people."""
    name: str
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    split: str | None = None           # the benchmark forget split, when it is one
    lookalikes: tuple[str, ...] = ()

    def key(self) -> str:
        base = self.split or f"{self.name}:{','.join(self.forget)}|{','.join(self.retain)}"
        return f"{base}~{','.join(self.lookalikes)}" if self.lookalikes else base

    def sources(self, meta: "BenchmarkMeta", role: str,
                ids: Iterable[str] | None = None) -> list[tuple[str, list[str] | None]]:
        """(evaluation split, entity ids) pairs holding the rows of ``role``'s entities
        (``ids``: only these): the split itself for a benchmark split, else for each entity
        the first evaluation split that lists it."""
        if self.split is not None:
            split = self.split if role == "forget" else retain_split(self.split)
            return [(split, None if ids is None else list(ids))]
        wanted = list(ids) if ids is not None else list(self.forget if role == "forget" else self.retain)
        out: dict[str, list[str]] = {}
        for e in wanted:
            home = next((s for s in EVAL_SPLITS if e in meta.splits.get(s, ())), None)
            if home is None:
                raise BenchmarkError(f"entity {e!r} is in no evaluation split of benchmark {meta.name!r}")
            out.setdefault(home, []).append(e)
        return list(out.items())


def forget_set(meta: "BenchmarkMeta", forget: "str | ForgetSet | dict[str, Any]") -> ForgetSet:
    """A forget split's name (or a ForgetSet, or its dict) as a ForgetSet."""
    if isinstance(forget, ForgetSet):
        return forget
    if isinstance(forget, dict):
        return ForgetSet(forget["name"], tuple(forget["forget"]), tuple(forget["retain"]), forget.get("split"),
                         tuple(forget.get("lookalikes", ())))
    retain = retain_split(forget)  # an unknown name fails here, listing the forget splits
    return ForgetSet(forget, tuple(meta.entity_ids(forget)), tuple(meta.entity_ids(retain)), forget)


def retain_split(forget: str) -> str:
    if forget not in RETAIN_OF:
        raise BenchmarkError(f"unknown forget split {forget!r}; choose one of {', '.join(FORGET_SPLITS)}")
    return RETAIN_OF[forget]


def write_split(out: Path, split: str, rows: list[dict[str, Any]], rows_per_shard: int = 256) -> list[Path]:
    """Write rows of one split as parquet shards under ``out/split``; returns the shard paths."""
    schema = schema_of(split)
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        chunk = rows[start:start + rows_per_shard]
        table = pa.Table.from_pylist(chunk, schema=schema)
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        paths.append(path)
    return paths


def write_meta(out: Path, meta: BenchmarkMeta) -> None:
    (Path(out) / "benchmark.json").write_text(json.dumps(meta.to_json(), indent=1, sort_keys=True))


def load_meta(data: Path) -> BenchmarkMeta:
    path = Path(data) / "benchmark.json"
    if not path.is_file():
        raise BenchmarkError(
            f"{path} not found: {data} is not a prepared benchmark; run `vkd prepare` to make one"
        )
    try:
        raw = json.loads(path.read_text())
        return BenchmarkMeta(
            name=raw["name"], seed=raw.get("seed"), splits=raw["splits"], extra=raw.get("extra", {}),
            entities=[Entity(**e) for e in raw["entities"]], version=raw.get("version", LAYOUT_VERSION),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BenchmarkError(f"{path} is malformed ({err}); prepare the benchmark again") from err


def shard_paths(data: Path, split: str) -> list[Path]:
    schema_of(split)
    folder = Path(data) / split
    paths = sorted(folder.glob("*.parquet"))
    if not paths:
        raise BenchmarkError(f"split {split!r} has no parquet shards under {folder}; prepare the benchmark again")
    return paths


def shards_holding(data: Path, split: str, ids: Iterable[str] | None) -> list[Path]:
    """The shards of a split that hold rows of these entities (every shard for None), from
    each shard's ID column alone: a stream of a few entities reads a few shards, not the
    split. A shard whose IDs cannot be read is kept (reading it reports the problem)."""
    paths = shard_paths(data, split)
    if ids is None:
        return paths
    wanted = set(ids)
    held = [p for p in paths if (found := _shard_ids(str(p), p.stat().st_mtime_ns)) is None or wanted & found]
    return held or paths[:1]


INLINE_BYTES = 256 << 20   # shards of at most this size in all are read in the driver, not by Ray Data tasks


def driver_sized(shards: Iterable[Path]) -> bool:
    """Whether these shards are small enough to read in the driver (``INLINE_BYTES``)."""
    return sum(Path(p).stat().st_size for p in shards) <= INLINE_BYTES


@functools.lru_cache(maxsize=4096)
def _shard_ids(path: str, mtime_ns: int) -> frozenset[str] | None:
    try:
        return frozenset(pq.read_table(path, columns=["ID"]).column("ID").to_pylist())
    except (pa.ArrowInvalid, OSError, KeyError):
        return None


def check_columns(table_schema: pa.Schema, split: str, where: str) -> None:
    missing = [n for n in schema_of(split).names if n not in table_schema.names]
    if missing:
        raise BenchmarkError(
            f"{where}: missing column(s) {', '.join(missing)} for split {split!r}; "
            f"expected columns {', '.join(schema_of(split).names)}"
        )


def read_rows(data: Path, split: str, ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the rows of a split (optionally only those entities), checking the columns."""
    wanted = set(ids) if ids is not None else None
    for path in shards_holding(data, split, wanted):
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise BenchmarkError(f"{path}: not a readable parquet file ({err}); prepare the benchmark again") from err
        check_columns(table.schema, split, str(path))
        for i, row in enumerate(table.to_pylist()):
            if wanted is None or row["ID"] in wanted:
                row["_source"] = f"{path}, row {i}"
                yield row


def decode_image(blob: Any, where: str):
    """PIL image (RGB) from an ``{bytes}`` struct or raw bytes; a clear error when corrupt."""
    from PIL import Image, UnidentifiedImageError

    data = blob.get("bytes") if isinstance(blob, dict) else blob
    if not data:
        raise BenchmarkError(f"{where}: image has no bytes; fix or drop that row")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BenchmarkError(f"{where}: corrupt image bytes ({err}); fix or drop that row") from err
    return img.convert("RGB")


def encode_png(img) -> dict[str, bytes]:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return {"bytes": buf.getvalue()}
