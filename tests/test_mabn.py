"""Tests of the MABN Flax layer against the float64 reference of spec section 2."""

from __future__ import annotations

import functools
import operator

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from mabn_reference import MABNReference

C = 5


class Probe(nn.Module):
  """MABN after a zero 'input' parameter, so that grads include d loss / d x."""

  norm: mj.MABN
  shape: tuple

  @nn.compact
  def __call__(self, x, train: bool):
    x = x + self.param("input", nn.initializers.zeros, self.shape)
    return self.norm(x, use_running_average=not train)


def _loss_fn(model):
  def loss_fn(variables, x, gy):
    y, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * gy), (mutated, y)

  return loss_fn


def _inputs(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  # Growing scales push chi away from chi_ema so that r is clipped later on.
  xs = [rng.normal(size=shape) * (1.0 + 0.4 * t) for t in range(steps)]
  gys = [rng.normal(size=shape) for _ in range(steps)]
  return xs, gys


SCHEDULE = dict(buffer_size=3, warmup_steps=4, renorm_start=6, r_max=1.3, momentum=0.9)


@pytest.mark.parametrize("norm_batch_size", [None, 2])
@pytest.mark.parametrize("shape", [(4, 3, 3, C), (6, C)], ids=["4d", "2d"])
def test_matches_float64_reference_in_every_schedule_phase(norm_batch_size, shape):
  steps = 10  # warmup (t < 4), SMA (t >= 4), renorm clipping (t > 6)
  layer = mj.MABN(norm_batch_size=norm_batch_size, **SCHEDULE)
  model = Probe(layer, shape)
  xs, gys = _inputs(shape, steps)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
  gamma = np.linspace(0.5, 1.5, C)
  beta = np.linspace(-0.2, 0.2, C)
  variables["params"]["norm"] = {
    "scale": jnp.asarray(gamma, jnp.float32),
    "bias": jnp.asarray(beta, jnp.float32),
  }
  ref = MABNReference(C, 3, 4, 6, 1.3, 0.9, 1e-5, norm_batch_size)
  step = jax.jit(mj.value_and_grad(_loss_fn(model), has_aux=True))
  clipped = False
  for t in range(steps):
    ((_, y), variables), grads = step(
      variables, jnp.asarray(xs[t], jnp.float32), jnp.asarray(gys[t], jnp.float32)
    )
    y_ref, gx_ref, gg_ref, gb_ref = ref.train_step(xs[t], gys[t], gamma, beta)
    tol = dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(y, y_ref, **tol, err_msg=f"y at step {t + 1}")
    np.testing.assert_allclose(grads["input"], gx_ref, **tol, err_msg=f"gx at step {t + 1}")
    np.testing.assert_allclose(grads["norm"]["scale"], gg_ref, **tol)
    np.testing.assert_allclose(grads["norm"]["bias"], gb_ref, **tol)
    stats = variables["batch_stats"]["norm"]
    for name, value in ref.state().items():
      np.testing.assert_allclose(stats[name], value, **tol, err_msg=f"{name} at step {t + 1}")
    scale_ratio = np.sqrt(np.asarray(stats["chi_buffer"][-1]) + 1e-5)
    clipped |= t + 1 > 6 and bool(np.any(scale_ratio > 1.3 * np.sqrt(ref.chi_ema)))
  assert clipped, "the schedule never reached renorm clipping"
  assert int(variables["batch_stats"]["norm"]["nonfinite_count"]) == 0


@pytest.mark.parametrize(
  "ablation",
  [dict(average_forward=False), dict(average_backward=False), dict(moving_average="ema")],
  ids=["backward_only", "forward_only", "ema"],
)
def test_ablations_match_the_float64_reference(ablation):
  shape = (4, 2, 2, C)
  layer = mj.MABN(norm_batch_size=2, **SCHEDULE, **ablation)
  model = Probe(layer, shape)
  xs, gys = _inputs(shape, 8, seed=11)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
  ref = MABNReference(C, 3, 4, 6, 1.3, 0.9, 1e-5, 2, **ablation)
  step = jax.jit(mj.value_and_grad(_loss_fn(model), has_aux=True))
  for t in range(8):
    ((_, y), variables), grads = step(
      variables, jnp.asarray(xs[t], jnp.float32), jnp.asarray(gys[t], jnp.float32)
    )
    y_ref, gx_ref, _, _ = ref.train_step(xs[t], gys[t], np.ones(C), np.zeros(C))
    np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-5, err_msg=f"step {t + 1}")
    np.testing.assert_allclose(grads["input"], gx_ref, rtol=2e-4, atol=2e-5)
  for name, value in ref.state().items():
    np.testing.assert_allclose(
      variables["batch_stats"]["norm"][name], value, rtol=2e-4, atol=2e-5, err_msg=name
    )


class MABNVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_nojit_agree(self):
    shape = (4, 2, 2, C)
    model = Probe(mj.MABN(norm_batch_size=2, **SCHEDULE), shape)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
    step = self.variant(mj.value_and_grad(_loss_fn(model), has_aux=True))
    xs, gys = _inputs(shape, 8, seed=1)
    for x, gy in zip(xs, gys, strict=True):
      ((loss, _), variables), grads = step(
        variables, jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32)
      )
    self.assertEqual(int(variables["batch_stats"]["norm"]["step"]), 8)
    # Compare against a jitted run from scratch.
    ref_vars = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
    ref_step = jax.jit(mj.value_and_grad(_loss_fn(model), has_aux=True))
    for x, gy in zip(xs, gys, strict=True):
      ((ref_loss, _), ref_vars), ref_grads = ref_step(
        ref_vars, jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32)
      )
    chex.assert_trees_all_close(variables, ref_vars, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_pmap_with_axis_name_equals_one_device_with_concatenated_batch():
  devices = 4
  local = (2, 3, 3, C)
  full = (devices * 2, 3, 3, C)
  xs, gys = _inputs(full, 8, seed=2)
  kw = dict(buffer_size=2, warmup_steps=2, renorm_start=4, r_max=1.2)

  single = Probe(mj.MABN(**kw), full)
  v1 = single.init(jax.random.key(0), jnp.zeros(full), train=True)
  step1 = jax.jit(mj.value_and_grad(_loss_fn(single), has_aux=True))

  mapped = Probe(mj.MABN(axis_name="batch", **kw), local)
  vm = mapped.init(jax.random.key(0), jnp.zeros(local), train=True)
  vm = jax.tree_util.tree_map(lambda a: jnp.stack([a] * devices), vm)

  def mapped_step(variables, x, gy):
    ((loss, y), variables), grads = mj.value_and_grad(_loss_fn(mapped), has_aux=True)(
      variables, x, gy
    )
    norm_grads = jax.lax.psum(grads["norm"], "batch")
    return y, variables, grads["input"], norm_grads

  stepm = jax.pmap(mapped_step, axis_name="batch")
  for x, gy in zip(xs, gys, strict=True):
    x, gy = jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32)
    ((_, y1), v1), g1 = step1(v1, x, gy)
    ym, vm, gxm, gnm = stepm(
      vm, x.reshape((devices, 2) + full[1:]), gy.reshape((devices, 2) + full[1:])
    )
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ym.reshape(full), y1, **tol)
    np.testing.assert_allclose(gxm.reshape(full), g1["input"], **tol)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[0], gnm), g1["norm"], **tol)
    for d in range(devices):
      chex.assert_trees_all_close(
        jax.tree_util.tree_map(operator.itemgetter(d), vm["batch_stats"]["norm"]),
        v1["batch_stats"]["norm"],
        **tol,
      )


def _mean_free_bn(x, gamma, beta, eps=1e-5):
  axes = tuple(range(x.ndim - 1))
  return gamma * x / jnp.sqrt(jnp.mean(x**2, axis=axes) + eps) + beta


@pytest.mark.parametrize(
  "kw",
  [dict(buffer_size=16, warmup_steps=100), dict(buffer_size=1, warmup_steps=0)],
  ids=["warmup", "buffer_size_1"],
)
def test_gradient_equals_autodiff_of_mean_free_batch_norm_before_averaging(kw):
  shape = (3, 2, 2, C)
  model = Probe(mj.MABN(renorm_start=1000, **kw), shape)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
  step = jax.jit(mj.value_and_grad(_loss_fn(model), has_aux=True))
  xs, gys = _inputs(shape, 6, seed=3)
  gamma = variables["params"]["norm"]["scale"]
  beta = variables["params"]["norm"]["bias"]
  for x, gy in zip(xs, gys, strict=True):
    x, gy = jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32)
    ((_, y), variables), grads = step(variables, x, gy)
    expected_y, vjp = jax.vjp(_mean_free_bn, x, gamma, beta)
    gx, ggamma, gbeta = vjp(gy)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["input"], gx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["norm"]["scale"], ggamma, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["norm"]["bias"], gbeta, rtol=1e-5, atol=1e-5)


def test_warmup_gradient_matches_finite_differences_in_float64():
  with jax.enable_x64(True):
    shape = (2, 2, 2, 3)
    layer = mj.MABN(param_dtype=jnp.float64)
    x0 = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float64)
    gy = jnp.asarray(np.random.default_rng(5).normal(size=shape), jnp.float64)
    variables = layer.init(jax.random.key(0), x0, use_running_average=False)

    def loss(x, taps):
      y, _ = layer.apply(
        {**variables, "backward_stats": taps}, x, use_running_average=False, mutable=["batch_stats"]
      )
      return jnp.sum(y * gy)

    gx, _ = jax.grad(loss, argnums=(0, 1))(x0, variables["backward_stats"])
    h = 1e-6
    flat = np.asarray(x0).ravel()
    numeric = np.empty_like(flat)
    for i in range(flat.size):
      e = np.zeros_like(flat)
      e[i] = h
      plus = loss(jnp.asarray((flat + e).reshape(shape)), variables["backward_stats"])
      minus = loss(jnp.asarray((flat - e).reshape(shape)), variables["backward_stats"])
      numeric[i] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(np.asarray(gx).ravel(), numeric, rtol=1e-6, atol=1e-8)


def test_stabilized_gradient_differs_from_autodiff_once_averaging_starts():
  # After warmup the backward uses Psi's SMA: not the derivative of the forward.
  shape = (2, C)
  model = Probe(mj.MABN(buffer_size=2, warmup_steps=0), shape)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
  step = jax.jit(mj.value_and_grad(_loss_fn(model), has_aux=True))
  xs, gys = _inputs(shape, 4, seed=6)
  ref = MABNReference(C, 2, 0, 1000)
  gamma, beta = np.ones(C), np.zeros(C)
  for x, gy in zip(xs, gys, strict=True):
    ((_, y), variables), grads = step(
      variables, jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32)
    )
    _, gx_ref, _, _ = ref.train_step(x, gy, gamma, beta)
  np.testing.assert_allclose(grads["input"], gx_ref, rtol=1e-4, atol=1e-5)
  psi = np.asarray(variables["batch_stats"]["norm"]["psi_buffer"])
  assert not np.allclose(psi[0], psi[1]), "Psi_B should vary between batches"


def test_inference_is_the_affine_map_of_the_stored_ema_and_touches_no_state():
  shape = (4, 3, 3, C)
  layer = mj.MABN(buffer_size=2, warmup_steps=1)
  x = jnp.asarray(np.random.default_rng(7).normal(size=shape) * 2, jnp.float32)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)

  def loss(v, x):
    y, mut = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y), mut

  for _ in range(3):
    (_, variables), _ = mj.value_and_grad(loss)(variables, x)
  variables["params"] = {"scale": jnp.arange(1.0, C + 1), "bias": jnp.arange(C) * 0.1}
  y, mutated = layer.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  chi = np.asarray(variables["batch_stats"]["chi_ema"], np.float64)
  expected = np.arange(1.0, C + 1) * np.asarray(x) / np.sqrt(chi + 1e-5) + np.arange(C) * 0.1
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(mutated["batch_stats"], variables["batch_stats"])
  assert not np.allclose(chi, 1.0)


def test_normalization_batch_of_one_and_odd_sizes_work():
  def loss(layer, v, x):
    y, mut = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y**2), mut

  for shape, b in [((1, C), None), ((3, 4, 4, C), 1), ((5, C), None), ((6, C), 3)]:
    layer = mj.MABN(norm_batch_size=b, warmup_steps=0, buffer_size=2)
    x = jnp.asarray(np.random.default_rng(8).normal(size=shape), jnp.float32)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    for _ in range(3):
      (value, variables), grads = mj.value_and_grad(functools.partial(loss, layer))(variables, x)
    assert np.isfinite(value)
    chex.assert_tree_all_finite((variables, grads))
    groups = shape[0] // (b or shape[0])
    assert int(variables["batch_stats"]["step"]) == 3
    assert variables["batch_stats"]["chi_buffer"].shape == (2, C)
    del groups


def test_batch_not_multiple_of_group_size_names_both_numbers():
  layer = mj.MABN(norm_batch_size=4)
  # Initialization takes any batch; a training step needs whole groups.
  variables = layer.init(jax.random.key(0), jnp.zeros((2, C)), use_running_average=False)
  train = lambda x: layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  with pytest.raises(ValueError, match=r"MABN.*6 samples.*norm_batch_size=4"):
    train(jnp.zeros((6, C)))
  with pytest.raises(ValueError, match=r"smaller than one normalization group"):
    train(jnp.zeros((2, C)))


def test_plain_jax_grad_on_params_fails_and_names_value_and_grad():
  shape = (4, C)
  model = Probe(mj.MABN(), shape)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=True)
  loss_fn = _loss_fn(model)

  def params_only(params, x, gy):
    return loss_fn({**variables, "params": params}, x, gy)[0]

  with pytest.raises(ValueError, match=r"MABN 'norm'.*mabn_jax.value_and_grad"):
    jax.grad(params_only)(variables["params"], jnp.ones(shape), jnp.ones(shape))
  without_taps = {k: v for k, v in variables.items() if k != "backward_stats"}
  with pytest.raises(ValueError, match=r"not being fed"):
    jax.grad(lambda p: loss_fn({**without_taps, "params": p}, jnp.ones(shape), jnp.ones(shape))[0])(
      variables["params"]
    )


def test_channel_count_differing_from_initialization_is_an_error():
  layer = mj.MABN()
  variables = layer.init(jax.random.key(0), jnp.zeros((2, C)), use_running_average=False)
  with pytest.raises(ValueError, match=r"chi_ema.*\(5,\).*\(7,\)"):
    layer.apply(variables, jnp.zeros((2, 7)), use_running_average=False, mutable=["batch_stats"])


@pytest.mark.parametrize(
  "field,value",
  [
    ("buffer_size", 0),
    ("momentum", 1.0),
    ("epsilon", 0.0),
    ("r_max", 0.5),
    ("warmup_steps", -1),
    ("renorm_start", -3),
    ("moving_average", "wma"),
  ],
)
def test_out_of_range_configuration_is_rejected(field, value):
  with pytest.raises(ValueError, match=rf"MABN.*{field}"):
    mj.MABN(**{field: value}).init(jax.random.key(0), jnp.zeros((2, C)), use_running_average=False)


def test_axis_out_of_range_and_wrong_rank_are_rejected():
  with pytest.raises(ValueError, match=r"axis 3 is out of range"):
    mj.MABN(axis=3).init(jax.random.key(0), jnp.zeros((2, C)), use_running_average=False)
  with pytest.raises(ValueError, match=r"rank >= 1"):
    mj.MABN().init(jax.random.key(0), jnp.zeros(()), use_running_average=False)
  # A rank-1 input is one sample (as in flax.linen.BatchNorm).
  v = mj.MABN().init(jax.random.key(0), jnp.zeros((C,)), use_running_average=False)
  assert v["batch_stats"]["chi_ema"].shape == (C,)


def test_feature_axis_other_than_last():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(4, C, 3, 3)), jnp.float32)
  layer = mj.MABN(axis=1, warmup_steps=0)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  chi = np.mean(np.asarray(x, np.float64) ** 2, axis=(0, 2, 3))
  np.testing.assert_allclose(
    y, np.asarray(x) / np.sqrt(chi + 1e-5)[None, :, None, None], rtol=1e-5, atol=1e-6
  )


def test_statistics_are_float32_for_half_precision_inputs():
  x = jnp.asarray(np.random.default_rng(10).normal(size=(4, C)) * 1e4, jnp.bfloat16)
  layer = mj.MABN(dtype=jnp.bfloat16, warmup_steps=0)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  y, mutated = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  for name in ("chi_ema", "chi_buffer", "psi_buffer"):
    assert mutated["batch_stats"][name].dtype == jnp.float32
  chex.assert_tree_all_finite(mutated)
  rms = np.sqrt(np.mean(np.asarray(y, np.float32) ** 2, axis=0))
  np.testing.assert_allclose(rms, 1.0, rtol=0.02)


def test_training_step_in_inference_mode_is_an_error_unless_taps_are_dropped():
  shape = (4, C)
  model = Probe(mj.MABN(), shape)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  assert "backward_stats" in variables  # created in inference-mode init too

  def eval_loss(v, x):
    y, mutated = model.apply(v, x, train=False, mutable=["batch_stats"])
    return jnp.sum(y), mutated

  x = jnp.ones(shape)
  with pytest.raises(ValueError, match=r"MABN 'norm'.*use_running_average=True.*would not update"):
    mj.value_and_grad(eval_loss)(variables, x)
  frozen = {k: v for k, v in variables.items() if k != "backward_stats"}
  (_, new_vars), grads = mj.value_and_grad(eval_loss)(frozen, x)
  chex.assert_trees_all_equal(new_vars["batch_stats"], variables["batch_stats"])
  assert float(jnp.abs(grads["norm"]["bias"]).sum()) > 0
