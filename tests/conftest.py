"""Session fixtures: a small synthetic benchmark, the tiny model built on it, a local Ray."""
from __future__ import annotations

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before anything imports the hub, Ray or MLflow

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import ray.cloudpickle  # noqa: E402

import tests.faults  # noqa: E402
from vkd.config import ModelConfig, load_config  # noqa: E402

# Ray's workers cannot import the tests: the faults they inject travel by value
ray.cloudpickle.register_pickle_by_value(tests.faults)

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

    from pipelines.runtime import init_ray

    init_ray(load_config(None).ray.num_cpus)
    yield ray
    ray.shutdown()
