"""Unlearning: saliency selection, every method's loss, the VKD distillation, and one VKD run
end to end on Ray (2 DeepSpeed workers): the LLM bit-identical, pruned neurons dead, updates
confined to the Fisher mask, the report and the registered model."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, SMALL_MODEL
from vkd.config import ConfigError, UnlearnConfig, load_config
from vkd.data.items import train_sequences
from vkd.data.layout import TRAIN_SPLIT, load_meta, read_rows
from vkd.methods import StepContext, method_for
from vkd.methods.losses import feature_distance, nll, visual_features
from vkd.methods.vkd import VKDConfig
from vkd.model import ModelAdapter
from vkd.registry import UnknownName
from vkd.saliency import SplitStats, fisher_mask, pruned_neurons, select
from vkd.train import Tokenize, make_batch


def _vkd(**options):
    """VKD with these settings (the rest its defaults)."""
    return method_for(UnlearnConfig().with_method("vkd", **options))


def test_select_by_ratio_and_by_top_fraction():
    score = torch.tensor([0.1, 5.0, 2.0, 0.0, 3.0])
    assert select(score, 2.0, "ratio").tolist() == [False, True, True, False, True]
    assert select(score, 0.4, "top_fraction").tolist() == [False, True, False, False, True]
    assert not select(score, 0.0, "top_fraction").any()
    with pytest.raises(ValueError, match="threshold mode"):
        select(score, 0.5, "most")


def test_pruning_picks_neurons_that_fire_for_the_forget_set_only():
    forget = SplitStats(importance={"a": torch.tensor([1.0, 8.0, 1.0]), "b": torch.tensor([4.0, 1.0])},
                        positions={"a": 2.0, "b": 2.0})
    retain = SplitStats(importance={"a": torch.tensor([1.0, 1.0, 9.0]), "b": torch.tensor([1.0, 1.0])},
                        positions={"a": 1.0, "b": 1.0})
    chosen = pruned_neurons(forget, retain, 0.4, "top_fraction")  # 2 of 5 neurons
    assert chosen["a"].tolist() == [False, True, False] and chosen["b"].tolist() == [True, False]
    fisher_f = SplitStats(fisher={"w": torch.tensor([[4.0, 0.0], [1.0, 1.0]])}, batches=1)
    fisher_r = SplitStats(fisher={"w": torch.tensor([[1.0, 1.0], [1.0, 0.5]])}, batches=1)
    assert fisher_mask(fisher_f, fisher_r, 1.5, "ratio")["w"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_an_unregistered_method_is_a_clear_error_listing_the_registered_ones(small_data, tmp_path):
    with pytest.raises(UnknownName, match="registered: .*gd.*vkd"):
        method_for(UnlearnConfig(method="forgetful"))
    with pytest.raises(Exception, match="unlearn.vkd.d_i_mode"):
        method_for(UnlearnConfig(sections={"vkd": {"d_i_mode": "most"}}))
    out = tmp_path / "m2"
    done = subprocess.run([sys.executable, "-m", "pipelines.unlearn", "--model", "tiny", "--data", str(small_data),
                           "--forget", "forget_10", "--method", "forgetful", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-1500:]
    assert "unknown unlearning method 'forgetful'" in done.stderr and "vkd" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def _batches(data, adapter, forget_ids, n=8):
    meta = load_meta(data)
    rows = list(read_rows(data, TRAIN_SPLIT))
    image_rows = [r for r in rows if r.get("image") is not None]
    forget = [s for r in image_rows if r["ID"] in forget_ids for s in train_sequences(r)][:n]
    retain = [s for r in image_rows if r["ID"] not in forget_ids for s in train_sequences(r)][::3][:n]
    tok = Tokenize(adapter, 96)
    as_inputs = (lambda items: make_batch({k: torch.from_numpy(v) for k, v in tok(items).items()}))
    assert meta.entities
    return as_inputs(forget), as_inputs(retain)


@pytest.mark.parametrize("name", ["ga", "gd", "kl", "npo", "mmunlearner", "vkd"])
def test_every_method_raises_the_forget_loss(name, small_data, tiny_path):
    """A few optimizer steps of each method's loss make the forget answers less likely (VKD
    with its answer-level forget term, ga; its default, generic, has tests of its own)."""
    adapter = ModelAdapter.load(tiny_path)
    forget_ids = set(load_meta(small_data).entity_ids("forget_10"))
    forget, retain = _batches(small_data, adapter, forget_ids)
    method = _vkd(forget_loss="ga", retain_weight=1.0) if name == "vkd" else method_for(UnlearnConfig(method=name))
    ctx = StepContext(adapter=adapter, reference=ModelAdapter.load(tiny_path).model)
    if name == "vkd":  # the teacher's features of the retain images
        feats = visual_features(adapter, retain.inputs["pixel_values"], [])
        ctx.teacher = {int(k): {n: f[i] for n, f in feats.items()} for i, k in enumerate(retain.image_keys)}

    def forget_nll():
        with torch.no_grad():
            return float(nll(adapter.model, forget.inputs))

    before = forget_nll()
    params = [p for p in adapter.model.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    for _ in range(4):
        batches = {s: b for s, b in (("forget", forget), ("retain", retain)) if s in method.streams}
        loss, metrics = method.loss(adapter.model, batches, ctx)
        assert torch.isfinite(loss) and "loss" in metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert forget_nll() > before + 0.05, (name, before, forget_nll())


def test_answer_logps_projects_only_answer_positions_and_scores_as_the_full_logits_do(small_data, tiny_path):
    """The vocabulary projection runs on the answer positions only; every answer token's
    log-probability is the one the full logits give (each row's sum too)."""
    from vkd.methods import losses as methods

    adapter = ModelAdapter.load(tiny_path)
    batch, _ = _batches(small_data, adapter, set(load_meta(small_data).entity_ids("forget_10")))
    forget = batch.inputs
    with torch.no_grad():
        logp, mask, logits = methods.answer_logps(adapter.model, forget)
        full = adapter.model(**{k: v for k, v in forget.items() if k != "labels"}).logits[:, :-1].float()
    labels = forget["labels"][:, 1:]
    want = torch.log_softmax(full, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    assert methods.keeps_logits(adapter.model)
    assert logits.shape[1] == int((labels != -100).any(0).sum()) < full.shape[1] // 2
    assert int(mask.sum()) == int((labels != -100).sum())
    assert torch.allclose(logp.sum(1), want.sum(1), atol=1e-4)
    assert torch.allclose(logp[mask], want[labels != -100], atol=1e-4)


def test_capped_ascent_stops_on_sequences_already_forgotten(small_data, tiny_path):
    """forget_cap: a sequence whose answer NLL is at the cap adds no gradient; below it,
    the term is GA's per-sequence mean and pushes the answers down."""
    from vkd.methods.losses import answer_logps, capped_nll

    adapter = ModelAdapter.load(tiny_path)
    batch, _ = _batches(small_data, adapter, set(load_meta(small_data).entity_ids("forget_10")))
    forget = batch.inputs
    with torch.no_grad():
        logp, mask, _ = answer_logps(adapter.model, forget)
        per_sequence = -logp.sum(1) / mask.sum(1)
    cap = float(per_sequence.median())
    method = _vkd(forget_loss="ga", forget_cap=cap)
    ctx = StepContext(adapter=adapter)
    visual = [p for n, p in adapter.model.named_parameters() if "vision" in n or "projector" in n]

    def grads(inputs):
        adapter.model.zero_grad()
        method.forget_term(adapter.model, inputs, ctx).backward()
        return torch.cat([p.grad.reshape(-1) for p in visual if p.grad is not None])

    above, below = per_sequence > cap + 1e-3, per_sequence < cap - 1e-3
    assert above.any() and below.any()
    assert torch.count_nonzero(grads({k: v[above] for k, v in forget.items()})) == 0  # all past the cap
    assert torch.count_nonzero(grads({k: v[below] for k, v in forget.items()})) > 0
    with torch.no_grad():
        assert float(capped_nll(adapter.model, forget, 1e9)) == pytest.approx(float(per_sequence.mean()), rel=1e-5)
    with pytest.raises(ConfigError, match="forget_cap"):
        VKDConfig(forget_cap=-1.0)


def test_vkd_without_retain_cross_entropy_keeps_the_llm_off_the_retain_images(small_data, tiny_path):
    """retain_weight 0: the step runs the LLM on the forget batch only, with the same
    forget term and the same distillation term as the step that also scores the retain
    answers."""
    adapter = ModelAdapter.load(tiny_path)
    forget_ids = set(load_meta(small_data).entity_ids("forget_10"))
    forget, retain = _batches(small_data, adapter, forget_ids)
    feats = visual_features(adapter, retain.inputs["pixel_values"], [1])
    table = {int(k): {n: f[i] for n, f in feats.items()} for i, k in enumerate(retain.image_keys)}
    with torch.no_grad():  # a student whose features differ from the teacher's
        for p in adapter.model.model.multi_modal_projector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []
    hook = adapter.model.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    figures = {}
    for weight in (1.0, 0.0):
        ctx = StepContext(adapter=adapter, teacher=table)
        calls.clear()
        _, figures[weight] = _vkd(forget_loss="ga", retain_weight=weight, vkd_layers=[1]).loss(
            adapter.model, {"forget": forget, "retain": retain}, ctx)
        figures[weight]["llm_calls"] = len(calls)
    hook.remove()
    assert figures[1.0]["llm_calls"] == 2 and figures[0.0]["llm_calls"] == 1
    assert figures[0.0]["vkd"] == pytest.approx(figures[1.0]["vkd"], rel=1e-5) and figures[0.0]["vkd"] > 0
    assert figures[0.0]["forget_term"] == pytest.approx(figures[1.0]["forget_term"], rel=1e-6)
    assert figures[0.0]["retain_nll"] == 0.0 < figures[1.0]["retain_nll"]


def test_the_vkd_term_pulls_retain_features_to_the_teacher(small_data, tiny_path):
    """Start from a student whose projector is perturbed; train on the VKD loss with a
    bounded forget term (refusal) and no retain cross-entropy: with beta the retain features
    return towards the teacher's, without it they do not."""
    teacher = ModelAdapter.load(tiny_path)
    forget_ids = set(load_meta(small_data).entity_ids("forget_10"))
    forget, retain = _batches(small_data, teacher, forget_ids)
    feats = visual_features(teacher, retain.inputs["pixel_values"], [1])
    table = {int(k): {n: f[i] for n, f in feats.items()} for i, k in enumerate(retain.image_keys)}

    def distance_after(beta: float) -> tuple[float, float]:
        student = ModelAdapter.load(tiny_path)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in student.model.model.multi_modal_projector.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ctx = StepContext(adapter=student, teacher=table)
        method = _vkd(beta=beta, retain_weight=0.0, forget_loss="refusal", vkd_layers=[1])
        start = float(feature_distance(visual_features(student, retain.inputs["pixel_values"], [])["projector"],
                                       feats["projector"], "mse"))
        params = [p for n, p in student.model.named_parameters() if "projector" in n or "vision" in n]
        _adam_steps(method, student.model, {"forget": forget, "retain": retain}, ctx, params, 1e-3, 15)
        end = float(feature_distance(visual_features(student, retain.inputs["pixel_values"], [])["projector"],
                                     feats["projector"], "mse"))
        return start, end

    start, pulled = distance_after(10.0)
    _, free = distance_after(0.0)
    assert pulled < 0.5 * start, (start, pulled)
    assert pulled < 0.5 * free, (pulled, free)


def _adam_steps(method, model, batches, ctx, params, lr: float, steps: int) -> None:
    """``steps`` Adam steps on ``method``'s loss."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss, _ = method.loss(model, batches, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _same_stats(a, b) -> bool:
    if isinstance(a, SplitStats):
        return (a.batches == b.batches and a.positions == b.positions
                and all(set(x) == set(y) and all(torch.allclose(x[k], y[k]) for k in x)
                        for x, y in ((a.importance, b.importance), (a.fisher, b.fisher))))
    return set(a) == set(b) and all(torch.allclose(a[k][n], b[k][n]) for k in a for n in a[k])


@pytest.mark.slow
def test_one_statistics_pass_measures_each_request_as_its_own_pass_would(small_data, tiny_path, tmp_path,
                                                                          ray_local):
    """A batch's requests share one statistics pass (one Ray Train run): every forget
    stream, the shared retain stream and the teacher, each the same as a pass of its own."""
    from pipelines.stats import cached_stats, run_need, warm_stats
    from pipelines.train import unlearn_trainer
    from vkd.data.layout import ForgetSet

    ids = [e.id for e in load_meta(small_data).entities]
    sets = [ForgetSet("a", (ids[0],), tuple(ids[2:])), ForgetSet("b", (ids[1],), tuple(ids[2:]))]
    cfg = load_config(None, [f"model.{k}={v}" for k, v in dataclasses.asdict(SMALL_MODEL).items()] + [
        "train.workers=1", "train.max_length=96", "unlearn.batch_size=4", "unlearn.vkd.stat_batches=2",
        "unlearn.retain_rows=12", "unlearn.vkd.vision_layers=1"])
    method = method_for(cfg.unlearn)

    passes = warm_stats([(cfg, fs) for fs in sets], tiny_path, small_data, tmp_path, tmp_path / "together")
    assert passes == [["forget", "forget", "retain", "teacher"]]
    assert warm_stats([(cfg, fs) for fs in sets], tiny_path, small_data, tmp_path, tmp_path / "together") == []

    plans = method.stream_plans(small_data, sets[1], cfg.unlearn)
    need = run_need(method, tiny_path, small_data, plans, unlearn_trainer(cfg, tiny_path, small_data, plans),
                    ModelAdapter.load(tiny_path))
    together = {part: torch.load(tmp_path / "together" / "stats" / f"{key}.pt", weights_only=False)
                for part, key in need.keys.items()}
    alone, measured = cached_stats(need, small_data, tmp_path, tmp_path / "alone")
    assert sorted(measured) == ["forget", "retain", "teacher"]
    for part in ("forget", "retain", "teacher"):
        assert _same_stats(together[part], getattr(alone, part)), f"the shared pass measured {part} differently"
    assert not _same_stats(together["forget"], together["retain"])


def test_the_relearning_attack_holds_entities_out():
    from pipelines.relearn import attack_split
    from vkd.config import ConfigError

    ids = [f"e{i}" for i in range(6)]
    attack, held = attack_split(ids, 0.25, seed=0)
    assert len(attack) == 2 and len(held) == 4 and not set(attack) & set(held) and set(attack) | set(held) == set(ids)
    assert attack_split(ids, 0.25, seed=0) == (attack, held)
    assert len(attack_split(ids, 0.99, seed=0)[1]) == 1  # at least one entity stays held out
    with pytest.raises(ConfigError, match="relearn.fraction"):
        attack_split(ids, 1.0, seed=0)


def test_vkd_in_feature_space_draws_the_forget_pictures_to_the_generic_person_without_the_llm(small_data, tiny_path):
    """forget_loss generic, no retain cross-entropy: a step runs the visual module alone (the
    LLM never runs); the forget pictures' features move to the generic person's (the mean of
    the retain pictures'), the retain pictures' stay the teacher's."""
    from vkd.methods.vkd import GENERIC

    adapter = ModelAdapter.load(tiny_path)
    forget, retain = _batches(small_data, adapter, set(load_meta(small_data).entity_ids("forget_10")))
    feats = visual_features(adapter, retain.inputs["pixel_values"], [])
    table = {int(k): {n: f[i] for n, f in feats.items()} for i, k in enumerate(retain.image_keys)}
    table[GENERIC] = {"projector": feats["projector"].mean(0)}
    method = _vkd(forget_loss="generic", retain_weight=0.0, beta=10.0)
    assert method.visual_only
    ctx = StepContext(adapter=adapter, teacher=table)
    calls = []
    hook = adapter.model.model.language_model.register_forward_hook(lambda *_: calls.append(1))

    def distances():
        now = visual_features(adapter, torch.cat([forget.inputs["pixel_values"], retain.inputs["pixel_values"]]), [])
        n = forget.inputs["pixel_values"].shape[0]
        return (float(feature_distance(now["projector"][:n], table[GENERIC]["projector"].expand_as(now["projector"][:n]),
                                       "mse")),
                float(feature_distance(now["projector"][n:], feats["projector"], "mse")))

    start = distances()
    params = [p for n, p in adapter.model.named_parameters() if n in set(method.trainable(adapter))]
    _adam_steps(method, adapter.model, {"forget": forget, "retain": retain}, ctx, params, 2e-3, 10)
    hook.remove()
    end = distances()
    assert not calls, "the LLM ran in a feature-space step"
    assert end[0] < 0.5 * start[0], (start, end)
    assert end[1] < 0.1 * start[0], (start, end)  # the retain pictures stay near the teacher's


def test_the_generic_person_is_the_candidate_under_which_the_llm_says_least_of_the_forget_answers(small_data,
                                                                                                   tiny_path):
    """forget_loss generic: of the candidate generic persons, the one whose features, in place
    of a forget picture's, make the frozen LLM give the fewest forget answers (then the least
    likely ones); the same seed picks the same one; the judging leaves the model as it was."""
    from vkd.data.layout import forget_set
    from vkd.methods.vkd import generic_person

    adapter = ModelAdapter.load(tiny_path)
    method = _vkd(forget_loss="generic", retain_weight=0.0, generic_candidates=6, generic_pairs=16)
    plans = method.stream_plans(small_data, forget_set(load_meta(small_data), "forget_10"), UnlearnConfig())
    seqs = [plans["retain"].sequences(r)[0] for r in read_rows(small_data, TRAIN_SPLIT) if plans["retain"].keep(r)]
    batch = make_batch({k: torch.from_numpy(v) for k, v in Tokenize(adapter, 96)(seqs[:24]).items()})
    feats = visual_features(adapter, batch.inputs["pixel_values"], [])
    teacher = {int(k): {n: f[i] for n, f in feats.items()} for i, k in enumerate(batch.image_keys)}
    with torch.no_grad():
        logits = adapter.model(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits
    target, figures = generic_person(adapter, teacher, small_data, plans, method.cfg, seed=0)
    with torch.no_grad():
        again = adapter.model(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits
    assert torch.equal(logits, again), "judging the candidates left a hook or a change in the model"
    assert (figures["generic_forget_answers"], figures["generic_forget_logp"]) <= \
        (figures["generic_forget_answers_mean"], figures["generic_forget_logp_mean"])
    mean = feats["projector"].float().mean(0)
    assert torch.allclose(target["projector"], mean) == (figures["generic_candidate"] == 0)
    assert torch.equal(generic_person(adapter, teacher, small_data, plans, method.cfg, seed=0)[0]["projector"],
                       target["projector"])
    one = dataclasses.replace(method.cfg, generic_candidates=1)
    assert torch.allclose(generic_person(adapter, teacher, small_data, plans, one, seed=0)[0]["projector"], mean)


def test_noise_lands_on_the_fisher_selected_entries_only_at_its_scale_and_seeded(tiny_path):
    """unlearn.vkd.noise: Gaussian noise of noise x the tensor's std on exactly the entries the
    Fisher mask selects (the rest, the LLM included, unchanged); the same seed, the same noise."""
    from vkd.methods.vkd import add_noise

    def noised(seed: int) -> dict[str, torch.Tensor]:
        adapter = ModelAdapter.load(tiny_path)
        add_noise(adapter, selected, 2.0, seed)
        return {n: p.detach().clone() for n, p in adapter.model.named_parameters()}

    start = {n: p.detach().clone() for n, p in ModelAdapter.load(tiny_path).model.named_parameters()}
    visual = sorted((n for n in start if "vision" in n and start[n].dim() == 2), key=lambda n: -start[n].numel())
    gen = torch.Generator().manual_seed(12345)  # not the noise's seed: the same stream would bias the draw
    selected = {n: (torch.rand(start[n].shape, generator=gen) < 0.3).float() for n in visual[:2]}
    first, again, other = noised(0), noised(0), noised(1)
    for name, before in start.items():
        moved = first[name] != before
        if name not in selected:
            assert not moved.any(), f"noise reached {name}, which the mask does not select"
            continue
        assert torch.equal(moved, selected[name].bool()), name
        shift = (first[name] - before)[moved]
        assert 1.6 < float(shift.std() / before.std()) < 2.4, name
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


def test_a_mask_that_selects_everything_measures_no_fisher_and_the_same_importance(small_data, tiny_path):
    """d_f 1 (top_fraction, VKD's default): no Fisher is asked for, the statistics pass runs
    forward only, and the neuron importance it measures is the one the backward pass gives."""
    from vkd.saliency import measure_split

    adapter = ModelAdapter.load(tiny_path)
    forget, retain = _batches(small_data, adapter, set(load_meta(small_data).entity_ids("forget_10")))
    assert not _vkd().statistics().fisher and _vkd(d_f=0.5).statistics().fisher
    assert not _vkd(d_f=0.0, d_f_mode="ratio").statistics().fisher
    inputs = [b.inputs for b in (forget, retain)]
    trainable = _vkd().trainable(adapter)
    forward = measure_split(adapter, inputs, [], "activation")
    with_fisher = measure_split(adapter, inputs, trainable, "activation")
    assert forward.importance and not forward.fisher
    assert all(torch.allclose(forward.importance[k], with_fisher.importance[k]) for k in forward.importance)
    assert forward.positions == with_fisher.positions
    # the masks the trainer gets: the pruned neurons' columns only (no all-ones Fisher table)
    from vkd.saliency import Statistics

    retain_only = measure_split(adapter, [retain.inputs], [], "activation")
    prep = _vkd(d_i=0.05, forget_loss="ga").prepare(adapter, Statistics(forward, retain_only, {}), trainable)
    assert prep.figures["pruned_neurons"] > 0 and prep.figures["updated_fraction"] == 1.0
    assert prep.masks and all(not bool(m.all()) for m in prep.masks.values())
    for name, mask in prep.masks.items():
        columns = torch.nonzero(mask[0] == 0).flatten().tolist()
        assert columns == prep.pruned[name.removesuffix(".weight")], name
