"""Tests of the training contract mj.value_and_grad."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict, freeze

import mabn_jax as mj


class FlaxBNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(1)(nn.relu(x))


class MABNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = mj.CenteredDense(6, use_bias=False)(x)
    x = mj.MABN(use_running_average=not train, buffer_size=2, warmup_steps=2)(x)
    return nn.Dense(1)(nn.relu(x))


def _data(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
    jnp.asarray(rng.normal(size=(n, 1)), jnp.float32),
  )


def _loss(model):
  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), mutated

  return loss_fn


def test_without_mabn_it_is_jax_value_and_grad_plus_batch_stats_update():
  model = FlaxBNNet()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=True)
  (loss, new_vars), grads = jax.jit(mj.value_and_grad(_loss(model)))(variables, x, y)

  def params_loss(params):
    return _loss(model)({**variables, "params": params}, x, y)

  (ref_loss, mutated), ref_grads = jax.value_and_grad(params_loss, has_aux=True)(
    variables["params"]
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(new_vars["batch_stats"], mutated["batch_stats"])
  chex.assert_trees_all_equal(new_vars["params"], variables["params"])
  assert "backward_stats" not in new_vars


def test_backward_statistic_is_written_to_batch_stats():
  model = MABNNet()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=True)
  assert set(variables) == {"params", "batch_stats", "backward_stats"}
  (loss, new_vars), grads = mj.value_and_grad(_loss(model))(variables, x, y)
  psi = new_vars["batch_stats"]["MABN_0"]["psi_buffer"]
  assert np.any(np.asarray(psi[-1]) != 0) and np.all(np.asarray(psi[0]) == 0)
  chex.assert_trees_all_equal(new_vars["backward_stats"], variables["backward_stats"])
  chex.assert_trees_all_equal_shapes(grads, variables["params"])
  assert int(new_vars["batch_stats"]["MABN_0"]["step"]) == 1


def test_has_aux_returns_aux_alongside_the_loss():
  model = MABNNet()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=True)

  def loss_fn(variables, x, y):
    loss, mutated = _loss(model)(variables, x, y)
    return loss, (mutated, {"twice": 2 * loss})

  ((loss, aux), new_vars), _ = mj.value_and_grad(loss_fn, has_aux=True)(variables, x, y)
  np.testing.assert_allclose(aux["twice"], 2 * loss)
  assert int(new_vars["batch_stats"]["MABN_0"]["step"]) == 1


def test_lax_scan_over_steps_equals_a_python_loop():
  model = MABNNet()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=True)
  step = mj.value_and_grad(_loss(model))
  xs = jnp.stack([x * (1 + i) for i in range(5)])

  def body(v, xi):
    (loss, v), grads = step(v, xi, y)
    return v, loss

  scanned, losses = jax.jit(lambda v: jax.lax.scan(body, v, xs))(variables)
  looped = variables
  for i in range(5):
    (loss, looped), _ = step(looped, xs[i], y)
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
  chex.assert_trees_all_close(scanned, looped, rtol=1e-5, atol=1e-6)


def test_frozen_dict_variables_stay_frozen():
  model = MABNNet()
  x, y = _data()
  variables = freeze(model.init(jax.random.key(0), x, train=True))
  (_, new_vars), _ = mj.value_and_grad(_loss(model))(variables, x, y)
  assert isinstance(new_vars, FrozenDict)


def test_missing_mutable_batch_stats_is_an_error():
  model = MABNNet()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=True)

  def loss_fn(variables, x, y):
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), {}

  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
    mj.value_and_grad(loss_fn)(variables, x, y)


def test_training_with_mabn_reduces_the_loss():
  import optax

  model = MABNNet()
  x, y = _data(n=16)
  variables = model.init(jax.random.key(0), x, train=True)
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def train_step(variables, opt_state):
    (loss, variables), grads = mj.value_and_grad(_loss(model))(variables, x, y)
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    variables = {**variables, "params": optax.apply_updates(variables["params"], updates)}
    return variables, opt_state, loss

  losses = []
  for _ in range(60):
    variables, opt_state, loss = train_step(variables, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_nonfinite_batch_keeps_state_and_is_counted():
  model = MABNNet()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=True)
  step = jax.jit(mj.value_and_grad(_loss(model)))
  (_, v1), _ = step(variables, x, y)
  (_, v2), _ = step(v1, x.at[0, 0].set(jnp.nan), y)
  stats1 = dict(v1["batch_stats"]["MABN_0"])
  stats2 = dict(v2["batch_stats"]["MABN_0"])
  assert int(stats2.pop("nonfinite_count")) == 1
  stats1.pop("nonfinite_count")
  chex.assert_trees_all_equal(stats1, stats2)
  assert mj.nonfinite_counts(v2) == {"MABN_0": 1}
  with pytest.raises(FloatingPointError, match="MABN_0"):
    mj.check_finite(v2)
  mj.check_finite(v1)


def test_value_and_grad_makes_the_taps_for_variables_with_params_and_batch_stats_only():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = mj.CenteredConv(4, (3, 3), use_bias=False)(x)
      return mj.MABN(buffer_size=2, warmup_steps=0, renorm_start=0)(
        x, use_running_average=not train
      )

  model = Net()
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
  variables = model.init(jax.random.key(1), x)
  full = dict(variables)
  partial = {k: variables[k] for k in ("params", "batch_stats")}

  def loss(v, x):
    y, mutated = model.apply(v, x, mutable=["batch_stats"])
    return jnp.mean(y**3), mutated

  (l_full, v_full), g_full = mj.value_and_grad(loss)(full, x)
  (l_part, v_part), g_part = mj.value_and_grad(loss)(partial, x)
  assert set(v_part) == {"params", "batch_stats"}  # the result keeps the caller's layout
  np.testing.assert_array_equal(l_part, l_full)
  chex.assert_trees_all_equal(g_part, g_full)
  chex.assert_trees_all_equal(v_part["batch_stats"], v_full["batch_stats"])
  assert np.abs(np.asarray(v_part["batch_stats"]["MABN_0"]["psi_buffer"])).max() > 0


def test_plain_grad_through_mabn_raises_also_when_its_input_is_not_differentiated():
  model = mj.MABN(buffer_size=2, warmup_steps=0)  # right after the input: x is data
  x = jax.random.normal(jax.random.key(0), (4, 3))
  variables = model.init(jax.random.key(1), x, use_running_average=False)

  def loss(params):
    y, _ = model.apply(
      {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
    )
    return jnp.sum(y**2)

  with pytest.raises(ValueError, match="backward statistic is not being fed"):
    jax.grad(loss)(variables["params"])
