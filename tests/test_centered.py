"""Tests of the weight-centralized CenteredConv and CenteredDense layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj


def test_centered_conv_equals_conv_with_the_centred_kernel():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  layer = mj.CenteredConv(4, (3, 3), strides=2, use_bias=True)
  variables = layer.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (3, 3, 3, 4)
  centred = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  expected = nn.Conv(4, (3, 3), strides=2).apply(
    {"params": {"kernel": centred, "bias": variables["params"]["bias"]}}, x
  )
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(np.asarray(centred), axis=(0, 1, 2)), 0.0, atol=1e-5)


def test_centered_dense_output_is_invariant_to_a_per_output_shift_of_the_kernel():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  layer = mj.CenteredDense(4, use_bias=False)
  variables = layer.init(jax.random.key(0), x)
  shifted = {"params": {"kernel": variables["params"]["kernel"] + jnp.arange(4.0)}}
  np.testing.assert_allclose(
    layer.apply(variables, x), layer.apply(shifted, x), rtol=1e-5, atol=1e-5
  )


def test_kernel_gradient_is_projected_to_zero_mean():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 3)), jnp.float32)
  layer = mj.CenteredConv(4, (3, 3))
  variables = layer.init(jax.random.key(0), x)
  grad = jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(variables)["params"]["kernel"]
  np.testing.assert_allclose(np.mean(np.asarray(grad), axis=(0, 1, 2)), 0.0, atol=1e-5)
  assert np.abs(np.asarray(grad)).max() > 1e-3


def test_centering_after_an_anchor_is_exact_for_every_input():
  kernel = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 2, 4)), jnp.float32)
  for first in (0.0, -2.5, np.inf, -np.inf, np.nan):
    anchor = jnp.full((2, 3), first, jnp.float32)
    np.testing.assert_array_equal(
      mj.functional.center_kernel(kernel, after=anchor), mj.functional.center_kernel(kernel)
    )
  grad = jax.grad(lambda k: jnp.sum(mj.functional.center_kernel(k, after=k) ** 3))(kernel)
  expected = jax.grad(lambda k: jnp.sum(mj.functional.center_kernel(k) ** 3))(kernel)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


def test_centered_conv_rejects_mask_and_conv_function_overrides():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ValueError, match="CenteredConv.*mask is not supported"):
    mj.CenteredConv(3, (3, 3), mask=jnp.ones((3, 3, 2, 3))).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="CenteredConv.*conv_general_dilated"):
    mj.CenteredConv(3, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated).init(
      jax.random.key(0), x
    )


def test_centered_kernels_are_not_all_live_at_once_in_a_training_step():
  # Each layer's centred kernel is computed when the layer runs, so a deep
  # stack of centred convs needs no more temporary memory than plain convs
  # plus one layer's kernel.
  def temp_bytes(conv_cls):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        for i in range(6):
          x = nn.relu(conv_cls(64, (3, 3), use_bias=False, name=f"c{i}")(x))
        return jnp.mean(x)

    x = jnp.ones((2, 4, 4, 64))
    params = Net().init(jax.random.key(0), x)
    step = jax.jit(
      lambda p, x: jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, jax.grad(Net().apply)(p, x)),
      donate_argnums=0,
    )
    return step.lower(params, x).compile().memory_analysis().temp_size_in_bytes

  kernel_bytes = 3 * 3 * 64 * 64 * 4
  assert temp_bytes(mj.CenteredConv) <= temp_bytes(nn.Conv) + 2 * kernel_bytes
