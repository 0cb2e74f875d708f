"""Checkpoints: round trip of the training state and metadata, retention, and incomplete directories.

Restoring a sharded state onto other mesh layouts is checked in tests/train_mesh_check.py (8 devices).
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.training.checkpointing import Checkpointer, prng_key_from_json, prng_key_to_json
from ftrl_jax.training.optim import make_optimizer
from ftrl_jax.training.train_state import create_train_state, shard_state, state_shardings
from tests.cached_models import init_params, one_device_mesh

CONFIG = models.preset("tiny", vocab_size=256, num_layers=2)
OPTIMIZER = make_optimizer(1e-3, weight_decay=0.1)


def _state(seed: int):
    """A state whose every leaf (step, params, both Adam moments, count) depends on `seed`."""
    state = create_train_state(init_params(CONFIG), OPTIMIZER)
    offset = float(seed)
    state = jax.tree.map(lambda x: x + jnp.asarray(offset, x.dtype), state)
    return shard_state(state, one_device_mesh())


def _assert_states_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_state_and_extra(tmp_path):
    state = _state(3)
    key = jax.random.PRNGKey(42)
    extra = {"data_position": 1234, "rng": prng_key_to_json(key), "note": "warm start"}
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.save(10, state, extra)
        checkpointer.wait()
        assert checkpointer.latest_step() == 10
        restored, restored_extra = checkpointer.restore(target_state=_state(0))
    _assert_states_equal(restored, state)
    assert int(restored.step) == 3
    assert restored_extra == extra
    np.testing.assert_array_equal(np.asarray(prng_key_from_json(restored_extra["rng"])), np.asarray(key))
    # Restored onto the target's layout.
    target_shardings = state_shardings(restored, one_device_mesh())
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(target_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_restore_from_abstract_target_and_by_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, _state(step), {"step": step})
        checkpointer.wait()
        abstract = jax.eval_shape(lambda: _state(0))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                state_shardings(abstract, one_device_mesh()))
        first, first_extra = checkpointer.restore(1, target_state=abstract)
        _assert_states_equal(first, _state(1))
        assert first_extra == {"step": 1}
        with pytest.raises(FileNotFoundError, match="step 5 .* complete steps: \\[1, 2\\]"):
            checkpointer.restore(5, target_state=abstract)


def test_state_is_copied_off_the_device_before_save_returns(tmp_path):
    state = _state(4)
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state)
        for leaf in jax.tree.leaves(state):  # what a donating train step does to its input
            leaf.delete()
        checkpointer.wait()
        restored, extra = checkpointer.restore(target_state=_state(0))
    assert extra == {}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_max_to_keep_and_reopening(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, _state(step), {"step": step})
        checkpointer.wait()
        assert checkpointer.all_steps() == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    with Checkpointer(tmp_path, max_to_keep=2) as reopened:
        assert reopened.latest_step() == 3
        restored, extra = reopened.restore(target_state=_state(0))
        assert extra == {"step": 3} and int(restored.step) == 3


def test_incomplete_checkpoints_are_never_the_latest(tmp_path, caplog):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(2, _state(2), {"step": 2})
    # A run killed mid-write leaves orbax's temporary directory; a cut-off copy leaves a step
    # directory without the commit marker. Both have higher steps than the real checkpoint.
    os.makedirs(tmp_path / "7.orbax-checkpoint-tmp-1700000000" / "state")
    os.makedirs(tmp_path / "9" / "state")
    (tmp_path / "9" / "state" / "partial").write_bytes(b"\0" * 16)

    with caplog.at_level(logging.WARNING):
        checkpointer = Checkpointer(tmp_path)
    assert checkpointer.latest_step() == 2
    warnings = caplog.text
    assert "7.orbax-checkpoint-tmp-1700000000" in warnings and "step 9 has no commit_success.txt" in warnings
    names = sorted(os.listdir(tmp_path))
    assert "9" not in names and any(n.startswith("9.incomplete-") for n in names), names  # kept, set aside
    assert not any("orbax-checkpoint-tmp" in n for n in names), names

    restored, extra = checkpointer.restore(target_state=_state(0))
    assert extra == {"step": 2} and int(restored.step) == 2
    # Later saves are not blocked by the incomplete step 9.
    assert checkpointer.save(3, _state(3), {"step": 3})
    checkpointer.close()
    assert Checkpointer(tmp_path).latest_step() == 3


def test_bad_extra_and_old_steps_are_reported(tmp_path, caplog):
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(ValueError, match="extra\\['rng'\\].*prng_key_to_json"):
            checkpointer.save(1, _state(1), {"rng": jax.random.PRNGKey(0)})
        assert checkpointer.save(5, _state(5))
        with caplog.at_level(logging.WARNING):
            assert not checkpointer.save(4, _state(4))
        assert "step 4 not saved" in caplog.text
        checkpointer.wait()
        assert checkpointer.all_steps() == [5]
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            Checkpointer(tmp_path / "empty").restore(target_state=_state(0))
