"""The model adapter: tiny LLaVA build/save/load, parameter groups, image features, families."""
from __future__ import annotations

import torch
import pytest

from tests.conftest import SMALL, SMALL_MODEL
from vkd.model import FAMILIES, GROUPS, ModelAdapter, ModelError, family_for, resolve_model


def test_tiny_saves_as_safetensors_and_reloads_identically(tiny, tiny_path, tmp_path):
    assert (tiny_path / "model.safetensors").is_file() and (tiny_path / "processor_config.json").is_file()
    again = ModelAdapter.load(tiny.save(tmp_path / "copy"))
    ids, extra = tiny.prompt_inputs(["Who is the person in the image?"], None)
    batch = tiny.batch(ids)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(tiny.model(**batch).logits, again.model(**batch).logits)
    assert tiny.tokenizer("Velmora baker")["input_ids"] == again.tokenizer("Velmora baker")["input_ids"]


def test_tiny_is_built_once_and_is_deterministic(small_data, tiny_path, model_cache, tmp_path):
    assert resolve_model("tiny", SMALL_MODEL, small_data, cache=model_cache) == tiny_path
    other = resolve_model("tiny", SMALL_MODEL, small_data, cache=tmp_path)
    assert (other / "model.safetensors").read_bytes() == (tiny_path / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (tiny_path / "tokenizer.json").read_text()


def test_parameter_groups_partition_the_model(tiny):
    groups = tiny.param_groups()
    names = [n for g in GROUPS for n, _ in groups[g]]
    assert len(names) == len(set(names)) == len(list(tiny.model.parameters()))
    assert all(n.startswith("model.vision_tower.") for n, _ in groups["vision"])
    assert all(n.startswith("model.multi_modal_projector.") for n, _ in groups["projector"])
    assert {n.split(".")[1] for n, _ in groups["llm"] if n.startswith("model.")} == {"language_model"}
    assert all(tiny.group_sizes()[g] > 0 for g in GROUPS)


def test_image_features_are_the_tokens_the_llm_sees(tiny, small_data):
    from vkd.data.items import eval_items
    from vkd.scoring import item_images

    items = [it for it in eval_items(small_data, "forget_15") if it["image"] is not None][:3]
    ids, extra = tiny.prompt_inputs([it["question"] for it in items], item_images(items))
    feats = tiny.image_features(extra["pixel_values"])
    n_tokens = (SMALL["image_size"] // SMALL_MODEL.patch_size) ** 2
    assert feats.shape == (3, n_tokens, SMALL_MODEL.text_hidden)
    image_token = tiny.model.config.image_token_index
    assert all(row.count(image_token) == n_tokens for row in ids)


def test_qwen2_vl_groups_by_its_own_module_names():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=4, video_token_id=5, vision_start_token_id=6, vision_end_token_id=7,
        bos_token_id=1, eos_token_id=2,
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    fam = family_for(model.config.model_type)
    groups = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        groups[fam.group_of(name)].append(name)
    assert groups["projector"] and all(".merger." in n for n in groups["projector"])
    assert groups["vision"] and not any(".merger." in n for n in groups["vision"])
    assert any(n.startswith("model.language_model.") for n in groups["llm"]) and "lm_head.weight" in groups["llm"]


def test_unsupported_and_missing_models_are_clear_errors(tmp_path, small_data):
    with pytest.raises(ModelError, match="model type 'bert' is not supported; supported types: llava"):
        family_for("bert")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path / "nothing", SMALL_MODEL, small_data, tmp_path)
    with pytest.raises(ModelError, match="no config.json"):
        ModelAdapter.load(tmp_path)
    assert set(FAMILIES.names()) == {"llava", "qwen2_vl"}
