"""Tests of mj.BatchNorm and mabn_jax.functional.batch_norm (spec, section 1)."""

from __future__ import annotations

import functools
import operator

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

import mabn_jax as mj
from mabn_jax.functional import batch_norm as F

RTOL = 1e-5
ATOL = 1e-5


def _data(shape, seed=0, offset=1.5, scale=2.0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = offset + scale * jax.random.normal(k1, shape, jnp.float32)
  gy = jax.random.normal(k2, shape, jnp.float32)
  return x, gy


def _random_params(variables, seed=1):
  """Replaces scale and bias by random values so the affine part is exercised."""
  params = variables["params"]
  k1, k2 = jax.random.split(jax.random.key(seed))
  return dict(
    variables,
    params=dict(
      scale=1.0 + 0.5 * jax.random.normal(k1, params["scale"].shape),
      bias=jax.random.normal(k2, params["bias"].shape),
    ),
  )


def _train_step(module, variables, x, gy):
  """(y, grads wrt (params, x), new batch_stats) of loss = sum(y * gy)."""

  def loss(params, x):
    y, updates = module.apply(
      dict(variables, params=params), x, use_running_average=False, mutable=["batch_stats"]
    )
    return jnp.sum(y * gy), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    variables["params"], x
  )
  return y, grads, stats


def _assert_stats_close(ours, flax_stats, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(ours["mean"], flax_stats["mean"], rtol=rtol, atol=atol)
  np.testing.assert_allclose(ours["var"], flax_stats["var"], rtol=rtol, atol=atol)


class FlaxExactnessTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_outputs_grads_and_stats_equal_flax_batchnorm_over_three_steps(self):
    x, gy = _data((6, 4, 4, 5))
    ours_mod = mj.BatchNorm(momentum=0.9)
    flax_mod = nn.BatchNorm(momentum=0.9)
    ours = _random_params(ours_mod.init(jax.random.key(0), x, use_running_average=False))
    theirs = _random_params(flax_mod.init(jax.random.key(0), x, use_running_average=False))
    chex.assert_trees_all_equal(ours["params"], theirs["params"])

    step_ours = self.variant(lambda v, x, gy: _train_step(ours_mod, v, x, gy))
    step_flax = self.variant(lambda v, x, gy: _train_step(flax_mod, v, x, gy))
    for step in range(3):
      xs = x * (1.0 + 0.3 * step) + step  # Changing batches move the EMA.
      y1, g1, s1 = step_ours(ours, xs, gy)
      y2, g2, s2 = step_flax(theirs, xs, gy)
      np.testing.assert_allclose(y1, y2, rtol=RTOL, atol=ATOL)
      chex.assert_trees_all_close(g1, g2, rtol=RTOL, atol=ATOL)
      _assert_stats_close(s1, s2)
      self.assertEqual(set(s1), set(s2))  # flax.linen.BatchNorm's variables
      ours = dict(ours, batch_stats=s1)
      theirs = dict(theirs, batch_stats=s2)
    # The stats really moved away from their (0, 1) start.
    self.assertGreater(float(jnp.min(ours["batch_stats"]["mean"])), 0.5)

    evaluate = self.variant(
      lambda mod, v, x: mod.apply(v, x, use_running_average=True), static_argnums=0
    )
    np.testing.assert_allclose(
      evaluate(ours_mod, ours, x), evaluate(flax_mod, theirs, x), rtol=RTOL, atol=ATOL
    )

  def test_feature_axis_one_equals_flax(self):
    x, gy = _data((4, 3, 5, 2), seed=3)
    ours_mod, flax_mod = mj.BatchNorm(axis=1), nn.BatchNorm(axis=1)
    ours = _random_params(ours_mod.init(jax.random.key(0), x, use_running_average=False))
    theirs = _random_params(flax_mod.init(jax.random.key(0), x, use_running_average=False))
    y1, g1, s1 = _train_step(ours_mod, ours, x, gy)
    y2, g2, s2 = _train_step(flax_mod, theirs, x, gy)
    self.assertEqual(s1["mean"].shape, (3,))
    np.testing.assert_allclose(y1, y2, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(g1, g2, rtol=RTOL, atol=ATOL)
    _assert_stats_close(s1, s2)

  def test_bfloat16_input_gives_bfloat16_output_and_float32_stats_like_flax(self):
    x, _ = _data((4, 3, 3, 2), seed=4)
    x = x.astype(jnp.bfloat16)
    ours_mod = mj.BatchNorm(dtype=jnp.bfloat16)
    flax_mod = nn.BatchNorm(dtype=jnp.bfloat16)
    v = ours_mod.init(jax.random.key(0), x, use_running_average=False)
    y1, s1 = ours_mod.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y2, s2 = flax_mod.apply(
      {k: {n: v[k][n] for n in ("mean", "var")} if k == "batch_stats" else v[k] for k in v},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    self.assertEqual(y1.dtype, jnp.bfloat16)
    self.assertEqual(s1["batch_stats"]["var"].dtype, jnp.float32)
    np.testing.assert_allclose(
      np.asarray(y1, np.float32), np.asarray(y2, np.float32), rtol=1e-2, atol=1e-2
    )
    _assert_stats_close(s1["batch_stats"], s2["batch_stats"])


class SyncBatchNormTest(chex.TestCase):
  def test_pmap_axis_name_equals_one_device_concatenated_and_flax_pmap(self):
    devices, per_device = 4, 2
    x, gy = _data((devices * per_device, 3, 3, 4), seed=5)
    shard = lambda a: a.reshape((devices, per_device) + a.shape[1:])
    ours_mod = mj.BatchNorm(axis_name="batch", momentum=0.8)
    flax_mod = nn.BatchNorm(axis_name="batch", momentum=0.8)
    variables = _random_params(mj.BatchNorm().init(jax.random.key(0), x, use_running_average=False))
    flax_vars = dict(
      variables, batch_stats={k: variables["batch_stats"][k] for k in ("mean", "var")}
    )

    def mapped(module, v):
      step = jax.pmap(
        lambda x, gy: _train_step(module, v, x, gy),
        axis_name="batch",
        devices=jax.devices()[:devices],
      )
      return step(shard(x), shard(gy))

    y_p, (gp_p, gx_p), s_p = mapped(ours_mod, variables)
    y_f, (gp_f, gx_f), s_f = mapped(flax_mod, flax_vars)
    y_1, (gp_1, gx_1), s_1 = _train_step(mj.BatchNorm(momentum=0.8), variables, x, gy)

    # Same as one device holding the concatenated batch.
    np.testing.assert_allclose(y_p.reshape(x.shape), y_1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx_p.reshape(x.shape), gx_1, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(
      jax.tree_util.tree_map(lambda g: g.sum(0), gp_p), gp_1, rtol=RTOL, atol=1e-4
    )
    for d in range(devices):  # Every device stores the same synced stats.
      _assert_stats_close(jax.tree_util.tree_map(operator.itemgetter(d), s_p), s_1)
    # Same as Flax's BatchNorm under the same pmap.
    np.testing.assert_allclose(y_p, y_f, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx_p, gx_f, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(gp_p, gp_f, rtol=RTOL, atol=ATOL)
    _assert_stats_close(s_p, s_f)

  def test_pmap_grouped_groups_span_devices_in_device_order(self):
    # norm_batch_size=2 with axis_name: group j on every device is averaged over
    # devices, i.e. one device with the per-device groups stacked equals the
    # global batch normalized with groups that pool the same slot everywhere.
    devices, per_device = 2, 4
    x, _ = _data((devices * per_device, 2, 3), seed=6)
    sharded = x.reshape((devices, per_device) + x.shape[1:])
    module = mj.BatchNorm(axis_name="batch", norm_batch_size=2)
    v = module.init(jax.random.key(0), sharded[0], use_running_average=False)
    y, _ = jax.pmap(
      lambda x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]),
      axis_name="batch",
      devices=jax.devices()[:devices],
    )(sharded)
    ref = np.asarray(sharded, np.float64)
    for g in range(per_device // 2):
      block = ref[:, 2 * g : 2 * g + 2]  # (devices, 2, 2, 3): group g on all devices
      mu = block.mean(axis=(0, 1, 2))
      var = block.var(axis=(0, 1, 2))
      np.testing.assert_allclose(
        y[:, 2 * g : 2 * g + 2], (block - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4
      )


def _numpy_grouped_bn(x, b, state_mean, state_var, momentum, eps):
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  groups = x.reshape((n // b, b) + x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  mu = groups.mean(axis=axes, keepdims=True)
  var = groups.var(axis=axes, keepdims=True)
  y = ((groups - mu) / np.sqrt(var + eps)).reshape(x.shape)
  new_mean = momentum * state_mean + (1 - momentum) * mu.reshape(-1, c).mean(0)
  new_var = momentum * state_var + (1 - momentum) * var.reshape(-1, c).mean(0)
  return y, new_mean, new_var


class GroupedBatchNormTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_grouped_bn_matches_numpy_float64_reference_over_steps(self):
    module = mj.BatchNorm(norm_batch_size=2, momentum=0.7, use_scale=False, use_bias=False)
    x, _ = _data((6, 3, 2, 4), seed=7)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    apply = self.variant(
      lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    )
    mean, var = np.zeros(4), np.ones(4)
    for step in range(3):
      xs = x * (1 + step) - step
      y, updates = apply(v, xs)
      y_ref, mean, var = _numpy_grouped_bn(xs, 2, mean, var, 0.7, 1e-5)
      np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(updates["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(updates["batch_stats"]["var"], var, rtol=1e-5, atol=1e-5)
      v = dict(v, **updates)
    y_eval = module.apply(v, x, use_running_average=True)
    np.testing.assert_allclose(
      y_eval, (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5
    )

  def test_groups_are_normalized_independently(self):
    x, _ = _data((4, 3, 3, 2), seed=8)
    module = mj.BatchNorm(norm_batch_size=2, use_scale=False, use_bias=False)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    y_all, _ = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y_first, _ = module.apply(v, x[:2], use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y_all[:2], y_first, rtol=1e-6, atol=1e-6)
    # Each group has zero mean and unit variance per channel on its own.
    groups = np.asarray(y_all).reshape(2, -1, 2)
    np.testing.assert_allclose(groups.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.var(1), 1.0, atol=1e-3)

  def test_finite_difference_gradients_float64_grouped_and_whole_batch(self):
    with jax.enable_x64(True):
      x = np.random.default_rng(0).normal(1.0, 2.0, (4, 3, 2)).astype(np.float64)
      gamma = np.random.default_rng(1).normal(1.0, 0.3, (2,))
      beta = np.random.default_rng(2).normal(0.0, 1.0, (2,))
      state = F.init_state(2, jnp.float64)

      def f(config, x, gamma, beta):
        out, _ = F.normalize_train(x, state, config)
        self.assertEqual(out.dtype, jnp.float64)
        return out * gamma + beta

      for b in (None, 2):
        config = F.BatchNormConfig(norm_batch_size=b)
        check_grads(
          functools.partial(f, config),
          (jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)),
          order=2,
          modes=["rev", "fwd"],
          atol=1e-6,
          rtol=1e-6,
          eps=1e-5,
        )


class BatchNormStateTest(chex.TestCase):
  def test_eval_uses_running_stats_and_writes_nothing(self):
    x, _ = _data((4, 2, 3), seed=9)
    module = mj.BatchNorm(use_scale=False, use_bias=False)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    v = dict(
      v, batch_stats=dict(v["batch_stats"], mean=jnp.full((3,), 2.0), var=jnp.full((3,), 4.0))
    )
    y, updates = module.apply(v, x, use_running_average=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, (x - 2.0) / np.sqrt(4.0 + 1e-5), rtol=1e-6)
    chex.assert_trees_all_equal(updates["batch_stats"], v["batch_stats"])

  def test_init_does_not_update_stats_and_layout_matches_flax(self):
    x, _ = _data((4, 3), seed=10)
    v = mj.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
    self.assertEqual(set(v["batch_stats"]), {"mean", "var"})
    self.assertEqual(set(v["params"]), {"scale", "bias"})
    counted = mj.BatchNorm(True, count_nonfinite=True).init(jax.random.key(0), x)
    self.assertEqual(set(counted["batch_stats"]), {"mean", "var", "nonfinite_count"})

  def test_nonfinite_batch_keeps_stats_and_counts_the_step(self):
    x, _ = _data((4, 3), seed=11)
    for counted in (True, False):
      module = mj.BatchNorm(count_nonfinite=counted)
      v = module.init(jax.random.key(0), x, use_running_average=False)
      _, updates = module.apply(
        v, x.at[0, 0].set(jnp.nan), use_running_average=False, mutable=["batch_stats"]
      )
      np.testing.assert_array_equal(updates["batch_stats"]["mean"], v["batch_stats"]["mean"])
      np.testing.assert_array_equal(updates["batch_stats"]["var"], v["batch_stats"]["var"])
      if counted:
        self.assertEqual(int(updates["batch_stats"]["nonfinite_count"]), 1)
      else:
        self.assertNotIn("nonfinite_count", updates["batch_stats"])

  def test_batch_not_multiple_of_norm_batch_size_raises_with_layer_path(self):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        return mj.BatchNorm(norm_batch_size=4, name="bn1")(x, use_running_average=False)

    variables = Net().init(jax.random.key(0), jnp.ones((6, 3)))  # init takes any batch
    with self.assertRaisesRegex(ValueError, r"BatchNorm '.*bn1'.*multiple of norm_batch_size=4"):
      Net().apply(variables, jnp.ones((6, 3)), mutable=["batch_stats"])

  def test_channel_count_change_raises(self):
    module = mj.BatchNorm()
    v = module.init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=False)
    with self.assertRaisesRegex(
      ValueError, r"'mean' has shape \(3,\) but the input implies \(4,\)"
    ):
      module.apply(v, jnp.ones((2, 4)), use_running_average=False, mutable=["batch_stats"])

  def test_bad_momentum_raises(self):
    with self.assertRaisesRegex(ValueError, "momentum must be in"):
      mj.BatchNorm(momentum=1.5).init(
        jax.random.key(0), jnp.ones((2, 3)), use_running_average=False
      )


def test_sows_whole_batch_moments_for_precise_bn_only_when_asked():
  from mabn_jax.training import BATCH_MOMENTS

  x, _ = _data((4, 2, 3), seed=12)
  module = mj.BatchNorm(norm_batch_size=2)
  v = module.init(jax.random.key(0), x, use_running_average=False)
  _, updates = module.apply(v, x, use_running_average=False, mutable=["batch_stats", BATCH_MOMENTS])
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(updates[BATCH_MOMENTS]["mean"][0], xs.mean((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(
    updates[BATCH_MOMENTS]["second_moment"][0], (xs**2).mean((0, 1)), rtol=1e-5
  )
  _, plain = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert BATCH_MOMENTS not in plain
