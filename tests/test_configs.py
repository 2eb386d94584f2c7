"""Recipes build abstractly with the published sizes; configs that cannot work fail at start, clearly."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import small_config

from plamo_jax.configuration import ConfigError, load_recipe, validate_config
from plamo_jax.parallel.rules import MESH_AXES
from plamo_jax.train.state import abstract_model, parameter_count

ROOT = Path(__file__).resolve().parents[1]


def count(name: str) -> int:
    return parameter_count(abstract_model(load_recipe(name).model)[1])


def test_llama3_8b_parameter_count_is_published_value():
    assert count("llama3_8b") == 8_030_261_248


def test_llama3_1b_parameter_count_is_published_value():
    """meta-llama/Llama-3.2-1B: 1,235,814,400 parameters with the embedding tied to the LM head."""
    assert count("llama3_1b") == 1_235_814_400


def test_other_recipes_build():
    assert 95e6 < count("dense_100m") < 115e6
    assert 95e9 < count("plamo_100b_like") < 105e9
    assert count("tiny") < 2e6


RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_validates_on_8_devices(recipe):
    """On 8 devices, or on as many as the recipe's fixed mesh sizes need (stage=4 x tensor=8: 32)."""
    config = load_recipe(recipe)
    sizes = [config.mesh[axis] for axis in MESH_AXES] + [config.mesh.get(f"dcn_{a}", 1) for a in MESH_AXES]
    fixed = math.prod(size for size in sizes if size != -1)
    validate_config(config, max(8, fixed))


@pytest.mark.parametrize(
    "change, devices, key",
    [
        ({"mesh.tensor": 3, "mesh.data": 1, "model.num_heads": 8}, 3, "model.num_heads"),
        (
            {"mesh.tensor": 4, "mesh.data": 2, "model.num_kv_heads": 2, "model.num_heads": 8},
            8,
            "model.num_kv_heads",
        ),
        ({"mesh.data": 4}, 8, "mesh"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "mesh.data"),
        ({"mesh.data": 8, "train.global_batch_size": 12}, 8, "train.global_batch_size"),
        ({"train.microbatches": 3}, 1, "train.global_batch_size"),
        ({"mesh.sequence": 2, "mesh.data": 4, "train.seq_len": 15}, 8, "train.seq_len"),
        ({"model.remat": "some"}, 1, "model.remat"),
        ({"optimizer.schedule": "linear"}, 1, "optimizer.schedule"),
    ],
)
def test_bad_configs_name_the_key(change, devices, key):
    config = small_config()
    for dotted, value in change.items():
        section, field = dotted.split(".")
        config[section][field] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(config, devices)


def test_unknown_override_key_fails_at_start(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            "configs/tiny.py",
            "--config.train.stpes=3",
            f"--config.train.output_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "stpes" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
