"""The MLLMU-Bench adapter. What it relies on, and where it was checked:

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vkd.data import BENCHMARKS
from vkd.data.ingest.common import (
    Row, TASK_COLUMNS, classification, digest, entity_id, ids_of, image_struct, natural_key, qa_metadata, read_rows,
    require_splits, require_src, split_files, tasks, text,
)
from vkd.data.layout import EVAL_SPLITS, TEST_SPLIT, TRAIN_SPLIT, BenchmarkError, BenchmarkMeta, Entity, write_split

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
