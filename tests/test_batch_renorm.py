"""Tests of mj.BatchRenorm and mabn_jax.functional.batch_renorm (spec, section 3)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

import mabn_jax as mj
from mabn_jax.functional import batch_renorm as F

EPS = 1e-5


def _data(shape, seed=0, offset=1.5, scale=2.0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = offset + scale * jax.random.normal(k1, shape, jnp.float32)
  gy = jax.random.normal(k2, shape, jnp.float32)
  return x, gy


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


def _with_stats(variables, **stats):
  return dict(variables, batch_stats=dict(variables["batch_stats"], **stats))


class ScheduleTest(chex.TestCase):
  def test_limits_at_chosen_steps(self):
    config = F.BatchRenormConfig(r_max=3.0, d_max=5.0, warmup_steps=10, ramp_steps=20)
    expected = {
      1: (1.0, 0.0),
      10: (1.0, 0.0),
      11: (1.1, 0.25),
      20: (2.0, 2.5),
      25: (2.5, 3.75),
      30: (3.0, 5.0),
      1000: (3.0, 5.0),
    }
    for step, (r_max, d_max) in expected.items():
      r, d = F.renorm_limits(jnp.int32(step), config)
      np.testing.assert_allclose(
        [float(r), float(d)], [r_max, d_max], rtol=1e-6, err_msg=f"step {step}"
      )

  def test_zero_ramp_jumps_after_warmup(self):
    config = F.BatchRenormConfig(r_max=4.0, d_max=2.0, warmup_steps=3, ramp_steps=0)
    self.assertEqual(tuple(map(float, F.renorm_limits(3, config))), (1.0, 0.0))
    self.assertEqual(tuple(map(float, F.renorm_limits(4, config))), (4.0, 2.0))

  def test_layer_step_counter_advances_in_training_only(self):
    x, _ = _data((4, 3))
    module = mj.BatchRenorm()
    v = module.init(jax.random.key(0), x, use_running_average=False)
    self.assertEqual(int(v["batch_stats"]["step"]), 0)
    for _ in range(3):
      _, updates = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
      v = dict(v, **updates)
    self.assertEqual(int(v["batch_stats"]["step"]), 3)
    _, updates = module.apply(v, x, use_running_average=True, mutable=["batch_stats"])
    self.assertEqual(int(updates["batch_stats"]["step"]), 3)


class EqualsBatchNormTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_r_max_1_d_max_0_equals_batchnorm_outputs_grads_stats(self):
    x, gy = _data((6, 3, 3, 4), seed=1)
    brn = mj.BatchRenorm(
      r_max=1.0, d_max=0.0, warmup_steps=0, ramp_steps=0, norm_batch_size=3, momentum=0.8
    )
    bn = mj.BatchNorm(norm_batch_size=3, momentum=0.8)
    v_brn = brn.init(jax.random.key(0), x, use_running_average=False)
    v_bn = bn.init(jax.random.key(0), x, use_running_average=False)
    # Running stats far from the batch's: r, d would be far from (1, 0) if unclipped.
    v_brn = _with_stats(v_brn, mean=jnp.full((4,), -3.0), var=jnp.full((4,), 50.0))
    v_bn = _with_stats(v_bn, mean=jnp.full((4,), -3.0), var=jnp.full((4,), 50.0))
    step_brn = self.variant(lambda v, x: _train_step(brn, v, x, gy))
    step_bn = self.variant(lambda v, x: _train_step(bn, v, x, gy))
    for step in range(3):
      xs = x * (1 + step)
      y1, g1, s1 = step_brn(v_brn, xs)
      y2, g2, s2 = step_bn(v_bn, xs)
      np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
      chex.assert_trees_all_close(g1, g2, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(s1["mean"], s2["mean"], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(s1["var"], s2["var"], rtol=1e-6, atol=1e-6)
      v_brn, v_bn = dict(v_brn, batch_stats=s1), dict(v_bn, batch_stats=s2)
    self.assertEqual(int(v_brn["batch_stats"]["step"]), 3)

  def test_default_schedule_is_batchnorm_during_warmup(self):
    x, _ = _data((4, 5), seed=2)
    v = mj.BatchRenorm(warmup_steps=5).init(jax.random.key(0), x, use_running_average=False)
    v = _with_stats(v, mean=jnp.full((5,), 10.0), var=jnp.full((5,), 0.01), step=jnp.int32(4))
    y, _ = mj.BatchRenorm(warmup_steps=5).apply(
      v, x, use_running_average=False, mutable=["batch_stats"]
    )
    y_bn, _ = mj.BatchNorm().apply(
      {"params": v["params"], "batch_stats": {k: v["batch_stats"][k] for k in ("mean", "var")}},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    np.testing.assert_allclose(y, y_bn, rtol=1e-6, atol=1e-6)

  def test_eval_equals_batchnorm_eval(self):
    x, _ = _data((4, 5), seed=3)
    v = mj.BatchRenorm().init(jax.random.key(0), x, use_running_average=False)
    v = _with_stats(v, mean=jnp.arange(5.0), var=jnp.arange(1.0, 6.0))
    y = mj.BatchRenorm().apply(v, x, use_running_average=True)
    np.testing.assert_allclose(
      y, (x - jnp.arange(5.0)) / np.sqrt(np.arange(1.0, 6.0) + EPS), rtol=1e-6, atol=1e-6
    )


def _numpy_brn(x, b, mean_run, var_run, r_max, d_max):
  x = np.asarray(x, np.float64)
  groups = x.reshape((x.shape[0] // b, b) + x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  mu = groups.mean(axis=axes, keepdims=True)
  var = groups.var(axis=axes, keepdims=True)
  sigma_run = np.sqrt(var_run + EPS)
  r = np.clip(np.sqrt(var + EPS) / sigma_run, 1 / r_max, r_max)
  d = np.clip((mu - mean_run) / sigma_run, -d_max, d_max)
  xhat = (groups - mu) / np.sqrt(var + EPS)
  return (xhat * r + d).reshape(x.shape), r, d


class RenormTest(chex.TestCase):
  def _apply_after_warmup(self, x, mean, var, b=None, r_max=3.0, d_max=5.0):
    module = mj.BatchRenorm(
      r_max=r_max,
      d_max=d_max,
      warmup_steps=2,
      ramp_steps=4,
      norm_batch_size=b,
      use_scale=False,
      use_bias=False,
    )
    v = module.init(jax.random.key(0), x, use_running_average=False)
    v = _with_stats(v, mean=mean, var=var, step=jnp.int32(10))  # past the ramp
    y, _ = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return y

  def test_clipping_respected_at_both_limits(self):
    x, _ = _data((8, 2, 3), seed=4, offset=0.0, scale=2.0)  # sigma_B ~ 2
    mean = jnp.array([-80.0, 50.0, 0.0])
    var = jnp.array([100.0, 0.01, 4.0])  # sigma_run 10, 0.1, 2
    y = self._apply_after_warmup(x, mean, var)
    ref, r, d = _numpy_brn(x, 8, np.asarray(mean), np.asarray(var), 3.0, 5.0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    r, d = r.reshape(-1), d.reshape(-1)
    # Channel 0: sigma ratio ~0.2 -> r clipped at 1/3; mean gap ~8 sigmas -> d at +5.
    np.testing.assert_allclose([r[0], d[0]], [1 / 3, 5.0], rtol=1e-6)
    # Channel 1: ratio ~20 -> r clipped at 3; gap -500 sigmas -> d at -5.
    np.testing.assert_allclose([r[1], d[1]], [3.0, -5.0], rtol=1e-6)
    # Channel 2: within the limits, not clipped.
    self.assertTrue(1 / 3 < r[2] < 3 and -5 < d[2] < 5)
    xs = np.asarray(x, np.float64)
    xhat0 = (xs[..., 0] - xs[..., 0].mean()) / np.sqrt(xs[..., 0].var() + EPS)
    np.testing.assert_allclose(y[..., 0], xhat0 / 3 + 5.0, rtol=1e-5, atol=1e-5)

  def test_grouped_renorm_matches_numpy_float64_reference(self):
    x, _ = _data((6, 2, 3), seed=5)
    mean, var = jnp.array([0.5, 1.0, 3.0]), jnp.array([2.0, 9.0, 0.5])
    y = self._apply_after_warmup(x, mean, var, b=2, r_max=1.5, d_max=0.5)
    ref, _, _ = _numpy_brn(x, 2, np.asarray(mean), np.asarray(var), 1.5, 0.5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

  def test_r_and_d_get_no_gradient(self):
    # With r, d constants, d/dx sum(gy * (xhat * r + d)) is BN's gradient at gy * r.
    x, gy = _data((6, 4), seed=6)
    mean, var = jnp.full((4,), 0.5), jnp.full((4,), 9.0)
    state = F.BatchRenormState(mean, var, jnp.int32(100))
    config = F.BatchRenormConfig(warmup_steps=0, ramp_steps=0)
    brn = lambda x: jnp.sum(gy * F.normalize_train(x, state, config)[0])
    g = jax.grad(brn)(x)
    batch_var = jnp.var(x, axis=0)
    r = jnp.clip(jnp.sqrt(batch_var + EPS) / jnp.sqrt(var + EPS), 1 / 3, 3)
    self.assertGreater(float(jnp.max(jnp.abs(r - 1))), 0.1)
    bn_state = mj.functional.batch_norm.init_state(4)
    bn = lambda x: jnp.sum(gy * r * mj.functional.batch_norm.normalize_train(x, bn_state)[0])
    np.testing.assert_allclose(g, jax.grad(bn)(x), rtol=1e-5, atol=1e-5)

  def test_pmap_axis_name_equals_one_device_concatenated(self):
    devices, per_device = 4, 2
    x, gy = _data((devices * per_device, 3, 2), seed=7)
    shard = lambda a: a.reshape((devices, per_device) + a.shape[1:])
    module = mj.BatchRenorm(axis_name="batch", warmup_steps=0, ramp_steps=0, r_max=1.2, d_max=0.3)
    single = mj.BatchRenorm(warmup_steps=0, ramp_steps=0, r_max=1.2, d_max=0.3)
    v = single.init(jax.random.key(0), x, use_running_average=False)
    v = _with_stats(v, mean=jnp.array([1.0, 2.0]), var=jnp.array([2.0, 8.0]))
    y_p, (_, gx_p), s_p = jax.pmap(
      lambda x, gy: _train_step(module, v, x, gy),
      axis_name="batch",
      devices=jax.devices()[:devices],
    )(shard(x), shard(gy))
    y_1, (_, gx_1), s_1 = _train_step(single, v, x, gy)
    np.testing.assert_allclose(y_p.reshape(x.shape), y_1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_p.reshape(x.shape), gx_1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_p["var"][3], s_1["var"], rtol=1e-5, atol=1e-6)

  def test_bad_limits_raise_with_layer_path(self):
    with self.assertRaisesRegex(ValueError, r"BatchRenorm .*r_max must be >= 1, got 0.5"):
      mj.BatchRenorm(r_max=0.5).init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=False)
    with self.assertRaisesRegex(ValueError, r"d_max must be >= 0"):
      mj.BatchRenorm(d_max=-1.0).init(
        jax.random.key(0), jnp.ones((2, 3)), use_running_average=False
      )
