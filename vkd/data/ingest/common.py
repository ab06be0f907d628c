"""What the ingest adapters share: listing split folders, reading parquet with the columns
checked, and converting values of a row."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from vkd.data.layout import LETTERS, BenchmarkError, decode_image

TASK_COLUMNS = ("Classification_Task", "Generation_Task", "Mask_Task")
MC_KINDS = ("Image_Textual_Questions", "Pure_Text_Questions")
Row = dict[str, Any]


# ---------------------------------------------------------------- reading the published files

def split_files(src: Path, name: str) -> list[Path]:
    """Parquet shards of one published config: a folder ``name/`` or a single ``name.parquet``."""
    folder = src / name
    if folder.is_dir():
        return sorted(folder.rglob("*.parquet"))
    single = src / f"{name}.parquet"
    return [single] if single.is_file() else []


def listing(src: Path) -> str:
    names = sorted(p.name for p in src.iterdir()
                   if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".parquet"))
    return ", ".join(names) or "nothing"


def require_splits(src: Path, names: tuple[str, ...], label: str, how: str) -> dict[str, list[Path]]:
    files = {name: split_files(src, name) for name in names}
    missing = [name for name, paths in files.items() if not paths]
    if missing:
        raise BenchmarkError(
            f"{label} source {src} lacks split folder(s) {', '.join(missing)} (a folder of parquet files, "
            f"or NAME.parquet); found: {listing(src)}. {how}"
        )
    return files


def read_schema(path: Path, label: str) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise BenchmarkError(
            f"{path}: not a readable parquet file ({err}); if it is a Git LFS pointer run `git lfs pull`, "
            f"otherwise download {label} again"
        ) from err


def read_rows(paths: list[Path], required: tuple[str, ...], label: str,
              columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, Row]]:
    """Yield ``(where, row)`` for every row, after checking each file has the required columns."""
    for path in paths:
        names = read_schema(path, label).names
        missing = [c for c in required if c not in names]
        if missing:
            raise BenchmarkError(
                f"{path}: missing required column(s) {', '.join(missing)} for {label} "
                f"(the file has: {', '.join(names)}); download the published {label} again"
            )
        wanted = names if columns is None else [c for c in columns if c in names]
        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=wanted):
            for row in batch.to_pylist():
                yield f"{path}, row {index}", row
                index += 1


# ---------------------------------------------------------------- normalising values

def text(value: Any) -> str:
    return "" if value is None else str(value)


def entity_id(value: Any, where: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    ident = text(value).strip()
    if not ident:
        raise BenchmarkError(f"{where}: column ID is empty; every row needs the ID of its person")
    return ident


def image_struct(value: Any, where: str) -> dict[str, bytes]:
    """``{bytes}`` of a published image (struct {bytes, path} or raw bytes), checked to decode."""
    if value is None:
        raise BenchmarkError(f"{where}: image is missing; fix or drop that row")
    decode_image(value, where)
    data = value.get("bytes") if isinstance(value, dict) else value
    return {"bytes": bytes(data)}


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def parsed(value: Any, where: str, column: str) -> Any:
    """Accept a column either as an already-parsed structure or as a JSON string."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{where}: column {column} is not valid JSON ({err}); fix that row") from err


def expect(value: Any, kind: type, where: str, column: str) -> Any:
    if not isinstance(value, kind):
        raise BenchmarkError(
            f"{where}: column {column} should be a {kind.__name__}, got {type(value).__name__}; "
            "the file does not follow the published schema"
        )
    return value


def options(value: Any, where: str, column: str) -> dict[str, str]:
    value = parsed(value, where, column) or {}
    if isinstance(value, (list, tuple)):
        value = dict(zip(LETTERS, value))
    expect(value, dict, where, column)
    return {letter: text(value.get(letter)) for letter in LETTERS}


def mc_questions(value: Any, where: str, column: str) -> list[Row]:
    items = expect(parsed(value, where, column) or [], list, where, column)
    return [
        {
            "Question": text(item.get("Question")),
            "Options": options(item.get("Options"), where, f"{column}.Options"),
            "Correct_Answer": text(item.get("Correct_Answer")).strip(),
        }
        for item in (expect(i, dict, where, column) for i in items)
    ]


def classification(value: Any, where: str) -> Row:
    task = expect(parsed(value, where, "Classification_Task") or {}, dict, where, "Classification_Task")
    return {kind: mc_questions(task.get(kind), where, f"Classification_Task.{kind}") for kind in MC_KINDS}


def open_questions(value: Any, where: str, column: str) -> list[Row]:
    items = expect(parsed(value, where, column) or [], list, where, column)
    return [
        {"Type": text(item.get("Type")), "Question": text(item.get("Question")),
         "Ground_Truth": text(item.get("Ground_Truth"))}
        for item in (expect(i, dict, where, column) for i in items)
    ]


def tasks(row: Row, where: str) -> Row:
    return {
        "Classification_Task": classification(row.get("Classification_Task"), where),
        "Generation_Task": open_questions(row.get("Generation_Task"), where, "Generation_Task"),
        "Mask_Task": open_questions(row.get("Mask_Task"), where, "Mask_Task"),
    }


def qa_metadata(value: Any, where: str) -> str:
    """ft_Data ``metadata`` as the JSON string of a list of {Question, Answer}."""
    pairs = parsed(value, where, "metadata") or []
    if isinstance(pairs, dict):
        pairs = [pairs]
    expect(pairs, list, where, "metadata")
    clean = [{"Question": text(p.get("Question")), "Answer": text(p.get("Answer"))}
             for p in (expect(p, dict, where, "metadata") for p in pairs)]
    return json.dumps(clean, ensure_ascii=False)


def unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def natural_key(ident: str) -> tuple[int, int | str]:
    return (0, int(ident)) if ident.isdigit() else (1, ident)


def require_src(src: Path | None, kind: str, how: str) -> Path:
    if src is None:
        raise BenchmarkError(f"benchmark {kind!r} is ingested from a download: pass --src DIR. {how}")
    return Path(src)


# ---------------------------------------------------------------- MLLMU-Bench


def ids_of(rows: list[Row]) -> list[str]:
    return unique([row["ID"] for row in rows])
