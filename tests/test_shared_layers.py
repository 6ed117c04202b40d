"""One layer called twice in one training step (weight sharing).

BN, Batch Renorm and CBN: two calls in one apply are two normalization steps:
outputs and state equal two sequential steps, and the gradient is the sum of
the two steps' gradients (same params), bit for bit. MABN cannot: its second step's
backward pass needs the first one's ``Psi``, which the same backward pass
computes later; a second training call raises at trace time.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj


class Twice(nn.Module):
  """``layer(x1)`` and ``layer(x2)`` with one layer (shared variables)."""

  layer: nn.Module

  @nn.compact
  def __call__(self, x1, x2, train: bool):
    layer = self.layer  # a module field: the child 'layer'
    return (layer(x1, use_running_average=not train), layer(x2, use_running_average=not train))


class Once(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x, train: bool):
    return self.layer(x, use_running_average=not train)


def _data(shape, seed):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape) * s + s, jnp.float32) for s in (1.0, 2.0)]


def _compare_with_sequential_steps(layer, shape):
  x1, x2 = _data(shape, 0)
  twice, once = Twice(layer), Once(layer)
  variables = twice.init(jax.random.key(0), x1, x2, train=True)
  out_shape = jax.eval_shape(lambda: once.apply(variables, x1, train=False)).shape
  rng = np.random.default_rng(2)
  g1, g2 = (jnp.asarray(rng.normal(size=out_shape), jnp.float32) for _ in range(2))

  def twice_loss(v):
    (y1, y2), mutated = twice.apply(v, x1, x2, train=True, mutable=["batch_stats"])
    return jnp.sum(y1 * g1) + jnp.sum(y2 * g2), (mutated, (y1, y2))

  def once_loss(v, x, g):
    y, mutated = once.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * g), (mutated, y)

  # Eager (op by op): both sides run the same float32 operations, so the
  # comparison is bit for bit (jitted, the two programs fuse differently).
  step_twice = mj.value_and_grad(twice_loss, has_aux=True)
  step_once = mj.value_and_grad(once_loss, has_aux=True)
  ((_, (y1, y2)), shared), grads = step_twice(variables)
  ((_, s1), first), grads1 = step_once(variables, x1, g1)
  ((_, s2), second), grads2 = step_once(first, x2, g2)

  chex.assert_trees_all_equal((y1, y2), (s1, s2))
  chex.assert_trees_all_equal(shared["batch_stats"], second["batch_stats"])
  chex.assert_trees_all_equal(grads, jax.tree.map(jnp.add, grads1, grads2))
  return shared


def test_batch_norm_called_twice_equals_two_sequential_steps():
  shared = _compare_with_sequential_steps(mj.BatchNorm(norm_batch_size=2), (4, 3))
  # Two EMA updates moved the running mean off its initial zeros.
  assert float(np.abs(shared["batch_stats"]["layer"]["mean"]).max()) > 0


def test_batch_renorm_called_twice_equals_two_sequential_steps():
  # The ramp starts at once so that r and d differ from (1, 0) in both steps.
  layer = mj.BatchRenorm(warmup_steps=0, ramp_steps=0, r_max=1.2, d_max=0.1, momentum=0.5)
  shared = _compare_with_sequential_steps(layer, (4, 3))
  assert int(shared["batch_stats"]["layer"]["step"]) == 2


def test_cross_iteration_conv_norm_called_twice_equals_two_sequential_steps():
  # No burn-in: the second call pools the first call's compensated entry.
  layer = mj.CrossIterationConvNorm(features=3, kernel_size=(3, 3), burn_in=0, window=3)
  shared = _compare_with_sequential_steps(layer, (2, 5, 5, 2))
  state = shared["batch_stats"]["layer"]["norm"]
  assert int(state["count"]) == 2 and int(state["step"]) == 2


def _mabn_step(model, variables, *inputs, method=None):
  def loss(v):
    out, mutated = model.apply(
      v,
      *inputs,
      train=True,
      mutable=["batch_stats"],
      **({} if method is None else {"method": method}),
    )
    return sum(jnp.sum(y) for y in jax.tree.leaves(out)), mutated

  return jax.jit(mj.value_and_grad(loss))(variables)


SECOND_CALL = r"MABN '{}'.*second time in training mode.*one layer instance per call"


def test_mabn_called_twice_in_one_training_step_raises_naming_the_layer():
  x = jnp.ones((4, 3))
  layer = mj.MABN(buffer_size=2, warmup_steps=0)
  variables = Once(layer).init(jax.random.key(0), x, train=True)
  with pytest.raises(ValueError, match=SECOND_CALL.format("layer")):
    _mabn_step(Twice(layer), variables, x, 2 * x)


def test_mabn_in_a_block_called_twice_raises_naming_the_layer():
  x = jnp.ones((4, 3))
  layer = mj.MABN(buffer_size=2, warmup_steps=0)

  class Outer(nn.Module):  # the same block, hence the same MABN, twice
    @nn.compact
    def __call__(self, x, train: bool):
      block = Once(layer, name="block")
      return block(x, train=train) + block(2 * x, train=train)

  variables = Outer().init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=SECOND_CALL.format("block/layer")):
    _mabn_step(Outer(), variables, x)


def test_mabn_model_applied_twice_in_one_step_raises():
  x = jnp.ones((4, 3))
  layer = mj.MABN(buffer_size=2, warmup_steps=0)
  variables = Once(layer).init(jax.random.key(0), x, train=True)
  with pytest.raises(ValueError, match=SECOND_CALL.format("layer")):
    _mabn_step(Once(layer), variables, x, method=lambda m, x, train: (m(x, train), m(2 * x, train)))


def test_mabn_called_once_per_step_over_several_steps_is_fine():
  x = jnp.ones((4, 3))
  layer = mj.MABN(buffer_size=2, warmup_steps=0)
  variables = Once(layer).init(jax.random.key(0), x, train=True)
  for _ in range(3):
    (_, variables), _ = _mabn_step(Once(layer), variables, x)
  assert int(variables["batch_stats"]["layer"]["step"]) == 3
  assert np.abs(np.asarray(variables["batch_stats"]["layer"]["psi_buffer"])).max() > 0


def test_mabn_forward_only_calls_twice_are_two_steps():
  # Without gradients no backward statistic is fed: two calls in one apply
  # advance the state exactly as two applies.
  x1, x2 = _data((4, 3), 3)
  layer = mj.MABN(buffer_size=2, warmup_steps=0)
  variables = Once(layer).init(jax.random.key(0), x1, train=True)
  (y1, y2), shared = Twice(layer).apply(variables, x1, x2, train=True, mutable=["batch_stats"])
  s1, first = Once(layer).apply(variables, x1, train=True, mutable=["batch_stats"])
  s2, second = Once(layer).apply({**variables, **first}, x2, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_equal((y1, y2, shared), (s1, s2, second))
