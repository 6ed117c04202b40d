"""Dynamic loss scaling for NNX models (mj.nnx.dynamic_scale_value_and_grad):
the unscaled step of mj.nnx.value_and_grad, and a non-finite step that leaves
the statistics untouched and backs the scale off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.training.dynamic_scale import DynamicScale

import mabn_jax as mj
from test_nnx_training import KW, Net, _data, _loss


def _stats(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


def _sgd(model, grads):
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))


def _scale(value):
  return DynamicScale(scale=jnp.float32(value), fin_steps=jnp.int32(0))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
def test_nnx_loss_scaling_gives_the_unscaled_step(jit):
  # From the third step on MABN's backward pass averages this step's Psi with
  # the stored ones, so a Psi left scaled (4096 times too large) would show.
  plain, scaled = Net(rngs=nnx.Rngs(0), **KW), Net(rngs=nnx.Rngs(0), **KW)
  plain_step = mj.nnx.value_and_grad(_loss)
  scaled_step = mj.nnx.dynamic_scale_value_and_grad(_loss, _scale(2.0**12))
  if jit:
    plain_step, scaled_step = nnx.jit(plain_step), nnx.jit(scaled_step)
  for t in range(6):
    loss, grads = plain_step(plain, *_data(t))
    result = scaled_step(scaled, *_data(t))
    assert bool(result.finite)
    np.testing.assert_allclose(result.aux, loss, rtol=1e-6)
    for (path, g), (_, h) in zip(
      nnx.to_flat_state(grads), nnx.to_flat_state(result.grad), strict=True
    ):
      np.testing.assert_allclose(h[...], g[...], rtol=1e-5, atol=1e-7, err_msg=str(path))
    for path, value in _stats(plain).items():
      np.testing.assert_allclose(_stats(scaled)[path], value, rtol=1e-5, atol=1e-7)
    _sgd(plain, grads)
    _sgd(scaled, result.grad)
  psi = _stats(scaled)[("norm", "psi_buffer")]
  assert np.count_nonzero(psi) > psi.size // 2  # the compared Psi were not trivially 0
  assert int(result.dynamic_scale.fin_steps) == 1  # the next scale after one finite step


def test_nnx_overflowing_step_leaves_statistics_bit_identical_and_backs_off():
  model = Net(rngs=nnx.Rngs(0), **KW)
  step = mj.nnx.dynamic_scale_value_and_grad(_loss, _scale(2.0**8))
  step(model, *_data(0))
  before = _stats(model)
  huge = 2.0**127  # its product with the loss overflows float32
  result = mj.nnx.dynamic_scale_value_and_grad(_loss, _scale(huge))(model, *_data(1))
  assert not bool(result.finite) and np.isfinite(float(result.aux))
  after = _stats(model)
  assert after.keys() == before.keys()
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))
  assert float(result.dynamic_scale.scale) == huge / 2
  assert int(result.dynamic_scale.fin_steps) == 0
