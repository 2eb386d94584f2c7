"""Orbax checkpoints: round trip, retention, fallback past unreadable steps, restore onto other meshes."""

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train import state as state_lib
from plamo_jax.train.optimizer import make_optimizer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def setup_on(config, mesh):
    setup = state_lib.setup_model(config.model, mesh, mesh_rules(config))
    return setup, make_optimizer(config.optimizer, config.train.steps)


def trained_state(config, mesh, seed: int = 0):
    """A state whose optimizer moments are non-zero (one real update) so every leaf carries information."""
    setup, optimizer = setup_on(config, mesh)
    state = state_lib.init_state(config.model, setup, optimizer, seed)
    @jax.jit
    def update(state):
        grads = jax.tree.map(lambda p: 0.01 * jax.numpy.ones_like(p) + p, state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 7}

    return update(state), setup, optimizer


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def logits_on(setup, params, batch):
    with sharding_context(setup.mesh, setup.rules):
        forward = jax.jit(lambda p, ids, seg, pos: nnx.merge(setup.graphdef, p)(ids, seg, pos)[0])
        return np.asarray(forward(params, batch["input_ids"], batch["segment_ids"], batch["positions"]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of steps 7 and 14 written on an fsdp=8 mesh."""
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    config = small_config()
    state, setup, optimizer = trained_state(config, mesh_of(fsdp=8))
    checkpointer = ckpt.Checkpointer(directory, every_steps=7, keep_last=3)
    assert checkpointer.maybe_save(7, state, {"epoch": 0, "position": 7}, config.to_json())
    assert not checkpointer.maybe_save(8, state, {"epoch": 0, "position": 8}, config.to_json())
    assert checkpointer.maybe_save(14, state, {"epoch": 1, "position": 3}, config.to_json())
    checkpointer.wait_until_finished()
    checkpointer.close()
    return directory, config, state, setup


def test_round_trip_with_data_state_and_config(saved):
    directory, config, state, setup = saved
    checkpointer = ckpt.Checkpointer(directory, every_steps=7, keep_last=3)
    abstract = state_lib.abstract_state(setup, make_optimizer(config.optimizer, config.train.steps))
    restored, data_state = checkpointer.restore_latest(abstract)
    checkpointer.close()
    assert data_state == {"epoch": 1, "position": 3}
    assert_trees_equal(restored, state)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim)
    assert ckpt.load_config(directory).to_json() == config.to_json()
    assert ckpt.load_config(directory, step=7).model.d_model == config.model.d_model


@pytest.mark.parametrize("mesh_sizes", [dict(data=2, tensor=4), dict(data=1)],
                         ids=["data2_tensor4", "one_device"])
def test_restore_on_another_mesh_gives_identical_logits(saved, mesh_sizes):
    directory, config, state, saving_setup = saved
    setup, optimizer = setup_on(config, mesh_of(**mesh_sizes))
    checkpointer = ckpt.Checkpointer(directory, every_steps=7, keep_last=3)
    restored, _ = checkpointer.restore_latest(state_lib.abstract_state(setup, optimizer))
    checkpointer.close()
    assert_trees_equal(restored, state)
    assert {leaf.sharding.mesh.shape_tuple for leaf in jax.tree.leaves(restored["params"])} == {
        setup.mesh.shape_tuple}
    batch = random_batch(np.random.default_rng(0), 4, 16, config.model.vocab_size)
    expected = logits_on(saving_setup, state["params"], batch)
    np.testing.assert_allclose(logits_on(setup, restored["params"], batch), expected, atol=1e-5, rtol=0)


def test_load_params_from_a_training_checkpoint(saved):
    directory, config, state, setup = saved
    on_host, loaded_config = ckpt.load_params(directory)
    assert loaded_config.model.num_layers == config.model.num_layers
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(on_host))
    assert_trees_equal(on_host, state["params"])
    placed, _ = ckpt.load_params(directory / "7", step=7, shardings=setup.param_shardings)
    assert jax.tree.leaves(placed)[0].sharding == jax.tree.leaves(setup.param_shardings)[0]
    assert_trees_equal(placed, state["params"])
    one, _ = ckpt.load_params(directory, only={"blocks": {"mlp": {"up": None}}})
    assert list(one) == ["blocks"] and list(one["blocks"]["mlp"]) == ["up"]
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint for step 9; it has steps \\[7, 14\\]"):
        ckpt.load_params(directory, step=9)


def test_load_params_from_a_relative_path(saved, monkeypatch):
    """`checkpoint.init_params=runs/tiny/checkpoints` as the README writes it (Orbax needs it absolute)."""
    directory, _, state, _ = saved
    monkeypatch.chdir(directory.parent.parent)
    relative = directory.relative_to(directory.parent.parent)
    assert_trees_equal(ckpt.load_params(relative)[0], state["params"])
    assert ckpt.params_metadata(relative)["embed"].shape == state["params"]["embed"].shape


def test_save_params_round_trip_and_no_overwrite(saved, tmp_path):
    _, config, state, _ = saved
    step_dir = ckpt.save_params(tmp_path / "params", state["params"], config)
    loaded, loaded_config = ckpt.load_params(tmp_path / "params")
    assert_trees_equal(loaded, state["params"])
    assert loaded_config.to_json() == config.to_json() and step_dir.name == "0"
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints"):
        ckpt.save_params(tmp_path / "params", state["params"], config)


def small_state(value: float) -> dict:
    return {"step": jax.numpy.int32(value), "params": {"w": jax.numpy.full((8, 4), value)}}


def abstract_small():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding),
            "params": {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=sharding)}}


def test_retention_keeps_last_and_every_kth(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, every_steps=1, keep_last=2, keep_every=4)
    for step in range(1, 10):
        checkpointer.maybe_save(step, small_state(step), {"s": step}, "{}")
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == list(range(1, 10))  # nothing is vouched for yet: nothing goes
    checkpointer.vouch(10)  # step 10 was healthy: checkpoints 1..9 hold good parameters
    assert checkpointer.all_steps() == [4, 8, 9]
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 8, 9]
    checkpointer.close()


def test_retention_never_trades_a_vouched_checkpoint_for_newer_unvouched_ones(tmp_path):
    """A run that went bad after step 4: checkpoints 5..9 were written but no later step vouched for them."""
    checkpointer = ckpt.Checkpointer(tmp_path, every_steps=1, keep_last=1)
    for step in range(1, 10):
        checkpointer.maybe_save(step, small_state(step), {"s": step}, "{}")
    checkpointer.wait_until_finished()
    checkpointer.vouch(5)
    assert checkpointer.all_steps() == [4, 5, 6, 7, 8, 9] and checkpointer.vouched_steps() == [4]
    restored, data_state = checkpointer.restore_latest(abstract_small(), before=5)  # a rewind's target
    assert int(restored["step"]) == 4 and data_state == {"s": 4}
    checkpointer.close()


def test_time_based_saving(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, every_steps=0, every_minutes=0.5 / 60, keep_last=5)
    assert not checkpointer.maybe_save(1, small_state(1), {}, "{}")
    time.sleep(0.6)
    assert checkpointer.maybe_save(2, small_state(2), {}, "{}")
    assert not checkpointer.maybe_save(3, small_state(3), {}, "{}")
    assert checkpointer.maybe_save(4, small_state(4), {}, "{}", force=True)
    checkpointer.close()
    assert checkpointer.all_steps() == [2, 4]


def corrupt_by_truncation(step_dir: Path) -> None:
    """Cut every array data file of the state item in half (what a crash during a copy leaves behind)."""
    data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.name]
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_state_item(step_dir: Path) -> None:
    """An incomplete step: its data and config are there but the array item never finished."""
    for path in sorted((step_dir / "state").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (step_dir / "state").rmdir()


@pytest.mark.parametrize("damage", [corrupt_by_truncation, remove_state_item],
                         ids=["truncated", "incomplete"])
def test_unreadable_latest_falls_back_to_previous(tmp_path, caplog, damage):
    directory = tmp_path / "checkpoints"
    checkpointer = ckpt.Checkpointer(directory, every_steps=2, keep_last=3)
    for step in (2, 4):
        checkpointer.maybe_save(step, small_state(step), {"position": step}, json.dumps({"step": step}))
    checkpointer.close()
    damage(directory / "4")

    checkpointer = ckpt.Checkpointer(directory, every_steps=2, keep_last=3)
    with caplog.at_level(logging.WARNING, logger="plamo_jax.train.checkpoint"):
        state, data_state = checkpointer.restore_latest(abstract_small())
    assert int(state["step"]) == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((8, 4), 2.0))
    assert any(str(directory / "4") in record.getMessage() for record in caplog.records)
    # The unreadable step is kept aside, not deleted, and training can write that step again.
    kept = list((tmp_path / "checkpoints_unreadable").iterdir())
    assert [p.name.split("_")[0] for p in kept] == ["4"]
    assert checkpointer.maybe_save(4, small_state(40), {"position": 4}, "{}")
    checkpointer.wait_until_finished()
    state, data_state = checkpointer.restore_latest(abstract_small())
    assert int(state["step"]) == 40 and data_state == {"position": 4}
    checkpointer.close()


def test_changed_model_is_an_error_not_a_fallback(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = ckpt.Checkpointer(directory, every_steps=1, keep_last=3)
    checkpointer.maybe_save(1, small_state(1), {}, "{}")
    checkpointer.wait_until_finished()
    wider = abstract_small()
    wider["params"]["w"] = jax.ShapeDtypeStruct((8, 5), np.float32, sharding=wider["step"].sharding)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"w: stored \(8, 4\) vs model \(8, 5\)"):
        checkpointer.restore_latest(wider)
    assert checkpointer.all_steps() == [1] and (directory / "1").is_dir()
    checkpointer.close()


def test_only_unreadable_checkpoints_is_an_error(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = ckpt.Checkpointer(directory, every_steps=1, keep_last=3)
    checkpointer.maybe_save(1, small_state(1), {}, "{}")
    checkpointer.close()
    remove_state_item(directory / "1")
    checkpointer = ckpt.Checkpointer(directory, every_steps=1, keep_last=3)
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint is readable \(steps \[1\]: step 1: "):
        checkpointer.restore_latest(abstract_small())
    assert (directory / "1").is_dir()
    checkpointer.close()


def test_no_checkpoint_restores_none(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path / "empty", every_steps=1, keep_last=1)
    assert checkpointer.restore_latest(abstract_small()) is None
    unplaced = {**abstract_small(), "step": jax.ShapeDtypeStruct((), np.int32)}
    with pytest.raises(ValueError, match=r"\['step'\]"):
        checkpointer.restore_latest(unplaced)
    checkpointer.close()


def test_config_saved_before_a_new_key_loads_with_its_default(tmp_path, caplog):
    config = json.loads(small_config().to_json())
    del config["model"]["remat"]
    config["model"]["retired_option"] = 1
    config["model"]["full_attention_layers"] = [1]
    ckpt.save_params(tmp_path / "params", {"w": np.zeros(2, np.float32)}, config)
    with caplog.at_level(logging.WARNING, logger="plamo_jax.train.checkpoint"):
        loaded = ckpt.load_config(tmp_path / "params")
    assert loaded.model.remat == "none" and loaded.model.full_attention_layers == (1,)
    assert "model.retired_option" in caplog.text


def test_previous_checkpoint_survives_until_the_next_is_committed(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, every_steps=1, keep_last=1)
    big = {"step": jax.numpy.int32(1), "params": {"w": jax.numpy.ones((512, 1024))}}
    checkpointer.maybe_save(1, big, {}, "{}")
    checkpointer.wait_until_finished()
    checkpointer.maybe_save(2, big, {}, "{}")  # returns while step 2 is still being written
    checkpointer.vouch(3)  # step 1 may go now, but not before step 2 is complete
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Step 1 is looked at first: if it is gone, step 2 must already be in place (renamed when complete).
        previous_exists = (tmp_path / "1").is_dir()
        assert previous_exists or (tmp_path / "2").is_dir()
        if not previous_exists:
            break
        time.sleep(0.001)
    checkpointer.wait_until_finished()
    checkpointer.vouch(3)
    assert checkpointer.all_steps() == [2] and not (tmp_path / "1").exists()
    checkpointer.close()
