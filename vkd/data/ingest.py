"""Ingest adapters: MLLMU-Bench and CLEAR, as published on the Hugging Face Hub, into the internal layout.

What the adapters rely on, and where it was checked:

MLLMU-Bench (dataset ``MLLMMU/MLLMU-Bench``, code github.com/franciscoliu/MLLMU-Bench):
  * One folder per config: ``Full_Set``, ``Retain_Set``, ``Test_Set``, ``forget_5/10/15``,
    ``retain_85/90/95``, ``ft_Data``, each with ``train-0000i-of-0000n.parquet`` shards (Test_Set
    has two). Source: the Hub file tree and viewer (Full_Set 500 rows, forget_5 25, Retain_Set 153).
  * Full_Set features (dataset card): ``image``, ``ID`` (string), ``Directory``, ``biography``,
    ``question``, ``answer``, ``Classification_Task`` {Image_Textual_Questions, Pure_Text_Questions:
    lists of {Correct_Answer, Options {A, B, C, D}, Question}}, ``Generation_Task``, ``Mask_Task``.
  * ``eval.py`` reads ``forget_{r}/train-00000-of-00001.parquet`` and ``retain_{100-r}/...``, uses
    ``row["image"]["bytes"]``, ``row["ID"]``, the Classification_Task keys above, Generation_Task and
    Mask_Task entries {Type ("Image_Textual" | "Pure_Text"), Question, Ground_Truth} with ``__`` as the
    cloze blank; for Test_Set it reads every shard of the folder, filters rows by the forget IDs and
    takes ``random.choice(row["images"])["bytes"]``. Retain_Set is evaluated as real celebrities.
  * ``data_process/data_preprocess.py`` (fine-tuning) reads ft_Data's ``image["bytes"]`` and
    ``json.loads(row["metadata"])`` as a list of {Question, Answer}; it uses no ID.
  Not verified: whether ft_Data carries an ``ID`` column, and what the ``question``/``answer``
  columns hold. No name column is published, so the person's name is derived (see ``mllmu_name``).

CLEAR (dataset ``therem/CLEAR``, code github.com/somvy/multimodal_unlearning):
  * Configs, one folder each: ``data`` (the ``default`` config), ``full``, ``forget01/05/10``,
    ``retain90/95/99``, each also as ``+tofu``; ``forget01/05/10_perturbed``, ``retain_perturbed``,
    ``real_faces``, ``real_world``. Source: the Hub file tree and viewer (full 3.77k rows,
    forget01 35, forget05 188, forget10 379).
  * Features (dataset card): plain configs ``image``, ``caption``, ``name``; ``+tofu`` configs
    ``image``, ``caption``, ``question``, ``answer`` and no ``name``; ``_perturbed`` configs add
    ``perturbed_captions`` and ``perturbed_names`` (lists) and ``paraphrased_caption``.
  * ``mm/dataset.py`` treats a ``+tofu`` row whose image is null as a text question/answer pair and
    any other row as an image with its caption; ``config/mm/eval.yaml`` uses ``name`` against
    ``perturbed_names`` for face recognition.
  Not verified: that the TOFU pairs of one person are contiguous in ``+tofu`` files (used only for
  pairs that do not mention any name, see ``attribute_pairs``).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from vkd.data import BENCHMARKS
from vkd.data.layout import (
    EVAL_SPLITS, FORGET_SPLITS, LETTERS, RETAIN_OF, TEST_SPLIT, TRAIN_SPLIT,
    BenchmarkError, BenchmarkMeta, Entity, decode_image, write_split,
)

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

MLLMU_HOW = ("Download it with `git clone https://huggingface.co/datasets/MLLMMU/MLLMU-Bench` "
             "(with git-lfs) and pass that folder as --src.")
MLLMU_EVAL_REQUIRED = ("image", "ID") + TASK_COLUMNS
MLLMU_TEST_REQUIRED = ("ID", "images") + TASK_COLUMNS
MLLMU_TRAIN_REQUIRED = ("image", "metadata")
TITLES = {"dr", "dr.", "mr", "mr.", "mrs", "mrs.", "ms", "ms.", "prof", "prof.", "sir"}
PARTICLES = {"de", "del", "della", "der", "di", "da", "du", "van", "von", "la", "le", "bin", "al", "el"}
NOT_NAMES = {"the", "a", "an", "in", "on", "at", "as", "born", "with", "from", "after", "this", "our"}


def asks_name(question: str) -> bool:
    q = question.lower()
    return "name" in q and any(w in q for w in ("person", "individual", "who", "this"))


def short_answer(answer: str) -> str:
    words = answer.strip().rstrip(".").split()
    return " ".join(words) if 0 < len(words) <= 5 else ""


def leading_name(biography: str) -> str:
    """The run of capitalised words a biography starts with ("Hanna Sørensen, born ..." -> "Hanna Sørensen")."""
    words = biography.split()
    while words and words[0].lower() in TITLES:
        words = words[1:]
    name: list[str] = []
    for i, word in enumerate(words[:6]):
        core = word.strip(",.;:()\"'")
        next_up = i + 1 < len(words) and words[i + 1][:1].isupper()
        if not core or not (core[:1].isupper() or (name and core in PARTICLES and next_up)):
            break
        name.append(core)
        if word != core:
            break
    if not name or name[0].lower() in NOT_NAMES:
        return ""
    return " ".join(name)


def mllmu_name(row: Row, ident: str) -> tuple[str, str]:
    """Name of the person of an evaluation row, and which rule gave it.

    The published splits have no name column, so, in order: a ``name`` column if present; the
    ``answer`` when ``question`` asks for the person's name; the correct option of an image
    question asking for the name; the capitalised words the biography starts with; else
    ``Person <ID>``.
    """
    if text(row.get("name")).strip():
        return text(row["name"]).strip(), "name column"
    if asks_name(text(row.get("question"))) and short_answer(text(row.get("answer"))):
        return short_answer(text(row.get("answer"))), "question/answer"
    for mc in row["Classification_Task"]["Image_Textual_Questions"]:
        chosen = short_answer(mc["Options"].get(mc["Correct_Answer"], ""))
        if asks_name(mc["Question"]) and chosen:
            return chosen, "classification question"
    if leading_name(text(row.get("biography"))):
        return leading_name(text(row.get("biography"))), "biography"
    return f"Person {ident}", "fallback"


PROFILE_COLUMNS = ("ID", "name", "biography", "question", "answer", "Classification_Task")


def mllmu_entities(files: dict[str, list[Path]]) -> tuple[list[Entity], dict[str, int]]:
    """One entity per ID of the evaluation splits, named from its first row (text columns only)."""
    first: dict[str, Row] = {}
    for split in EVAL_SPLITS:
        label = f"MLLMU-Bench {split}"
        for where, raw in read_rows(files[split], MLLMU_EVAL_REQUIRED, label, PROFILE_COLUMNS):
            ident = entity_id(raw["ID"], where)
            if ident not in first:
                first[ident] = dict(raw, Classification_Task=classification(raw["Classification_Task"], where))
    entities, rules = [], {}
    for ident in sorted(first, key=natural_key):
        name, rule = mllmu_name(first[ident], ident)
        rules[rule] = rules.get(rule, 0) + 1
        entities.append(Entity(ident, name, {"biography": text(first[ident].get("biography"))}))
    return entities, rules


def mllmu_eval_rows(paths: list[Path], split: str, names: dict[str, str]) -> list[Row]:
    rows = []
    for where, raw in read_rows(paths, MLLMU_EVAL_REQUIRED, f"MLLMU-Bench {split}"):
        ident = entity_id(raw["ID"], where)
        rows.append({
            "image": image_struct(raw["image"], where), "ID": ident, "name": names[ident],
            "biography": text(raw.get("biography")), "question": text(raw.get("question")),
            "answer": text(raw.get("answer")), **tasks(raw, where),
        })
    return rows


def mllmu_test_rows(paths: list[Path], names: dict[str, str]) -> list[Row]:
    rows = []
    for where, raw in read_rows(paths, MLLMU_TEST_REQUIRED, "MLLMU-Bench Test_Set"):
        images = raw["images"]
        images = [images] if isinstance(images, dict) else (images or [])
        if not images:
            raise BenchmarkError(f"{where}: column images is empty; a Test_Set row needs at least one image")
        ident = entity_id(raw["ID"], where)
        rows.append({
            "ID": ident, "name": names.get(ident, text(raw.get("name"))),
            "images": [image_struct(img, f"{where}, images[{k}]") for k, img in enumerate(images)],
            **tasks(raw, where),
        })
    return rows


@dataclass
class TrainIds:
    """How ft_Data rows get their person: an ID column, else the same image bytes as a profile,
    else the row position in Full_Set (read only when needed)."""

    src: Path
    by_image: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _by_position: list[str] | None = None

    def resolve(self, raw: Row, image: bytes, index: int, total: int, where: str) -> str:
        if text(raw.get("ID")).strip():
            return self.count("ID column", entity_id(raw["ID"], where))
        if digest(image) in self.by_image:
            return self.count("same image", self.by_image[digest(image)])
        if len(self.by_position()) == total:
            return self.count("Full_Set position", self.by_position()[index])
        raise BenchmarkError(
            f"{where}: ft_Data row has no ID and its image matches no profile image of the evaluation "
            "splits; add an ID column to ft_Data, or include Full_Set (same row order) in --src"
        )

    def by_position(self) -> list[str]:
        if self._by_position is None:
            paths = split_files(self.src, "Full_Set")
            rows = read_rows(paths, ("ID",), "MLLMU-Bench Full_Set", ("ID",))
            self._by_position = [entity_id(raw["ID"], where) for where, raw in rows]
        return self._by_position

    def count(self, rule: str, ident: str) -> str:
        self.counts[rule] = self.counts.get(rule, 0) + 1
        return ident


def mllmu_train_rows(paths: list[Path], ids: TrainIds) -> list[Row]:
    raw_rows = list(read_rows(paths, MLLMU_TRAIN_REQUIRED, "MLLMU-Bench ft_Data"))
    rows = []
    for index, (where, raw) in enumerate(raw_rows):
        image = image_struct(raw["image"], where)
        ident = ids.resolve(raw, image["bytes"], index, len(raw_rows), where)
        rows.append({"image": image, "ID": ident, "metadata": qa_metadata(raw["metadata"], where)})
    return rows


def ids_of(rows: list[Row]) -> list[str]:
    return unique([row["ID"] for row in rows])


@BENCHMARKS.register("mllmu")
def prepare_mllmu(out: Path, src: Path | None = None, seed: int = 0, **_: Any) -> BenchmarkMeta:
    """Convert a download of MLLMU-Bench; its splits are used as published (``seed`` is only recorded).

    Retain_Set (real celebrities) has no counterpart in the internal layout and is not converted;
    Full_Set is only read to give ft_Data rows their IDs when nothing else can. Splits are written
    one at a time so that only one of them is held in memory.
    """
    src = require_src(src, "mllmu", MLLMU_HOW)
    files = require_splits(src, (TRAIN_SPLIT,) + EVAL_SPLITS + (TEST_SPLIT,), "MLLMU-Bench", MLLMU_HOW)
    entities, name_rules = mllmu_entities(files)
    names = {e.id: e.name for e in entities}
    train_ids = TrainIds(src)
    splits: dict[str, list[str]] = {}
    for split in EVAL_SPLITS:
        rows = mllmu_eval_rows(files[split], split, names)
        train_ids.by_image.update({digest(r["image"]["bytes"]): r["ID"] for r in rows})
        splits[split] = ids_of(rows)
        write_split(out, split, rows)
    for split, rows in ((TRAIN_SPLIT, mllmu_train_rows(files[TRAIN_SPLIT], train_ids)),
                        (TEST_SPLIT, mllmu_test_rows(files[TEST_SPLIT], names))):
        splits[split] = ids_of(rows)
        write_split(out, split, rows)
    extra = {
        "source": "MLLMU-Bench", "src": str(src), "name_from": name_rules, "ft_Data_ID_from": train_ids.counts,
        "not_converted": [n for n in ("Retain_Set",) if split_files(src, n)],
        "ids_without_profile": sorted(set(splits[TRAIN_SPLIT] + splits[TEST_SPLIT]) - set(names)),
    }
    splits = {split: splits[split] for split in (TRAIN_SPLIT,) + EVAL_SPLITS + (TEST_SPLIT,)}
    return BenchmarkMeta(name="mllmu", entities=entities, splits=splits, seed=seed, extra=extra)


# ---------------------------------------------------------------- CLEAR

CLEAR_HOW = ("Download it with `huggingface-cli download therem/CLEAR --repo-type dataset --local-dir DIR` "
             "and pass DIR as --src.")
CLEAR_IMAGE_CONFIGS = ("full", "data", "default")
CLEAR_FORGET = {"forget_5": "forget05", "forget_10": "forget10", "forget_15": None}
CLEAR_SHARE = {"forget_5": 0.05, "forget_10": 0.10, "forget_15": 0.15}
DESCRIBE = "Describe the person in the image."
WHO = "Who is the person in the image?"


@dataclass
class Photo:
    image: dict[str, bytes]
    caption: str


@dataclass
class Pair:
    question: str
    answer: str
    perturbed: list[str]


@dataclass
class Person:
    entity: Entity
    photos: list[Photo] = field(default_factory=list)
    unseen: list[Photo] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    perturbed_names: list[str] = field(default_factory=list)


def slug(name: str, taken: set[str]) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-") or "person"
    ident, k = base, 2
    while ident in taken:
        ident, k = f"{base}-{k}", k + 1
    taken.add(ident)
    return ident


def clear_image_files(src: Path) -> tuple[str, list[Path]]:
    for config in CLEAR_IMAGE_CONFIGS:
        if split_files(src, config):
            return config, split_files(src, config)
    raise BenchmarkError(
        f"CLEAR source {src} lacks the split folder full/ (or data/, the default config) that holds every "
        f"image with its caption and name; found: {listing(src)}. {CLEAR_HOW}"
    )


def person_name(raw: Row, where: str) -> str:
    name = text(raw.get("name")).strip()
    if not name:
        raise BenchmarkError(f"{where}: column name is empty; every CLEAR image row needs the person's name")
    return name


def clear_people(config: str, paths: list[Path]) -> dict[str, Person]:
    people: dict[str, Person] = {}
    taken: set[str] = set()
    for where, raw in read_rows(paths, ("image", "caption", "name"), f"CLEAR {config}"):
        name = person_name(raw, where)
        if name not in people:
            people[name] = Person(Entity(slug(name, taken), name))
        people[name].photos.append(Photo(image_struct(raw["image"], where), text(raw["caption"])))
    if not people:
        raise BenchmarkError(f"{paths[0].parent}: CLEAR {config} has no rows; download it again")
    return people


def photo_keys(name: str, image: bytes, caption: str) -> tuple[str, str]:
    return digest(image), f"{name}\n{caption.strip()}"


def forget_names(src: Path, config: str, people: dict[str, Person], seen: set[str]) -> list[str]:
    """Names of a forget config; an image whose bytes and caption are both absent from full/ is kept
    as an unseen test image (the caption guards against the same photo encoded differently)."""
    names = []
    for where, raw in read_rows(split_files(src, config), ("name",), f"CLEAR {config}", ("name", "image", "caption")):
        name = person_name(raw, where)
        if name not in people:
            raise BenchmarkError(
                f"{where}: person {name!r} is not in the full image set; {config} and full/ come from "
                "different versions of CLEAR, download both again"
            )
        names.append(name)
        blob, caption = raw.get("image"), text(raw.get("caption"))
        data = blob.get("bytes") if isinstance(blob, dict) else blob
        keys = set(photo_keys(name, bytes(data or b""), caption))
        if data and not seen & keys:
            seen.update(keys)
            people[name].unseen.append(Photo(image_struct(blob, where), caption))
    return unique(names)


def forget_splits(src: Path, people: dict[str, Person], seed: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Our forget_5/10/15 from the published folders of that name, else CLEAR's forget05/forget10.

    CLEAR's forget01 (1 %) has no counterpart; forget_15 (and any split whose folder is absent) is the
    next smaller forget split plus people drawn with ``seed`` until it holds 15 % (5 %, 10 %) of them,
    at least one more than that smaller split and at least one fewer than everyone.
    """
    seen = {key for name, person in people.items() for p in person.photos
            for key in photo_keys(name, p.image["bytes"], p.caption)}
    order = list(people)
    random.Random(f"{seed}:forget").shuffle(order)
    chosen: dict[str, list[str]] = {}
    origin: dict[str, str] = {}
    previous: list[str] = []
    for split in FORGET_SPLITS:
        config = next((c for c in (split, CLEAR_FORGET[split]) if c and split_files(src, c)), None)
        if config:
            chosen[split], origin[split] = forget_names(src, config, people, seen), f"{config}/"
        else:
            target = min(len(people) - 1, max(len(previous) + 1, round(CLEAR_SHARE[split] * len(people))))
            chosen[split] = previous + [n for n in order if n not in previous][:max(0, target - len(previous))]
            origin[split] = f"{len(chosen[split])} people: the smaller forget split plus a draw with seed {seed}"
        previous = chosen[split]
    if split_files(src, "forget01"):
        chosen["forget01"] = forget_names(src, "forget01", people, seen)
    return chosen, origin


def add_perturbed_names(src: Path, people: dict[str, Person]) -> list[str]:
    """Collect CLEAR's wrong names per person from every ``*_perturbed`` config that has them."""
    used = []
    columns = ("name", "perturbed_names")
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and p.name.endswith("_perturbed")):
        paths, label = split_files(src, folder.name), f"CLEAR {folder.name}"
        if not paths or not set(columns) <= set(read_schema(paths[0], label).names):
            continue
        used.append(folder.name)
        for _, raw in read_rows(paths, columns, label, columns):
            person = people.get(text(raw.get("name")).strip())
            if person is not None:
                wrong = [text(n) for n in raw["perturbed_names"] or []]
                person.perturbed_names = unique(person.perturbed_names + wrong)
    return used


def tofu_files(src: Path) -> list[tuple[str, list[Path]]]:
    if split_files(src, "full+tofu"):
        return [("full+tofu", split_files(src, "full+tofu"))]
    folders = sorted(p.name for p in src.iterdir() if p.is_dir() and p.name.endswith("+tofu"))
    return [(name, split_files(src, name)) for name in folders if split_files(src, name)]


def name_in(textual: str, names: list[str]) -> str | None:
    """The longest person name that occurs in the text, if any."""
    lowered = textual.lower()
    hits = [n for n in names if n.lower() in lowered]
    return max(hits, key=len) if hits else None


def attribute_pairs(owners: list[str | None]) -> list[str | None]:
    """Give pairs that mention no name the person of the nearest earlier (else later) attributed pair.

    TOFU lists each author's questions together, so a neighbour is the best remaining evidence.
    """
    filled = list(owners)
    for i, owner in enumerate(owners):
        if owner is None:
            before = next((o for o in reversed(owners[:i]) if o is not None), None)
            filled[i] = before or next((o for o in owners[i + 1:] if o is not None), None)
    return filled


def add_pairs(src: Path, people: dict[str, Person]) -> dict[str, Any]:
    """Attach each TOFU pair of the +tofu configs (rows whose image is null) to its person."""
    names = list(people)
    counts = {"by name": 0, "by neighbour": 0, "dropped": 0}
    done: set[tuple[str, str]] = set()
    files = tofu_files(src)
    wanted = ("image", "question", "answer", "name", "perturbed_answer")
    for config, paths in files:
        pairs: list[Pair] = []
        found: list[str | None] = []
        for _, raw in read_rows(paths, ("question", "answer"), f"CLEAR {config}", wanted):
            key = (text(raw["question"]).strip(), text(raw["answer"]).strip())
            if raw.get("image") is not None or not key[0] or key in done:
                continue
            done.add(key)
            owner = text(raw.get("name")).strip() or name_in(" ".join(key), names)
            pairs.append(Pair(*key, [text(a) for a in raw.get("perturbed_answer") or []]))
            found.append(owner if owner in people else None)
        for pair, named, owner in zip(pairs, found, attribute_pairs(found)):
            counts["by name" if named else ("by neighbour" if owner else "dropped")] += 1
            if owner:
                people[owner].pairs.append(pair)
    return {"files": [c for c, _ in files], **counts}


def mc(question: str, answer: str, wrong: list[str], letter: str) -> Row:
    others = iter(wrong)
    opts = {lt: (answer if lt == letter else next(others)) for lt in LETTERS}
    return {"Question": question, "Options": opts, "Correct_Answer": letter}


def name_question(person: Person, names: list[str], letter: str, rng: random.Random) -> Row:
    """'Who is the person in the image?' with three wrong names: CLEAR's perturbed names, else others drawn."""
    own = person.entity.name
    wrong = [n for n in person.perturbed_names if n and n != own][:3]
    pool = [n for n in names if n != own and n not in wrong]
    if len(wrong) + len(pool) < 3:
        raise BenchmarkError(
            f"CLEAR source has too few distinct names to build a 4-option question for {own!r}; "
            "it needs at least 4 people (or perturbed_names)"
        )
    wrong += rng.sample(pool, 3 - len(wrong))
    return mc(WHO, own, wrong, letter)


def text_questions(person: Person, rng: random.Random) -> list[Row]:
    """Multiple-choice TOFU questions; only pairs that ship at least 3 perturbed answers qualify."""
    out = []
    for pair in person.pairs:
        wrong = [a for a in unique(pair.perturbed) if a and a != pair.answer][:3]
        if len(wrong) == 3:
            out.append(mc(pair.question, pair.answer, wrong, rng.choice(LETTERS)))
    return out


def masked(caption: str, name: str) -> list[Row]:
    pattern = re.compile(re.escape(name), re.IGNORECASE)
    if not pattern.search(caption):
        return []
    return [{"Type": "Image_Textual", "Question": pattern.sub("__", caption), "Ground_Truth": name}]


def describe(photo: Photo) -> list[Row]:
    return [{"Type": "Image_Textual", "Question": DESCRIBE, "Ground_Truth": photo.caption}]


def clear_eval_row(person: Person, who: Row, rng: random.Random) -> Row:
    photo, name = person.photos[0], person.entity.name
    return {
        "image": photo.image, "ID": person.entity.id, "name": name, "biography": "",
        "question": DESCRIBE, "answer": photo.caption,
        "Classification_Task": {"Image_Textual_Questions": [who], "Pure_Text_Questions": text_questions(person, rng)},
        "Generation_Task": describe(photo) + [
            {"Type": "Pure_Text", "Question": p.question, "Ground_Truth": p.answer} for p in person.pairs
        ],
        "Mask_Task": masked(photo.caption, name),
    }


def clear_test_row(person: Person, photo: Photo, who: Row) -> Row:
    return {
        "ID": person.entity.id, "name": person.entity.name, "images": [photo.image],
        "Classification_Task": {"Image_Textual_Questions": [who], "Pure_Text_Questions": []},
        "Generation_Task": describe(photo), "Mask_Task": masked(photo.caption, person.entity.name),
    }


def hold_out(person: Person, rng: random.Random) -> tuple[Photo | None, str]:
    """The person's Test_Set image: an image only the forget configs hold, else one taken out of training."""
    if person.unseen:
        return person.unseen[0], "unseen"
    if len(person.photos) < 2:
        return None, "none"
    return person.photos.pop(rng.randrange(len(person.photos))), "held out"


def clear_train_rows(person: Person) -> list[Row]:
    rows = [
        {"image": p.image, "ID": person.entity.id,
         "metadata": json.dumps([{"Question": DESCRIBE, "Answer": p.caption}], ensure_ascii=False)}
        for p in person.photos
    ]
    if person.pairs:
        pairs = [{"Question": p.question, "Answer": p.answer} for p in person.pairs]
        rows.append({"image": None, "ID": person.entity.id, "metadata": json.dumps(pairs, ensure_ascii=False)})
    return rows


def balanced_letters(n: int, seed: int) -> list[str]:
    letters = [LETTERS[i % len(LETTERS)] for i in range(n)]
    random.Random(f"{seed}:letters").shuffle(letters)
    return letters


@dataclass
class ClearRows:
    train: list[Row] = field(default_factory=list)
    evals: dict[str, Row] = field(default_factory=dict)
    test: list[Row] = field(default_factory=list)
    test_from: dict[str, int] = field(default_factory=lambda: {"unseen": 0, "held out": 0, "none": 0})


def clear_rows(people: dict[str, Person], seed: int) -> ClearRows:
    names = list(people)
    rows = ClearRows()
    rng, held = random.Random(f"{seed}:questions"), random.Random(f"{seed}:holdout")
    for person, letter in zip(people.values(), balanced_letters(len(people), seed)):
        photo, how = hold_out(person, held)
        rows.test_from[how] += 1
        who = name_question(person, names, letter, rng)
        rows.evals[person.entity.id] = clear_eval_row(person, who, rng)
        if photo is not None:
            rows.test.append(clear_test_row(person, photo, who))
        rows.train += clear_train_rows(person)
    return rows


def clear_splits(people: dict[str, Person], forget: dict[str, list[str]], rows: ClearRows) -> dict[str, list[str]]:
    ident = {name: person.entity.id for name, person in people.items()}
    splits = {TRAIN_SPLIT: ids_of(rows.train)}
    for split in FORGET_SPLITS:
        splits[split] = [ident[n] for n in forget[split]]
        splits[RETAIN_OF[split]] = [ident[n] for n in people if n not in set(forget[split])]
    splits[TEST_SPLIT] = ids_of(rows.test)
    return {split: splits[split] for split in (TRAIN_SPLIT,) + EVAL_SPLITS + (TEST_SPLIT,)}


@BENCHMARKS.register("clear")
def prepare_clear(out: Path, src: Path | None = None, seed: int = 0, **_: Any) -> BenchmarkMeta:
    """Convert a download of CLEAR: one entity per distinct ``name`` (ID: a slug of the name).

    ft_Data: every training image with "Describe the person in the image." -> caption, plus one
    text-only row per person with its TOFU pairs. Evaluation rows (one per person, on its first
    training image): a 4-option name question, multiple-choice TOFU questions where perturbed answers
    exist, caption and TOFU generation, and the caption with the name masked as ``__``. CLEAR has no
    unseen images, so the Test_Set image of each person is one only a forget config holds if any,
    else one training image held out with ``seed`` (people with a single image get no Test_Set row).
    real_faces and real_world (real people, general knowledge) are not converted.
    """
    src = require_src(src, "clear", CLEAR_HOW)
    image_config, image_paths = clear_image_files(src)
    people = clear_people(image_config, image_paths)
    forget, origin = forget_splits(src, people, seed)
    perturbed = add_perturbed_names(src, people)
    pair_counts = add_pairs(src, people)
    rows = clear_rows(people, seed)
    splits = clear_splits(people, forget, rows)
    write_split(out, TRAIN_SPLIT, rows.train)
    for split in EVAL_SPLITS:
        write_split(out, split, [rows.evals[i] for i in splits[split]])
    write_split(out, TEST_SPLIT, rows.test)
    extra = {
        "source": "CLEAR", "src": str(src), "images_from": f"{image_config}/", "forget_from": origin,
        "clear_forget01": [people[n].entity.id for n in forget.get("forget01", [])],
        "perturbed_names_from": perturbed, "tofu_pairs": pair_counts, "test_image_from": rows.test_from,
        "no_test_image": [p.entity.id for p in people.values() if p.entity.id not in set(splits[TEST_SPLIT])],
    }
    entities = [
        Entity(p.entity.id, p.entity.name, {"images": len(p.photos), "tofu_pairs": len(p.pairs)})
        for p in people.values()
    ]
    return BenchmarkMeta(name="clear", entities=entities, splits=splits, seed=seed, extra=extra)
