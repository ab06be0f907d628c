"""Benchmarks: the internal layout, the synthetic generator and the ingest adapters."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from vkd.data.layout import BenchmarkError, BenchmarkMeta, write_meta
from vkd.registry import Registry, UnknownName

# A preparer writes every split of its benchmark into ``out`` (an empty folder) and returns
# the metadata; ``src`` is the published dataset folder for ingest adapters.
Preparer = Callable[..., BenchmarkMeta]
BENCHMARKS: Registry[Preparer] = Registry("benchmark")


def prepare_benchmark(kind: str, out: str | Path, *, src: str | Path | None = None,
                      overwrite: bool = False, **settings: Any) -> BenchmarkMeta:
    """Build benchmark ``kind`` into ``out``.

    Work happens in a sibling temporary folder that replaces ``out`` only on success, so a
    failed run never loses what ``out`` held; a non-empty ``out`` needs ``overwrite``.
    """
    from vkd.data import ingest, synthetic  # noqa: F401  (fill the registry)

    try:
        preparer = BENCHMARKS.get(kind)
    except UnknownName as err:
        raise BenchmarkError(str(err)) from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"output {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BenchmarkError(f"output folder {out} is not empty; choose another --out or pass --overwrite to replace it")
    if src is not None and not Path(src).is_dir():
        raise BenchmarkError(f"--src {src} is not a folder; point it at the downloaded {kind} dataset")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        kwargs = dict(settings)
        if src is not None:
            kwargs["src"] = Path(src)
        meta = preparer(tmp, **kwargs)
        write_meta(tmp, meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta
