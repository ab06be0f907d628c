"""Ingest adapters on tiny fixtures written in the published MLLMU-Bench and CLEAR schemas."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vkd.data import prepare_benchmark
from vkd.data.layout import ALL_SPLITS, FORGET_SPLITS, LETTERS, RETAIN_OF, BenchmarkError, schema_of

SHARD = "train-00000-of-00001.parquet"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # prepare_benchmark imports vkd.data.synthetic to fill the registry; stand in for it until it exists.
    if importlib.util.find_spec("vkd.data.synthetic") is None:
        monkeypatch.setitem(sys.modules, "vkd.data.synthetic", types.ModuleType("vkd.data.synthetic"))


def png(seed: int) -> bytes:
    img = Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % 8, seed // 8 % 8), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write(table_rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), path)
    return path


def read_split(out: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / split).glob("*.parquet"))])


def assert_internal_layout(out: Path) -> None:
    assert (out / "benchmark.json").is_file()
    for split in ALL_SPLITS:
        assert read_split(out, split).schema.equals(schema_of(split)), split


# ---------------------------------------------------------------- MLLMU-Bench fixture

PUB_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PUB_MC = pa.struct([
    ("Correct_Answer", pa.string()),
    ("Options", pa.struct([(x, pa.string()) for x in "ABCD"])),
    ("Question", pa.string()),
])
PUB_OPEN = pa.struct([("Type", pa.string()), ("Question", pa.string()), ("Ground_Truth", pa.string())])
PUB_TASKS = [
    ("Classification_Task", pa.struct([
        ("Image_Textual_Questions", pa.list_(PUB_MC)), ("Pure_Text_Questions", pa.list_(PUB_MC)),
    ])),
    ("Generation_Task", pa.list_(PUB_OPEN)),
    ("Mask_Task", pa.list_(PUB_OPEN)),
]
PUB_PROFILE = pa.schema([
    ("image", PUB_IMAGE), ("ID", pa.string()), ("Directory", pa.string()), ("biography", pa.string()),
    ("question", pa.string()), ("answer", pa.string()), *PUB_TASKS,
])
PUB_TEST = pa.schema([("ID", pa.int64()), ("images", pa.list_(PUB_IMAGE)), *PUB_TASKS])
PUB_FT = pa.schema([("image", PUB_IMAGE), ("metadata", pa.string())])

PEOPLE = ["Alice Marlow", "Bruno Keller", "Chiara Vitale", "Dmitri Orlov",
          "Elena Park", "Farid Haddad", "Greta Lind", "Hugo Brandt"]
JOBS = ["baker", "pilot", "chemist", "violinist", "architect", "surgeon", "judge", "sculptor"]
MLLMU_FORGET = {"forget_5": ["1"], "forget_10": ["1", "2"], "forget_15": ["1", "2", "3"]}


def mllmu_tasks(i: int) -> dict[str, Any]:
    name, job = PEOPLE[i], JOBS[i]
    wrong = [j for j in JOBS if j != job][:3]
    return {
        "Classification_Task": {
            "Image_Textual_Questions": [{
                "Correct_Answer": "C", "Options": dict(zip("ABCD", [wrong[0], wrong[1], job, wrong[2]])),
                "Question": "What is the occupation of the person in the image?",
            }],
            "Pure_Text_Questions": [{
                "Correct_Answer": "A", "Options": dict(zip("ABCD", [job, *wrong])),
                "Question": f"What is the occupation of {name}?",
            }],
        },
        "Generation_Task": [
            {"Type": "Image_Textual", "Question": "What does this person do?", "Ground_Truth": f"A {job}."},
            {"Type": "Pure_Text", "Question": f"What does {name} do?", "Ground_Truth": f"A {job}."},
        ],
        "Mask_Task": [{"Type": "Pure_Text", "Question": f"{name} works as a __.", "Ground_Truth": job}],
    }


def mllmu_profile(i: int) -> dict[str, Any]:
    ident = str(i + 1)
    return {
        "image": {"bytes": png(i), "path": f"{ident}.png"}, "ID": ident, "Directory": f"profiles/{ident}",
        "biography": f"{PEOPLE[i]}, born in 1970, works as a {JOBS[i]}.",
        "question": "What is the occupation of this person?", "answer": f"A {JOBS[i]}.", **mllmu_tasks(i),
    }


def write_mllmu(root: Path) -> Path:
    profiles = [mllmu_profile(i) for i in range(len(PEOPLE))]
    everyone = [p["ID"] for p in profiles]
    split_ids = dict(MLLMU_FORGET)
    for forget, retain in RETAIN_OF.items():
        split_ids[retain] = [i for i in everyone if i not in MLLMU_FORGET[forget]]
    for split, ids in split_ids.items():
        write([p for p in profiles if p["ID"] in ids], PUB_PROFILE, root / split / SHARD)
    write(profiles, PUB_PROFILE, root / "Full_Set" / SHARD)
    celebrity = dict(mllmu_profile(0), ID="celeb-1", biography="A famous actor.")
    write([celebrity], PUB_PROFILE, root / "Retain_Set" / SHARD)
    test = [
        {"ID": i + 1, "images": [{"bytes": png(100 + i), "path": "a.png"}, {"bytes": png(200 + i), "path": "b.png"}],
         **mllmu_tasks(i)}
        for i in range(len(PEOPLE))
    ]
    write(test[:4], PUB_TEST, root / "Test_Set" / "train-00000-of-00002.parquet")
    write(test[4:], PUB_TEST, root / "Test_Set" / "train-00001-of-00002.parquet")
    ft = [{"image": p["image"], "metadata": json.dumps([
        {"Question": f"What is the name of this {JOBS[i]}?", "Answer": PEOPLE[i]},
        {"Question": "Where was this person born?", "Answer": "In Lyon."},
    ])} for i, p in enumerate(profiles)]
    write(ft, PUB_FT, root / "ft_Data" / SHARD)
    return root


@pytest.fixture(scope="module")
def mllmu_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mllmu(tmp_path_factory.mktemp("mllmu"))


@pytest.fixture(scope="module")
def mllmu_out(mllmu_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("prepared") / "mllmu"
    return out, prepare_benchmark("mllmu", out, src=mllmu_src)


def copy_src(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "src"))


def test_mllmu_writes_every_split_in_the_internal_schema(mllmu_out: tuple[Path, Any]) -> None:
    out, _ = mllmu_out
    assert_internal_layout(out)


def test_mllmu_entities_and_splits_round_trip(mllmu_out: tuple[Path, Any]) -> None:
    out, meta = mllmu_out
    assert [e.id for e in meta.entities] == [str(i) for i in range(1, 9)]
    assert [e.name for e in meta.entities] == PEOPLE
    for forget, ids in MLLMU_FORGET.items():
        assert meta.splits[forget] == ids
        assert meta.splits[RETAIN_OF[forget]] == [str(i) for i in range(1, 9) if str(i) not in ids]
    assert read_split(out, "forget_10").column("ID").to_pylist() == ["1", "2"]
    assert read_split(out, "forget_10").column("name").to_pylist() == PEOPLE[:2]
    assert meta.splits["Test_Set"] == [str(i) for i in range(1, 9)]
    assert meta.extra["not_converted"] == ["Retain_Set"]
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["splits"]["forget_15"] == ["1", "2", "3"]


def test_mllmu_questions_survive(mllmu_out: tuple[Path, Any]) -> None:
    out, _ = mllmu_out
    row = read_split(out, "retain_95").to_pylist()[0]
    assert row["ID"] == "2"
    mc = row["Classification_Task"]["Image_Textual_Questions"][0]
    assert mc["Question"] == "What is the occupation of the person in the image?"
    assert mc["Options"] == {"A": "baker", "B": "chemist", "C": "pilot", "D": "violinist"}
    assert mc["Correct_Answer"] == "C"
    mask = {"Type": "Pure_Text", "Question": "Bruno Keller works as a __.", "Ground_Truth": "pilot"}
    assert row["Mask_Task"] == [mask]
    assert row["image"]["bytes"] == png(1)


def test_mllmu_train_and_test_rows_get_string_ids(mllmu_out: tuple[Path, Any]) -> None:
    out, meta = mllmu_out
    train = read_split(out, "ft_Data").to_pylist()
    assert [r["ID"] for r in train] == [str(i) for i in range(1, 9)]
    assert meta.extra["ft_Data_ID_from"] == {"same image": 8}
    pair = {"Question": "What is the name of this chemist?", "Answer": "Chiara Vitale"}
    assert json.loads(train[2]["metadata"])[0] == pair
    test = read_split(out, "Test_Set").to_pylist()
    assert test[4]["ID"] == "5" and test[4]["name"] == "Elena Park"
    assert [img["bytes"] for img in test[4]["images"]] == [png(104), png(204)]


def test_mllmu_accepts_json_strings_and_parsed_metadata(mllmu_src: Path, tmp_path: Path) -> None:
    src = copy_src(mllmu_src, tmp_path)
    path = src / "forget_5" / SHARD
    table = pq.read_table(path)
    as_json = [json.dumps(v) for v in table.column("Classification_Task").to_pylist()]
    column = table.schema.get_field_index("Classification_Task")
    table = table.set_column(column, "Classification_Task", pa.array(as_json))
    pq.write_table(table, path)
    ft = pq.read_table(src / "ft_Data" / SHARD).to_pylist()
    for row in ft:
        row["metadata"] = json.loads(row["metadata"])
    pq.write_table(pa.Table.from_pylist(ft), src / "ft_Data" / SHARD)
    out = tmp_path / "out"
    prepare_benchmark("mllmu", out, src=src)
    row = read_split(out, "forget_5").to_pylist()[0]
    assert row["Classification_Task"]["Pure_Text_Questions"][0]["Options"]["A"] == "baker"
    assert json.loads(read_split(out, "ft_Data").to_pylist()[0]["metadata"])[1]["Answer"] == "In Lyon."


def test_mllmu_train_ids_fall_back_to_full_set_order(mllmu_src: Path, tmp_path: Path) -> None:
    src = copy_src(mllmu_src, tmp_path)
    ft = pq.read_table(src / "ft_Data" / SHARD).to_pylist()
    for i, row in enumerate(ft):
        row["image"] = {"bytes": png(500 + i), "path": None}
    write(ft, PUB_FT, src / "ft_Data" / SHARD)
    meta = prepare_benchmark("mllmu", tmp_path / "out", src=src)
    assert meta.extra["ft_Data_ID_from"] == {"Full_Set position": 8}
    assert read_split(tmp_path / "out", "ft_Data").column("ID").to_pylist() == [str(i) for i in range(1, 9)]
    shutil.rmtree(src / "Full_Set")
    with pytest.raises(BenchmarkError, match="add an ID column") as err:
        prepare_benchmark("mllmu", tmp_path / "out2", src=src)
    assert f"{src / 'ft_Data' / SHARD}, row 0" in str(err.value)


def test_mllmu_missing_column_names_column_and_file(mllmu_src: Path, tmp_path: Path) -> None:
    src = copy_src(mllmu_src, tmp_path)
    path = src / "retain_90" / SHARD
    pq.write_table(pq.read_table(path).drop_columns(["Mask_Task"]), path)
    with pytest.raises(BenchmarkError, match="Mask_Task") as err:
        prepare_benchmark("mllmu", tmp_path / "out", src=src)
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_mllmu_corrupt_image_names_file_and_row(mllmu_src: Path, tmp_path: Path) -> None:
    src = copy_src(mllmu_src, tmp_path)
    path = src / "forget_10" / SHARD
    rows = pq.read_table(path).to_pylist()
    rows[1]["image"] = {"bytes": b"not an image at all", "path": "broken.png"}
    write(rows, PUB_PROFILE, path)
    with pytest.raises(BenchmarkError, match="corrupt image") as err:
        prepare_benchmark("mllmu", tmp_path / "out", src=src)
    assert f"{path}, row 1" in str(err.value)


def test_mllmu_missing_split_folder_lists_what_was_found(mllmu_src: Path, tmp_path: Path) -> None:
    src = copy_src(mllmu_src, tmp_path)
    shutil.rmtree(src / "Test_Set")
    with pytest.raises(BenchmarkError, match="Test_Set") as err:
        prepare_benchmark("mllmu", tmp_path / "out", src=src)
    assert "found: Full_Set, Retain_Set, forget_10" in str(err.value)


def test_non_empty_out_is_kept_without_overwrite(mllmu_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BenchmarkError, match="overwrite"):
        prepare_benchmark("mllmu", out, src=mllmu_src)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    prepare_benchmark("mllmu", out, src=mllmu_src, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert_internal_layout(out)


# ---------------------------------------------------------------- CLEAR fixture

CLEAR_PLAIN = pa.schema([("image", PUB_IMAGE), ("caption", pa.string()), ("name", pa.string())])
CLEAR_TOFU = pa.schema([
    ("image", PUB_IMAGE), ("caption", pa.string()), ("question", pa.string()), ("answer", pa.string()),
])
CLEAR_PERTURBED = pa.schema([
    ("image", PUB_IMAGE), ("caption", pa.string()), ("name", pa.string()),
    ("perturbed_captions", pa.list_(pa.string())), ("paraphrased_caption", pa.string()),
    ("perturbed_names", pa.list_(pa.string())),
])
AUTHORS = ["Hsiao Yun-Hwa", "Basil Mahfouz", "Nikolai Abilov", "Aysha Al-Hashim", "Edward Patrick",
           "Ji-Yeon Park", "Behrouz Rohani", "Wei-Jun Chen", "Tae-ho Park", "Elvin Mammadov"]
FAKE_NAMES = ["Mara Quill", "Otto Fenn", "Lena Hart", "Ivo Brandt"]
UNSEEN = png(999)


def clear_photo(p: int, k: int) -> dict[str, Any]:
    return {"image": {"bytes": png(10 * p + k + 300), "path": None},
            "caption": f"{AUTHORS[p]} is seen in photo {k}, standing by a window."}


def write_clear(root: Path) -> Path:
    full = [dict(clear_photo(p, k), name=AUTHORS[p]) for p in range(len(AUTHORS)) for k in range(3)]
    write(full, CLEAR_PLAIN, root / "full" / SHARD)
    write([r for r in full if r["name"] == AUTHORS[0]], CLEAR_PLAIN, root / "forget01" / SHARD)
    write([r for r in full if r["name"] == AUTHORS[0]], CLEAR_PLAIN, root / "forget05" / SHARD)
    unseen = {"image": {"bytes": UNSEEN, "path": None}, "caption": f"{AUTHORS[1]} on a stage.", "name": AUTHORS[1]}
    write([r for r in full if r["name"] in AUTHORS[:2]] + [unseen], CLEAR_PLAIN, root / "forget10" / SHARD)
    perturbed = [dict(r, perturbed_captions=["x", "y"], paraphrased_caption="z", perturbed_names=FAKE_NAMES)
                 for r in full if r["name"] == AUTHORS[0]]
    write(perturbed, CLEAR_PERTURBED, root / "forget05_perturbed" / SHARD)
    qa = []
    for p, name in enumerate(AUTHORS):
        qa.append({"question": f"Where was {name} born?", "answer": f"{name} was born in city {p}."})
        qa.append({"question": f"What genre does {name} write?", "answer": f"Genre {p}."})
        if p == 2:
            qa.append({"question": "Which award did this author win?", "answer": "The Silver Quill."})
    tofu = [dict(clear_photo(p, k), question=None, answer=None) for p in range(len(AUTHORS)) for k in range(3)]
    tofu += [dict(image=None, caption=None, **pair) for pair in qa]
    write(tofu, CLEAR_TOFU, root / "full+tofu" / SHARD)
    write([{"image": {"bytes": png(5), "path": None}, "caption": "c", "name": "Real Person"}], CLEAR_PLAIN,
          root / "real_faces" / SHARD)
    return root


@pytest.fixture(scope="module")
def clear_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clear(tmp_path_factory.mktemp("clear"))


@pytest.fixture(scope="module")
def clear_out(clear_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("prepared") / "clear"
    return out, prepare_benchmark("clear", out, src=clear_src, seed=3)


def rows_by_id(out: Path, split: str) -> dict[str, dict[str, Any]]:
    return {r["ID"]: r for r in read_split(out, split).to_pylist()}


def test_clear_writes_every_split_in_the_internal_schema(clear_out: tuple[Path, Any]) -> None:
    out, _ = clear_out
    assert_internal_layout(out)


def test_clear_entities_and_forget_mapping(clear_out: tuple[Path, Any]) -> None:
    _, meta = clear_out
    assert [e.name for e in meta.entities] == AUTHORS
    assert meta.entities[0].id == "hsiao-yun-hwa"
    ids = [e.id for e in meta.entities]
    assert meta.splits["forget_5"] == ids[:1]
    assert meta.splits["forget_10"] == ids[:2]
    assert len(meta.splits["forget_15"]) == 3 and meta.splits["forget_15"][:2] == ids[:2]
    for forget in FORGET_SPLITS:
        retain = meta.splits[RETAIN_OF[forget]]
        assert sorted(retain + meta.splits[forget]) == sorted(ids) and not set(retain) & set(meta.splits[forget])
    assert meta.extra["forget_from"]["forget_5"] == "forget05/"
    assert meta.extra["clear_forget01"] == ids[:1]


def test_clear_name_question_uses_perturbed_names_and_spreads_letters(clear_out: tuple[Path, Any]) -> None:
    out, meta = clear_out
    first = rows_by_id(out, "forget_5")[meta.entities[0].id]
    mc = first["Classification_Task"]["Image_Textual_Questions"][0]
    assert mc["Question"] == "Who is the person in the image?"
    assert mc["Options"][mc["Correct_Answer"]] == AUTHORS[0]
    assert sorted(v for v in mc["Options"].values() if v != AUTHORS[0]) == sorted(FAKE_NAMES[:3])
    letters = set()
    for split in ("forget_15", "retain_85"):
        for row in rows_by_id(out, split).values():
            q = row["Classification_Task"]["Image_Textual_Questions"][0]
            assert q["Options"][q["Correct_Answer"]] == row["name"]
            assert len(set(q["Options"].values())) == 4
            letters.add(q["Correct_Answer"])
    assert len(letters) > 1 and letters <= set(LETTERS)
    assert first["Classification_Task"]["Pure_Text_Questions"] == []


def test_clear_generation_mask_and_training_rows(clear_out: tuple[Path, Any]) -> None:
    out, meta = clear_out
    third = meta.entities[2]
    row = rows_by_id(out, "retain_95")[third.id]
    assert row["Mask_Task"][0]["Ground_Truth"] == AUTHORS[2]
    assert row["Mask_Task"][0]["Question"].startswith("__ is seen in photo")
    pure = [g for g in row["Generation_Task"] if g["Type"] == "Pure_Text"]
    award = {"Type": "Pure_Text", "Question": "Which award did this author win?", "Ground_Truth": "The Silver Quill."}
    assert award in pure
    train = read_split(out, "ft_Data").to_pylist()
    text_rows = [r for r in train if r["image"] is None]
    assert len(text_rows) == len(AUTHORS)
    third_pairs = json.loads(next(r for r in text_rows if r["ID"] == third.id)["metadata"])
    assert {"Question": f"Where was {AUTHORS[2]} born?", "Answer": f"{AUTHORS[2]} was born in city 2."} in third_pairs
    described = json.loads(next(r for r in train if r["image"] is not None)["metadata"])
    assert described[0]["Question"] == "Describe the person in the image."
    assert meta.extra["tofu_pairs"]["by neighbour"] == 1


def test_clear_test_images_are_never_trained_on(clear_out: tuple[Path, Any]) -> None:
    out, meta = clear_out
    test = rows_by_id(out, "Test_Set")
    assert sorted(test) == sorted(e.id for e in meta.entities)
    trained = {r["image"]["bytes"] for r in read_split(out, "ft_Data").to_pylist() if r["image"] is not None}
    assert all(len(r["images"]) == 1 and r["images"][0]["bytes"] not in trained for r in test.values())
    assert test[meta.entities[1].id]["images"][0]["bytes"] == UNSEEN
    assert len(trained) == 3 * len(AUTHORS) - (len(AUTHORS) - 1)


def test_clear_missing_name_column(clear_src: Path, tmp_path: Path) -> None:
    src = copy_src(clear_src, tmp_path)
    path = src / "full" / SHARD
    pq.write_table(pq.read_table(path).drop_columns(["name"]), path)
    with pytest.raises(BenchmarkError, match="missing required column\\(s\\) name") as err:
        prepare_benchmark("clear", tmp_path / "out", src=src)
    assert str(path) in str(err.value)


def test_clear_corrupt_image_names_file_and_row(clear_src: Path, tmp_path: Path) -> None:
    src = copy_src(clear_src, tmp_path)
    path = src / "full" / SHARD
    rows = pq.read_table(path).to_pylist()
    rows[4]["image"] = {"bytes": b"\x89PNG garbage", "path": None}
    write(rows, CLEAR_PLAIN, path)
    with pytest.raises(BenchmarkError, match="corrupt image") as err:
        prepare_benchmark("clear", tmp_path / "out", src=src)
    assert f"{path}, row 4" in str(err.value)


def test_clear_missing_image_folder(clear_src: Path, tmp_path: Path) -> None:
    src = copy_src(clear_src, tmp_path)
    shutil.rmtree(src / "full")
    with pytest.raises(BenchmarkError, match="full/") as err:
        prepare_benchmark("clear", tmp_path / "out", src=src)
    assert "found: forget01, forget05, forget05_perturbed, forget10, full+tofu, real_faces" in str(err.value)


def test_clear_derives_forget_splits_by_seed_when_absent(clear_src: Path, tmp_path: Path) -> None:
    src = copy_src(clear_src, tmp_path)
    for folder in ("forget01", "forget05", "forget10", "forget05_perturbed"):
        shutil.rmtree(src / folder)
    metas = [prepare_benchmark("clear", tmp_path / f"out{k}", src=src, seed=7) for k in range(2)]
    assert metas[0].splits == metas[1].splits
    f5, f10, f15 = (metas[0].splits[s] for s in FORGET_SPLITS)
    assert len(f5) == 1 and f10[:1] == f5 and f15[:2] == f10 and len(f15) == 3


def test_clear_text_questions_from_perturbed_answers(clear_src: Path, tmp_path: Path) -> None:
    src = copy_src(clear_src, tmp_path)
    path = src / "full+tofu" / SHARD
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["perturbed_answer"] = None if row["answer"] is None else [f"Wrong {k}" for k in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    meta = prepare_benchmark("clear", tmp_path / "out", src=src)
    row = rows_by_id(tmp_path / "out", "forget_5")[meta.entities[0].id]
    question = row["Classification_Task"]["Pure_Text_Questions"][0]
    assert question["Question"] == f"Where was {AUTHORS[0]} born?"
    assert question["Options"][question["Correct_Answer"]] == f"{AUTHORS[0]} was born in city 0."
    assert sorted(v for v in question["Options"].values() if v.startswith("Wrong")) == ["Wrong 0", "Wrong 1", "Wrong 2"]
