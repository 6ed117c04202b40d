"""BN-to-MABN conversion: round trip, chi_ema = var + mean^2, fine-tuning runs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mabn_jax as mj
from mabn_jax.conversion import convert_batch_norm
from mabn_jax.functional.centering import center_kernel


class Net(nn.Module):
  """conv -> norm -> relu (x2) -> dense; ``mabn`` selects the MABN twin."""

  mabn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    for _ in range(2):
      if self.mabn:
        x = mj.CenteredConv(6, (3, 3), use_bias=False)(x)
        x = mj.MABN(use_running_average=not train, norm_batch_size=2)(x)
      else:
        x = nn.Conv(6, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _bn_checkpoint(x, zero_mean: bool):
  """A 'trained' BN model: centred kernels, random affine params and statistics."""
  variables = Net().init(jax.random.key(0), x)
  key = jax.random.key(1)
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: (
      center_kernel(a)
      if p[-1].key == "kernel" and a.ndim == 4
      else a + 0.3 * jax.random.normal(jax.random.fold_in(key, a.size), a.shape)
    ),
    variables["params"],
  )
  stats = jax.tree_util.tree_map_with_path(
    lambda p, a: (
      jnp.exp(0.4 * jax.random.normal(jax.random.fold_in(key, 7 + a.size), a.shape))
      if p[-1].key == "var"
      else (
        jnp.zeros_like(a) if zero_mean else jax.random.normal(jax.random.fold_in(key, 9), a.shape)
      )
    ),
    variables["batch_stats"],
  )
  return {"params": params, "batch_stats": stats}


def test_converted_chi_ema_is_var_plus_mean_squared_and_buffers_filled():
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  bn = _bn_checkpoint(x, zero_mean=False)
  target = Net(mabn=True).init(jax.random.key(3), x)
  new = convert_batch_norm(bn, target=target)
  src = bn["batch_stats"]
  for s, d in (("BatchNorm_0", "MABN_0"), ("BatchNorm_1", "MABN_1")):
    expected = np.asarray(src[s]["var"], np.float64) + np.asarray(src[s]["mean"], np.float64) ** 2
    state = new["batch_stats"][d]
    np.testing.assert_allclose(state["chi_ema"], expected, rtol=1e-6)
    np.testing.assert_allclose(state["chi_buffer"], np.broadcast_to(expected, (16, 6)), rtol=1e-6)
    np.testing.assert_array_equal(state["psi_buffer"], 0.0)
    assert int(state["step"]) == 100  # max(buffer_size 16, warmup_steps 100)
  # The converted tree has exactly the twin's structure and dtypes.
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == jax.tree.map(
    lambda a: (a.shape, a.dtype), target
  )
  # Params are copied: scale/bias and kernels.
  np.testing.assert_array_equal(
    new["params"]["MABN_1"]["scale"], bn["params"]["BatchNorm_1"]["scale"]
  )
  np.testing.assert_array_equal(
    new["params"]["CenteredConv_0"]["kernel"], bn["params"]["Conv_0"]["kernel"]
  )


def test_converted_model_eval_equals_batch_norm_eval_for_zero_mean_convs():
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  bn = _bn_checkpoint(x, zero_mean=True)
  new = convert_batch_norm(bn, target=Net(mabn=True).init(jax.random.key(3), x))
  out_bn = Net().apply(bn, x)
  out_mabn = Net(mabn=True).apply(new, x)
  np.testing.assert_allclose(out_mabn, out_bn, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(out_bn)).max() > 1e-2


def test_one_fine_tuning_step_runs_from_converted_checkpoint():
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 1])
  bn = _bn_checkpoint(x, zero_mean=False)
  model = Net(mabn=True)
  variables = convert_batch_norm(bn, target=model.init(jax.random.key(3), x))

  def loss_fn(v, x, labels):
    logits, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), mutated

  (loss, new_vars), grads = jax.jit(mj.value_and_grad(loss_fn))(variables, x, labels)
  assert np.isfinite(float(loss))
  state = new_vars["batch_stats"]["MABN_0"]
  assert int(state["step"]) == 101
  # The step used the moving averages: its psi rows were pushed (nonzero newest rows).
  assert np.abs(np.asarray(state["psi_buffer"][-2:])).max() > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_conversion_mismatch_errors_are_clear():
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  bn = _bn_checkpoint(x, zero_mean=False)

  class OneLayer(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = mj.CenteredConv(6, (3, 3), use_bias=False)(x)
      return mj.MABN(use_running_average=not train)(x)

  with pytest.raises(ValueError, match="2 BatchNorm layers"):
    convert_batch_norm(bn, target=OneLayer().init(jax.random.key(0), x))
  with pytest.raises(ValueError, match="exactly one"):
    convert_batch_norm(bn)


class RegistryNet(nn.Module):
  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(self.normalizer.conv_norm(6, 3, name="c1")(x, train=train))
    x = nn.relu(self.normalizer.conv_norm(6, 3, strides=2, name="c2")(x, train=train))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def test_registry_bn_model_converts_to_mabn_and_fine_tunes():
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  bn_norm = mj.make_normalizer("bn", norm_batch_size=2)
  bn_vars = RegistryNet(bn_norm).init(jax.random.key(0), x)
  key = jax.random.key(5)
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: (
      center_kernel(a)
      if p[-1].key == "kernel" and a.ndim == 4
      else a + 0.3 * jax.random.normal(jax.random.fold_in(key, a.size), a.shape)
    ),
    bn_vars["params"],
  )
  stats = jax.tree_util.tree_map_with_path(
    lambda p, a: (
      jnp.exp(0.4 * jax.random.normal(jax.random.fold_in(key, a.size + 1), a.shape))
      if p[-1].key == "var"
      else jnp.zeros_like(a)
    ),
    bn_vars["batch_stats"],
  )
  bn_vars = {"params": params, "batch_stats": stats}
  new_vars, mabn_norm = mj.convert_batch_norm(bn_vars, bn_norm, buffer_size=4)
  assert mabn_norm.name == "mabn" and mabn_norm.options["norm_batch_size"] == 2
  model = RegistryNet(mabn_norm)
  template = model.init(jax.random.key(1), x, train=True)  # the layout after training
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_vars) == jax.tree.map(
    lambda a: (a.shape, a.dtype), template
  )
  state = new_vars["batch_stats"]["c2"]["norm"]
  np.testing.assert_allclose(state["chi_ema"], stats["c2"]["norm"]["var"], rtol=1e-6)
  assert int(state["step"]) == 100  # max(buffer_size 4, warmup_steps 100)
  # Zero-mean conv outputs (centred kernels, mean 0): same eval output.
  np.testing.assert_allclose(
    model.apply(new_vars, x), RegistryNet(bn_norm).apply(bn_vars, x), rtol=1e-5, atol=1e-6
  )

  def loss_fn(v, x):
    out, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.mean(out**2), mutated

  (loss, after), grads = jax.jit(mj.value_and_grad(loss_fn))(new_vars, x)
  assert np.isfinite(float(loss))
  assert int(after["batch_stats"]["c1"]["norm"]["step"]) == 101
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
  with pytest.raises(ValueError, match="'bn' or 'syncbn'"):
    mj.convert_batch_norm(new_vars, mabn_norm)
