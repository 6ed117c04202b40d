"""Frozen BN: BatchNorm's inference map in training too, state and affine fixed."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mabn_jax as mj

C = 3
EPS = 1e-3


def _variables():
  rng = np.random.default_rng(0)
  return {
    "params": {
      "scale": jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=C), jnp.float32),
    },
    "batch_stats": {
      "mean": jnp.asarray(rng.normal(size=C), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.2, 3.0, C), jnp.float32),
    },
  }


def _reference(x, variables):
  p, s = variables["params"], variables["batch_stats"]
  x, mean, var = (np.asarray(a, np.float64) for a in (x, s["mean"], s["var"]))
  return (x - mean) / np.sqrt(var + EPS) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_training_output_gradients_and_state_are_those_of_the_frozen_inference_map():
  layer = mj.FrozenBatchNorm(epsilon=EPS)
  x = jax.random.normal(jax.random.key(0), (4, 5, C)) * 2.0 + 1.0
  bn_vars = nn.BatchNorm(use_running_average=True).init(jax.random.key(1), x)
  variables = {
    **_variables(),
    "batch_stats": {**_variables()["batch_stats"], "nonfinite_count": jnp.zeros((), jnp.int32)},
  }
  assert set(bn_vars["batch_stats"]) <= set(variables["batch_stats"])

  def loss(params, x):
    y, mutated = layer.apply(
      {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
    )
    return jnp.sum(y * jnp.arange(y.size).reshape(y.shape)), (y, mutated)

  (_, (y, mutated)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    variables["params"], x
  )
  np.testing.assert_allclose(y, _reference(x, variables), rtol=1e-5, atol=1e-5)
  for name, value in variables["batch_stats"].items():
    np.testing.assert_array_equal(mutated["batch_stats"][name], value)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_params))
  s = variables["batch_stats"]
  expected_gx = (
    np.arange(x.size).reshape(x.shape)
    * np.asarray(variables["params"]["scale"])
    / np.sqrt(np.asarray(s["var"]) + EPS)
  )
  np.testing.assert_allclose(g_x, expected_gx, rtol=1e-5)
  inference = layer.apply(variables, x, use_running_average=True)
  np.testing.assert_array_equal(inference, y)


def test_flax_batch_norm_variables_load_as_they_are():
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, C))
  bn = nn.BatchNorm(use_running_average=True, epsilon=EPS)
  variables = bn.init(jax.random.key(0), x)
  variables = {"params": _variables()["params"], "batch_stats": _variables()["batch_stats"]}
  expected = bn.apply(variables, x)
  frozen = mj.FrozenBatchNorm(epsilon=EPS)
  np.testing.assert_allclose(
    frozen.apply(variables, x, use_running_average=True), expected, rtol=1e-6, atol=1e-6
  )
  # Training writes the (unchanged) statistics, as flax.linen.BatchNorm's
  # training does: their collection must be mutable.
  with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
    frozen.apply(variables, x, use_running_average=False)
  _, updates = frozen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"]
  )


def test_nnx_frozen_batch_norm_equals_the_linen_layer_bit_for_bit():
  x = jax.random.normal(jax.random.key(3), (4, 6, C)) * 3.0
  variables = _variables()
  linen = mj.FrozenBatchNorm(epsilon=EPS)
  expected, _ = linen.apply(
    {
      **variables,
      "batch_stats": {**variables["batch_stats"], "nonfinite_count": jnp.zeros((), jnp.int32)},
    },
    x,
    use_running_average=False,
    mutable=["batch_stats"],
  )
  module = mj.nnx.FrozenBatchNorm(C, epsilon=EPS, rngs=nnx.Rngs(0))
  for name, value in {**variables["params"], **variables["batch_stats"]}.items():
    getattr(module, name)[...] = value
  np.testing.assert_array_equal(module(x), expected)
  np.testing.assert_array_equal(module.mean[...], variables["batch_stats"]["mean"])


def test_frozen_batch_norm_folds_into_its_convolution():
  normalizer = mj.make_normalizer("frozen_bn", epsilon=EPS)

  class Net(nn.Module):
    norm: mj.Normalizer

    @nn.compact
    def __call__(self, x, train):
      return self.norm.conv_norm(C, 3, name="block")(x, train=train)

  x = jax.random.normal(jax.random.key(4), (2, 5, 5, 2))
  variables = Net(normalizer).init(jax.random.key(0), x, train=False)
  stats = _variables()["batch_stats"]
  variables = {
    **variables,
    "batch_stats": {"block": {"norm": {**variables["batch_stats"]["block"]["norm"], **stats}}},
  }
  expected = Net(normalizer).apply(variables, x, train=False)
  folded, none = mj.fold(variables, normalizer)
  np.testing.assert_allclose(
    Net(none).apply(folded, x, train=False), expected, rtol=1e-5, atol=1e-5
  )
