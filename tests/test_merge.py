"""Model merging: each method equals its hand computation; a merged checkpoint loads, exports and runs in
transformers with our logits; bad inputs are one-line errors with exit status 2."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import small_config

from plamo_jax import cli
from plamo_jax.convert.merge import MergeSpec, merge_tensors
from plamo_jax.errors import ConfigError
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train import state as state_lib
from plamo_jax.train.run import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_convert_dense import load_ours, torch_logits  # noqa: E402 - the HF export tests' helpers need torch

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
A, B, BASE = (RNG.standard_normal((4, 8)).astype(np.float32) for _ in range(3))


def test_linear_is_the_weighted_average():
    close = dict(rtol=1e-6, atol=1e-6)
    normalised = merge_tensors(MergeSpec("linear", weights=(1.0, 3.0)), [A, B])
    np.testing.assert_allclose(normalised, 0.25 * A + 0.75 * B, **close)
    as_given = merge_tensors(MergeSpec("linear", weights=(1.0, 3.0), normalize=False), [A, B])
    np.testing.assert_allclose(as_given, A + 3.0 * B, **close)
    np.testing.assert_allclose(merge_tensors(MergeSpec("linear"), [A, B, BASE]), (A + B + BASE) / 3, **close)


def test_slerp_returns_the_endpoints_and_the_closed_form():
    np.testing.assert_array_equal(merge_tensors(MergeSpec("slerp", t=0.0), [A, B]), A)
    np.testing.assert_array_equal(merge_tensors(MergeSpec("slerp", t=1.0), [A, B]), B)
    a, b = A.astype(np.float64).ravel(), B.astype(np.float64).ravel()
    omega = np.arccos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    expected = (np.sin(0.5 * omega) * a + np.sin(0.5 * omega) * b) / np.sin(omega)
    np.testing.assert_allclose(merge_tensors(MergeSpec("slerp", t=0.5), [A, B]).ravel(), expected, rtol=1e-5)
    # Colinear tensors (sin omega ~ 0): linear interpolation.
    np.testing.assert_allclose(merge_tensors(MergeSpec("slerp", t=0.25), [A, 2 * A]), 1.25 * A, rtol=1e-6)


def test_task_arithmetic_by_hand():
    base = np.array([1.0, 2.0, 3.0], np.float32)
    first, second = np.array([2.0, 2.0, 5.0], np.float32), np.array([0.0, 3.0, 3.0], np.float32)
    # deltas [1, 0, 2] and [-1, 1, 0]; base + 0.5 * first delta + 1.0 * second delta
    merged = merge_tensors(MergeSpec("task_arithmetic", weights=(0.5, 1.0)), [first, second], base)
    np.testing.assert_allclose(merged, [0.5, 3.0, 4.0], rtol=1e-6)
    spec = MergeSpec("task_arithmetic", weights=(0.5, 1.0), scale=2.0)
    doubled = merge_tensors(spec, [first, second], base)
    np.testing.assert_allclose(doubled, [0.0, 4.0, 5.0], rtol=1e-6)


def test_ties_by_hand():
    base = np.full(8, 10.0, np.float32)
    first = base + np.array([3, -1, 0.5, -2, 4, 0.1, 2, 0], np.float32)
    second = base + np.array([-1, -2, 1, 3, -5, 0.2, 4, 0], np.float32)
    # density 0.5 keeps 4 of 8:       [3, 0, 0, -2, 4, 0, 2, 0] and [0, -2, 0, 3, -5, 0, 4, 0]
    # elected signs (sign of the sum):  +  -  0   +  -  0  +  0
    # agreeing deltas' mean:          [3, -2, 0, 3, -5, 0, (2 + 4) / 2, 0]
    merged = merge_tensors(MergeSpec("ties", density=0.5, scale=0.5), [first, second], base)
    np.testing.assert_allclose(merged - base, 0.5 * np.array([3, -2, 0, 3, -5, 0, 3, 0]), atol=1e-6)
    # weights (1, 3): weighted sums [3, -6, 0, 7, -11, 0, 14, 0] elect the same signs; the mean is weighted
    weighted = merge_tensors(MergeSpec("ties", weights=(1.0, 3.0), density=0.5), [first, second], base)
    np.testing.assert_allclose(weighted - base, [3, -2, 0, 3, -5, 0, (2 + 12) / 4, 0], atol=1e-6)


def dare_mask(seed: int, model: int, path: str, shape, density: float) -> np.ndarray:
    """The documented mask: numpy's generator seeded with (seed, model index, crc32 of the path)."""
    return np.random.default_rng([seed, model, zlib.crc32(path.encode())]).random(shape, np.float32) < density


def test_dare_by_hand_and_deterministic_per_seed():
    density, path = 0.5, ("layers", "mlp", "w")
    spec = MergeSpec("dare", weights=(0.5, 2.0), density=density, seed=7)
    merged = merge_tensors(spec, [A, B], BASE, path)
    kept = [dare_mask(7, i, "layers/mlp/w", A.shape, density) for i in range(2)]
    dropped = [np.where(mask, (x - BASE) / density, 0) for mask, x in zip(kept, [A, B], strict=True)]
    expected = BASE + 0.5 * dropped[0] + 2.0 * dropped[1]
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert 0 < kept[0].sum() < A.size and not np.array_equal(kept[0], kept[1])

    np.testing.assert_array_equal(merge_tensors(spec, [A, B], BASE, path), merged)
    reseeded = MergeSpec("dare", weights=(0.5, 2.0), density=density, seed=8)
    other_seed = merge_tensors(reseeded, [A, B], BASE, path)
    other_path = merge_tensors(spec, [A, B], BASE, ("layers", "mlp", "v"))
    assert not np.allclose(other_seed, merged) and not np.allclose(other_path, merged)
    # density 1 keeps everything: task arithmetic
    np.testing.assert_allclose(merge_tensors(MergeSpec("dare", weights=(0.5, 2.0)), [A, B], BASE, path),
                               BASE + 0.5 * (A - BASE) + 2.0 * (B - BASE), rtol=1e-5, atol=1e-6)


def test_dare_ties_by_hand():
    density = 0.6
    merged = merge_tensors(MergeSpec("dare_ties", density=density, seed=3), [A, B], BASE, ("w",))
    deltas = [np.where(dare_mask(3, i, "w", A.shape, density), (x - BASE) / density, 0)
              for i, x in enumerate([A, B])]
    sign = np.sign(deltas[0] + deltas[1])
    agree = [(np.sign(d) == sign) & (d != 0) for d in deltas]
    count = agree[0].astype(np.float32) + agree[1]
    total = np.where(agree[0], deltas[0], 0) + np.where(agree[1], deltas[1], 0)
    expected = BASE + np.where(count > 0, total / np.maximum(count, 1), 0)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, tensors, base, message", [
    (MergeSpec("average"), 2, False, "--method 'average' is not a merge method"),
    (MergeSpec("slerp"), 3, False, "--method slerp merges exactly 2 models, got 3"),
    (MergeSpec("slerp", t=1.5), 2, False, r"--t 1.5: expected an interpolation factor in \[0, 1\]"),
    (MergeSpec("ties", density=0.0), 2, True, r"--density 0.0: expected a kept fraction in \(0, 1\]"),
    (MergeSpec("dare", density=1.2), 2, True, r"--density 1.2"),
    (MergeSpec("linear", weights=(1.0, 2.0, 3.0)), 2, False, "--weights 1,2,3: 3 values for 2 models"),
    (MergeSpec("linear", weights=(1.0, -1.0)), 2, False, "--weights 1,-1 sum to 0"),
    (MergeSpec("ties"), 2, False, "--method ties needs --base"),
    (MergeSpec("linear"), 2, True, "--method linear takes no --base"),
])
def test_bad_settings_name_the_flag(spec, tensors, base, message):
    with pytest.raises(ConfigError, match=message):
        merge_tensors(spec, [A] * tensors, BASE if base else None)


# -- checkpoints and the tool ---------------------------------------------------------------------

def load_tool():
    spec = importlib.util.spec_from_file_location("tools_merge", REPO / "tools" / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = load_tool()


def save_random(directory: Path, seed: int, **model_overrides) -> tuple[Path, dict]:
    config = small_config(init_std=0.3, **model_overrides)
    run = build_model(config, jax.devices()[:1])
    params = jax.device_get(state_lib.init_params(config.model, run.setup, seed=seed))
    ckpt.save_params(directory, params, config)
    return directory, params


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [save_random(root / name, seed) for name, seed in (("a", 1), ("b", 2), ("base", 3))]


def assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, want)


def run_tool(args: list[str], capsys) -> tuple[int, str]:
    status = cli.call(TOOL.main, [str(arg) for arg in args])
    return status, capsys.readouterr().err


def test_linear_merge_loads_and_exports_with_matching_logits(checkpoints, tmp_path, capsys):
    (a, params_a), (b, params_b), _ = checkpoints
    status, err = run_tool(["--method", "linear", "--weights", "1,3", "--out", tmp_path / "merged",
                            "--hf-out", tmp_path / "hf", "--hf-dtype", "fp32", a, b], capsys)
    assert status == 0, err
    merged, config = ckpt.load_params(tmp_path / "merged")
    assert config.model.to_dict() == ckpt.load_config(a).model.to_dict()
    expected = jax.tree.map(lambda x, y: 0.25 * x + 0.75 * y, params_a, params_b)
    assert_trees_close(merged, expected)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    forward, _ = load_ours(tmp_path / "merged")
    ids = np.random.default_rng(2).integers(0, config.model.vocab_size, size=(2, 12))
    theirs = torch_logits(model, ids)
    assert theirs.std() > 0.1  # the comparison is not between near-constant logits
    np.testing.assert_allclose(forward(ids), theirs, atol=1e-4, rtol=0)


def test_task_arithmetic_merge_of_checkpoints_carries_the_first_models_assets(checkpoints, tmp_path, capsys):
    (a, params_a), (b, params_b), (base, params_base) = checkpoints
    assets = tmp_path / "a_copy"
    a_copy, _ = save_random(assets, 1)
    (a_copy / ckpt.ASSETS_DIR).mkdir()
    (a_copy / ckpt.ASSETS_DIR / "tokenizer.json").write_text("{}")
    status, err = run_tool(["--method", "task_arithmetic", "--base", base, "--weights", "0.5,0.25",
                            "--out", tmp_path / "merged", a_copy, b], capsys)
    assert status == 0, err
    merged, _ = ckpt.load_params(tmp_path / "merged")
    expected = jax.tree.map(lambda x, y, z: z + 0.5 * (x - z) + 0.25 * (y - z),
                            params_a, params_b, params_base)
    assert_trees_close(merged, expected)
    assert (tmp_path / "merged" / ckpt.ASSETS_DIR / "tokenizer.json").read_text() == "{}"


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory):
    return save_random(tmp_path_factory.mktemp("wide") / "wide", 4, mlp_dim=256)[0]


@pytest.mark.parametrize("args, wide, message", [
    (["--method", "linear"], True, r"wide: its model differs from the first model's .* in "
                                   r"model.mlp_dim=128 \(checkpoint: 256\)"),
    (["--method", "task_arithmetic"], False, "task_arithmetic needs --base"),
    (["--method", "average"], False, "--method 'average' is not a merge method"),
    (["--method", "linear", "--weights", "1,2,3"], False, "--weights 1,2,3: 3 values for 2 models"),
    (["--method", "linear", "--weights", "1,x"], False, "--weights '1,x': expected comma-separated numbers"),
    (["--method", "ties", "--base", "{base}", "--density", "1.5"], False, r"--density 1.5: expected"),
    (["--method", "slerp", "--t", "-0.1"], False, r"--t -0.1: expected"),
])
def test_bad_inputs_are_one_line_with_status_2(checkpoints, other_architecture, tmp_path, capsys, args, wide,
                                               message):
    (a, _), (b, _), (base, _) = checkpoints
    args = [str(arg).replace("{base}", str(base)) for arg in args]
    second = other_architecture if wide else b
    status, err = run_tool([*args, "--out", tmp_path / "merged", a, second], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "merged").exists()


def test_the_command_line_refuses_a_non_empty_output(checkpoints, tmp_path):
    (a, _), (b, _), _ = checkpoints
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "x").write_text("")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "merge.py"), "--method", "linear", "--out",
                             str(tmp_path / "merged"), str(a), str(b)], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--out" in result.stderr and "is not an empty directory" in result.stderr


def test_each_input_parameter_is_read_once_and_alone(checkpoints, tmp_path, monkeypatch, capsys):
    """What bounds memory: every read asks for one stacked parameter of one checkpoint, each read once."""
    (a, params_a), (b, _), (base, _) = checkpoints
    reads = []
    load_params = ckpt.load_params

    def counting_load(path, step=None, shardings=None, only=None):
        [(leaf, _)] = jax.tree_util.tree_leaves_with_path(only, is_leaf=lambda x: x is None)
        reads.append((str(path), jax.tree_util.keystr(leaf)))
        return load_params(path, step, shardings, only)

    monkeypatch.setattr(ckpt, "load_params", counting_load)
    status, err = run_tool(["--method", "ties", "--base", base, "--density", "0.3", "--out", tmp_path / "m",
                            a, b], capsys)
    assert status == 0, err
    assert len(reads) == len(set(reads)) == 3 * len(jax.tree.leaves(params_a))
