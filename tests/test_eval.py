"""Evaluation: metric functions, chance level of an untrained model, Ray Data = in-process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vkd.data.items import eval_items, items_for, reference_images
from vkd.metrics import DIRECTIONS, MC_KEYS, aggregate, cloze_correct, rouge_l
from vkd.scoring import evaluate_items


def test_rouge_l_and_cloze():
    assert rouge_l("the baker from Velmora", "the baker from Velmora") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("xyz", "abc") == 0.0
    assert rouge_l("a baker born in Velmora", "baker in Velmora") == pytest.approx(2 * 0.6 * 1.0 / 1.6)
    assert cloze_correct("Velmora, a town", "Velmora") == 1.0
    assert cloze_correct("Port Amsel", "Port") == 1.0 and cloze_correct("Port", "Port Amsel") == 0.0
    assert cloze_correct("the answer is Velmora", "Velmora") == 0.0


def test_directions_cover_every_key(small_data, tiny):
    items = eval_items(small_data, "forget_15", limit=1)
    results = evaluate_items(tiny, items, reference_images(small_data, "forget_15", 4), batch_size=16, max_new_tokens=4)
    metrics = aggregate(results)
    assert set(MC_KEYS) <= set(metrics)
    assert {"forget_vqa_rougeL", "retain_qa_cloze", "test_vqa_cloze"} <= set(metrics)
    assert set(metrics) <= set(DIRECTIONS)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert DIRECTIONS["forget_vqa"] == "lower" and DIRECTIONS["retain_qa"] == "keep"


def test_scores_do_not_depend_on_batching(small_data, tiny):
    items = eval_items(small_data, "forget_15", limit=2)
    refs = reference_images(small_data, "forget_15", 4)
    one = evaluate_items(tiny, items, refs, batch_size=len(items), max_new_tokens=6)
    many = evaluate_items(tiny, items, refs, batch_size=5, max_new_tokens=6)
    assert [r["value"] for r in one] == [r["value"] for r in many]


def test_shared_prompt_scores_equal_one_sequence_per_option(small_data, tiny, monkeypatch):
    """Running each prompt once and sharing its keys/values across its options scores what one
    full sequence per option scores: left-padded prompts of different lengths, options of one
    and of many tokens, a different number of options per prompt, no NaN from the pad rows."""
    import dataclasses

    import torch

    from vkd.scoring import _options_logp, item_images

    items = [it for it in eval_items(small_data, "forget_15", limit=2, generation=False) if it["task"] == "mc"]
    for has_image in (True, False):
        group = [it for it in items if (it["image"] is not None) == has_image][:4]
        questions, images = [it["question"] + " Really?" * k for k, it in enumerate(group)], item_images(group)
        options = [["the", "a"] + it["options"] if k == 0 else it["options"] for k, it in enumerate(group)]
        assert len({len(p) for p in tiny.prompt_inputs(questions, images)[0]}) > 1
        lengths = {len(t) for opts in options for t in tiny.target_ids(opts, eos=False)}
        assert 1 in lengths and max(lengths) >= 4
        shared = _options_logp(tiny, questions, images, options)
        with monkeypatch.context() as m:  # any family but llava takes one full sequence per option
            m.setattr(tiny, "family", dataclasses.replace(tiny.family, name="full"))
            full = _options_logp(tiny, questions, images, options)
        assert shared.shape == full.shape == (sum(map(len, options)),)
        assert not shared.isnan().any() and shared.std() > 0.01
        assert torch.allclose(shared, full, rtol=0, atol=1e-4), (shared - full).abs().max()


@pytest.mark.slow
def test_ray_data_gives_the_in_process_numbers(small_data, tiny, tiny_path, ray_local):
    from pipelines.evaluate import evaluate_on_ray
    from vkd.config import EvalConfig

    cfg = EvalConfig(batch_size=16, max_new_tokens=6, max_rows=2, actors=2, references=4)
    local = evaluate_items(tiny, items_for(small_data, "forget_15", cfg), reference_images(small_data, "forget_15", 4),
                           batch_size=7, max_new_tokens=6)
    assert {r["key"] for r in local} >= {"retain_test_vqa", "retain_test_vqa_gen", "forget_vqa_gen"}
    # items built in the driver (a small evaluation), and streamed from the shards (a large one)
    for inline in (True, False):
        on_ray = evaluate_on_ray(tiny_path, small_data, "forget_15", cfg, inline=inline)
        assert len(on_ray) == len(local), inline
        assert aggregate(on_ray) == pytest.approx(aggregate(local), abs=1e-9), inline


def test_one_read_of_a_split_gives_each_row_the_items_of_its_own_role(small_data):
    """A streamed evaluation reads each split once; a batch's forget and retain entities may
    share a split, and each row must come out under the role that names its entity."""
    import pyarrow.parquet as pq

    from pipelines.evaluate import _Expand
    from vkd.config import EvalConfig
    from vkd.data.items import expand_eval_row
    from vkd.data.layout import load_meta, shard_paths

    ids = load_meta(small_data).entity_ids("forget_15")
    shard = shard_paths(small_data, "forget_15")[0]
    rows = {r["ID"]: r for r in pq.read_table(shard).to_pylist()}
    assert ids[0] in rows and ids[1] in rows
    expand = _Expand({"forget_15": [("forget", [ids[0]]), ("retain", [ids[1]])], "Test_Set": [("test", None)]},
                     EvalConfig(max_rows=2))
    for entity, role in ((ids[0], "forget"), (ids[1], "retain")):
        items = expand({**rows[entity], "path": str(shard)})
        assert items and {it["key"].split("_")[0] for it in items} == {role}
        assert [it["question"] for it in items] == [it["question"] for it in expand_eval_row(rows[entity], role, 2)]
    only_first = _Expand({"forget_15": [("forget", [ids[0]])]}, EvalConfig(max_rows=2))
    assert only_first({**rows[ids[1]], "path": str(shard)}) == [], "an entity the plan does not name"


@pytest.mark.slow
def test_untrained_model_is_at_chance_on_the_demo_benchmark(demo_config, tmp_path_factory):
    """The demo benchmark's multiple choice cannot be guessed: an untrained tiny model of the
    demo's size scores 0.25 +- 0.08 on every multiple-choice key."""
    import dataclasses

    from vkd.data import prepare_benchmark
    from vkd.data.layout import load_meta
    from vkd.model import ModelAdapter, resolve_model

    data = tmp_path_factory.mktemp("demo") / "data"
    settings = {**dataclasses.asdict(demo_config.benchmark), "train_images": 2}  # training pictures play no part
    prepare_benchmark(settings.pop("kind"), data, **settings)
    adapter = ModelAdapter.load(resolve_model("tiny", demo_config.model, data, tmp_path_factory.mktemp("m")))
    # forget_15 and every question: the demo's forget_10 holds 3 entities, too few questions
    # for a +-0.08 band around chance (one binomial sd is 0.046 at 90 questions)
    retain_sample = set(load_meta(data).splits["retain_85"][:15])  # the retain keys hold many entities
    items = [it for it in eval_items(data, "forget_15", generation=False)
             if it["task"] == "mc" and (not it["key"].startswith("retain") or it["entity"] in retain_sample)]
    metrics = aggregate(evaluate_items(adapter, items, reference_images(data, "forget_15", demo_config.eval.references),
                                        batch_size=64))
    assert set(metrics) == set(MC_KEYS)
    for key in MC_KEYS:
        assert abs(metrics[key] - 0.25) <= 0.08, (key, metrics)


@pytest.mark.slow
def test_cli_evaluate_writes_metrics_and_refuses_to_overwrite(small_data, tiny_path, tmp_path):
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "pipelines.evaluate", "--model", str(tiny_path), "--data", str(small_data),
           "--forget", "forget_15", "--out", str(out), "eval.max_rows=1", "eval.max_new_tokens=4", "eval.actors=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert set(MC_KEYS) <= set(metrics)
    assert (tmp_path / "metrics.config.yaml").is_file()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert json.loads(out.read_text()) == metrics


def test_cli_bad_input_is_one_clear_line(small_data, tmp_path):
    cases = [
        (["pipelines.evaluate", "--model", "tiny", "--data", str(tmp_path / "none"), "--forget", "forget_10",
          "--out", str(tmp_path / "m.json")], "benchmark.json not found"),
        (["pipelines.evaluate", "--model", "tiny", "--data", str(small_data), "--forget", "forget_99",
          "--out", str(tmp_path / "m.json")], "unknown forget split 'forget_99'"),
        (["pipelines.prepare", "synthetic", "--out", str(small_data)], "not empty"),
        (["pipelines.prepare", "synthetic", "--out", str(tmp_path / "x"), "benchmark.entities=many"],
         "benchmark.entities: expected an integer"),
    ]
    for args, message in cases:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr[-1500:])
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]


def test_a_rung_of_a_visual_only_run_scores_what_a_full_rung_scores(small_data, tiny_path):
    """The rungs of a run that trains the visual module alone take the text-only keys from the
    starting model: with the vision tower changed, they match a rung that scores every key."""
    import torch

    from vkd.config import EvalConfig
    from vkd.data.layout import forget_set, load_meta
    from vkd.model import ModelAdapter
    from vkd.probe import Probe, ProbeSpec

    spec = ProbeSpec(data=str(small_data), forget=forget_set(load_meta(small_data), "forget_10"),
                     eval=EvalConfig(generation=False, retain_entities=4, max_rows=4, references=3),
                     start_model=str(tiny_path), before={}, at=[])
    full, fixed = Probe(spec), Probe(spec, text_fixed=True)
    assert len(fixed.rung_items) < len(full.sample) and all(it["image"] is not None for it in fixed.rung_items)
    changed = ModelAdapter.load(tiny_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in changed.model.named_parameters():
            if changed.family.group_of(name) != "llm":
                p.add_(0.5 * torch.randn_like(p))
    a, b = full(changed, final=False), fixed(changed, final=False)
    assert a == b
    assert {k for k in a if k.endswith("_qa")} and a != full(ModelAdapter.load(tiny_path), final=False)
