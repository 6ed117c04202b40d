"""The tools on an NNX model equal the tools on the same linen model.

Each NNX model is the registry's NNX twin of a linen model, loaded with the
linen model's variables after a few training steps; fold and precise BN then
give the same statistics, kernels and outputs in both APIs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mabn_jax as mj
from mabn_jax.fold import Folded
from test_nnx import _load
from test_nnx_registry import CIN, KWARGS, LinenBlock, NNXBlock

SHAPE = (4, 5, 5, CIN)
NAMES = ("bn", "brn", "mabn", "cbn")


def _trained(name):
  """A linen registry block after three training steps, its variables, and
  its NNX twin holding the same values."""
  normalizer = mj.make_normalizer(name, **KWARGS[name])
  linen = LinenBlock(normalizer, "conv")
  variables = linen.init(jax.random.key(0), jnp.zeros(SHAPE))

  def loss(v, x):
    y, mutated = linen.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.mean(y**2 + y), mutated

  step = jax.jit(mj.value_and_grad(loss))
  for i in range(3):
    x = jax.random.normal(jax.random.key(i + 1), SHAPE) * 2.0 + 0.5
    (_, variables), grads = step(variables, x)
    variables = {
      **variables,
      "params": jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads),
    }
  model = NNXBlock(normalizer, "conv", nnx.Rngs(1))
  _load(model, variables)
  return normalizer, linen, variables, model


def _batches(count=3):
  return [jax.random.normal(jax.random.key(10 + i), SHAPE) * 1.5 - 0.3 for i in range(count)]


def _nnx_stats(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


@pytest.mark.parametrize("name", NAMES)
def test_precise_bn_on_an_nnx_model_equals_it_on_the_linen_model(name):
  _, linen, variables, model = _trained(name)
  batches = _batches()
  expected = mj.recompute_batch_stats(linen.apply, variables, batches, train=True)
  assert mj.recompute_batch_stats(model, batches) is model
  got = _nnx_stats(model)
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected["batch_stats"]))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  assert set(map(str, flat_got)) == set(map(str, flat_expected))
  for path, value in flat_expected.items():
    np.testing.assert_allclose(flat_got[path], value, rtol=1e-6, atol=1e-6, err_msg=str(path))
  changed = [
    not np.allclose(value, flat)
    for value, flat in zip(
      jax.tree.leaves(variables["batch_stats"]),
      jax.tree.leaves(expected["batch_stats"]),
      strict=True,
    )
  ]
  assert any(changed)  # the recomputation did something


@pytest.mark.parametrize("name", NAMES)
def test_fold_on_an_nnx_model_equals_fold_on_the_linen_model(name):
  normalizer, linen, variables, model = _trained(name)
  x = _batches(1)[0]
  before = linen.apply(variables, x, train=False)
  folded, none = mj.fold(variables, normalizer)
  assert mj.fold(model) is model
  assert isinstance(model.block.norm, Folded)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, value in jax.tree_util.tree_leaves_with_path(folded["params"]):
    got = params
    for key in path:
      got = got[key.key]
    np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-7, err_msg=str(path))
  model.eval()
  np.testing.assert_allclose(model(x), before, rtol=1e-4, atol=1e-4)
  twin = LinenBlock(none, "conv")
  np.testing.assert_allclose(twin.apply(folded, x, train=False), before, rtol=1e-4, atol=1e-4)


def test_fold_of_nnx_pairs_by_path():
  class Plain(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(CIN, 3, (3, 3), use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.conv(x))

  model = Plain(nnx.Rngs(0))
  model.bn.mean[...] = jnp.array([0.1, -0.2, 0.3])
  model.bn.var[...] = jnp.array([0.5, 2.0, 1.5])
  model.bn.scale[...] = jnp.array([1.5, 0.5, -1.0])
  x = _batches(1)[0]
  before = model(x)
  mj.fold(model, pairs=[("conv", "bn")])
  np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-5)
  assert model.conv.bias is not None


LAYERS = {
  "BatchNorm": (mj.BatchNorm, mj.nnx.BatchNorm, dict(norm_batch_size=2)),
  "BatchRenorm": (mj.BatchRenorm, mj.nnx.BatchRenorm, dict(warmup_steps=0, ramp_steps=1)),
  "MABN": (mj.MABN, mj.nnx.MABN, dict(buffer_size=2, warmup_steps=0, renorm_start=0)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_hold_no_math_their_output_is_the_functional_methods(name):
  linen_cls, nnx_cls, kwargs = LAYERS[name]
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 3.0 + 1.0
  layer = linen_cls(**kwargs)
  variables = layer.init(jax.random.key(1), x, use_running_average=False)
  scale = jnp.linspace(0.5, 1.5, 5)
  bias = jnp.linspace(-1.0, 1.0, 5)
  variables = {**variables, "params": {"scale": scale, "bias": bias}}
  method = layer.functional()
  state = method.init(5)
  for step in range(3):  # the layer and the method step through the same states
    x_step = x * (step + 1)
    y, mutated = layer.apply(variables, x_step, use_running_average=False, mutable=["batch_stats"])
    expected, state, _ = method.train(x_step, state, scale=scale, bias=bias)
    np.testing.assert_array_equal(y, expected)
    for field, value in state._asdict().items():
      np.testing.assert_array_equal(mutated["batch_stats"][field], value, err_msg=field)
    variables = {**variables, **mutated}
  y = layer.apply(variables, x, use_running_average=True)
  np.testing.assert_array_equal(y, method.infer(x, state, scale=scale, bias=bias))
  module = nnx_cls(5, **kwargs, rngs=nnx.Rngs(0))
  assert module.functional() == method
  module.scale[...], module.bias[...] = scale, bias
  for field, value in state._asdict().items():
    getattr(module, field)[...] = value
  np.testing.assert_array_equal(module(x, use_running_average=True), y)


def _bn_trained():
  """The 'bn' block after three steps (linen variables) and its NNX twin."""
  normalizer, linen, variables, model = _trained("bn")
  return normalizer, variables, model


def test_conversion_of_an_nnx_model_equals_conversion_of_the_linen_variables():
  normalizer, variables, model = _bn_trained()
  expected, mabn = mj.convert_batch_norm(variables, normalizer, buffer_size=2, warmup_steps=1)
  assert mj.convert_batch_norm(model, name="mabn", buffer_size=2, warmup_steps=1) is model
  assert isinstance(model.block.norm, mj.nnx.MABN)
  assert isinstance(model.block.conv, mj.nnx.CenteredConv)
  for collection, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    got = dict(
      jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, variable_type)))
    )
    want = dict(jax.tree_util.tree_leaves_with_path(expected[collection]))
    assert set(map(str, got)) == set(map(str, want)), collection
    for path, value in want.items():
      np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  x = _batches(1)[0]
  model.eval()
  linen_mabn = LinenBlock(mabn, "conv")
  np.testing.assert_allclose(
    model(x), linen_mabn.apply(expected, x, train=False), rtol=1e-6, atol=1e-6
  )
  model.train()  # the converted model trains with the NNX training contract
  loss = lambda m, x: jnp.mean(m(x) ** 2)
  mj.nnx.value_and_grad(loss)(model, x)
  assert (
    int(model.block.norm.step[...]) == int(expected["batch_stats"]["block"]["norm"]["step"]) + 1
  )


def test_conversion_of_nnx_pairs_keeps_the_producer_when_the_target_is_not_centred():
  _, _, model = _bn_trained()
  conv = model.block.conv
  mj.convert_batch_norm(model, name="brn", pairs=[("block/conv", "block/norm")])
  assert model.block.conv is conv and isinstance(model.block.norm, mj.nnx.BatchRenorm)
  mj.convert_batch_norm(model, name="mabn")  # Batch Renorm keeps BN's mean/var too
  with pytest.raises(ValueError, match="not a BatchNorm"):  # MABN has no mean/var
    mj.convert_batch_norm(model, name="mabn")


def _loss_of_output(y):
  return jnp.mean(y**2 + y)


@pytest.mark.parametrize("name", ("bn", "brn", "mabn"))
def test_recording_on_an_nnx_model_equals_recording_on_the_linen_model(name):
  _, linen, variables, model = _trained(name)
  x = _batches(1)[0]

  def linen_loss(v, x):
    y, mutated = linen.apply(v, x, train=True, mutable=["batch_stats"])
    return _loss_of_output(y), mutated

  ((linen_value, new_variables), linen_grads), linen_stats = jax.jit(
    mj.recording.value_and_grad(linen_loss)
  )(variables, x)
  recorded = nnx.jit(mj.recording.value_and_grad(lambda m, x: _loss_of_output(m(x))))
  (nnx_value, nnx_grads), nnx_stats = recorded(model, x)

  names = mj.recording.MABN_STATISTICS if name == "mabn" else mj.recording.BN_STATISTICS
  assert set(linen_stats) == {"block/norm"} and set(nnx_stats) == {"block/norm"}
  assert set(nnx_stats["block/norm"]) == set(names)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), nnx_stats, linen_stats
  )
  assert np.abs(nnx_stats["block/norm"][names[-1]]).max() > 0  # a real backward signal
  np.testing.assert_allclose(nnx_value, linen_value, rtol=1e-6)
  np.testing.assert_allclose(
    nnx_grads["block"]["conv"]["kernel"][...],
    linen_grads["block"]["conv"]["kernel"],
    rtol=1e-5,
    atol=1e-7,
  )
  for field, value in _nnx_stats(model)["block"]["norm"].items():
    np.testing.assert_allclose(
      value, new_variables["batch_stats"]["block"]["norm"][field], rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", ("bn", "mabn"))
def test_recording_an_nnx_model_leaves_its_training_bitwise_identical(name):
  _, _, _, plain = _trained(name)
  _, _, _, recorded = _trained(name)
  loss = lambda m, x: _loss_of_output(m(x))
  plain_step = nnx.jit(mj.nnx.value_and_grad(loss))
  recorded_step = nnx.jit(mj.recording.value_and_grad(loss))
  own_call = type(recorded.block.norm).__dict__.get("__call__")
  for x in _batches(3):
    plain_value, plain_grads = plain_step(plain, x)
    (value, grads), statistics = recorded_step(recorded, x)
    np.testing.assert_array_equal(value, plain_value)
    jax.tree.map(
      np.testing.assert_array_equal, nnx.to_pure_dict(grads), nnx.to_pure_dict(plain_grads)
    )
    assert set(statistics) == {"block/norm"}
  jax.tree.map(
    np.testing.assert_array_equal,
    nnx.to_pure_dict(nnx.state(recorded)),
    nnx.to_pure_dict(nnx.state(plain)),
  )
  # The normalizer class is restored: its own __call__ as before the steps.
  assert type(recorded.block.norm).__dict__.get("__call__") is own_call


def test_recording_a_flax_nnx_batch_norm_equals_the_direct_computation():
  model = nnx.BatchNorm(3, epsilon=1e-5, rngs=nnx.Rngs(0))
  model.scale[...] = jnp.asarray([0.5, 2.0, -1.0])
  x = jax.random.normal(jax.random.key(3), (4, 5, 5, 3)) * 2.0 + 0.3
  target = jax.random.normal(jax.random.key(4), x.shape)
  loss = lambda m, x: jnp.mean((m(x) - target) ** 2)
  (_, _), statistics = mj.recording.value_and_grad(loss)(model, x)
  rec = statistics[""]
  xd = np.asarray(x, np.float64)
  mu = xd.mean(axis=(0, 1, 2))
  var = xd.var(axis=(0, 1, 2))
  xhat = (xd - mu) / np.sqrt(var + 1e-5)
  gamma = np.asarray([0.5, 2.0, -1.0])
  y = xhat * gamma
  g = 2.0 * (y - np.asarray(target, np.float64)) / xd.size * gamma
  np.testing.assert_allclose(rec["mu"][0], mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rec["var"][0], var, rtol=1e-5)
  np.testing.assert_allclose(rec["g"][0], g.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(rec["psi"][0], (xhat * g).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-9)


class _PlainNNX(nnx.Module):
  """Layers named freely, a cast between a conv and its norm, and a norm fed
  by a scaled conv output."""

  def __init__(self, scaled: bool, *, rngs):
    self.c1 = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.b1 = nnx.BatchNorm(4, rngs=rngs)
    self.stack = nnx.List([nnx.Conv(4, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)])
    self.scaled = scaled

  def __call__(self, x):
    y = nnx.relu(self.b1(self.c1(x).astype(jnp.float32)))
    z = self.stack[0](y)
    return self.stack[1](2.0 * z if self.scaled else z)


def _with_statistics(model):
  for i, (_, norm, _) in enumerate(mj.discovery.nnx_normalizers(model)):
    key = jax.random.key(20 + i)
    norm.mean[...] = jax.random.normal(key, norm.mean.shape)
    norm.var[...] = jax.random.uniform(jax.random.fold_in(key, 1), norm.var.shape) + 0.5
    norm.scale[...] = jax.random.normal(jax.random.fold_in(key, 2), norm.scale.shape)
  model.eval()
  return model


def test_fold_of_an_nnx_model_pairs_by_data_flow_and_keeps_its_output():
  model = _with_statistics(_PlainNNX(False, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(5), SHAPE[:3] + (3,))
  before = model(x)
  mj.fold(model, x=x)
  assert isinstance(model.b1, Folded) and isinstance(model.stack[1], Folded)
  np.testing.assert_allclose(model(x), before, rtol=1e-4, atol=1e-4)


def test_fold_by_data_flow_refuses_a_convolution_whose_output_also_feeds_another_layer():
  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      h = self.conv(x)
      return nnx.relu(self.bn(h)) + h  # folding would change the skip's h

  model = _with_statistics(Shared(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(5), SHAPE[:3] + (3,))
  before = model(x)
  with pytest.raises(ValueError, match="'bn' .*its input also feeds other computations"):
    mj.fold(model, x=x)
  assert isinstance(model.bn, nnx.BatchNorm)
  np.testing.assert_array_equal(model(x), before)


def test_fold_by_data_flow_refuses_an_operation_it_cannot_move():
  model = _with_statistics(_PlainNNX(True, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(5), SHAPE[:3] + (3,))
  with pytest.raises(ValueError, match=r"'stack/1' is fed by 'stack/0' through \['mul'\]"):
    mj.fold(model, x=x)
