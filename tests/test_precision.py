"""Half-precision activations, float32 statistics (Flax's dtype/param_dtype).

* Every registry normalizer with ``dtype=bfloat16`` or ``float16`` returns
  half-precision activations, keeps float32 params, and never stores a
  statistic in half precision (every ``'batch_stats'`` leaf is float32 or
  int32, after init and after training steps).
* 50 bf16 training steps stay within ``STATE_RTOL = 5e-2`` of float32 on the
  same data for every float leaf (``max|bf16 - f32| <= 5e-2 * max|f32|`` per
  leaf; measured deviations are <= 1.5e-2), the integer counters are equal,
  and the final loss is within ``LOSS_RTOL = 1e-1`` relative.
* Inputs of magnitude 1e4 and 1e-4 (float16, bfloat16, float32) give stored
  second moments / variances within ``MOMENT_RTOL = 1e-4`` of float64 NumPy
  on the same (rounded) inputs: no overflow (1e4^2 = 1e8 > float16 max) and
  no underflow (1e-8 < float16's smallest subnormal).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mabn_jax as mj

C = 8
SHAPE = (8, 8, 8, 3)
HALF = [jnp.bfloat16, jnp.float16]
STATE_RTOL = 5e-2
LOSS_RTOL = 1e-1
MOMENT_RTOL = 1e-4

KWARGS = {
  "bn": dict(norm_batch_size=2),
  "syncbn": {},
  "brn": dict(norm_batch_size=2, warmup_steps=5, ramp_steps=10),
  "gn": dict(num_groups=2),
  "ln": {},
  "in": {},
  "cbn": dict(burn_in=5, window=3, norm_batch_size=4),
  "cbn_naive": dict(burn_in=2, window=3),
  "mabn": dict(buffer_size=4, warmup_steps=5, renorm_start=10, norm_batch_size=2),
  "none": {},
  "frozen_bn": {},
  "ws_gn": dict(num_groups=2),
  "frn": {},
}


class Net(nn.Module):
  normalizer: mj.Normalizer
  dtype: object = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.normalizer.conv_norm(C, 3, name="block")(x, train=train)
    return nn.Dense(2, dtype=self.dtype, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _normalizer(name, dtype):
  # 'none' takes no layer kwargs (a conv with bias): its conv follows the input.
  kwargs = dict(KWARGS[name]) if name == "none" else dict(KWARGS[name], dtype=dtype)
  return mj.make_normalizer(name, **kwargs)


@functools.lru_cache(maxsize=None)
def _trainer(name, dtype):
  model = Net(_normalizer(name, dtype), dtype=dtype)
  tx = optax.sgd(0.05, momentum=0.9)

  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y)), (mutated, out)

  def step(variables, opt_state, x, y):
    ((loss, out), variables), grads = mj.value_and_grad(loss_fn, has_aux=True)(variables, x, y)
    if name == "syncbn":
      grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {**variables, "params": params}, opt_state, loss, out

  if name == "syncbn":  # a single replica on its mapped axis 'batch'
    mapped = jax.vmap(step, axis_name="batch")
    add, drop = (
      lambda t: jax.tree_util.tree_map(lambda a: a[None], t),
      lambda t: jax.tree_util.tree_map(lambda a: a[0], t),
    )
    step = lambda v, o, x, y: drop(mapped(add(v), add(o), add(x), add(y)))
  return model, tx, jax.jit(step)


def _batches(steps, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(3, 2))
  for _ in range(steps):
    x = rng.normal(size=SHAPE).astype(np.float32)
    yield x, np.tanh(x.mean((1, 2)) @ w).astype(np.float32)


def _train(name, dtype, steps):
  model, tx, step = _trainer(name, dtype)
  variables = model.init(jax.random.key(0), jnp.zeros(SHAPE, dtype), train=True)
  opt_state = tx.init(variables["params"])
  outs, loss = [], None
  for x, y in _batches(steps):
    variables, opt_state, loss, out = step(variables, opt_state, jnp.asarray(x, dtype), y)
    outs.append(out)
  return variables, float(jnp.mean(loss)), outs


def _assert_float32_statistics(variables):
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get("batch_stats", {})):
    assert leaf.dtype in (jnp.float32, jnp.int32), (jax.tree_util.keystr(path), leaf.dtype)
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
    assert leaf.dtype == jnp.float32, (jax.tree_util.keystr(path), leaf.dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", mj.normalizer_names())
def test_half_precision_activations_with_float32_params_and_statistics(name, dtype):
  model, _, _ = _trainer(name, dtype)
  variables = model.init(jax.random.key(0), jnp.zeros(SHAPE, dtype), train=True)
  _assert_float32_statistics(variables)
  variables, _, outs = _train(name, dtype, steps=3)
  _assert_float32_statistics(variables)
  block = _normalizer(name, dtype).conv_norm(C, 3)
  block_vars = {k: v["block"] for k, v in variables.items() if "block" in v}
  out_block = block.apply(block_vars, jnp.ones(SHAPE, dtype), train=False)
  expected = jnp.float32 if name == "none" else dtype
  assert out_block.dtype == expected
  assert outs[-1].dtype == dtype
  assert all(bool(jnp.all(jnp.isfinite(o.astype(jnp.float32)))) for o in outs)
  assert all(
    bool(jnp.all(jnp.isfinite(leaf)))
    for leaf in jax.tree_util.tree_leaves(variables.get("batch_stats", {}))
  )


@pytest.mark.parametrize("name", ["mabn", "bn", "brn", "cbn"])
def test_bf16_training_for_50_steps_stays_within_tolerance_of_float32(name):
  ref, ref_loss, _ = _train(name, jnp.float32, steps=50)
  low, low_loss, _ = _train(name, jnp.bfloat16, steps=50)
  _assert_float32_statistics(low)
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
  low_leaves = jax.tree_util.tree_leaves(low)
  assert len(ref_leaves) == len(low_leaves)
  by_path = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in ref_leaves}
  for (path, a), b in zip(ref_leaves, low_leaves, strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    where = jax.tree_util.keystr(path)
    if np.issubdtype(np.asarray(a).dtype, np.integer) or "step" in where or "count" in where:
      np.testing.assert_array_equal(a, b, err_msg=where)
    else:
      # CBN's offsets ``stat - d . W`` are differences of two values of the
      # statistic's size (``mu_offset`` is 0 up to rounding): their scale is
      # the statistic's.
      scale = np.abs(a).max()
      for offset, stat in (("'mu_offset'", "'mu_buffer'"), ("'nu_offset'", "'nu_buffer'")):
        if where.endswith(f"[{offset}]"):
          scale = max(scale, np.abs(by_path[where[: -len(offset) - 2] + f"[{stat}]"]).max())
      assert np.abs(a - b).max() <= STATE_RTOL * scale + 1e-6, where
  assert abs(low_loss - ref_loss) <= LOSS_RTOL * ref_loss


# --- large and tiny magnitudes ----------------------------------------------


def _cbn_identity(x):
  """A 1x1 CBN whose conv is the identity, so its statistics are x's."""
  return mj.CrossIterationConvNorm(
    features=x.shape[-1],
    kernel_size=(1, 1),
    burn_in=5,
    momentum=0.0,
    dtype=x.dtype,
    kernel_init=lambda key, shape, dtype: jnp.eye(shape[-1], dtype=dtype).reshape(shape),
  )


LAYERS = {
  "MABN": lambda x: mj.MABN(momentum=0.0, warmup_steps=5, buffer_size=2, dtype=x.dtype),
  "BatchNorm": lambda x: mj.BatchNorm(momentum=0.0, dtype=x.dtype),
  "BatchRenorm": lambda x: mj.BatchRenorm(momentum=0.0, dtype=x.dtype),
  "CBN": _cbn_identity,
}


@pytest.mark.parametrize("magnitude", [1e4, 1e-4])
@pytest.mark.parametrize(
  "dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=["f16", "bf16", "f32"]
)
@pytest.mark.parametrize("kind", LAYERS)
def test_large_and_tiny_inputs_do_not_overflow_or_underflow_the_second_moment(
  kind, dtype, magnitude
):
  rng = np.random.default_rng(5)
  raw = np.clip(rng.normal(size=(4, 3, 3, 4)), -3, 3) * magnitude
  x = jnp.asarray(raw, dtype)
  x64 = np.asarray(x, np.float64)  # the rounded inputs the layer sees
  layer = LAYERS[kind](x)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  out, mutated = jax.jit(
    lambda v, x: layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  )(variables, x)
  stats = mutated["batch_stats"]
  stats = stats.get("norm", stats)
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree_util.tree_leaves(stats))
  axes = (0, 1, 2)
  if kind == "MABN":
    stored = stats["chi_buffer"][-1]
    expected = np.mean(np.square(x64), axis=axes)
    normalized = x64 / np.sqrt(expected + 1e-5)
  else:
    stored = stats["var"]
    expected = np.var(x64, axis=axes)
    np.testing.assert_allclose(
      stats["mean"],
      np.mean(x64, axis=axes),
      rtol=MOMENT_RTOL,
      atol=MOMENT_RTOL * np.sqrt(expected).max(),
    )
    normalized = (x64 - np.mean(x64, axis=axes)) / np.sqrt(expected + 1e-5)
  assert np.all(np.isfinite(np.asarray(stored))) and np.all(np.asarray(stored) > 0)
  np.testing.assert_allclose(np.asarray(stored, np.float64), expected, rtol=MOMENT_RTOL)
  # The output is finite and near the float64 normalization (half-precision rounding).
  out = np.asarray(out, np.float64)
  assert out.dtype == np.float64 and np.all(np.isfinite(out))
  atol = {jnp.float32: 1e-4, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}[dtype]
  np.testing.assert_allclose(out, normalized, rtol=0, atol=atol)
