"""Configs: method sections, the flat keys of earlier versions, values checked at the door;
the content keys and the atomic cache; the loop's timetable."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT
from vkd.cache import DIGEST_CHARS, Cache, digest, write_atomic
from vkd.config import ConfigError, UnlearnConfig, load_config
from vkd.methods import METHODS
from vkd.methods.vkd import VKDConfig


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name == "batch_demo.yaml":  # a manifest, not a run config (tests/test_batch.py loads it)
            continue
        cfg = load_config(path)
        cfg.save(tmp_path / "again.yaml")
        assert load_config(tmp_path / "again.yaml") == cfg, path.name
        assert cfg.updated([]).to_dict() == cfg.to_dict()


def test_a_method_reads_its_own_section_and_keeps_the_others():
    cfg = load_config(None, ["unlearn.method=gd", "unlearn.gd.retain_weight=2", "unlearn.vkd.beta=7"])
    assert cfg.unlearn.options == METHODS.get("gd").Config(retain_weight=2.0)
    assert cfg.unlearn.sections["vkd"].beta == 7.0
    tree = cfg.to_dict()["unlearn"]
    assert tree["gd"] == {"retain_weight": 2.0} and tree["vkd"]["beta"] == 7.0 and "sections" not in tree
    switched = cfg.updated(["unlearn.method=vkd"])
    assert switched.unlearn.options.beta == 7.0  # a section given stays with the config
    assert load_config(None).unlearn.options == VKDConfig()  # the chosen method's defaults when none is given


def test_a_flat_key_of_an_earlier_version_still_applies_with_a_deprecation_line(capsys):
    cfg = load_config(None, ["unlearn.d_f=0.5", "unlearn.beta=3"])
    assert cfg.unlearn.sections["vkd"].d_f == 0.5 and cfg.unlearn.sections["mmunlearner"].d_f == 0.5
    assert cfg.unlearn.options.beta == 3.0
    err = capsys.readouterr().err
    assert "unlearn.beta is deprecated: write unlearn.vkd.beta" in err
    assert "unlearn.mmunlearner.d_f, unlearn.vkd.d_f" in err


@pytest.mark.parametrize("override, message", [
    ("unlearn.lr=nan", "unlearn.lr: expected a finite number"),
    ("unlearn.vkd.beta=.inf", "unlearn.vkd.beta: expected a finite number"),
    ("unlearn.vkd.d_i=1.5", "unlearn.vkd.d_i=1.5: must lie in [0, 1] with d_i_mode=top_fraction"),
    ("unlearn.vkd.forget_loss=shout", "unlearn.vkd.forget_loss='shout'; choose one of ga, npo, refusal"),
    ("unlearn.steps=0", "unlearn.steps=0: must be at least 1"),
    ("train.zero_stage=4", "train.zero_stage=4; choose one of 0, 1, 2, 3"),
    ("eval.cpus_per_actor=0", "eval.cpus_per_actor=0.0: must be greater than 0"),
    ("unlearn.method=forget_all", "unknown unlearning method 'forget_all'; registered: ga, gd"),
    ("unlearn.vkd.betta=1", "unknown field unlearn.vkd.betta"),
    ("unlearn.shrink=1", "unknown field unlearn.shrink"),
])
def test_a_bad_value_is_an_error_naming_the_field(override, message):
    with pytest.raises(Exception) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_settings_made_in_code_are_checked_too():
    with pytest.raises(ConfigError, match=r"unlearn.vkd.vkd_distance='cityblock'"):
        VKDConfig(vkd_distance="cityblock")
    with pytest.raises(ConfigError, match=r"unlearn.lr=nan: expected a finite number"):
        UnlearnConfig(lr=float("nan"))


def test_content_keys_are_stable_and_of_one_length():
    a = digest({"b": 1, "a": [1, 2]})
    assert a == digest({"a": [1, 2], "b": 1}) and len(a) == DIGEST_CHARS
    assert digest({"a": [1, 2], "b": 2}) != a


def test_a_cached_value_is_made_once_and_a_failed_write_leaves_nothing(tmp_path):
    cache, calls = Cache(tmp_path, "eval", ".json"), []
    assert cache.json("k", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert cache.json("k", lambda: calls.append(1) or {"x": 2}) == {"x": 1} and calls == [1]

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "eval" / "other.json", broken)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["k.json"]


def test_the_timetable_checkpoints_and_probes_where_it_should():
    from vkd.loop import Timetable

    t = Timetable(total=10, checkpoint_every=4, probing=True, probe_at=frozenset({3}))
    assert [s for s in range(1, 11) if t.checkpoint(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if t.probe(s)] == [3, 4, 8, 10]
    local = Timetable(total=10, probing=False)
    assert [s for s in range(1, 11) if local.checkpoint(s)] == [10] and not any(local.probe(s) for s in range(11))
