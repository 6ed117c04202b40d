"""Non-finite batches lose nothing, for every registry normalizer.

A batch with NaN or Inf leaves every ``'batch_stats'`` value (running
statistics, ring buffers, step counters) exactly as it was and increments the
layer's ``nonfinite_count``. The optimizer must skip the step too; the
recipe tested here (and in the README) is ``optax.apply_if_finite`` around the
optimizer, or a ``jnp.where`` on the updates. With it a run that meets a NaN
batch at step ``k`` ends bit for bit where a run that never saw that batch
ends.
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
SHAPE = (4, 6, 6, 3)
STEPS = 6
BAD_STEP = 3  # 0-based index of the injected batch

# Small schedules so that every phase (warm-up, moving averages, renorm,
# CBN's buffer) is active within a few steps.
KWARGS = {
  # BatchNorm keeps Flax's variables unless asked to count skipped steps.
  "bn": dict(count_nonfinite=True),
  "syncbn": dict(count_nonfinite=True),
  "brn": dict(warmup_steps=1, ramp_steps=2),
  "gn": dict(num_groups=2),
  "ln": {},
  "in": {},
  "cbn": dict(burn_in=1, window=3),
  "cbn_naive": dict(burn_in=1, window=3),
  "mabn": dict(buffer_size=2, warmup_steps=2, renorm_start=3, norm_batch_size=2),
  "none": {},
  "frozen_bn": dict(count_nonfinite=True),
  "ws_gn": dict(num_groups=2),
  "frn": {},
}
REPLICAS = 2  # 'syncbn' runs under vmap with its axis 'batch' over 2 replicas


class Net(nn.Module):
  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.normalizer.conv_norm(C, 3, name="block")(x, train=train)
    return nn.Dense(2, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _data(seed=0):
  rng = np.random.default_rng(seed)
  xs = [jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(STEPS)]
  ys = [jnp.asarray(rng.normal(size=(SHAPE[0], 2)), jnp.float32) for _ in range(STEPS)]
  return xs, ys


def skip_nonfinite_optimizer():
  """The recipe: the optimizer skips (zero update, state kept) non-finite steps."""
  return optax.apply_if_finite(optax.sgd(0.05, momentum=0.9), max_consecutive_errors=10)


@functools.lru_cache(maxsize=None)
def _setup(name):
  model = Net(mj.make_normalizer(name, **KWARGS[name]))
  tx = skip_nonfinite_optimizer()
  sync = name == "syncbn"

  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(out - y)), mutated

  def step(variables, opt_state, x, y):
    (loss, variables), grads = mj.value_and_grad(loss_fn)(variables, x, y)
    if sync:
      grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {**variables, "params": params}, opt_state, loss

  if sync:  # state replicated: stacked copies, one per replica
    step = jax.vmap(step, axis_name="batch")
  step = jax.jit(step)

  def init():
    variables = model.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
    opt_state = tx.init(variables["params"])
    if sync:
      stack = lambda t: jax.tree_util.tree_map(lambda a: jnp.stack([a] * REPLICAS), t)
      return stack(variables), stack(opt_state)
    return variables, opt_state

  def batch(x):  # per replica: the same data on both replicas keeps them equal
    return jnp.stack([x] * REPLICAS) if sync else x

  return init, step, batch


def _run(name, xs, ys):
  init, step, batch = _setup(name)
  variables, opt_state = init()
  history = []
  for x, y in zip(xs, ys, strict=True):
    variables, opt_state, _ = step(variables, opt_state, batch(x), batch(y))
    history.append((variables, opt_state))
  return history


def _without_counter(stats):
  flat = {
    k: v
    for k, v in jax.tree_util.tree_leaves_with_path(stats)
    if "nonfinite_count" not in jax.tree_util.keystr(k)
  }
  return flat


def _assert_same_state(a, b):
  """Params, batch_stats but the counters, and the inner optimizer state, bit for bit."""
  (va, oa), (vb, ob) = a, b
  chex.assert_trees_all_equal(va["params"], vb["params"])
  sa = _without_counter(va.get("batch_stats", {}))
  sb = _without_counter(vb.get("batch_stats", {}))
  assert sa.keys() == sb.keys()
  for key in sa:
    np.testing.assert_array_equal(sa[key], sb[key], err_msg=jax.tree_util.keystr(key))
  chex.assert_trees_all_equal(oa.inner_state, ob.inner_state)


def _poison(x, value):
  return x.at[1, 2, 3, 0].set(value)


@pytest.mark.parametrize("name", mj.normalizer_names())
def test_nan_batch_keeps_state_and_training_ends_as_if_it_was_skipped(name):
  xs, ys = _data()
  poisoned_xs = xs[:BAD_STEP] + [_poison(xs[BAD_STEP], jnp.nan)] + xs[BAD_STEP:]
  poisoned_ys = ys[:BAD_STEP] + [ys[BAD_STEP]] + ys[BAD_STEP:]
  with_nan = _run(name, poisoned_xs, poisoned_ys)
  clean = _run(name, xs, ys)

  # Step k changes nothing but the flag (and the optimizer's skip counters).
  _assert_same_state(with_nan[BAD_STEP], with_nan[BAD_STEP - 1])
  final = with_nan[-1][0]
  if name == "syncbn":  # replicas hold the same state; read replica 0
    final = jax.tree_util.tree_map(lambda a: a[0], final)
  counts = mj.nonfinite_counts(final)
  # Frozen BN computes no statistic, so it has nothing to skip.
  expected = (
    {}
    if name in ("gn", "ln", "in", "ws_gn", "frn", "none")
    else {"block/norm": 0 if name == "frozen_bn" else 1}
  )
  assert counts == expected
  assert int(np.max(with_nan[BAD_STEP][1].total_notfinite)) == 1
  # ... and the run continues to exactly where the clean run ends.
  _assert_same_state(with_nan[-1], clean[-1])
  for a, b in zip(with_nan[BAD_STEP + 1 :], clean[BAD_STEP:], strict=True):
    _assert_same_state(a, b)


@pytest.mark.parametrize("value", [jnp.inf, -jnp.inf])
@pytest.mark.parametrize("name", ["mabn", "cbn", "brn"])
def test_inf_batch_keeps_state_and_check_finite_can_raise(name, value):
  xs, ys = _data(1)
  history = _run(name, xs[:2] + [_poison(xs[2], value)], ys[:3])
  _assert_same_state(history[2], history[1])
  assert mj.nonfinite_counts(history[2][0]) == {"block/norm": 1}
  mj.check_finite(history[1][0])  # nothing skipped yet: no error
  with pytest.raises(FloatingPointError, match="block/norm"):
    mj.check_finite(history[2][0])


def test_where_on_updates_is_an_equivalent_skip_recipe():
  """Without optax.apply_if_finite: zero the update when the grads are not finite."""
  model = Net(mj.make_normalizer("mabn", **KWARGS["mabn"]))
  tx = optax.sgd(0.05, momentum=0.9)

  def loss_fn(variables, x, y):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(out - y)), mutated

  @jax.jit
  def step(variables, opt_state, x, y):
    (loss, new_vars), grads = mj.value_and_grad(loss_fn)(variables, x, y)
    updates, new_opt = tx.update(grads, opt_state, variables["params"])
    finite = jnp.all(
      jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
    )
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(optax.apply_updates(variables["params"], updates), variables["params"])
    return {**new_vars, "params": params}, keep(new_opt, opt_state)

  xs, ys = _data(2)
  variables = model.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
  opt_state = tx.init(variables["params"])
  a = b = (variables, opt_state)
  for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
    if t == BAD_STEP:
      a = step(*a, _poison(x, jnp.nan), y)
    a = step(*a, x, y)
    b = step(*b, x, y)
  chex.assert_trees_all_equal(a[0]["params"], b[0]["params"])
  chex.assert_trees_all_equal(a[1], b[1])
  sa, sb = _without_counter(a[0]["batch_stats"]), _without_counter(b[0]["batch_stats"])
  for key in sa:
    np.testing.assert_array_equal(sa[key], sb[key])
  assert mj.nonfinite_counts(a[0]) == {"block/norm": 1}


class Probe(nn.Module):
  options: tuple = ()

  @nn.compact
  def __call__(self, x, train: bool):
    return mj.MABN(
      use_running_average=not train, buffer_size=2, warmup_steps=1, **dict(self.options)
    )(x)


# Groups fit in the buffer here, so the check is the one of the tap's increment
# itself (functional.mabn._stabilized_bwd); with the EMA the averages carry it.
@pytest.mark.parametrize(
  "options", [(), (("norm_batch_size", 2),), (("moving_average", "ema"), ("norm_batch_size", 2))]
)
def test_nan_gradient_with_finite_forward_never_reaches_psi_buffer(options):
  model = Probe(options)
  x = jax.random.normal(jax.random.key(3), (4, C))
  gy = jax.random.normal(jax.random.key(4), (4, C))
  variables = model.init(jax.random.key(0), x, train=True)

  @jax.jit
  def step(variables, x, gy):
    def loss_fn(v):
      y, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
      return jnp.sum(y * gy), mutated

    return mj.value_and_grad(loss_fn)(variables)

  for _ in range(3):  # fill the buffers: the SMA phase
    (_, variables), _ = step(variables, x, gy)
  before = variables["batch_stats"]["MABN_0"]
  x = 2.0 * x  # a new batch: its chi differs from the buffered ones
  (_, after), grads = step(variables, x, gy.at[0, 1].set(jnp.nan))
  after = after["batch_stats"]["MABN_0"]
  assert not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_array_equal(after["psi_buffer"], before["psi_buffer"])
  assert bool(jnp.all(jnp.isfinite(after["psi_buffer"])))
  # The forward statistics were finite, so they advanced as usual.
  assert int(after["step"]) == int(before["step"]) + 1
  assert not np.array_equal(after["chi_buffer"], before["chi_buffer"])
  # A finite gradient does move psi_buffer (the check above is not vacuous).
  (_, normal), _ = step(variables, x, gy)
  assert not np.array_equal(normal["batch_stats"]["MABN_0"]["psi_buffer"], before["psi_buffer"])


# The layers test only the new chi_ema for finiteness (mabn.newest_entries):
# every group's chi_B must reach it, whatever the averaging.
@pytest.mark.parametrize(
  "options",
  [
    (),
    (("moving_average", "ema"),),
    (("average_forward", False),),
    (("average_forward", False), ("average_backward", False)),
    (("norm_batch_size", 2),),  # 2 groups of 2: both stay in the buffers
  ],
)
def test_nonfinite_group_pushed_out_of_the_buffer_still_keeps_psi_buffer(options):
  # 4 groups of 1 sample, 2 buffer rows: group 0's NaN statistics leave the
  # buffers in the same step, yet neither chi nor psi state may move.
  model = Probe((("norm_batch_size", 1),) + options)
  x = jax.random.normal(jax.random.key(5), (4, C))
  variables = model.init(jax.random.key(0), x, train=True)

  def loss_fn(v, x):
    y, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y), mutated

  step = jax.jit(mj.value_and_grad(loss_fn))
  (_, variables), _ = step(variables, x)
  before = variables["batch_stats"]["MABN_0"]
  x = 2.0 * x + 1.0  # a new batch: its Psi_B rows differ from the buffered ones
  (_, normal), _ = step(variables, x)
  assert not np.array_equal(normal["batch_stats"]["MABN_0"]["psi_buffer"], before["psi_buffer"])
  (_, after), _ = step(variables, x.at[0, 0].set(jnp.nan))
  after = after["batch_stats"]["MABN_0"]
  assert int(after["nonfinite_count"]) == 1
  for name in ("chi_ema", "chi_buffer", "psi_buffer", "step"):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
