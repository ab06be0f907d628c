"""Content keys and the one atomic cache.

Everything a run can reuse (the tiny model, a model's evaluation, statistics passes, a
registered model's download) is kept under a content key: :func:`digest` of everything the
value depends on, the model and data parts by :func:`model_fingerprint` and
:func:`data_fingerprint`. A value is written whole or not at all (into a temporary sibling,
then renamed), so a killed run never leaves half a value that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

DIGEST_CHARS = 16  # hex characters of every content key: 64 bits


def digest(value: Any) -> str:
    """The content key of a JSON-able value (dict keys sorted; other objects by ``str``)."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_CHARS]


def model_fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint of a model folder: config, and each weight file's size
    with the hash of its first and last MiB."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(2**20)
            fh.seek(max(0, size - 2**20))
            h.update(f.name.encode() + str(size).encode() + head + fh.read())
    return h.hexdigest()[:DIGEST_CHARS]


def data_fingerprint(data: str | Path) -> str:
    """A hash of the benchmark's metadata file (entities, splits, seed and settings)."""
    return hashlib.sha256((Path(data) / "benchmark.json").read_bytes()).hexdigest()[:DIGEST_CHARS]


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary sibling of ``path`` (a file or a folder), then rename it
    to ``path``. When another process got there first, its value stays and ours goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        target = tmp / "value"
        write(target)
        try:
            os.rename(target, path)  # a file replaces a file; a folder only a missing one
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class Cache:
    """One kind of cached value (``eval``, ``stats``, ``models``...) under ``root/kind``: a
    file or folder per content key, made once by whoever asks first."""

    def __init__(self, root: str | Path, kind: str, suffix: str = ""):
        self.folder = Path(root) / kind
        self.suffix = suffix

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{self.suffix}"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def get_or_make(self, key: str, make: Callable[[Path], None]) -> Path:
        """The value's path, ``make(tmp)`` writing it first when it is missing."""
        path = self.path(key)
        if not path.exists():
            write_atomic(path, make)
        return path

    def json(self, key: str, compute: Callable[[], Any]) -> Any:
        """A JSON value, computed when missing."""
        path = self.get_or_make(key, lambda tmp: tmp.write_text(json.dumps(compute())))
        return json.loads(path.read_text())

    def torch(self, key: str, compute: Callable[[], Any] | None = None) -> Any:
        """A torch-saved value (``compute`` it when missing; None: it must be there)."""
        import torch

        if compute is not None:
            self.get_or_make(key, lambda tmp: torch.save(compute(), tmp))
        return torch.load(self.path(key), weights_only=False)

    def put_torch(self, key: str, value: Any) -> None:
        import torch

        self.get_or_make(key, lambda tmp: torch.save(value, tmp))
