"""The CLEAR adapter. What it relies on, and where it was checked:

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

import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vkd.data import BENCHMARKS
from vkd.data.ingest.common import (
    Row, digest, ids_of, image_struct, listing, read_rows, read_schema, require_src, split_files, text, unique,
)
from vkd.data.layout import (
    EVAL_SPLITS, FORGET_SPLITS, LETTERS, RETAIN_OF, TEST_SPLIT, TRAIN_SPLIT, BenchmarkError, BenchmarkMeta, Entity,
    write_split,
)

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
