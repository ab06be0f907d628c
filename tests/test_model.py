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
    # every block of its vision tower feeds the merger: the LLM sees all of it
    assert ModelAdapter(model, _Processor()).unseen_visual() == frozenset()


class _Processor:
    """Enough of a processor for an adapter that only looks at the model's parameters."""
    class tokenizer:
        pad_token_id = 0


def test_the_layers_after_the_vision_feature_layer_are_never_trained_or_pruned(small_data):
    """A llava-1.5-shaped model (its projector takes the second-to-last vision layer): that
    last layer and the post layer norm are unseen, so VKD neither trains nor prunes them,
    and vision_layers counts from the feature layer down."""
    import dataclasses

    from vkd.methods import method_for
    from vkd.config import UnlearnConfig
    from vkd.model import build_tiny
    from vkd.saliency import neuron_modules

    cfg = dataclasses.replace(SMALL_MODEL, vision_layers=3, feature_layer=-2, chat_template="llava-1.5")
    adapter = build_tiny(cfg, ["the texts of a tokenizer"] * 20, 32)
    last = adapter.family.vision_layers + "2."
    unseen = adapter.unseen_visual()
    assert {n for n in unseen if not n.startswith(last)} == {"model.vision_tower.post_layernorm.weight",
                                                              "model.vision_tower.post_layernorm.bias"}
    assert all(n in unseen for n, _ in adapter.model.named_parameters() if n.startswith(last))
    vkd = method_for(UnlearnConfig().with_method("vkd", vision_layers=1))
    trained = vkd.trainable(adapter)
    assert not set(trained) & unseen and any(n.startswith(adapter.family.vision_layers + "1.") for n in trained)
    assert not any(n.startswith((adapter.family.vision_layers + "0.", last)) for n in trained)
    assert not any(n.startswith(last) for n in neuron_modules(adapter))


def test_unsupported_and_missing_models_are_clear_errors(tmp_path, small_data):
    with pytest.raises(ModelError, match="model type 'bert' is not supported; supported types: llava"):
        family_for("bert")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path / "nothing", SMALL_MODEL, small_data, tmp_path)
    with pytest.raises(ModelError, match="no config.json"):
        ModelAdapter.load(tmp_path)
    assert set(FAMILIES.names()) == {"llava", "qwen2_vl"}
