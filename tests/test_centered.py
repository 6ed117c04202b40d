"""Tests of the weight-centralized CenteredConv and CenteredDense layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mabn_jax as mj


def test_centered_conv_equals_conv_with_the_centred_kernel():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  layer = mj.CenteredConv(4, (3, 3), strides=2, use_bias=True)
  variables = layer.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (3, 3, 3, 4)
  centred = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  expected = nn.Conv(4, (3, 3), strides=2).apply(
      {"params": {"kernel": centred, "bias": variables["params"]["bias"]}}, x)
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(np.asarray(centred), axis=(0, 1, 2)), 0.0, atol=1e-5)


def test_centered_dense_output_is_invariant_to_a_per_output_shift_of_the_kernel():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  layer = mj.CenteredDense(4, use_bias=False)
  variables = layer.init(jax.random.key(0), x)
  shifted = {"params": {"kernel": variables["params"]["kernel"] + jnp.arange(4.0)}}
  np.testing.assert_allclose(layer.apply(variables, x), layer.apply(shifted, x),
                             rtol=1e-5, atol=1e-5)


def test_kernel_gradient_is_projected_to_zero_mean():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 3)), jnp.float32)
  layer = mj.CenteredConv(4, (3, 3))
  variables = layer.init(jax.random.key(0), x)
  grad = jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(variables)["params"]["kernel"]
  np.testing.assert_allclose(np.mean(np.asarray(grad), axis=(0, 1, 2)), 0.0, atol=1e-5)
  assert np.abs(np.asarray(grad)).max() > 1e-3
