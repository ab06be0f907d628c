"""Flatten benchmark rows into the items that training and evaluation consume.

An evaluation item is a flat dict (so it streams through Ray Data) with the columns of
``ITEM_COLUMNS``: ``task`` is ``mc`` (multiple choice over ``options``, correct index
``answer``), ``gen`` (free generation scored by ROUGE-L against ``truth``) or ``cloze``
(fill the ``__`` blank; correct when the answer starts with ``truth``). ``key`` is the metric
the item counts towards, e.g. ``forget_vqa`` or ``retain_qa_rougeL``.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterator

from vkd.data.layout import (
    EVAL_SPLITS, LETTERS, TEST_SPLIT, TRAIN_SPLIT, BenchmarkError, ForgetSet, decode_image, forget_set, load_meta,
    read_rows,
)

ITEM_COLUMNS = ("key", "task", "entity", "name", "question", "options", "answer", "truth", "image", "source")
CLOZE_PREFIX = "Fill in the blank: "


def _image_bytes(blob: Any) -> bytes | None:
    if blob is None:
        return None
    return blob.get("bytes") if isinstance(blob, dict) else blob


def _mc_items(prefix: str, questions: list[dict], image: bytes | None, entity: str, name: str, source: str,
              limit: int) -> Iterator[dict]:
    if limit and len(questions) > limit:  # evenly spaced, so every attribute keeps its share
        questions = [questions[i * len(questions) // limit] for i in range(limit)]
    for j, q in enumerate(questions):
        opts = q.get("Options") or {}
        letter = q.get("Correct_Answer")
        if letter not in LETTERS or any(opts.get(x) is None for x in LETTERS):
            raise BenchmarkError(f"{source}: Classification_Task question {j} needs Options A-D and a Correct_Answer letter")
        yield {"key": prefix, "task": "mc", "entity": entity, "name": name, "question": q["Question"],
               "options": [opts[x] for x in LETTERS], "answer": LETTERS.index(letter), "truth": "",
               "image": image, "source": source}


def _open_items(role: str, tasks: list[dict], task: str, image: bytes | None, entity: str, name: str,
                source: str, limit: int, image_only: bool) -> Iterator[dict]:
    suffix = "rougeL" if task == "gen" else "cloze"
    counts: dict[str, int] = {}
    for t in tasks or []:
        visual = t.get("Type", "Image_Textual") != "Pure_Text"
        if image_only and not visual:
            continue
        key = f"{role}_{'vqa' if visual else 'qa'}_{suffix}"
        counts[key] = counts.get(key, 0) + 1
        if limit and counts[key] > limit:
            continue
        question = CLOZE_PREFIX + t["Question"] if task == "cloze" else t["Question"]
        yield {"key": key, "task": task, "entity": entity, "name": name, "question": question, "options": [], "answer": -1,
               "truth": t["Ground_Truth"], "image": image if visual else None, "source": source}


SHORT_WORDS = 6  # a ground truth of at most this many words is a short answer (the *_gen keys)


def _spread(questions: list, limit: int) -> list:
    """At most ``limit`` of ``questions`` (0: all), evenly spaced, so every attribute keeps its share."""
    if limit and len(questions) > limit:
        return [questions[i * len(questions) // limit] for i in range(limit)]
    return questions


def short_questions(row: dict[str, Any], visual: bool) -> list[tuple[str, str]]:
    """(question, ground truth) of a row's short open questions: its multiple-choice
    questions asked open (the truth is the correct option) and its Generation_Task questions
    whose truth has at most ``SHORT_WORDS`` words, each question once."""
    cls = row.get("Classification_Task") or {}
    out: dict[str, str] = {}
    for q in cls.get("Image_Textual_Questions" if visual else "Pure_Text_Questions") or []:
        letter, opts = q.get("Correct_Answer"), q.get("Options") or {}
        if letter in LETTERS and opts.get(letter):
            out.setdefault(q["Question"], opts[letter])
    for t in row.get("Generation_Task") or []:
        if (t.get("Type", "Image_Textual") != "Pure_Text") == visual and len(t["Ground_Truth"].split()) <= SHORT_WORDS:
            out.setdefault(t["Question"], t["Ground_Truth"])
    return list(out.items())


def _short_items(key: str, pairs: list[tuple[str, str]], image: bytes | None, entity: str, name: str,
                 source: str) -> list[dict]:
    return [{"key": key, "task": "short", "entity": entity, "name": name, "question": q, "options": [], "answer": -1,
             "truth": truth, "image": image, "source": source} for q, truth in pairs]


def _limits(limit: int, other: int) -> int:
    """The tighter of two caps (0: no cap)."""
    return min(x for x in (limit, other) if x) if (limit or other) else 0


def _unseen_items(row: dict[str, Any], role: str, limit: int, generation: bool, open_limit: int,
                  gen_limit: int) -> list[dict]:
    """Items of a Test_Set row. ``test`` (the forget entities): every unseen image with every
    image question. ``retain_test`` (other entities): the row's image questions spread over
    its unseen images, question j on image j mod n, so an entity costs what its profile row
    costs."""
    source, entity, name = row.get("_source", f"entity {row['ID']}"), row["ID"], row.get("name") or ""
    cls = row.get("Classification_Task") or {}
    images = [_image_bytes(b) for b in row.get("images") or []]
    mc, short = cls.get("Image_Textual_Questions") or [], short_questions(row, True)
    items: list[dict] = []
    if role == "retain_test":
        mc, short = _spread(mc, limit), _spread(short, gen_limit)
        for k, image in enumerate(images):
            where = f"{source}, image {k}"
            items += _mc_items("retain_test_vqa", mc[k::len(images)], image, entity, name, where, 0)
            items += _short_items("retain_test_vqa_gen", short[k::len(images)], image, entity, name, where)
        return items
    for k, image in enumerate(images):
        where = f"{source}, image {k}"
        items += _mc_items("test_vqa", mc, image, entity, name, where, limit)
        items += _short_items("test_vqa_gen", _spread(short, gen_limit), image, entity, name, where)
        if generation:
            items += _open_items("test", row.get("Generation_Task"), "gen", image, entity, name, where, open_limit, True)
            items += _open_items("test", row.get("Mask_Task"), "cloze", image, entity, name, where, open_limit, True)
    return items


def expand_eval_row(row: dict[str, Any], role: str, limit: int = 0, generation: bool = True,
                    open_limit: int = 0, gen_limit: int = 0) -> list[dict]:
    """Every evaluation item of one forget/retain row (``role`` forget|retain) or one Test_Set
    row (``role`` test or retain_test: its unseen images). ``limit`` caps every kind of
    question per row and key, ``open_limit`` the long open ones (ROUGE-L, cloze: only with
    ``generation``) and ``gen_limit`` the short ones (the ``*_gen`` keys, always scored)."""
    open_limit, gen_limit = _limits(limit, open_limit), _limits(limit, gen_limit)
    if role in ("test", "retain_test"):
        return _unseen_items(row, role, limit, generation, open_limit, gen_limit)
    source = row.get("_source", f"entity {row['ID']}")
    cls = row.get("Classification_Task") or {}
    entity, name = row["ID"], row.get("name") or ""
    image = _image_bytes(row.get("image"))
    items = list(_mc_items(f"{role}_vqa", cls.get("Image_Textual_Questions") or [], image, entity, name, source, limit))
    items += _mc_items(f"{role}_qa", cls.get("Pure_Text_Questions") or [], None, entity, name, source, limit)
    items += _short_items(f"{role}_vqa_gen", _spread(short_questions(row, True), gen_limit), image, entity, name, source)
    items += _short_items(f"{role}_qa_gen", _spread(short_questions(row, False), gen_limit), None, entity, name, source)
    if generation:
        items += _open_items(role, row.get("Generation_Task"), "gen", image, entity, name, source, open_limit, False)
        items += _open_items(role, row.get("Mask_Task"), "cloze", image, entity, name, source, open_limit, False)
    return items


Plan = list[tuple[str, str, list[str] | None]]


def _evenly(ids: tuple[str, ...], n: int) -> list[str]:
    """``n`` of ``ids``, evenly spaced (all of them when n is 0 or more than there are)."""
    if not n or n >= len(ids):
        return list(ids)
    step = len(ids) / n
    return [ids[int(i * step)] for i in range(n)]


def eval_plan(data: str | Path, forget: "str | ForgetSet", retain_entities: int = 0,
              retain_test_entities: int = 0) -> Plan:
    """(split, role, entity ids or None for all) of an evaluation against ``forget`` (a
    forget split or a ForgetSet): the forget entities' rows and unseen images, the retain
    entities' rows (``retain_entities`` of them, evenly spaced; 0: all) and the unseen images
    of ``retain_test_entities`` of them (0: none). The forget set's lookalikes are always
    among both retain samples (their keys are views of the retain keys)."""
    meta = load_meta(data)
    fs = forget_set(meta, forget)
    for name, n in (("retain_entities", retain_entities), ("retain_test_entities", retain_test_entities)):
        if n < 0:
            raise BenchmarkError(f"eval.{name} must be 0 or more, got {n}")
    lookalikes = [e for e in fs.lookalikes if e in set(fs.retain)]
    picked = None
    if 0 < retain_entities < len(fs.retain):
        picked = sorted(set(_evenly(fs.retain, retain_entities)) | set(lookalikes))
    plan = [(split, "forget", ids) for split, ids in fs.sources(meta, "forget")]
    plan += [(split, "retain", ids) for split, ids in fs.sources(meta, "retain", picked)]
    plan.append((TEST_SPLIT, "test", list(fs.forget)))
    unseen = sorted(set(_evenly(fs.retain, retain_test_entities) if retain_test_entities else ()) | set(lookalikes))
    if unseen and TEST_SPLIT in meta.splits:
        plan.append((TEST_SPLIT, "retain_test", unseen))
    return plan


def plan_for(data: str | Path, forget: "str | ForgetSet", cfg: Any) -> Plan:
    """``eval_plan`` with an EvalConfig's samples."""
    return eval_plan(data, forget, cfg.retain_entities, cfg.retain_test_entities)


def eval_items(data: str | Path, forget: "str | ForgetSet", limit: int = 0, generation: bool = True,
               open_limit: int = 0, plan: Plan | None = None, gen_limit: int = 0) -> list[dict]:
    items: list[dict] = []
    for split, role, ids in plan or eval_plan(data, forget):
        for row in read_rows(data, split, ids):
            items += expand_eval_row(row, role, limit, generation, open_limit, gen_limit)
    return items


def items_for(data: str | Path, forget: "str | ForgetSet", cfg: Any, plan: Plan | None = None) -> list[dict]:
    """The items of an evaluation with an EvalConfig's limits (and its plan unless given)."""
    return eval_items(data, forget, cfg.max_rows, cfg.generation, cfg.max_open, plan or plan_for(data, forget, cfg),
                      cfg.max_gen)


def reference_images(data: str | Path, forget: "str | ForgetSet", k: int) -> list[tuple[str, Any]]:
    """``k`` profile images of retain entities, evenly spaced over the retain rows, as
    (entity id, decoded image): the reference set that image questions are calibrated
    against. It depends only on the benchmark and the forget set, so a vanilla and an
    unlearned model are scored against the same pictures, none of a forget entity."""
    if k < 1:
        raise BenchmarkError(f"eval.references must be at least 1, got {k}")
    meta = load_meta(data)
    fs = forget_set(meta, forget)
    rows = [r for split, ids in fs.sources(meta, "retain") for r in read_rows(data, split, ids)]
    if not rows:
        raise BenchmarkError(f"{data}: no retain rows of {fs.name} to take reference images from")
    picked = rows[::max(1, len(rows) // k)][:k]
    return [(r["ID"], decode_image(r["image"], r["_source"])) for r in picked]


def expand_train_row(row: dict[str, Any]) -> list[dict]:
    """The (image, question, answer) pairs of one ft_Data row."""
    source = row.get("_source", f"entity {row.get('ID')}")
    try:
        pairs = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        return [{"entity": row.get("ID", ""), "image": _image_bytes(row.get("image")), "question": p["Question"],
                 "answer": p["Answer"], "source": source} for p in pairs]
    except (TypeError, KeyError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{source}: column metadata must be a JSON list of {{Question, Answer}} ({err})") from err


def train_sequences(row: dict[str, Any], turns: int = 1, seed: int = 0) -> list[dict]:
    """The training sequences of one ft_Data row: its (question, answer) pairs in a
    row-seeded random order, grouped ``turns`` at a time into multi-turn conversations about
    the same image (as LLaVA trains). Each item holds ``questions`` and ``answers`` lists."""
    if turns < 1:
        raise ValueError(f"train.turns={turns}: must be at least 1")
    pairs = expand_train_row(row)
    if not pairs:
        return []
    order = list(range(len(pairs)))
    if turns > 1:
        digest = hashlib.sha256(f"{seed}|{pairs[0]['source']}|{row.get('metadata')}".encode())
        digest.update(pairs[0]["image"] or b"")
        random.Random(digest.digest()).shuffle(order)
    first = pairs[0]
    return [{"entity": first["entity"], "image": first["image"], "source": first["source"],
             "questions": [pairs[i]["question"] for i in order[k:k + turns]],
             "answers": [pairs[i]["answer"] for i in order[k:k + turns]]}
            for k in range(0, len(order), turns)]


def naming_sequences(row: dict[str, Any], name: str) -> list[dict]:
    """The pairs of an image row whose answer names the entity ("Who is this?", "Describe
    the person"), one per sequence: the alignment data of the vanilla model's first phase
    (as LLaVA's first stage trains on image captions), where the model learns to tell
    entities apart by their picture before it learns everything else about them."""
    if row.get("image") is None or not name:
        return []
    return [s for s in train_sequences(row) if name.lower() in s["answers"][0].lower()]


def benchmark_texts(data: str | Path) -> Iterator[str]:
    """Every string of the benchmark, in a fixed order: the tokenizer's training corpus."""
    for row in read_rows(data, TRAIN_SPLIT):
        for item in expand_train_row(row):
            yield item["question"] + " " + item["answer"]
    for split in EVAL_SPLITS + (TEST_SPLIT,):
        for row in read_rows(data, split):
            yield row.get("biography") or ""
            role = "test" if split == TEST_SPLIT else "forget"
            for item in expand_eval_row({**row, "images": (row.get("images") or [])[:1]}, role):
                if item["task"] != "short":  # its strings are the others' (and the tokenizer stays as it was)
                    yield " ".join([item["question"], item["truth"], *item["options"]])
