"""The synthetic benchmark: layout, determinism, identities, questions, splits, bad input."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from itertools import combinations

import pyarrow.parquet as pq
import pytest

from tests.conftest import SMALL
from vkd.data import prepare_benchmark
from vkd.data.items import eval_items, expand_train_row
from vkd.data.layout import (
    ALL_SPLITS, FORGET_SPLITS, RETAIN_OF, TEST_SPLIT, TRAIN_SPLIT, BenchmarkError, load_meta, read_rows,
    schema_of, shard_paths,
)


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_every_split_has_the_mllmu_schema(small_data):
    for split in ALL_SPLITS:
        for path in shard_paths(small_data, split):
            assert pq.read_schema(path).remove_metadata().equals(schema_of(split)), (split, path)


def test_same_seed_same_bytes_other_seed_other_bytes(small_data, tmp_path):
    prepare_benchmark("synthetic", tmp_path / "again", **SMALL)
    prepare_benchmark("synthetic", tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert _digest(tmp_path / "again") == _digest(small_data)
    assert _digest(tmp_path / "other") != _digest(small_data)


def test_identities_need_the_combination(small_data):
    meta = load_meta(small_data)
    idents = [e.profile["identity"] for e in meta.entities]
    for trait in idents[0]:
        counts = Counter(i[trait] for i in idents)
        assert min(counts.values()) >= 2, f"a value of {trait} singles out one entity"
    for a, b in combinations(idents, 2):
        assert sum(a[t] != b[t] for t in a) >= 3
    assert len(meta.entities[0].profile) - 1 >= 6  # >= 6 textual attributes besides the identity


def test_images_vary_and_test_images_are_unseen(small_data):
    train = [r for r in read_rows(small_data, TRAIN_SPLIT) if r["image"] is not None]
    seen = {hashlib.sha256(r["image"]["bytes"]).hexdigest() for r in train}
    assert len(seen) == len(train), "every training portrait is drawn anew"
    for row in read_rows(small_data, TEST_SPLIT):
        for img in row["images"]:
            assert hashlib.sha256(img["bytes"]).hexdigest() not in seen
    profile_images = {hashlib.sha256(r["image"]["bytes"]).hexdigest() for r in read_rows(small_data, "forget_15")}
    assert profile_images <= seen, "forget rows show an image the model trained on"


def test_image_questions_never_name_the_entity_text_questions_do(small_data):
    meta = load_meta(small_data)
    names = {e.id: e.name for e in meta.entities}
    image_pairs = text_pairs = 0
    for row in read_rows(small_data, TRAIN_SPLIT):
        for item in expand_train_row(row):
            named = names[item["entity"]] in item["question"]
            if item["image"] is not None:
                image_pairs += 1
                assert not named, item["question"]
            else:
                text_pairs += 1
                assert named, item["question"]
    assert image_pairs and text_pairs
    for item in eval_items(small_data, "forget_15"):
        if item["image"] is not None:
            assert names[item["entity"]] not in item["question"]


def test_splits_are_by_entity_and_nested(small_data):
    meta = load_meta(small_data)
    everyone = {e.id for e in meta.entities}
    previous: set[str] = set()
    for forget in FORGET_SPLITS:
        f, r = set(meta.splits[forget]), set(meta.splits[RETAIN_OF[forget]])
        assert f and not f & r and f | r == everyone
        assert previous <= f
        previous = f
        assert {row["ID"] for row in read_rows(small_data, forget)} == f


def test_multiple_choice_cannot_be_guessed_from_position_or_strings(small_data):
    items = [it for it in eval_items(small_data, "forget_15", generation=False) if it["task"] == "mc"]
    letters = Counter(it["answer"] for it in items)
    assert max(letters.values()) - min(letters.values()) <= len(items) * 0.05 + 2
    for it in items:
        assert len(set(it["options"])) == 4
    # the longest / shortest option is right about a quarter of the time
    longest = sum(max(range(4), key=lambda i: len(it["options"][i])) == it["answer"] for it in items) / len(items)
    assert 0.1 < longest < 0.45


def test_meta_round_trip_and_unknowns(small_data):
    meta = load_meta(small_data)
    assert meta.entity(meta.entities[3].name).id == meta.entities[3].id
    with pytest.raises(BenchmarkError, match="unknown entity 'Nobody'"):
        meta.entity("Nobody")
    with pytest.raises(BenchmarkError, match="unknown forget split 'forget_50'"):
        eval_items(small_data, "forget_50")
    with pytest.raises(BenchmarkError, match="unknown split 'train'"):
        list(read_rows(small_data, "train"))


def test_prepare_never_overwrites_without_permission(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BenchmarkError, match="not empty.*--overwrite"):
        prepare_benchmark("synthetic", out, **SMALL)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(BenchmarkError, match="at least 8 entities"):
        prepare_benchmark("synthetic", out, overwrite=True, **{**SMALL, "entities": 3})
    assert (out / "keep.txt").read_text() == "precious", "a failed overwrite keeps the old content"
    prepare_benchmark("synthetic", out, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists() and (out / "benchmark.json").is_file()


def test_missing_column_and_corrupt_image_are_named(small_data, tmp_path):
    import shutil

    import pyarrow as pa

    bad = tmp_path / "bad"
    shutil.copytree(small_data, bad)
    shard = shard_paths(bad, "retain_90")[0]
    table = pq.read_table(shard)
    pq.write_table(table.drop(["Classification_Task"]), shard)
    with pytest.raises(BenchmarkError, match=r"part-00000.parquet: missing column\(s\) Classification_Task"):
        eval_items(bad, "forget_10")
    rows = table.to_pylist()
    rows[1]["image"] = {"bytes": b"not a png at all"}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    items = eval_items(bad, "forget_10")
    from vkd.scoring import item_images

    broken = [it for it in items if it["image"] == b"not a png at all"]
    with pytest.raises(BenchmarkError, match=r"part-00000.parquet, row 1: corrupt image bytes"):
        item_images(broken)


def test_benchmark_json_lists_entities_and_splits(small_data):
    raw = json.loads((small_data / "benchmark.json").read_text())
    assert raw["name"] == "synthetic" and len(raw["entities"]) == SMALL["entities"]
    assert set(raw["splits"]) >= set(ALL_SPLITS)


def test_text_rows_cycle_through_every_phrasing(small_data):
    from vkd.data.synthetic import TEXT_Q

    meta = load_meta(small_data)
    first = meta.entities[0]
    rows = [r for r in read_rows(small_data, TRAIN_SPLIT) if r["ID"] == first.id and r["image"] is None]
    assert len(rows) == 6, "text_rows defaults to one row per phrasing"
    asked = {item["question"] for r in rows for item in expand_train_row(r)}
    for attr, phrasings in TEXT_Q.items():
        assert {q.format(name=first.name) for q in phrasings} <= asked, attr


def test_variation_scales_every_amplitude():
    from vkd.data.synthetic import Variation

    assert Variation().scaled(1.0) == Variation()
    still = Variation().scaled(0.0)
    assert still.max_shift == still.max_rotation == still.tint == still.clutter == 0
    assert still.scale == still.brightness == still.contrast == (1.0, 1.0) and still.noise_sigma == (0.0, 0.0)
    half = Variation().scaled(0.5)
    assert half.max_rotation == Variation().max_rotation / 2 and half.brightness == (0.85, 1.15)
    with pytest.raises(BenchmarkError, match="variation=-1"):
        Variation().scaled(-1)


def test_naming_pairs_are_the_image_pairs_that_name_the_entity(small_data):
    from vkd.data.items import naming_sequences

    meta = load_meta(small_data)
    names = {e.id: e.name for e in meta.entities}
    rows = list(read_rows(small_data, TRAIN_SPLIT))
    image_row = next(r for r in rows if r["image"] is not None)
    naming = naming_sequences(image_row, names[image_row["ID"]])
    assert len(naming) == 3, "who is this, describe the person, and the name cloze"
    assert all(names[image_row["ID"]] in s["answers"][0] and s["image"] is not None for s in naming)
    text_row = next(r for r in rows if r["image"] is None)
    assert naming_sequences(text_row, names[text_row["ID"]]) == []
