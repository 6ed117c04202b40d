"""MABN under ``jax.shard_map`` with replicated state (``in_specs``/``out_specs`` ``P()``).

On the 8 fake CPU devices of tests/conftest.py. Per-device statistics cannot
live in replicated state: plain MABN raises a ``ValueError`` naming the layer
and both fixes (per-device state, or ``axis_name``) instead of JAX's custom-VJP
type error. With ``axis_name='batch'`` the statistics are synchronized and the
replicated step trains like one device on the whole batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mabn_jax as mj

DEVICES = 8
MABN = dict(buffer_size=2, warmup_steps=1, renorm_start=2)


class Net(nn.Module):
  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.normalizer.conv_norm(4, 3, name="block")(x, train=train)
    return nn.Dense(2, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _step(model, axis):
  """One SGD step; under ``shard_map`` (``axis``) on the mean loss of all shards.

  The params are replicated, so their gradient is already reduced over the
  devices (shard_map transposes the implicit broadcast into a ``psum``).
  """

  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    loss = jnp.mean(jnp.square(out - y))
    return (jax.lax.pmean(loss, axis) if axis else loss), mutated

  def step(variables, x, y):
    (loss, variables), grads = mj.value_and_grad(loss_fn)(variables, x, y)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {**variables, "params": params}

  return step


def _data(steps=3):
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, 2 * DEVICES, 6, 6, 3)).astype(np.float32)
  xs *= 1.0 + np.repeat(np.arange(DEVICES, dtype=np.float32), 2).reshape(1, -1, 1, 1, 1)
  return xs, rng.normal(size=(steps, 2 * DEVICES, 2)).astype(np.float32)


def _replicated_shard_map(model):
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  step = jax.jit(
    jax.shard_map(
      _step(model, "batch"), mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P()
    )
  )
  split = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))
  return step, split, lambda t: jax.device_put(t, NamedSharding(mesh, P()))


def test_per_device_mabn_with_replicated_state_names_the_layer_and_the_fix():
  model = Net(mj.make_normalizer("mabn", **MABN))
  variables = model.init(jax.random.key(0), jnp.zeros((2, 6, 6, 3)), train=True)
  step, split, replicate = _replicated_shard_map(model)
  xs, ys = _data(1)
  with pytest.raises(ValueError) as info:
    step(replicate(variables), split(xs[0]), split(ys[0]))
  message = str(info.value)
  assert message.startswith("MABN 'block/norm': under jax.shard_map")
  assert "out_specs P('batch')" in message and "axis_name='batch'" in message
  assert "Custom VJP" not in message


def test_synchronized_mabn_with_replicated_state_equals_one_device_on_the_whole_batch():
  synced = Net(mj.make_normalizer("mabn", axis_name="batch", **MABN))
  single = Net(mj.make_normalizer("mabn", **MABN))
  variables = single.init(jax.random.key(0), jnp.zeros((2, 6, 6, 3)), train=True)
  step, split, replicate = _replicated_shard_map(synced)
  one = jax.jit(_step(single, None))
  a, b = replicate(variables), variables
  for x, y in zip(*_data(), strict=True):
    a, b = step(a, split(x), split(y)), one(b, x, y)
  norm_a, norm_b = a["batch_stats"]["block"]["norm"], b["batch_stats"]["block"]["norm"]
  assert int(norm_a["step"]) == int(norm_b["step"]) == 3
  for name in ("chi_ema", "chi_buffer", "psi_buffer"):
    np.testing.assert_allclose(norm_a[name], norm_b[name], rtol=1e-4, atol=1e-6, err_msg=name)
  for (path, p), q in zip(
    jax.tree_util.tree_leaves_with_path(a["params"]),
    jax.tree_util.tree_leaves(b["params"]),
    strict=True,
  ):
    np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_mabn_under_jit_with_a_batch_sharded_over_an_explicit_mesh_axis():
  # Over an explicit axis the batch's type is sharded, which the weight-centred
  # conv must not slice (it once failed with a ShardingTypeError).
  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  model = Net(mj.make_normalizer("mabn", **MABN))
  variables = model.init(jax.random.key(0), jnp.zeros((2, 6, 6, 3)), train=True)
  replicated = NamedSharding(mesh, P())
  sharded_step = jax.jit(_step(model, None), out_shardings=replicated)
  one = jax.jit(_step(model, None))
  a, b = jax.device_put(variables, replicated), variables
  for x, y in zip(*_data(), strict=True):
    a = sharded_step(a, *(jax.device_put(v, NamedSharding(mesh, P("batch"))) for v in (x, y)))
    b = one(b, x, y)
  for (path, p), q in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
  ):
    np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
