"""State across devices and transformations: pmap, donated jit, scan, micro-batches.

* ``pmap`` on the 8 fake CPU devices (tests/conftest.py): without
  ``axis_name`` each device keeps the statistics of its own data (they equal
  a single-device run on that shard and differ between devices); with
  ``axis_name`` every replica holds bit-identical statistics; params, updated
  from ``pmean``-ed gradients, stay bit-identical on all devices.
* ``jax.jit`` with the variables and optimizer state donated gives bit for
  bit the results of the undonated step, and the donated buffers are freed.
* ``lax.scan`` over steps equals a Python loop of the same step.
* Gradient accumulation (:func:`mabn_jax.accumulate_value_and_grad`):
  each micro-batch is one normalization step.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mabn_jax as mj

C = 4
SHAPE = (4, 6, 6, 3)  # per device
DEVICES = 8
KWARGS = {
  "bn": dict(norm_batch_size=2),
  "syncbn": {},
  "brn": dict(warmup_steps=1, ramp_steps=2),
  "gn": dict(num_groups=2),
  "ln": {},
  "in": {},
  "cbn": dict(burn_in=1, window=3),
  "cbn_naive": dict(burn_in=1, window=2),
  "mabn": dict(buffer_size=2, warmup_steps=2, renorm_start=3, norm_batch_size=2),
  "none": {},
  "frozen_bn": {},
  "ws_gn": dict(num_groups=2),
  "frn": {},
}
STATELESS = ("gn", "ln", "in", "ws_gn", "frn", "none")


class Net(nn.Module):
  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.normalizer.conv_norm(C, 3, name="block")(x, train=train)
    return nn.Dense(2, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _loss(model):
  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(out - y)), mutated

  return loss_fn


def _make_step(model, tx, axis_name=None):
  def step(variables, opt_state, x, y):
    (loss, variables), grads = mj.value_and_grad(_loss(model))(variables, x, y)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {**variables, "params": params}, opt_state, loss

  return step


def _data(steps, devices=None, seed=0):
  rng = np.random.default_rng(seed)
  lead = () if devices is None else (devices,)
  xs = rng.normal(size=(steps,) + lead + SHAPE).astype(np.float32)
  # Different scales per device, so per-device statistics really differ.
  if devices is not None:
    xs = xs * (1.0 + np.arange(devices, dtype=np.float32)).reshape(1, -1, 1, 1, 1, 1)
  ys = rng.normal(size=(steps,) + lead + (SHAPE[0], 2)).astype(np.float32)
  return jnp.asarray(xs), jnp.asarray(ys)


def _float_stats(variables):
  return {
    jax.tree_util.keystr(p): v
    for p, v in jax.tree_util.tree_leaves_with_path(variables.get("batch_stats", {}))
    if jnp.issubdtype(v.dtype, jnp.floating)
  }


PMAP_CASES = [(name, None) for name in mj.normalizer_names()] + [
  ("brn", "batch"),
  ("mabn", "batch"),
  ("cbn", "batch"),
]


@pytest.mark.parametrize("name,axis_name", PMAP_CASES, ids=[f"{n}-{a}" for n, a in PMAP_CASES])
def test_pmap_statistics_per_device_unless_axis_name_and_params_replicated(name, axis_name):
  assert jax.device_count() == DEVICES
  kwargs = dict(KWARGS[name])
  if axis_name is not None:
    kwargs["axis_name"] = axis_name
  synced = name == "syncbn" or axis_name is not None
  model = Net(mj.make_normalizer(name, **kwargs))
  tx = optax.sgd(0.1, momentum=0.9)
  variables = model.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
  opt_state = tx.init(variables["params"])
  step = jax.pmap(_make_step(model, tx, "batch"), axis_name="batch")
  replicate = lambda t: jax.tree_util.tree_map(lambda a: jnp.stack([a] * DEVICES), t)
  v, o = replicate(variables), replicate(opt_state)
  xs, ys = _data(2, DEVICES)
  for x, y in zip(xs, ys, strict=True):
    v, o, _ = step(v, o, x, y)

  for leaf in jax.tree_util.tree_leaves(v["params"]):
    for d in range(1, DEVICES):
      np.testing.assert_array_equal(leaf[d], leaf[0])
  stats = _float_stats(v)
  if name in STATELESS:
    assert not stats
    return
  assert stats
  for key, leaf in stats.items():
    differs = [not np.array_equal(leaf[d], leaf[0]) for d in range(1, DEVICES)]
    if synced or name == "frozen_bn":  # frozen: the same fixed statistics everywhere
      assert not any(differs), key
    elif key.endswith("['mean']") or key.endswith("['var']") or "chi" in key:
      assert all(differs), key
  if not synced:
    # Device 3's statistics after the first step are those of a one-device
    # step on device 3's data (later steps differ: the params follow the
    # averaged gradients).
    v1, _, _ = step(replicate(variables), replicate(opt_state), xs[0], ys[0])
    s1, _, _ = jax.jit(_make_step(model, tx))(variables, opt_state, xs[0][3], ys[0][3])
    single = _float_stats(s1)
    for key, leaf in _float_stats(v1).items():
      np.testing.assert_allclose(leaf[3], single[key], rtol=1e-6, atol=1e-7, err_msg=key)


SCAN_NAMES = ("mabn", "bn", "brn", "cbn")


@functools.lru_cache(maxsize=None)
def _single(name):
  model = Net(mj.make_normalizer(name, **KWARGS[name]))
  tx = optax.adam(1e-2)
  variables = model.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
  return model, tx, variables, tx.init(variables["params"]), _make_step(model, tx)


def _assert_trees_equal(a, b):
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
  ):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", SCAN_NAMES)
def test_jit_with_donated_variables_equals_undonated_and_frees_buffers(name):
  _, _, variables, opt_state, step = _single(name)
  plain = jax.jit(step)
  donated = jax.jit(step, donate_argnums=(0, 1))
  xs, ys = _data(3)
  copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
  a, b = (variables, opt_state), (copy(variables), copy(opt_state))
  for x, y in zip(xs, ys, strict=True):
    a = plain(*a, x, y)[:2]
    inputs = b
    b = donated(*b, x, y)[:2]
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(inputs))
  _assert_trees_equal(a, b)


@pytest.mark.parametrize("name", SCAN_NAMES)
def test_lax_scan_over_steps_equals_python_loop(name):
  _, _, variables, opt_state, step = _single(name)
  xs, ys = _data(4, seed=1)

  @jax.jit
  def scanned(variables, opt_state, xs, ys):
    def body(carry, batch):
      v, o, loss = step(*carry, *batch)
      return (v, o), loss

    return jax.lax.scan(body, (variables, opt_state), (xs, ys))

  (sv, so), losses = scanned(variables, opt_state, xs, ys)
  jitted = jax.jit(step)
  lv, lo = variables, opt_state
  for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
    lv, lo, loss = jitted(lv, lo, x, y)
    np.testing.assert_allclose(losses[t], loss, rtol=1e-5)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path((sv, so)), jax.tree_util.tree_leaves((lv, lo)), strict=True
  ):
    if jnp.issubdtype(a.dtype, jnp.integer):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


MICRO = 3  # micro-batches per optimizer step


@pytest.mark.parametrize("name", ["mabn", "bn", "cbn", "gn"])
def test_accumulated_gradients_equal_a_loop_with_one_normalization_step_per_micro_batch(name):
  model, _, variables, _, _ = (
    _single(name)
    if name in SCAN_NAMES
    else (Net(mj.make_normalizer(name, **KWARGS[name])), None, None, None, None)
  )
  if variables is None:
    variables = model.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
  xs, ys = _data(MICRO, seed=2)
  (loss, accumulated), grads = jax.jit(mj.accumulate_value_and_grad(_loss(model)))(
    variables, xs, ys
  )

  step = jax.jit(mj.value_and_grad(_loss(model)))
  looped, grad_sum, losses = variables, None, []
  for x, y in zip(xs, ys, strict=True):
    (l, looped), g = step(looped, x, y)
    losses.append(l)
    grad_sum = g if grad_sum is None else jax.tree_util.tree_map(jnp.add, grad_sum, g)
  chex.assert_trees_all_close(
    grads, jax.tree_util.tree_map(lambda g: g / MICRO, grad_sum), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6)
  chex.assert_trees_all_close(accumulated, looped, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_equal(accumulated["params"], variables["params"])
  if name in ("mabn", "cbn"):  # one normalization step per micro-batch
    assert int(accumulated["batch_stats"]["block"]["norm"]["step"]) == MICRO


def test_accumulated_bn_gradient_equals_one_step_with_micro_batch_sized_groups():
  """BN over A micro-batches of b samples == one step on A*b samples, groups of b."""
  model = Net(mj.make_normalizer("bn"))
  grouped = Net(mj.make_normalizer("bn", norm_batch_size=SHAPE[0]))
  variables = model.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
  xs, ys = _data(MICRO, seed=3)
  (loss, _), grads = jax.jit(mj.accumulate_value_and_grad(_loss(model)))(variables, xs, ys)
  whole = lambda a: a.reshape((-1,) + a.shape[2:])
  (full_loss, _), full_grads = jax.jit(mj.value_and_grad(_loss(grouped)))(
    variables, whole(xs), whole(ys)
  )
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  chex.assert_trees_all_close(grads, full_grads, rtol=1e-4, atol=1e-6)


def test_accumulation_with_aux_stacks_aux_and_frozen_dicts_stay_frozen():
  from flax.core import freeze

  model, _, variables, _, _ = _single("mabn")

  def loss_fn(variables, x, y):
    loss, mutated = _loss(model)(variables, x, y)
    return loss, (mutated, loss * 2)

  xs, ys = _data(MICRO, seed=4)
  ((loss, aux), new), _ = mj.accumulate_value_and_grad(loss_fn, has_aux=True)(
    freeze(variables), xs, ys
  )
  assert aux.shape == (MICRO,)
  np.testing.assert_allclose(loss, jnp.mean(aux) / 2, rtol=1e-6)
  assert isinstance(new, type(freeze({})))


def test_nonfinite_micro_batch_keeps_state_for_it_and_poisons_the_mean_gradient():
  model, _, variables, _, _ = _single("mabn")
  xs, ys = _data(MICRO, seed=5)
  bad = xs.at[1, 0, 0, 0, 0].set(jnp.nan)
  accumulate = jax.jit(mj.accumulate_value_and_grad(_loss(model)))
  (_, with_nan), grads = accumulate(variables, bad, ys)
  # The state equals accumulating only the finite micro-batches (0 and 2).
  (_, skipped), _ = accumulate(variables, xs[::2], ys[::2])
  counter = lambda p: "nonfinite_count" in jax.tree_util.keystr(p)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(with_nan["batch_stats"]),
    jax.tree_util.tree_leaves(skipped["batch_stats"]),
    strict=True,
  ):
    if not counter(path):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert mj.nonfinite_counts(with_nan) == {"block/norm": 1}
  # The mean gradient is not finite: optax.apply_if_finite skips the update.
  assert not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
