"""MABN's backward-statistics tap has its own name, and old variables migrate.

The tap ``'backward_stats'/psi_increment`` updates ``'batch_stats'/psi_buffer``
by the rule of ``mj.TAP_TARGETS``; variables saved when the tap was named
``psi_buffer`` are rejected with a message naming ``mj.migrate_variables``,
which converts them.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import FrozenDict, freeze

import mabn_jax as mj

C = 3


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = mj.CenteredDense(C, use_bias=False)(x)
    x = mj.MABN(use_running_average=not train, buffer_size=2, warmup_steps=1, name="norm")(x)
    return nn.Dense(1)(x)


def _loss(model):
  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), mutated

  return loss_fn


def _data(t):
  rng = np.random.default_rng(t)
  return (
    jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    jnp.asarray(rng.normal(size=(4, 1)), jnp.float32),
  )


def _old_layout(variables):
  """The same variables as saved before the rename (tap named psi_buffer)."""
  flat = traverse_util.flatten_dict(dict(variables[mj.BACKWARD_STATS]))
  old = {path[:-1] + ("psi_buffer",): value for path, value in flat.items()}
  return {**variables, mj.BACKWARD_STATS: traverse_util.unflatten_dict(old)}


def _train(variables, steps=3):
  model = Net()
  step = jax.jit(mj.value_and_grad(_loss(model)))
  for t in range(steps):
    (_, variables), _ = step(variables, *_data(t))
  return variables


def test_tap_and_statistic_have_distinct_names_linked_by_tap_targets():
  variables = Net().init(jax.random.key(0), _data(0)[0], train=True)
  assert set(variables[mj.BACKWARD_STATS]["norm"]) == {mj.PSI_TAP} == {"psi_increment"}
  # CBN's backward='averaged' adds g_increment -> g_buffer.
  assert mj.TAP_TARGETS == {"psi_increment": "psi_buffer", "g_increment": "g_buffer"}
  assert "psi_buffer" in variables["batch_stats"]["norm"]
  trained = _train(variables)
  assert np.abs(np.asarray(trained["batch_stats"]["norm"]["psi_buffer"])).max() > 0
  np.testing.assert_array_equal(trained[mj.BACKWARD_STATS]["norm"][mj.PSI_TAP], 0.0)


def test_old_layout_is_rejected_by_the_layer_naming_migrate_variables():
  variables = _old_layout(Net().init(jax.random.key(0), _data(0)[0], train=True))
  with pytest.raises(
    ValueError,
    match=r"MABN 'norm'.*backward_stats/psi_buffer.*"
    r"psi_increment.*mabn_jax.migrate_variables",
  ):
    Net().apply(variables, _data(0)[0], train=False)


def test_old_layout_is_rejected_by_value_and_grad_naming_migrate_variables():
  variables = _old_layout(Net().init(jax.random.key(0), _data(0)[0], train=True))
  with pytest.raises(
    ValueError,
    match=r"value_and_grad.*backward_stats/norm/psi_buffer"
    r".*now named 'psi_increment'.*migrate_variables",
  ):
    mj.value_and_grad(_loss(Net()))(variables, *_data(0))


def test_feed_backward_statistics_rejects_old_and_unknown_tap_names():
  stats = {"norm": {"psi_buffer": jnp.zeros((2, C))}}
  with pytest.raises(ValueError, match=r"norm/psi_buffer.*migrate_variables"):
    mj.feed_backward_statistics(stats, {"norm": {"psi_buffer": jnp.ones((2, C))}})
  with pytest.raises(ValueError, match=r"unknown tap name 'other'.*psi_increment"):
    mj.feed_backward_statistics(stats, {"norm": {"other": jnp.ones((2, C))}})


def test_migrated_old_variables_train_exactly_as_new_ones():
  variables = Net().init(jax.random.key(0), _data(0)[0], train=True)
  trained = _train(variables, 2)
  migrated = mj.migrate_variables(_old_layout(trained))
  chex.assert_trees_all_equal(migrated, trained)
  chex.assert_trees_all_equal(_train(migrated), _train(trained))
  assert isinstance(mj.migrate_variables(freeze(_old_layout(trained))), FrozenDict)
  chex.assert_trees_all_equal(mj.migrate_variables(trained), trained)


def test_old_layout_orbax_checkpoint_restores_without_target_then_migrates(tmp_path):
  import orbax.checkpoint as ocp

  variables = _train(Net().init(jax.random.key(0), _data(0)[0], train=True), 2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "old", _old_layout(variables))
  checkpointer.wait_until_finished()
  restored = mj.migrate_variables(ocp.StandardCheckpointer().restore(tmp_path / "old"))
  restored = jax.tree.map(jnp.asarray, restored)
  chex.assert_trees_all_equal(restored, variables)
  chex.assert_trees_all_equal(_train(restored), _train(variables))
