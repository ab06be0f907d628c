"""What a training stream reads and in what order, plain Python: which ft_Data rows
(``RowPlan``), how a row becomes sequences, the seeded sampling of rows, stable keys of
rows and images, and reading ahead of a consumer.

``pipelines/train/data.py`` puts these on Ray Data; everything here also runs in one
process (benchmarks, unit tests).
"""
from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from vkd.data.items import naming_sequences, train_sequences


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


@dataclass
class RowPlan:
    """Which ft_Data rows a stream reads and how each becomes training sequences."""
    ids: frozenset[str] | None = None    # entities whose rows it reads (None: all)
    image_only: bool = False             # skip text-only rows
    names: dict[str, str] | None = None  # entity id -> name: only the pairs that name the entity (alignment)
    answer: str | None = None            # replace every answer (a refusal target)
    turns: int = 1
    seed: int = 0
    rows: frozenset[int] | None = None   # only the rows with these keys (row_key); None: all
    one_per_image: bool = False          # a row's first sequence alone (a step that needs its picture, not its pairs)

    def keep(self, row: dict[str, Any]) -> bool:
        return ((self.ids is None or row.get("ID") in self.ids) and not (self.image_only and row.get("image") is None)
                and (self.rows is None or row_key(row) in self.rows))

    def sequences(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        row = dict(row)
        where = row.pop("path", None)  # a streamed read names the shard; a read in the driver, the shard and row
        if where or "_source" not in row:
            row["_source"] = f"{where or 'ft_Data'}, entity {row.get('ID')}"
        if self.names is not None:
            seqs = naming_sequences(row, self.names.get(row.get("ID"), ""))
        else:
            seqs = train_sequences(row, self.turns, self.seed)
        if self.answer is not None:
            seqs = [{**s, "answers": [self.answer] * len(s["answers"])} for s in seqs]
        if self.one_per_image:
            seqs = seqs[:1]
        return [{k: it[k] for k in ("image", "questions", "answers", "source")} for it in seqs]

    def to_key(self) -> dict[str, Any]:
        """The plan as a JSON-able dict (a part of cache keys)."""
        return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(self).items()}


def shuffled_sequences(rows: list[dict[str, Any]], plan: RowPlan, items: int, rng: Any) -> list[dict[str, Any]]:
    """The first ``items`` sequences of ``rows`` pass after pass, each pass's sequences in a
    new random order."""
    seqs: list[dict[str, Any]] = []
    while len(seqs) < items:
        one_pass = [s for r in rows for s in plan.sequences(r)]
        if not one_pass:
            break
        rng.shuffle(one_pass)
        seqs += one_pass
    return seqs[:items]


class Ahead:
    """Iterates ``items`` in a background thread, up to ``depth`` items ahead of the consumer.
    A step that draws from several streams starts them side by side instead of one after
    the other (each stream's start costs seconds), and a statistics pass starts its next
    stream while it works on the current one. The producer's errors reach the consumer."""
    _END = object()

    def __init__(self, items: Iterable[Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), daemon=True)
        self._thread.start()

    def _produce(self, items: Iterable[Any]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((self._END, None))
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put((self._END, error))

    def __iter__(self) -> "Ahead":
        return self

    def __next__(self) -> Any:
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it may hold an endless stream)."""
        self._stop.set()
