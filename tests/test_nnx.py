"""The Flax NNX modules equal the linen layers, directly and through nnx.bridge.

Each pair is a linear map or convolution followed by a normalizer, trained
for several steps from the same initial values with the package's training
contract (``mj.value_and_grad`` for linen, ``mj.nnx.value_and_grad`` for
NNX), eagerly and jitted: outputs, parameter gradients and every statistic
agree bit for bit (both sides run the same functional core).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import mabn_jax as mj

CIN, C = 2, 3
SPATIAL = (4, 4)

# name -> (linen first layer, linen norm, NNX first layer, NNX norm factory, input shape)
MABN_KW = dict(
  buffer_size=2, warmup_steps=2, renorm_start=3, r_max=1.2, momentum=0.9, norm_batch_size=2
)
BRN_KW = dict(warmup_steps=1, ramp_steps=2, r_max=1.3, d_max=0.2, momentum=0.8, norm_batch_size=2)
CBN_KW = dict(window=3, burn_in=1, momentum=0.8)


def _pairs():
  dense = lambda: nn.Dense(C, use_bias=False)
  ndense = lambda rngs: nnx.Linear(CIN, C, use_bias=False, rngs=rngs)
  return {
    "mabn": (
      lambda: mj.CenteredDense(C, use_bias=False),
      lambda: mj.MABN(**MABN_KW),
      lambda rngs: mj.nnx.CenteredDense(CIN, C, use_bias=False, rngs=rngs),
      lambda rngs: mj.nnx.MABN(C, **MABN_KW, rngs=rngs),
      (4, CIN),
    ),
    "bn": (
      dense,
      lambda: mj.BatchNorm(norm_batch_size=2, momentum=0.8),
      ndense,
      lambda rngs: mj.nnx.BatchNorm(C, norm_batch_size=2, momentum=0.8, rngs=rngs),
      (4, CIN),
    ),
    "brn": (
      dense,
      lambda: mj.BatchRenorm(**BRN_KW),
      ndense,
      lambda rngs: mj.nnx.BatchRenorm(C, **BRN_KW, rngs=rngs),
      (4, CIN),
    ),
    "cbn": (
      None,
      lambda: mj.CrossIterationConvNorm(C, (3, 3), use_bias=True, **CBN_KW),
      None,
      lambda rngs: mj.nnx.CrossIterationConvNorm(
        CIN, C, (3, 3), use_bias=True, **CBN_KW, rngs=rngs
      ),
      (2,) + SPATIAL + (CIN,),
    ),
    "cbn_centered_naive": (
      None,
      lambda: mj.CrossIterationConvNorm(
        C, (3, 3), centered=True, naive=True, norm_batch_size=1, **CBN_KW
      ),
      None,
      lambda rngs: mj.nnx.CrossIterationConvNorm(
        CIN, C, (3, 3), centered=True, naive=True, norm_batch_size=1, **CBN_KW, rngs=rngs
      ),
      (2,) + SPATIAL + (CIN,),
    ),
    "mabn_bfloat16": (
      lambda: nn.Dense(C, use_bias=False, dtype=jnp.bfloat16),
      lambda: mj.MABN(**MABN_KW, dtype=jnp.bfloat16),
      lambda rngs: nnx.Linear(CIN, C, use_bias=False, dtype=jnp.bfloat16, rngs=rngs),
      lambda rngs: mj.nnx.MABN(C, **MABN_KW, dtype=jnp.bfloat16, rngs=rngs),
      (4, CIN),
    ),
    "bn_bfloat16": (
      lambda: nn.Dense(C, use_bias=False, dtype=jnp.bfloat16),
      lambda: mj.BatchNorm(dtype=jnp.bfloat16),
      lambda rngs: nnx.Linear(CIN, C, use_bias=False, dtype=jnp.bfloat16, rngs=rngs),
      lambda rngs: mj.nnx.BatchNorm(C, dtype=jnp.bfloat16, rngs=rngs),
      (4, CIN),
    ),
    "centered_dense_bfloat16": (
      None,
      lambda: mj.CenteredDense(C, dtype=jnp.bfloat16),
      None,
      lambda rngs: mj.nnx.CenteredDense(CIN, C, dtype=jnp.bfloat16, rngs=rngs),
      (4, CIN),
    ),
    "cbn_exact_pooled": (
      None,
      lambda: mj.CrossIterationConvNorm(
        C, (3, 3), backward="exact", running_stats="pooled", norm_batch_size=1, **CBN_KW
      ),
      None,
      lambda rngs: mj.nnx.CrossIterationConvNorm(
        CIN,
        C,
        (3, 3),
        backward="exact",
        running_stats="pooled",
        norm_batch_size=1,
        **CBN_KW,
        rngs=rngs,
      ),
      (2,) + SPATIAL + (CIN,),
    ),
    "cbn_derivative_stride_2": (
      None,
      lambda: mj.CrossIterationConvNorm(C, (3, 3), derivative_stride=2, **CBN_KW),
      None,
      lambda rngs: mj.nnx.CrossIterationConvNorm(
        CIN, C, (3, 3), derivative_stride=2, **CBN_KW, rngs=rngs
      ),
      (2,) + SPATIAL + (CIN,),
    ),
    "cbn_bfloat16_derivatives": (
      None,
      lambda: mj.CrossIterationConvNorm(C, (3, 3), derivative_dtype=jnp.bfloat16, **CBN_KW),
      None,
      lambda rngs: mj.nnx.CrossIterationConvNorm(
        CIN, C, (3, 3), derivative_dtype=jnp.bfloat16, **CBN_KW, rngs=rngs
      ),
      (2,) + SPATIAL + (CIN,),
    ),
    "cbn_batch_backward": (
      None,
      lambda: mj.CrossIterationConvNorm(C, (3, 3), backward="batch", **CBN_KW),
      None,
      lambda rngs: mj.nnx.CrossIterationConvNorm(
        CIN, C, (3, 3), backward="batch", **CBN_KW, rngs=rngs
      ),
      (2,) + SPATIAL + (CIN,),
    ),
    "centered_conv": (
      None,
      lambda: mj.CenteredConv(C, (3, 3), strides=2),
      None,
      lambda rngs: mj.nnx.CenteredConv(CIN, C, (3, 3), strides=2, rngs=rngs),
      (2,) + SPATIAL + (CIN,),
    ),
  }


NAMES = list(_pairs())


class LinenNet(nn.Module):
  first: nn.Module | None
  norm: nn.Module

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.first is not None:
      x = self.first(x)
    if isinstance(self.norm, (nn.Conv, nn.Dense)):
      return self.norm(x)
    return self.norm(x, use_running_average=not train)


class NNXNet(nnx.Module):
  def __init__(self, first, norm):
    self.first = first
    self.norm = norm

  def __call__(self, x):
    if self.first is not None:
      x = self.first(x)
    return self.norm(x)


def _make(name, seed=0):
  """``(linen model, linen variables, NNX model with the same values, shape)``."""
  first, norm, nfirst, nnorm, shape = _pairs()[name]
  linen = LinenNet(first() if first else None, norm())
  variables = linen.init(jax.random.key(seed), jnp.zeros(shape))
  rngs = nnx.Rngs(seed + 1)
  model = NNXNet(nfirst(rngs) if nfirst else None, nnorm(rngs))
  _load(model, variables)
  return linen, variables, model, shape


def _load(model, variables):
  """Copies linen variables into the NNX model: the same paths, collection dropped."""
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))))
  loaded = set()
  for (_, *path), value in traverse_util.flatten_dict(dict(variables)).items():
    state[tuple(path)][...] = value
    loaded.add(tuple(path))
  assert loaded == set(state), sorted(set(state) ^ loaded)


def _nnx_values(model):
  return {
    path: np.asarray(v[...])
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))
  }


def _linen_values(variables):
  return {
    tuple(path): np.asarray(v)
    for (_, *path), v in traverse_util.flatten_dict(dict(variables)).items()
  }


def _assert_same(model, variables, step):
  nnx_values, linen_values = _nnx_values(model), _linen_values(variables)
  assert nnx_values.keys() == linen_values.keys()
  for path, value in linen_values.items():
    np.testing.assert_array_equal(nnx_values[path], value, err_msg=f"{path} at step {step}")
    assert nnx_values[path].dtype == value.dtype, path


def _batches(shape, out_shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  for t in range(steps):
    x = rng.normal(size=shape) * (1.0 + 0.5 * t) + 0.3
    yield jnp.asarray(x, jnp.float32), jnp.asarray(rng.normal(size=out_shape), jnp.float32)


def _linen_step(linen):
  def loss_fn(variables, x, g):
    y, mutated = linen.apply(variables, x, mutable=["batch_stats"])
    return jnp.sum(y * g), (mutated, y)

  return mj.value_and_grad(loss_fn, has_aux=True)


def _nnx_loss(model, x, g):
  y = model(x)
  return jnp.sum(y * g), y


def _linen_grads_as_nnx_paths(grads):
  return {tuple(p): np.asarray(v) for p, v in traverse_util.flatten_dict(dict(grads)).items()}


def _nnx_grads(grads):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}


def _train_and_compare(name, linen, variables, model, shape, nnx_step, steps=6):
  out_shape = jax.eval_shape(lambda: linen.apply(variables, jnp.zeros(shape), train=False)).shape
  linen_step = _linen_step(linen)
  for t, (x, g) in enumerate(_batches(shape, out_shape, steps), start=1):
    ((_, y_linen), variables), grads_linen = linen_step(variables, x, g)
    (_, y_nnx), grads_nnx = nnx_step(model, x, g)
    np.testing.assert_array_equal(y_nnx, y_linen, err_msg=f"{name}: y at step {t}")
    expected = _linen_grads_as_nnx_paths(grads_linen)
    got = _nnx_grads(grads_nnx)
    assert got.keys() == expected.keys()
    for path in expected:
      np.testing.assert_array_equal(
        got[path], expected[path], err_msg=f"{name}: grad {path} at step {t}"
      )
    _assert_same(model, variables, t)
  return variables


@pytest.mark.parametrize("name", NAMES)
def test_nnx_module_equals_linen_layer_bit_for_bit_over_training_steps(name):
  linen, variables, model, shape = _make(name)
  _assert_same(model, variables, 0)
  step = mj.nnx.value_and_grad(_nnx_loss, has_aux=True)
  variables = _train_and_compare(name, linen, variables, model, shape, step)
  if name == "mabn":  # the schedule reached renormalization and Psi was fed
    assert int(model.norm.step[...]) == 6
    assert np.abs(np.asarray(model.norm.psi_buffer[...])).min() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bridged_linen_model_trains_as_linen(name):
  linen, variables, _, shape = _make(name)
  bridged = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0)).lazy_init(jnp.zeros(shape))
  _load(bridged, {k: v for k, v in variables.items()})

  def loss(model, x, g):
    y = model(x, mutable=["batch_stats"])
    return jnp.sum(y * g), y

  step = mj.nnx.value_and_grad(loss, has_aux=True)
  trained = _train_and_compare(name, linen, variables, bridged, shape, step)
  assert all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree.leaves(trained))
  if "batch_stats" in variables:  # training moved the statistics (compared above)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(trained["batch_stats"])
    assert not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_bridged_mabn_holds_its_tap_as_backward_stat_next_to_psi_buffer():
  x = jnp.ones((4, C))
  bridged = nnx.bridge.ToNNX(mj.MABN(use_running_average=False), rngs=nnx.Rngs(0))
  bridged = bridged.lazy_init(x)
  assert isinstance(bridged.psi_increment, mj.nnx.BackwardStat)
  assert isinstance(bridged.psi_buffer, nnx.BatchStat)
  assert bridged.psi_increment[...].shape == bridged.psi_buffer[...].shape == (16, C)


def test_nnx_state_types_and_names_follow_the_linen_collections():
  model = mj.nnx.MABN(C, rngs=nnx.Rngs(0))
  kinds = {
    path[0]: type(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))
  }
  assert kinds == {
    "scale": nnx.Param,
    "bias": nnx.Param,
    "chi_ema": nnx.BatchStat,
    "chi_buffer": nnx.BatchStat,
    "psi_buffer": nnx.BatchStat,
    "step": nnx.BatchStat,
    "nonfinite_count": nnx.BatchStat,
    "psi_increment": mj.nnx.BackwardStat,
  }
  # Counters are float32, like the statistics (mabn_jax.functional.counters).
  assert model.step[...].dtype == jnp.float32 and model.chi_buffer[...].dtype == jnp.float32
  assert model.nonfinite_count[...].dtype == jnp.float32
  no_affine = mj.nnx.BatchNorm(C, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
  assert no_affine.scale is None and no_affine.bias is None
  assert set(dict(nnx.to_flat_state(nnx.state(no_affine, nnx.Param)))) == set()


def test_train_and_eval_switch_the_mode():
  model = NNXNet(None, mj.nnx.BatchNorm(C, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, C)) + 2.0, jnp.float32)
  model.eval()
  assert model.norm.use_running_average is True
  np.testing.assert_allclose(model(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
  np.testing.assert_array_equal(model.norm.mean[...], 0.0)
  model.train()
  assert model.norm.use_running_average is False
  model(x)
  assert np.abs(np.asarray(model.norm.mean[...])).min() > 0
  model.norm(x, use_running_average=True)  # the call argument wins


@pytest.mark.parametrize("name", NAMES)
def test_jitted_nnx_step_equals_jitted_linen_step(name):
  linen, variables, model, shape = _make(name)
  out_shape = jax.eval_shape(lambda: linen.apply(variables, jnp.zeros(shape), train=False)).shape
  linen_step = jax.jit(_linen_step(linen))
  nnx_step = nnx.jit(mj.nnx.value_and_grad(_nnx_loss, has_aux=True))
  for t, (x, g) in enumerate(_batches(shape, out_shape, 4), start=1):
    ((_, y_linen), variables), grads_linen = linen_step(variables, x, g)
    (_, y_nnx), grads_nnx = nnx_step(model, x, g)
    np.testing.assert_array_equal(y_nnx, y_linen, err_msg=f"{name}: y at step {t}")
    expected = _linen_grads_as_nnx_paths(grads_linen)
    got = _nnx_grads(grads_nnx)
    for path in expected:
      np.testing.assert_array_equal(
        got[path], expected[path], err_msg=f"{name}: grad {path} at step {t}"
      )
    _assert_same(model, variables, t)


@pytest.mark.parametrize(
  "linen_cls,nnx_cls,renamed",
  [
    (mj.MABN, mj.nnx.MABN, {}),
    (mj.BatchNorm, mj.nnx.BatchNorm, {}),
    (mj.BatchRenorm, mj.nnx.BatchRenorm, {}),
    (mj.CrossIterationConvNorm, mj.nnx.CrossIterationConvNorm, {"features": "out_features"}),
  ],
)
def test_nnx_modules_take_every_linen_field_with_its_default(linen_cls, nnx_cls, renamed):
  import dataclasses
  import inspect

  parameters = inspect.signature(nnx_cls.__init__).parameters
  for field in dataclasses.fields(linen_cls):
    if field.name in ("parent", "name"):
      continue
    name = renamed.get(field.name, field.name)
    assert name in parameters, f"{nnx_cls.__name__} lacks {name}"
    default = parameters[name].default
    if field.default is not dataclasses.MISSING and name != "use_running_average":
      if callable(field.default):  # initializers: same values, not the same object
        assert callable(default), name
      else:
        assert default == field.default, (name, default, field.default)
