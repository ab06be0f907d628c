"""Session fixtures: a small synthetic benchmark, the tiny model built on it, a local Ray."""
from __future__ import annotations

import os

for key, value in {
    "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(key, value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vkd.config import ModelConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(entities=12, seed=7, image_size=32, train_images=3, test_images=2, mc_variants=2, render_scale=2)
SMALL_MODEL = ModelConfig(vocab_size=512, vision_hidden=64, vision_layers=2, vision_intermediate=128,
                          patch_size=8, text_hidden=64, text_layers=2, text_intermediate=128)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    from vkd.data import prepare_benchmark

    out = tmp_path_factory.mktemp("bench") / "small"
    prepare_benchmark("synthetic", out, **SMALL)
    return out


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_path(small_data, model_cache):
    from vkd.model import resolve_model

    return resolve_model("tiny", SMALL_MODEL, small_data, cache=model_cache)


@pytest.fixture(scope="session")
def tiny(tiny_path):
    from vkd.model import ModelAdapter

    return ModelAdapter.load(tiny_path)


@pytest.fixture(scope="session")
def demo_config():
    return load_config(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipelines.common import init_ray

    init_ray(load_config(None))
    yield ray
    ray.shutdown()
