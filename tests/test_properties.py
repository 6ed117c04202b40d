"""Property tests (hypothesis + chex) of every normalizer's invariants.

Drawn: layer kind, batch of ``groups * group_size`` samples (normalization
groups on or off), spatial shape, channels, feature axis, input dtype
(float32, bfloat16, float16), ``dtype`` (None: inferred, or the input's),
schedule settings and number of training steps. Checked for every draw:

* output shape and dtype (``dtype`` or Flax's inference from input and params);
* after finite input, every ``'batch_stats'`` leaf is finite, float32 (or
  int32) and ``nonfinite_count`` is 0;
* inference equals the folded per-channel affine map (``mabn_jax.fold``);
* a jitted training step equals the same step without jit.

Tolerances are relative to the largest magnitude: ``1e-5`` for float32
outputs and ``3e-2`` for half-precision ones (one rounding of a bf16 output
is up to 2^-8). Examples are capped (``max_examples``, no deadline) to keep
the file fast.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mabn_jax as mj
from mabn_jax.fold import affine_of_normalizer, fold_conv

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SETTINGS = settings(
  max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _tol(dtype):
  return 1e-5 if dtype == jnp.float32 else 3e-2


def _close(a, b, tol, what=""):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  bound = tol * (np.max(np.abs(b), initial=0.0) + 1.0)
  assert np.max(np.abs(a - b), initial=0.0) <= bound, (what, np.max(np.abs(a - b)), bound)


@st.composite
def layer_cases(draw):
  kind = draw(st.sampled_from(["MABN", "BatchNorm", "BatchRenorm", "CBN"]))
  groups = draw(st.integers(1, 3))
  group_size = draw(st.sampled_from([1, 2, 3]))
  use_groups = draw(st.booleans())
  spatial = draw(st.sampled_from([(3,), (2, 3)] if kind == "CBN" else [(), (3,), (2, 3)]))
  channels = draw(st.integers(1, 5))
  in_dtype = draw(st.sampled_from(DTYPES))
  out_dtype = draw(st.sampled_from([None, in_dtype]))
  momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
  steps = draw(st.integers(1, 4))
  common = dict(
    momentum=momentum, norm_batch_size=group_size if use_groups else None, dtype=out_dtype
  )
  rank = len(spatial) + 2
  if kind == "CBN":
    kernel = tuple(draw(st.integers(1, 3)) for _ in spatial)
    layer = mj.CrossIterationConvNorm(
      features=draw(st.integers(1, 4)),
      kernel_size=kernel,
      window=draw(st.integers(1, 3)),
      burn_in=draw(st.integers(0, 2)),
      centered=draw(st.booleans()),
      **common,
    )
  else:
    axis = draw(st.sampled_from([-1] + list(range(1, rank - 1))))
    common["axis"] = axis
    if kind == "MABN":
      layer = mj.MABN(
        buffer_size=draw(st.integers(1, 3)),
        warmup_steps=draw(st.integers(0, 3)),
        renorm_start=draw(st.integers(0, 3)),
        r_max=draw(st.sampled_from([1.0, 2.0])),
        **common,
      )
    elif kind == "BatchNorm":
      layer = mj.BatchNorm(**common)
    else:
      layer = mj.BatchRenorm(
        warmup_steps=draw(st.integers(0, 2)), ramp_steps=draw(st.integers(0, 2)), **common
      )
  shape = (groups * group_size,) + spatial + (channels,)
  return kind, layer, shape, in_dtype, steps, draw(st.integers(0, 2**16))


def _train_fn(layer):
  def loss_fn(variables, x, gy):
    y, mutated = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y.astype(jnp.float32) * gy), (mutated, y)

  def step(variables, x, gy):
    ((_, y), variables), grads = mj.value_and_grad(loss_fn, has_aux=True)(variables, x, gy)
    return y, variables, grads

  return step


def _randomize_params(params, key):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
    tree,
    [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)],
  )


@SETTINGS
@given(layer_cases())
def test_layer_invariants(case):
  kind, layer, shape, in_dtype, steps, seed = case
  key = jax.random.key(seed)
  x = jax.random.normal(key, shape, jnp.float32).astype(in_dtype)
  variables = layer.init(jax.random.key(1), x, use_running_average=False)
  variables = {**variables, "params": _randomize_params(variables["params"], key)}
  step = _train_fn(layer)
  jitted = jax.jit(step)

  for t in range(steps):
    xt = (jax.random.normal(jax.random.fold_in(key, t), shape) * (1 + t)).astype(in_dtype)
    y = jax.eval_shape(step, variables, xt, jnp.ones(()))[0]  # the output shape
    gy = jax.random.normal(jax.random.fold_in(key, 100 + t), y.shape)
    y_jit, new_jit, grads_jit = jitted(variables, xt, gy)
    if t == steps - 1:  # jit equals no-jit (one eager step: it is slow)
      y_eager, new_eager, grads_eager = step(variables, xt, gy)
      tol = _tol(y_jit.dtype)
      _close(y_jit, y_eager, tol, "output")
      for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path((new_jit, grads_jit)),
        jax.tree_util.tree_leaves((new_eager, grads_eager)),
        strict=True,
      ):
        _close(a, b, max(tol, 1e-4), jax.tree_util.keystr(path))
    variables = new_jit

  # Output shape and dtype.
  expected_dtype = layer.dtype or jnp.promote_types(in_dtype, jnp.float32)
  assert y_jit.dtype == expected_dtype
  if kind == "CBN":
    assert y_jit.shape[0] == shape[0] and y_jit.shape[-1] == layer.features
  else:
    assert y_jit.shape == shape
  # Finite float32 state, nothing skipped.
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]):
    assert leaf.dtype in (jnp.float32, jnp.int32), jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(leaf))), jax.tree_util.keystr(path)
  assert mj.nonfinite_counts(variables) == {"": 0} or all(
    v == 0 for v in mj.nonfinite_counts(variables).values()
  )

  # Inference equals the folded affine map.
  y_inf = jax.jit(lambda v, x: layer.apply(v, x, use_running_average=True))(variables, x)
  assert y_inf.dtype == expected_dtype
  x64 = np.asarray(x, np.float64)
  if kind == "CBN":
    folded = fold_conv(
      variables["params"]["conv"],
      variables["params"]["norm"],
      variables["batch_stats"]["norm"],
      layer.epsilon,
      layer.centered,
    )
    conv = nn.Conv(layer.features, layer.kernel_size, padding=layer.padding, use_bias=True)
    expected = conv.apply({"params": folded}, jnp.asarray(x, jnp.float32))
  else:
    scale, shift = affine_of_normalizer(
      variables["params"], variables["batch_stats"], layer.epsilon
    )
    axis = layer.axis % len(shape)
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    expected = x64 * scale.reshape(bshape) + shift.reshape(bshape)
  _close(y_inf, expected, _tol(expected_dtype), "inference vs folded map")


@st.composite
def registry_shapes(draw):
  groups = draw(st.integers(1, 2))
  group_size = draw(st.sampled_from([1, 2]))
  size = draw(st.sampled_from([3, 4]))
  cin = draw(st.integers(1, 3))
  dtype = draw(st.sampled_from(DTYPES))
  return groups, group_size, size, cin, dtype, draw(st.booleans())


class Block(nn.Module):
  normalizer: mj.Normalizer
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    return self.normalizer.conv_norm(self.features, 3, name="block")(x, train=train)


REGISTRY_SETTINGS = settings(
  max_examples=1, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
GROUPED = ("bn", "brn", "mabn", "cbn", "cbn_naive")


@pytest.mark.parametrize("name", mj.normalizer_names())
@REGISTRY_SETTINGS
@given(case=registry_shapes())
def test_registry_entry_invariants(name, case):
  groups, group_size, size, cin, dtype, use_groups = case
  kwargs = {"num_groups": 2} if name in ("gn", "ws_gn") else {}
  if name in GROUPED and use_groups:
    kwargs["norm_batch_size"] = group_size
  if name in ("cbn", "cbn_naive"):
    kwargs.update(burn_in=1, window=2)
  if name == "mabn":
    kwargs.update(buffer_size=2, warmup_steps=1)
  if name != "none":
    kwargs["dtype"] = dtype
  normalizer = mj.make_normalizer(name, **kwargs)
  features = 4
  block = Block(normalizer, features)
  shape = (groups * group_size, size, size, cin)
  x = jax.random.normal(jax.random.key(groups + 7 * size), shape).astype(dtype)

  def loss_fn(variables, x):
    y, mutated = block.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.square(y.astype(jnp.float32))), (mutated, y)

  def step(variables, x):
    ((_, y), variables), grads = mj.value_and_grad(loss_fn, has_aux=True)(variables, x)
    return y, variables, grads

  if name == "syncbn":  # a single replica on its mapped axis
    mapped = jax.vmap(step, in_axes=(None, 0), axis_name="batch")
    step = lambda v, x: jax.tree_util.tree_map(lambda a: a[0], mapped(v, x[None]))
  variables = block.init(jax.random.key(0), x, train=True)
  for _ in range(2):
    y, variables, grads = jax.jit(step)(variables, x)
  y_eager, v_eager, g_eager = step(jax.tree_util.tree_map(jnp.asarray, variables), x)
  y_jit, v_jit, g_jit = jax.jit(step)(variables, x)
  tol = _tol(y_jit.dtype)
  _close(y_jit, y_eager, tol, "output")
  # Half-precision conv gradients depend on the summation order (jit fuses
  # differently), so gradients are compared in float32 only.
  compared = (v_jit, g_jit) if dtype == jnp.float32 else v_jit
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(compared),
    jax.tree_util.tree_leaves((v_eager, g_eager) if dtype == jnp.float32 else v_eager),
    strict=True,
  ):
    _close(a, b, max(tol, 1e-4), jax.tree_util.keystr(path))

  assert y_jit.shape == shape[:-1] + (features,)
  assert y_jit.dtype == (jnp.float32 if name == "none" else dtype)
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get("batch_stats", {})):
    assert leaf.dtype in (jnp.float32, jnp.int32), jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(leaf))), jax.tree_util.keystr(path)
  assert all(v == 0 for v in mj.nonfinite_counts(variables).values())

  # Inference equals the folded conv (a conv with bias, no normalization);
  # per-sample normalizers do not fold (mj.fold leaves them unchanged).
  y_inf = block.apply(variables, x, train=False)
  folded, twin = mj.fold(variables, normalizer)
  if name in ("gn", "ln", "in", "ws_gn", "frn", "none"):
    assert twin == normalizer
    return
  assert twin.name == "none"
  y_folded = Block(twin, features).apply(folded, jnp.asarray(x, jnp.float32), train=False)
  _close(y_inf, y_folded, _tol(y_inf.dtype), "inference vs folded conv")
