"""The training contract inside a Flax-ImageNet-style training loop.

The loop below is written the way Flax's ImageNet example writes its own: a
small ResNet whose norm is ``functools.partial(norm_cls,
use_running_average=not train, momentum=0.9, epsilon=1e-5)``, a
``flax.training.train_state.TrainState`` subclass holding ``batch_stats``
only (no ``'backward_stats'``: ``mj.value_and_grad`` makes the taps),
initialized with a batch of one, a ``train_step`` returning ``loss, (new
model state, logits)``, ``sync_batch_stats`` averaging ``batch_stats`` over
the devices with ``lax.pmean``, run under ``jax.pmap`` on the 8 fake CPU
devices (tests/conftest.py sets ``XLA_FLAGS``) and under ``jax.jit``.

* Every ``batch_stats`` leaf keeps its dtype through the steps and the
  ``pmean`` (the counters are float32), the counters stay exact (MABN's
  ``step`` equals the number of steps, ``nonfinite_count`` 0), the step is
  traced once (no recompilation after ``sync_batch_stats``), losses finite.
* float16 with dynamic loss scaling (``mj.dynamic_scale_value_and_grad`` and
  Flax's ``DynamicScale``): the backward statistics come out unscaled (equal
  bit for bit to an unscaled step in float32), a step forced to overflow
  leaves every piece of state bit-identical and halves the scale.
* State saved with int32 counters (before they were float32) still loads.
* Errors about the ``'backward_stats'`` collection name it and the fix.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils, nnx, traverse_util
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale
from jax import lax

import mabn_jax as mj

DEVICES = 8
PER_DEVICE = 4
IMAGE = (8, 8, 3)
CLASSES = 3
MABN_OPTIONS = dict(buffer_size=2, warmup_steps=2, renorm_start=3, norm_batch_size=2)
COUNTERS = ("step", "count", "nonfinite_count")


class ResNetBlock(nn.Module):
  filters: int
  conv: Callable
  norm: Callable
  strides: Sequence[int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm()(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  norm_cls: Callable
  conv_cls: Callable = nn.Conv
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv_cls, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      self.norm_cls, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    x = nn.relu(norm(name="bn_init")(conv(4, (3, 3), name="conv_init")(x)))
    x = ResNetBlock(4, conv=conv, norm=norm)(x)
    x = ResNetBlock(8, conv=conv, norm=norm, strides=(2, 2))(x)
    x = nn.Dense(CLASSES, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return jnp.asarray(x, self.dtype)


class TrainState(train_state.TrainState):
  batch_stats: Any
  dynamic_scale: Any = None


def _bn_model(dtype=jnp.float32) -> ResNet:
  """BN counting its skipped steps: a counter that must survive the pmean
  (by default ``mj.BatchNorm`` keeps Flax's ``mean``/``var`` only)."""
  return ResNet(norm_cls=functools.partial(mj.BatchNorm, count_nonfinite=True), dtype=dtype)


def _mabn_model(dtype=jnp.float32) -> ResNet:
  """MABN from the registry: its layer class and options, its centred conv."""
  normalizer = mj.make_normalizer("mabn", **MABN_OPTIONS)
  options = {k: v for k, v in normalizer.options.items() if k != "centered"}
  assert normalizer.centered
  return ResNet(
    norm_cls=functools.partial(normalizer.entry.linen, **options),
    conv_cls=mj.CenteredConv,
    dtype=dtype,
  )


def _mabn_layer_model(dtype=jnp.float32) -> ResNet:
  """MABN as ``mj.MABN`` with ``mj.CenteredConv``."""
  return ResNet(
    norm_cls=functools.partial(mj.MABN, **MABN_OPTIONS), conv_cls=mj.CenteredConv, dtype=dtype
  )


def create_train_state(model, dynamic_scale=None) -> TrainState:
  """As Flax's example: init with one sample, keep params and batch_stats.

  Its leaves are put on the device (``TrainState.create``'s ``step`` is a
  Python int, which a jitted step would compile for once more), as the
  example's ``jax_utils.replicate`` does for ``pmap``."""
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1,) + IMAGE, model.dtype))
  state = TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=optax.sgd(0.1, momentum=0.9),
    batch_stats=variables["batch_stats"],
    dynamic_scale=dynamic_scale,
  )
  return jax.device_put(state)


def jitted_step():
  """``(jit(train_step), traces)``: a fresh jitted step (its own compilation
  cache) and the list its traces append to."""
  traces: list = []
  return jax.jit(functools.partial(train_step, traces=traces)), traces


def train_step(state, images, labels, axis_name=None, traces=None):
  """One step of the loop; ``traces`` counts how often JAX traces it."""
  if traces is not None:
    traces.append(1)

  def loss_fn(variables, images, labels):
    logits, new_model_state = state.apply_fn(variables, images, mutable=["batch_stats"])
    one_hot = jax.nn.one_hot(labels, CLASSES)
    loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot))
    return loss, (new_model_state, logits)

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  dynamic_scale = state.dynamic_scale
  if dynamic_scale is not None:
    grad_fn = mj.dynamic_scale_value_and_grad(
      loss_fn, dynamic_scale, has_aux=True, axis_name=axis_name
    )
    dynamic_scale, is_fin, ((loss, _), new_variables), grads = grad_fn(variables, images, labels)
  else:
    ((loss, _), new_variables), grads = mj.value_and_grad(loss_fn, has_aux=True)(
      variables, images, labels
    )
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
  assert "backward_stats" not in new_variables
  new_state = state.apply_gradients(grads=grads, batch_stats=new_variables["batch_stats"])
  if dynamic_scale is not None:
    keep = functools.partial(jnp.where, is_fin)
    new_state = new_state.replace(
      opt_state=jax.tree_util.tree_map(keep, new_state.opt_state, state.opt_state),
      params=jax.tree_util.tree_map(keep, new_state.params, state.params),
      dynamic_scale=dynamic_scale,
    )
  return new_state, loss


# As Flax's example (there with the axis name 'x': pmap retraces once for
# arrays whose mesh axis is named differently, whatever their types).
cross_replica_mean = jax.pmap(lambda x: lax.pmean(x, "batch"), "batch")


def sync_batch_stats(state: TrainState) -> TrainState:
  """Flax's example: average the per-device ``batch_stats`` over the devices."""
  return state.replace(batch_stats=cross_replica_mean(state.batch_stats))


def _batch(seed: int, leading: tuple, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  images = rng.normal(1.0, 2.0, leading + IMAGE).astype(dtype)
  labels = rng.integers(0, CLASSES, leading).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _dtypes(tree) -> dict:
  return {
    "/".join(map(str, path)): jnp.asarray(v).dtype
    for path, v in traverse_util.flatten_dict(tree).items()
  }


def _counters(batch_stats) -> dict:
  return {
    "/".join(path): np.asarray(v)
    for path, v in traverse_util.flatten_dict(batch_stats).items()
    if path[-1] in COUNTERS
  }


def _run_pmap(model, steps: int, sync_every: int, dynamic_scale=None):
  """The loop under pmap: steps, a sync every ``sync_every`` steps.

  Returns ``(state, dtypes, losses, retraces)``: ``retraces`` counts the
  traces of the step after the second one. (The first two are JAX's: the
  arrays ``jax_utils.replicate`` makes and the step's outputs have different
  mesh axis names, so ``pmap`` traces twice whatever the normalizer;
  ``flax.linen.BatchNorm``'s loop does too.)"""
  state = create_train_state(model, dynamic_scale)
  dtypes = _dtypes(state.batch_stats)
  state = jax_utils.replicate(state)
  traces: list = []
  p_train_step = jax.pmap(
    functools.partial(train_step, axis_name="batch", traces=traces), axis_name="batch"
  )
  losses, warm = [], 0
  for t in range(steps):
    images, labels = _batch(t, (DEVICES, PER_DEVICE), model.dtype)
    state, loss = p_train_step(state, images, labels)
    losses.append(np.asarray(loss))
    if t == 1:
      warm = len(traces)
    if (t + 1) % sync_every == 0:
      state = sync_batch_stats(state)
      assert _dtypes(state.batch_stats) == dtypes
  return state, dtypes, losses, len(traces) - warm


@pytest.mark.parametrize("make_model", [_bn_model, _mabn_model], ids=["bn", "mabn"])
def test_pmap_loop_with_sync_batch_stats_keeps_dtypes_counters_and_one_trace(make_model):
  steps = 4  # a sync after steps 2 and 4: step 3 runs on synced state
  state, dtypes, losses, retraces = _run_pmap(make_model(), steps, sync_every=2)
  stats = state.batch_stats
  assert _dtypes(stats) == dtypes
  assert all(d == jnp.float32 for d in dtypes.values())
  assert retraces == 0  # the pmean changed no input type
  assert np.all(np.isfinite(np.stack(losses)))
  counters = _counters(stats)
  assert counters and all(v.shape == (DEVICES,) for v in counters.values())
  for path, value in counters.items():
    expected = steps if path.endswith("/step") else 0
    np.testing.assert_array_equal(value, np.full((DEVICES,), expected, np.float32), err_msg=path)
  if make_model is _mabn_model:
    assert any(path.endswith("/step") for path in counters)
    # The per-device statistics were averaged: every replica holds the same.
    chi = stats["bn_init"]["chi_ema"]
    np.testing.assert_array_equal(chi, np.broadcast_to(chi[0], chi.shape))


@pytest.mark.parametrize("make_model", [_bn_model, _mabn_layer_model], ids=["bn", "mabn"])
def test_jit_loop_keeps_dtypes_and_compiles_once(make_model):
  model = make_model()
  state = create_train_state(model)
  dtypes = _dtypes(state.batch_stats)
  assert "backward_stats" not in jax.tree_util.tree_structure(state).__repr__()
  step, traces = jitted_step()
  losses = []
  for t in range(4):
    state, loss = step(state, *_batch(t, (PER_DEVICE,)))
    losses.append(float(loss))
  assert step._cache_size() == 1 and len(traces) == 1
  assert _dtypes(state.batch_stats) == dtypes
  assert np.all(np.isfinite(losses))
  for path, value in _counters(state.batch_stats).items():
    assert value == (4 if path.endswith("/step") else 0), path


def _loss_fn(model):
  def loss_fn(variables, images, labels):
    logits, new_model_state = model.apply(variables, images, mutable=["batch_stats"])
    one_hot = jax.nn.one_hot(labels, CLASSES)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot)), (
      new_model_state
    )

  return loss_fn


def _scaled_and_plain_steps(model, scale: float, steps: int):
  """Along ``steps`` steps of plain SGD, each step's ``(variables, grads)``
  from ``mj.value_and_grad`` and from ``mj.dynamic_scale_value_and_grad``
  with ``scale``, on the same variables."""
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1,) + IMAGE, model.dtype))
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  dynamic_scale = DynamicScale(scale=jnp.float32(scale), fin_steps=jnp.int32(0))
  plain = jax.jit(mj.value_and_grad(_loss_fn(model)))
  scaled = jax.jit(mj.dynamic_scale_value_and_grad(_loss_fn(model), dynamic_scale))
  out = []
  for t in range(steps):
    images, labels = _batch(t, (PER_DEVICE,), model.dtype)
    (_, new), grads = plain(variables, images, labels)
    result = scaled(variables, images, labels)
    assert bool(result.finite)
    out.append(((new, grads), (result.aux[1], result.grad)))
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, new["params"], grads)
    variables = {**new, "params": params}
  return out


def test_loss_scaling_in_float32_gives_the_unscaled_step():
  # From the second step on the backward pass averages this step's Psi with
  # the stored one, so a Psi left scaled (4096 times too large) would show.
  # The two steps are different XLA programs, which may round the forward
  # statistics differently in the last bit: equal to float32 rounding.
  steps = _scaled_and_plain_steps(_mabn_model(), 2.0**12, steps=3)
  for plain, scaled in steps:
    chex.assert_trees_all_close(scaled, plain, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal_dtypes(scaled, plain)
  psi = steps[-1][0][0]["batch_stats"]["bn_init"]["psi_buffer"]
  assert np.all(np.asarray(psi) != 0)


def test_loss_scaling_in_float16_gives_unscaled_backward_statistics():
  steps = _scaled_and_plain_steps(_mabn_model(jnp.float16), 2.0**10, steps=3)
  for (plain, _), (scaled, _) in steps:
    flat = traverse_util.flatten_dict(scaled["batch_stats"])
    for path, value in traverse_util.flatten_dict(plain["batch_stats"]).items():
      assert flat[path].dtype == value.dtype, path
      np.testing.assert_allclose(flat[path], value, rtol=2e-2, atol=1e-4, err_msg="/".join(path))
  # The unscaled float16 Psi equals float32's to float16 precision.
  reference = _scaled_and_plain_steps(_mabn_model(jnp.float32), 1.0, steps=1)
  np.testing.assert_allclose(
    steps[0][1][0]["batch_stats"]["bn_init"]["psi_buffer"],
    reference[0][0][0]["batch_stats"]["bn_init"]["psi_buffer"],
    rtol=0.05,
    atol=1e-4,
  )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32], ids=["float16", "float32"])
def test_overflowing_step_leaves_state_bit_identical_and_backs_off(dtype):
  model = _mabn_model(dtype)
  ok = DynamicScale(scale=jnp.float32(2.0**8), fin_steps=jnp.int32(0))
  state = create_train_state(model, ok)
  step, traces = jitted_step()
  state, _ = step(state, *_batch(0, (PER_DEVICE,), dtype))
  assert int(state.dynamic_scale.fin_steps) == 1
  # A scale whose product with the loss overflows the backward pass.
  huge = jnp.float32(2.0**127 if dtype == jnp.float32 else 2.0**30)
  before = state.replace(dynamic_scale=state.dynamic_scale.replace(scale=huge))
  after, loss = step(before, *_batch(1, (PER_DEVICE,), dtype))
  assert np.isfinite(float(loss))
  chex.assert_trees_all_equal(after.params, before.params)
  chex.assert_trees_all_equal(after.opt_state, before.opt_state)
  chex.assert_trees_all_equal(after.batch_stats, before.batch_stats)
  assert float(after.dynamic_scale.scale) == float(huge) / 2
  assert int(after.dynamic_scale.fin_steps) == 0
  assert step._cache_size() == 1 and len(traces) == 1


def test_float16_pmap_loop_with_loss_scaling_keeps_dtypes_and_counters():
  scale = DynamicScale(scale=jnp.float32(2.0**15), fin_steps=jnp.int32(0))
  steps = 4
  state, dtypes, losses, retraces = _run_pmap(_mabn_model(jnp.float16), steps, 1, scale)
  assert _dtypes(state.batch_stats) == dtypes and retraces == 0
  assert np.all(np.isfinite(np.stack(losses)))
  finite_steps = np.asarray(state.dynamic_scale.fin_steps)[0]
  for path, value in _counters(state.batch_stats).items():
    expected = finite_steps if path.endswith("/step") else 0
    np.testing.assert_array_equal(value, np.full((DEVICES,), expected, np.float32), err_msg=path)
  # 2**15 times the float16 loss overflows at first: the scale backs off,
  # and the skipped steps advanced no counter.
  assert finite_steps >= 1
  assert np.asarray(state.dynamic_scale.scale)[0] == 2.0**15 / 2 ** (steps - finite_steps)


def _int_counters(tree):
  """``tree`` with its counters int32, as state saved before they were float32."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict(
    {p: jnp.asarray(v, jnp.int32) if p[-1] in COUNTERS else v for p, v in flat.items()}
  )


def test_int32_counters_of_old_state_are_read_and_written_back_as_float32(tmp_path):
  import orbax.checkpoint as ocp

  model = _mabn_model()
  state = create_train_state(model)
  step, _ = jitted_step()
  state, _ = step(state, *_batch(0, (PER_DEVICE,)))
  old = state.replace(batch_stats=_int_counters(state.batch_stats))
  assert any(d == jnp.int32 for d in _dtypes(old.batch_stats).values())
  new, _ = step(state, *_batch(1, (PER_DEVICE,)))
  from_old, _ = step(old, *_batch(1, (PER_DEVICE,)))
  chex.assert_trees_all_equal(from_old.batch_stats, new.batch_stats)  # dtypes included
  chex.assert_trees_all_equal(from_old.params, new.params)

  # An orbax checkpoint holding int32 counters: restored without a target and
  # migrated, or with the current layout as target, the counters are float32.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "old", {"batch_stats": old.batch_stats})
  checkpointer.wait_until_finished()
  raw = ocp.StandardCheckpointer().restore(tmp_path / "old")
  assert _dtypes(raw["batch_stats"]) != _dtypes(state.batch_stats)
  migrated = mj.migrate_variables(raw)
  chex.assert_trees_all_equal(migrated["batch_stats"], state.batch_stats)
  target = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"batch_stats": state.batch_stats}
  )
  restored = ocp.StandardCheckpointer().restore(tmp_path / "old", target)
  chex.assert_trees_all_equal(restored["batch_stats"], state.batch_stats)


def test_nnx_layer_reads_an_int32_counter_and_writes_float32():
  layer = mj.nnx.MABN(3, rngs=nnx.Rngs(0), **MABN_OPTIONS)
  reference = mj.nnx.MABN(3, rngs=nnx.Rngs(0), **MABN_OPTIONS)
  layer.step.set_value(jnp.zeros((), jnp.int32))
  layer.nonfinite_count.set_value(jnp.zeros((), jnp.int32))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)

  def loss(model, x):
    return jnp.sum(model(x, use_running_average=False) ** 2)

  for model in (layer, reference):
    mj.nnx.value_and_grad(loss)(model, x)
  assert layer.step[...].dtype == jnp.float32 and float(layer.step[...]) == 1.0
  assert layer.nonfinite_count[...].dtype == jnp.float32
  chex.assert_trees_all_equal(nnx.state(layer), nnx.state(reference))


def _variables():
  model = _mabn_model()
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((PER_DEVICE,) + IMAGE))
  return model, variables


def _loss(model):
  def loss_fn(variables, images):
    out, mutated = model.apply(variables, images, mutable=["batch_stats"])
    return jnp.mean(out**2), mutated

  return loss_fn


def test_incomplete_backward_stats_collection_is_named_with_the_fix():
  model, variables = _variables()
  taps = dict(variables["backward_stats"])
  taps.pop("bn_init")
  images, _ = _batch(0, (PER_DEVICE,))
  with pytest.raises(ValueError, match=r"'backward_stats' collection lacks the taps \['bn_init"):
    mj.value_and_grad(_loss(model))({**variables, "backward_stats": taps}, images)


def test_taps_without_their_statistics_name_the_collection():
  model, variables = _variables()
  images, _ = _batch(0, (PER_DEVICE,))
  other = {**variables, "backward_stats": {"elsewhere": {"psi_increment": jnp.zeros((2, 4))}}}
  with pytest.raises(ValueError, match=r"'backward_stats' collection lacks the taps"):
    mj.value_and_grad(_loss(model))(other, images)

  def no_stats(variables, images):
    out, _ = model.apply(variables, images, mutable=["batch_stats"])
    return jnp.mean(out**2), {}

  with pytest.raises(ValueError, match=r"'backward_stats' taps.*mutable=\['batch_stats'\]"):
    mj.value_and_grad(no_stats)(variables, images)


def test_empty_backward_stats_collection_gets_zero_taps_made():
  model, variables = _variables()
  images, _ = _batch(0, (PER_DEVICE,))
  (_, given), _ = mj.value_and_grad(_loss(model))(variables, images)
  (_, made), _ = mj.value_and_grad(_loss(model))({**variables, "backward_stats": {}}, images)
  chex.assert_trees_all_equal(made["batch_stats"], given["batch_stats"])


def test_nonfinite_counts_show_a_skip_of_any_device_after_pmean():
  # One of 8 devices skipped a step: the pmean-ed counter is 1/8, and a
  # pmap-ed one has a leading device axis; either reads as one skipped step.
  averaged = {"batch_stats": {"norm": {"nonfinite_count": jnp.float32(0.125)}}}
  per_device = {"batch_stats": {"norm": {"nonfinite_count": jnp.asarray([0.0] * 7 + [2.0])}}}
  assert mj.nonfinite_counts(averaged) == {"norm": 1}
  assert mj.nonfinite_counts(per_device) == {"norm": 2}
  with pytest.raises(FloatingPointError, match="norm"):
    mj.check_finite(averaged)


def test_migrate_variables_converts_only_the_normalizers_counters():
  _, variables = _variables()
  old = {**variables, "batch_stats": _int_counters(variables["batch_stats"])}
  old["batch_stats"]["other"] = {"count": jnp.zeros((), jnp.int32)}
  migrated = mj.migrate_variables(old)
  assert migrated["batch_stats"]["other"]["count"].dtype == jnp.int32
  del migrated["batch_stats"]["other"]
  chex.assert_trees_all_equal(migrated, variables)
