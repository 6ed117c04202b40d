"""CBN's gradient options (``CBNConfig.backward``): each against what it claims to differentiate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import mabn_jax as mj
from mabn_jax.functional import cross_iteration as F

SPEC = F.ConvSpec.make(2, padding="SAME")


def _buffered(config, rng, steps=2, batch=6, dtype=jnp.float64, spread=0.2):
  """A state after ``steps`` training steps with a changing kernel (steps of
  relative size ~``spread``), and the current step's input, kernel and output
  cotangent. Every buffered entry stays consistent once compensated (none
  is dropped), so the Taylor terms take part."""
  base = rng.normal(size=(2, 2, 2, 3))
  kernels = [jnp.asarray(base + spread * rng.normal(size=base.shape)) for _ in range(steps + 1)]
  xs = [jnp.asarray(rng.normal(size=(batch, 4, 4, 2)) + 0.3) for _ in range(steps + 1)]
  groups = batch // config.norm_batch_size if config.group_history else None
  state = F.init_state(kernels[0].shape, config.window, dtype, groups=groups)
  for x, w in zip(xs[:steps], kernels[:steps], strict=True):
    _, state = F.normalize_train(F.conv(x, w, SPEC), x, w, state, SPEC, config)
  g = jnp.asarray(rng.normal(size=(batch, 4, 4, 3)))
  if not config.naive and state.count:
    mu, nu = F.compensate(
      state.mu_offset, state.nu_offset, state.dmu_buffer, state.dnu_buffer, kernels[-1]
    )
    assert bool(jnp.all(nu >= mu**2)), "a compensated entry would be dropped"
  return state, xs[-1], kernels[-1], g, kernels[:steps], xs[:steps]


def _loss(config, state, g):
  def loss(x, w):
    out, _ = F.normalize_train(F.conv(x, w, SPEC), x, w, state, SPEC, config)
    return jnp.sum(out * g) + 0.5 * jnp.sum(out**2 * g)

  return loss


@pytest.mark.parametrize(
  "norm_batch_size, derivative_stride, group_history",
  [(None, 1, False), (2, 1, False), (None, 2, False), (2, 1, True)],
)
def test_exact_gradient_equals_finite_differences_of_the_forward_float64(
  norm_batch_size, derivative_stride, group_history
):
  with jax.enable_x64(True):
    config = F.CBNConfig(
      window=3,
      burn_in=0,
      backward="exact",
      norm_batch_size=norm_batch_size,
      derivative_stride=derivative_stride,
      group_history=group_history,
    )
    state, x, w, g, _, _ = _buffered(config, np.random.default_rng(0))
    assert int(state.count) == 2
    if group_history:  # every group's window holds its own two past steps
      assert state.dmu_buffer.shape[:2] == (2, 3)
    # Finite differences perturb x and W in the whole forward: the current
    # batch, the step's earlier groups and the Taylor terms of past entries.
    check_grads(jax.jit(_loss(config, state, g)), (x, w), order=1, modes=["rev"], eps=1e-6)


def test_published_gradient_differs_from_finite_differences_of_the_forward_float64():
  with jax.enable_x64(True):
    config = F.CBNConfig(window=3, burn_in=0, backward="published")
    state, x, w, g, _, _ = _buffered(config, np.random.default_rng(1))
    loss = _loss(config, state, g)
    _, grad_w = jax.grad(loss, argnums=(0, 1))(x, w)
    exact = jax.grad(
      _loss(F.CBNConfig(window=3, burn_in=0, backward="exact"), state, g), argnums=1
    )(x, w)
    assert float(jnp.max(jnp.abs(grad_w - exact))) > 1e-3 * float(jnp.max(jnp.abs(exact)))


def _reference_exact_loss(x, w, g, past_kernels, past_xs, window, epsilon=1e-5):
  """Spec section 4 written out with stored past kernels, one group per step:
  ``mu_i(W) = mu_i + dmu_i . (W - W_i)`` (and ``nu``) differentiated directly;
  the derivatives are jacobians of the past steps' moments in their kernel."""

  def moments(x, w):
    y = F.conv(x, w, SPEC)
    return jnp.mean(y, axis=(0, 1, 2)), jnp.mean(y**2, axis=(0, 1, 2))

  y = F.conv(x, w, SPEC)
  mu, nu = moments(x, w)
  mus, nus, count = [mu], [nu], 1.0
  for x_old, w_old in list(zip(past_xs, past_kernels, strict=True))[-(window - 1) :]:
    m_old, n_old = moments(x_old, w_old)
    jm, jn = jax.jacrev(lambda k, x_old=x_old: moments(x_old, k))(w_old)  # (C, *K, C) each
    delta = w - w_old
    m_c = m_old + jnp.einsum("c...,...->c", jax.lax.stop_gradient(jm), delta)
    n_c = n_old + jnp.einsum("c...,...->c", jax.lax.stop_gradient(jn), delta)
    keep = (jax.lax.stop_gradient(n_c) >= jax.lax.stop_gradient(m_c) ** 2).astype(w.dtype)
    mus.append(keep * m_c)
    nus.append(keep * n_c)
    count = count + keep
  mu_bar = sum(mus) / count
  nu_bar = sum(nus) / count
  var = jnp.maximum(nu_bar - mu_bar**2, 0.0)
  out = (y - mu_bar) / jnp.sqrt(var + epsilon)
  return jnp.sum(out * g) + 0.5 * jnp.sum(out**2 * g)


def test_exact_gradient_equals_a_reference_differentiating_the_taylor_term_float64():
  with jax.enable_x64(True):
    config = F.CBNConfig(window=3, burn_in=0, backward="exact")
    state, x, w, g, past_kernels, past_xs = _buffered(config, np.random.default_rng(2))
    ours = jax.grad(_loss(config, state, g), argnums=(0, 1))(x, w)
    ref = jax.grad(
      lambda x, w: _reference_exact_loss(x, w, g, past_kernels, past_xs, 3), argnums=(0, 1)
    )(x, w)
    np.testing.assert_allclose(
      _loss(config, state, g)(x, w),
      _reference_exact_loss(x, w, g, past_kernels, past_xs, 3),
      rtol=1e-10,
    )
    for a, b in zip(ours, ref, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_batch_gradient_equals_finite_differences_of_bn_with_the_pooled_offsets_float64():
  """``'batch'`` differentiates BN whose moments are shifted by constants:
  ``mu + c_mu``, ``nu + c_nu`` with ``c = pooled - current`` at this step."""
  with jax.enable_x64(True):
    config = F.CBNConfig(window=3, burn_in=0, backward="batch", norm_batch_size=3)
    state, x, w, g, _, _ = _buffered(config, np.random.default_rng(3))
    eps = config.epsilon
    y0 = F.conv(x, w, SPEC)
    mu0, nu0 = F.batch_moments(y0, 2)
    # The pooled moments at this point, recovered from the forward output:
    # xhat = (y - mu_bar) * inv_std per group.
    out0, _ = F.normalize_train(y0, x, w, state, SPEC, config)
    yg, og = y0.reshape(2, 3, 4, 4, 3), out0.reshape(2, 3, 4, 4, 3)
    inv_std = jnp.std(og, axis=(1, 2, 3)) / jnp.std(yg, axis=(1, 2, 3))
    mu_bar = jnp.mean(yg, axis=(1, 2, 3)) - jnp.mean(og, axis=(1, 2, 3)) / inv_std
    var_bar = 1.0 / inv_std**2 - eps
    c_mu, c_nu = mu_bar - mu0, var_bar + mu_bar**2 - nu0

    def surrogate(x, w):
      y = F.conv(x, w, SPEC)
      mu, nu = F.batch_moments(y, 2)
      m, n = mu + c_mu, nu + c_nu
      var = jnp.maximum(n - m**2, 0.0)
      out = (y.reshape(2, 3, 4, 4, 3) - m[:, None, None, None]) / jnp.sqrt(
        var[:, None, None, None] + eps
      )
      out = out.reshape(y.shape)
      return jnp.sum(out * g) + 0.5 * jnp.sum(out**2 * g)

    loss = _loss(config, state, g)
    np.testing.assert_allclose(loss(x, w), surrogate(x, w), rtol=1e-9)
    check_grads(jax.jit(surrogate), (x, w), order=1, modes=["rev"], eps=1e-6)
    for a, b in zip(
      jax.grad(loss, argnums=(0, 1))(x, w), jax.grad(surrogate, argnums=(0, 1))(x, w), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("group_history", [False, True])
def test_forward_and_state_do_not_depend_on_the_backward_option(group_history):
  rng = np.random.default_rng(4)
  outs = {}
  for backward in F.BACKWARDS:
    config = F.CBNConfig(
      window=3, burn_in=1, backward=backward, norm_batch_size=2, group_history=group_history
    )
    state = F.init_state(
      (2, 2, 2, 3), 3, groups=3 if group_history else None, averaged=backward == "averaged"
    )
    local = np.random.default_rng(4)
    for _ in range(4):
      w = jnp.asarray(local.normal(size=(2, 2, 2, 3)), jnp.float32)
      x = jnp.asarray(local.normal(size=(6, 4, 4, 2)), jnp.float32)
      out, state = F.normalize_train(F.conv(x, w, SPEC), x, w, state, SPEC, config)
    outs[backward] = (out, state)
  del rng
  ref_out, ref_state = outs["published"]
  # 'batch' forms the pooled moments as mu + (mu_bar - mu): equal up to rounding.
  # Only 'averaged' keeps backward statistics (g_buffer, psi_buffer: fed by its taps).
  for backward, (out, state) in outs.items():
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6, err_msg=backward)
    for name in F.CBNState._fields:
      if name not in ("g_buffer", "psi_buffer"):
        np.testing.assert_allclose(
          getattr(state, name),
          getattr(ref_state, name),
          rtol=1e-6,
          atol=1e-6,
          err_msg=f"{backward} {name}",
        )


def test_exact_gradient_is_nearly_orthogonal_to_the_kernel_unlike_the_published_one():
  """The compensated forward barely depends on a channel's kernel scale, so its
  exact gradient has almost no component along the kernel; the published one has."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    cos = {}
    for backward in ("published", "exact"):
      config = F.CBNConfig(window=4, burn_in=0, backward=backward)
      local = np.random.default_rng(5)
      state, x, w, g, _, _ = _buffered(config, local, steps=3)
      grad = jax.grad(_loss(config, state, g), argnums=1)(x, w)
      cos[backward] = float(jnp.sum(grad * w) / (jnp.linalg.norm(grad) * jnp.linalg.norm(w)))
    del rng
    assert abs(cos["exact"]) < abs(cos["published"]), cos


def test_layer_and_registry_accept_backward_and_reject_unknown_values():
  x = jnp.ones((4, 6, 6, 3)) + jnp.arange(6.0)[None, :, None, None]
  for backward in F.BACKWARDS:
    model = mj.make_normalizer("cbn", backward=backward, burn_in=0).conv_norm(4, 3)
    variables = model.init(jax.random.PRNGKey(0), x, train=True)
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (4, 6, 6, 4)
  model = mj.make_normalizer("cbn", backward="both").conv_norm(4, 3, name="c1")
  with pytest.raises(ValueError, match=r"backward must be one of .*published.*got 'both'"):
    model.init(jax.random.PRNGKey(0), x, train=True)


def test_pooled_running_statistics_average_what_each_step_normalized_with():
  rng = np.random.default_rng(6)
  w = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)
  states = {k: F.init_state(w.shape, 3) for k in F.RUNNING_STATS}
  for t in range(3):
    x = jnp.asarray(rng.normal(size=(6, 4, 4, 2)) + t, jnp.float32)
    y = F.conv(x, w, SPEC)
    for kind in F.RUNNING_STATS:
      config = F.CBNConfig(window=3, burn_in=0, norm_batch_size=2, running_stats=kind)
      old = states[kind]
      out, states[kind] = F.normalize_train(y, x, w, old, SPEC, config)
      if kind == "pooled":
        # Recover each group's mu_bar and var_bar from its normalized output.
        yg, og = y.reshape(3, 2, 4, 4, 3), out.reshape(3, 2, 4, 4, 3)
        inv_std = jnp.std(og, axis=(1, 2, 3)) / jnp.std(yg, axis=(1, 2, 3))
        mu_bar = jnp.mean(yg, axis=(1, 2, 3)) - jnp.mean(og, axis=(1, 2, 3)) / inv_std
        var_bar = 1.0 / inv_std**2 - config.epsilon
        np.testing.assert_allclose(
          states[kind].mean, 0.9 * old.mean + 0.1 * jnp.mean(mu_bar, 0), rtol=2e-4, atol=2e-5
        )
        np.testing.assert_allclose(
          states[kind].var, 0.9 * old.var + 0.1 * jnp.mean(var_bar, 0), rtol=2e-3, atol=2e-4
        )
  # At normalization batch 2 the pooled variance (6 samples) exceeds the
  # groups' own (2 samples) on average.
  assert float(jnp.mean(states["pooled"].var)) > float(jnp.mean(states["batch"].var))
  with pytest.raises(ValueError, match="running_stats must be one of"):
    F.CBNConfig(running_stats="ema").validate()
