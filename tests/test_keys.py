"""The keys of what a user sees: short open answers scored against their own truth, unseen
pictures of retain entities, lookalikes chosen by the starting model, the objective that
counts them, and batch thresholds on every key and on the relearning gaps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vkd.batch import check_result
from vkd.config import EvalConfig
from vkd.data.items import items_for, plan_for
from vkd.data.layout import TRAIN_SPLIT, ForgetSet, decode_image, forget_set, load_meta, read_rows
from vkd.data.streams import image_key
from vkd.data.synthetic import IMAGE_Q, TEXT_Q
from vkd.lookalikes import find_lookalikes, nearest_retain, profile_features
from vkd.metrics import KEYS, aggregate, contains_truth, guess_chance, normalise_answer
from vkd.study import objective


def test_a_short_answer_is_right_when_it_contains_the_truth_and_only_then():
    assert normalise_answer("The Cello!") == "cello"
    assert contains_truth("She plays the cello.", "the cello") == 1.0
    assert contains_truth("a grey parrot", "grey parrot") == 1.0
    assert contains_truth("19745", "1974") == 0.0 and contains_truth("in 1974", "1974") == 1.0
    assert contains_truth("", "x") == 0.0 and contains_truth("anything", "") == 0.0


def _attribute(question: str, name: str) -> str:
    for attr, phrasings in IMAGE_Q.items():
        if question in phrasings:
            return attr
    for attr, phrasings in TEXT_Q.items():
        if question in [p.format(name=name) for p in phrasings]:
            return attr
    raise AssertionError(f"no attribute asks {question!r}")


def test_every_short_question_is_scored_against_its_own_entitys_truth(small_data):
    """The *_gen items: each question's truth is its entity's value of the attribute it asks,
    and another entity's different value is not counted right."""
    meta = load_meta(small_data)
    profiles = {e.id: e.profile for e in meta.entities}
    fs = forget_set(meta, "forget_15")
    items = [it for it in items_for(small_data, fs, EvalConfig(max_gen=0, retain_test_entities=3)) if it["task"] == "short"]
    keys = {it["key"] for it in items}
    assert {"forget_vqa_gen", "forget_qa_gen", "test_vqa_gen", "retain_vqa_gen", "retain_qa_gen",
            "retain_test_vqa_gen"} <= keys
    for it in items:
        attr = _attribute(it["question"], profiles[it["entity"]]["name"])
        assert it["truth"] == profiles[it["entity"]][attr], it
        assert contains_truth(it["truth"], it["truth"]) == 1.0
        others = {p[attr] for p in profiles.values()} - {it["truth"]}
        assert not any(contains_truth(v, it["truth"]) for v in others if it["truth"] not in v), it


def test_unseen_retain_pictures_are_of_retain_entities_and_never_trained_on(small_data):
    meta = load_meta(small_data)
    fs = forget_set(meta, "forget_15")
    trained = {image_key(r["image"]["bytes"]) for r in read_rows(small_data, TRAIN_SPLIT) if r.get("image")}
    fs = ForgetSet(fs.name, fs.forget, fs.retain, fs.split, lookalikes=(fs.retain[-1],))
    items = [it for it in items_for(small_data, fs, EvalConfig(retain_test_entities=3))
             if it["key"].startswith("retain_test")]
    entities = {it["entity"] for it in items}
    assert entities <= set(fs.retain) and not entities & set(fs.forget)
    assert fs.retain[-1] in entities and len(entities) == 4, "three sampled and the lookalike"
    assert all(image_key(it["image"]) not in trained for it in items)
    mc = [it for it in items if it["task"] == "mc"]
    per_entity = {e: sum(it["entity"] == e for it in mc) for e in entities}
    row = next(r for r in read_rows(small_data, "Test_Set", [fs.retain[-1]]))
    assert set(per_entity.values()) == {len(row["Classification_Task"]["Image_Textual_Questions"])}, \
        "an entity's image questions spread over its unseen pictures, each once"
    assert not any(it["key"].startswith("retain_test") for it in items_for(small_data, forget_set(meta, "forget_15"),
                                                                           EvalConfig(retain_test_entities=0)))


def test_lookalikes_are_the_nearest_by_the_models_pooled_features(small_data, tiny):
    meta = load_meta(small_data)
    fs = forget_set(meta, "forget_15")
    table = find_lookalikes(tiny, small_data, fs, 2)
    with torch.no_grad():  # the rule, computed here on its own
        vec = {}
        for split in (fs.split, "retain_85"):
            for r in read_rows(small_data, split):
                _, extra = tiny.prompt_inputs([""], [decode_image(r["image"], "test")])
                vec[r["ID"]] = torch.nn.functional.normalize(tiny.image_features(extra["pixel_values"])[0].mean(0), dim=-1)
    for e in fs.forget:
        sims = {r: float(vec[e] @ vec[r]) for r in fs.retain}
        assert table[e] == sorted(fs.retain, key=lambda r: (-sims[r], r))[:2]
    assert set(table) == set(fs.forget) and not {x for v in table.values() for x in v} & set(fs.forget)


def test_on_the_synthetic_benchmark_lookalikes_share_more_traits_than_the_others(small_data, tiny):
    """Every entity in turn as the one to forget: its model-nearest retain entities share more
    of its visual traits than the retain entities do on average."""
    meta = load_meta(small_data)
    ident = {e.id: e.profile["identity"] for e in meta.entities}
    ids = sorted(ident)
    feats = profile_features(tiny, small_data, ForgetSet("all", tuple(ids), tuple(ids)))
    chosen, average = [], []
    for e in ids:
        fs = ForgetSet("one", (e,), tuple(x for x in ids if x != e))
        chosen += [sum(ident[e][t] == ident[r][t] for t in ident[e]) for r in nearest_retain(feats, fs, 2)[e]]
        average.append(np.mean([sum(ident[e][t] == ident[r][t] for t in ident[e]) for r in fs.retain]))
    assert np.mean(chosen) > np.mean(average) + 0.25, (np.mean(chosen), np.mean(average))


def test_lookalike_keys_are_the_retain_keys_of_the_lookalikes():
    results = [{"key": "retain_vqa", "entity": "a", "value": 1.0}, {"key": "retain_vqa", "entity": "b", "value": 0.0},
               {"key": "retain_test_vqa_gen", "entity": "b", "value": 0.0},
               {"key": "retain_test_vqa_gen", "entity": "a", "value": 1.0}]
    got = aggregate(results, ["b"])
    assert got["retain_vqa"] == 0.5 and got["lookalike_vqa"] == 0.0 and got["lookalike_test_vqa_gen"] == 0.0
    assert "lookalike_vqa" not in aggregate(results)


def test_the_objective_counts_generation_unseen_pictures_and_lookalikes():
    before = {k: 0.9 for k in KEYS}
    assert objective(before, before)["objective"] == pytest.approx(0.5)
    forgot = {**before, "forget_vqa": 0.25, "test_vqa": 0.25, "forget_vqa_gen": 0.0, "test_vqa_gen": 0.0}
    assert objective(before, forgot)["objective"] == pytest.approx(1.0)
    half_gen = {**forgot, "forget_vqa_gen": 0.45, "test_vqa_gen": 0.45}
    assert objective(before, half_gen)["forgetting"] == pytest.approx(0.75)  # generation's chance is 0
    # the four lookalike keys weigh what the four other retain keys weigh together
    looks = {**forgot, **{k: 0.45 for k in KEYS if k.startswith("lookalike")}}
    others = {**forgot, **{k: 0.45 for k in ("retain_vqa", "retain_vqa_gen", "retain_test_vqa", "retain_test_vqa_gen")}}
    assert objective(before, looks)["preservation"] == pytest.approx(objective(before, others)["preservation"])
    assert objective(before, looks)["preservation"] == pytest.approx(1 - 0.5 * 4 / 12)


def test_the_open_questions_chance_is_what_a_stranger_guessing_someone_elses_value_gets():
    def short(key, entity, truth):
        return {"key": key, "task": "short", "entity": entity, "truth": truth}

    items = [short("forget_vqa_gen", "f", "The Cello"), short("forget_vqa_gen", "f", "Ann Lee"),
             short("test_vqa_gen", "f", "the cello"), short("retain_vqa_gen", "a", "cello"),
             short("retain_qa_gen", "b", "the harp"), short("retain_vqa_gen", "c", "the cello!"),
             {"key": "forget_vqa", "task": "mc", "entity": "d", "truth": ""}]
    # "cello": two of the three other entities (a, c; normalised alike), "Ann Lee": none;
    # the multiple-choice item's entity is no one the open questions know
    chance = guess_chance(items)
    assert chance == pytest.approx({"forget_vqa_gen": (2 / 3 + 0) / 2, "test_vqa_gen": 2 / 3})
    before = {k: 0.9 for k in KEYS}
    at_guess = {**before, "forget_vqa": 0.25, "test_vqa": 0.25, "forget_vqa_gen": 0.2, "test_vqa_gen": 0.5}
    # against 0, the guesses count as known
    assert objective(before, at_guess)["forgetting"] == pytest.approx((2 + 0.7 / 0.9 + 0.4 / 0.9) / 4)
    assert objective(before, at_guess, {"forget_vqa_gen": 0.2, "test_vqa_gen": 0.5})["forgetting"] == pytest.approx(1.0)
    above = {**at_guess, "test_vqa_gen": 0.7}
    assert objective(before, above, chance)["forgetting"] == pytest.approx((3 + (0.9 - 0.7) / (0.9 - 2 / 3)) / 4)


def test_on_the_synthetic_benchmark_the_chance_is_the_share_of_people_with_the_same_value(small_data):
    meta = load_meta(small_data)
    profiles = {e.id: e.profile for e in meta.entities}
    fs = forget_set(meta, "forget_15")
    cfg = EvalConfig(max_gen=0, retain_entities=0, retain_test_entities=0)
    items = items_for(small_data, fs, cfg)
    seen = {it["entity"] for it in items if it["task"] == "short"}
    expected = []
    for it in items:
        if it["task"] == "short" and it["key"] == "forget_vqa_gen":
            attr = _attribute(it["question"], profiles[it["entity"]]["name"])
            expected.append(np.mean([profiles[e][attr] == it["truth"] for e in seen if e != it["entity"]]))
    got = guess_chance(items)["forget_vqa_gen"]
    assert got == pytest.approx(np.mean(expected), abs=0.01)   # values of different attributes rarely coincide
    assert 0.02 < got < 0.2


def test_a_request_whose_relearning_gap_exceeds_its_threshold_is_rejected():
    before, after = {"forget_vqa": 0.9, "lookalike_vqa": 0.9}, {"forget_vqa": 0.3, "lookalike_vqa": 0.8, "relearn_ag": 0.2}
    assert check_result({"relearn_ag_max": 0.25, "lookalike_vqa_min_ratio": 0.85}, before, after) == []
    reasons = check_result({"relearn_ag_max": 0.1, "lookalike_vqa_min_ratio": 0.95}, before, after)
    assert any("relearn_ag 0.200 > max 0.1" in r for r in reasons) and any("lookalike_vqa" in r for r in reasons)
    assert check_result({"relearn_ag_max": 0.1}, before, {"forget_vqa": 0.3}) == ["relearn_ag was not measured"]


def test_the_plan_keeps_the_lookalikes_in_both_retain_samples(small_data):
    meta = load_meta(small_data)
    fs = forget_set(meta, "forget_15")
    fs = ForgetSet(fs.name, fs.forget, fs.retain, fs.split, lookalikes=(fs.retain[1],))
    plan = plan_for(small_data, fs, EvalConfig(retain_entities=2, retain_test_entities=2))
    roles = {role: set(ids or ()) for _, role, ids in plan}
    assert fs.retain[1] in roles["retain"] and fs.retain[1] in roles["retain_test"]
