"""Tests of Cross-Iteration BN (spec, section 4): functional math and Flax layer."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import mabn_jax as mj
from mabn_jax.functional import cross_iteration as F
from mabn_jax.layers.cross_iteration import CrossIterationConvNorm

# The published layer's gradient and running statistics, which the references
# below implement.
PUBLISHED = dict(backward="published", running_stats="batch")


# --------------------------------------------------------------------------
# Independent NumPy float64 reference (explicit patches, Python lists).
# --------------------------------------------------------------------------


def np_patches(x, kernel_size, stride, padding):
  """``(N, Ho, Wo, kh, kw, cin)`` input patches of a 2-D convolution."""
  n, h, w, c = x.shape
  kh, kw = kernel_size
  if padding == "SAME":
    outs = [-(-h // stride), -(-w // stride)]
    pads = []
    for size, out, k in zip((h, w), outs, (kh, kw), strict=True):
      total = max((out - 1) * stride + k - size, 0)
      pads.append((total // 2, total - total // 2))
  else:
    pads = [(0, 0), (0, 0)]
  xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((n, ho, wo, kh, kw, c))
  for i in range(ho):
    for j in range(wo):
      out[:, i, j] = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
  return out


class NumpyCBN:
  """Spec section 4, written directly: a list of past entries, per-group loops."""

  def __init__(self, channels, window, burn_in, naive, momentum, epsilon, groups):
    self.window, self.burn_in, self.naive = window, burn_in, naive
    self.momentum, self.epsilon, self.groups = momentum, epsilon, groups
    self.mean = np.zeros(channels)
    self.var = np.ones(channels)
    self.entries = []  # dicts mu, nu, dmu, dnu, kernel; oldest first
    self.step = 0

  def __call__(self, x, kernel, stride, padding, conv_bias=None):
    kh, kw, cin, cout = kernel.shape
    patches = np_patches(x, (kh, kw), stride, padding)
    y = np.einsum("nhwijc,ijco->nhwo", patches, kernel)
    self.step += 1
    burning = self.step <= self.burn_in
    b = x.shape[0] // self.groups
    out = np.zeros_like(y)
    current = []
    for g in range(self.groups):
      yg, pg = y[g * b : (g + 1) * b], patches[g * b : (g + 1) * b]
      m = yg.shape[0] * yg.shape[1] * yg.shape[2]
      mu, nu = yg.mean(axis=(0, 1, 2)), (yg**2).mean(axis=(0, 1, 2))
      entry = dict(
        mu=mu,
        nu=nu,
        dmu=pg.mean(axis=(0, 1, 2)),
        dnu=2.0 / m * np.einsum("nhwijc,nhwo->ijco", pg, yg),
        kernel=kernel.copy(),
      )
      mu_sum, nu_sum, count = mu.copy(), nu.copy(), np.ones(cout)
      if not burning and self.window > 1:
        for e in (self.entries + current)[-(self.window - 1) :]:
          delta = kernel - e["kernel"]
          mu_e, nu_e = e["mu"].copy(), e["nu"].copy()
          if not self.naive:
            for c in range(cout):
              mu_e[c] += np.sum(e["dmu"] * delta[..., c])
              nu_e[c] += np.sum(e["dnu"][..., c] * delta[..., c])
          ok = nu_e >= mu_e**2
          mu_sum += np.where(ok, mu_e, 0.0)
          nu_sum += np.where(ok, nu_e, 0.0)
          count += ok
      mu_bar, nu_bar = mu_sum / count, nu_sum / count
      var_bar = np.maximum(nu_bar - mu_bar**2, 0.0)
      out[g * b : (g + 1) * b] = (yg - mu_bar) / np.sqrt(var_bar + self.epsilon)
      current.append(entry)
    mus = np.stack([e["mu"] for e in current])
    varis = np.stack([np.maximum(e["nu"] - e["mu"] ** 2, 0.0) for e in current])
    bias = 0.0 if conv_bias is None else conv_bias
    self.mean = self.momentum * self.mean + (1 - self.momentum) * (mus.mean(0) + bias)
    self.var = self.momentum * self.var + (1 - self.momentum) * varis.mean(0)
    if not burning and self.window > 1:
      self.entries = (self.entries + current)[-(self.window - 1) :]
    return out


def _train_step_fn(model):
  @jax.jit
  def step(params, batch_stats, x):
    out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return out, updates["batch_stats"]

  return step


REFERENCE_CASES = {
  "groups_as_iterations": dict(
    window=3,
    norm_batch_size=2,
    burn_in=1,
    naive=False,
    centered=False,
    strides=1,
    padding="SAME",
    use_bias=False,
  ),
  "centered_strided_valid": dict(
    window=4,
    norm_batch_size=None,
    burn_in=0,
    naive=False,
    centered=True,
    strides=2,
    padding="VALID",
    use_bias=True,
  ),
  "naive": dict(
    window=3,
    norm_batch_size=None,
    burn_in=1,
    naive=True,
    centered=False,
    strides=1,
    padding="SAME",
    use_bias=False,
  ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_numpy_float64_reference_step_by_step_with_changing_kernels(case):
  cfg = REFERENCE_CASES[case]
  groups = 1 if cfg["norm_batch_size"] is None else 4 // cfg["norm_batch_size"]
  model = CrossIterationConvNorm(
    features=3, kernel_size=(3, 3), momentum=0.8, **PUBLISHED, **{k: v for k, v in cfg.items()}
  )
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(4, 6, 6, 2)).astype(np.float32) + 0.5 for _ in range(5)]
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]), use_running_average=False)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  params["norm"]["scale"] = rng.uniform(0.5, 1.5, size=3).astype(np.float32)
  params["norm"]["bias"] = rng.normal(size=3).astype(np.float32)
  if cfg["use_bias"]:
    params["conv"]["bias"] = rng.normal(size=3).astype(np.float32)
  batch_stats = variables["batch_stats"]
  ref = NumpyCBN(3, cfg["window"], cfg["burn_in"], cfg["naive"], 0.8, 1e-5, groups)
  step = _train_step_fn(model)
  for t, x in enumerate(xs):
    raw = params["conv"]["kernel"].astype(np.float64)
    kernel = raw - raw.mean(axis=(0, 1, 2), keepdims=True) if cfg["centered"] else raw
    conv_bias = params["conv"]["bias"].astype(np.float64) if cfg["use_bias"] else None
    expected = ref(x.astype(np.float64), kernel, cfg["strides"], cfg["padding"], conv_bias)
    expected = expected * params["norm"]["scale"] + params["norm"]["bias"]
    out, batch_stats = step(params, batch_stats, jnp.asarray(x))
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4, err_msg=f"step {t + 1}")
    norm = batch_stats["norm"]
    np.testing.assert_allclose(norm["mean"], ref.mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm["var"], ref.var, rtol=1e-4, atol=1e-5)
    assert int(norm["step"]) == t + 1
    count = int(norm["count"])
    assert count == len(ref.entries)
    for i, entry in enumerate(ref.entries):
      row = cfg["window"] - 1 - count + i
      # The reference keeps each entry's kernel; the layer keeps the offsets
      # stat - d . W_old instead (the naive variant: neither).
      expected_rows = {"mu_buffer": entry["mu"], "nu_buffer": entry["nu"]}
      if not cfg["naive"]:
        w_old = entry["kernel"]
        expected_rows.update(
          dmu_buffer=entry["dmu"],
          dnu_buffer=entry["dnu"],
          mu_offset=entry["mu"] - np.einsum("ijk,ijkc->c", entry["dmu"], w_old),
          nu_offset=entry["nu"] - np.einsum("ijkc,ijkc->c", entry["dnu"], w_old),
        )
      else:
        assert "dnu_buffer" not in norm and "mu_offset" not in norm
      for name, value in expected_rows.items():
        np.testing.assert_allclose(
          norm[name][row], value, rtol=1e-4, atol=1e-4, err_msg=f"step {t + 1} {name} row {row}"
        )
    # The kernel changes between steps (as an optimizer would change it).
    params["conv"]["kernel"] = params["conv"]["kernel"] + 0.05 * rng.normal(size=raw.shape).astype(
      np.float32
    )
  assert count == cfg["window"] - 1  # the window filled up


# --------------------------------------------------------------------------
# Functional pieces.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kernel_size, strides, padding, dilation, spatial",
  [
    ((3, 2), (2, 1), "SAME", 1, (5, 5)),
    ((3, 3), 1, "VALID", 2, (7, 6)),
    ((1, 1), 1, "SAME", 1, (4, 5)),
    ((1, 1), 2, "SAME", 1, (5, 4)),
    ((1, 1), (2, 3), ((1, 0), (2, 1)), 1, (5, 5)),
    ((1,), 2, "VALID", 1, (7,)),
    ((1, 1, 1), (1, 2, 2), "SAME", 1, (3, 4, 5)),
    ((3, 3), (2, 1), ((-1, 2), (1, -2)), (1, 2), (8, 9)),
    ((5,), 3, ((3, 1),), 1, (6,)),
  ],
)
def test_cheap_derivatives_equal_jacrev_of_mu_and_nu(
  kernel_size, strides, padding, dilation, spatial
):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4,) + spatial + (2,)))
    kernel = jnp.asarray(rng.normal(size=kernel_size + (2, 3)))
    spec = F.ConvSpec.make(len(spatial), strides=strides, padding=padding, kernel_dilation=dilation)
    groups = 2

    def moments(w):
      return F.batch_moments(F.conv(x, w, spec), groups)

    jac_mu, jac_nu = jax.jacrev(moments)(kernel)  # (G, C, *kernel_size, cin, C)
    dmu, dnu = F.moment_derivatives(x, F.conv(x, kernel, spec), kernel, spec, groups)
    assert dmu.shape == (groups,) + kernel_size + (2,)
    assert dnu.shape == (groups,) + kernel_size + (2, 3)
    eye = np.eye(3)
    # d mu_c / d W[..., c'] = delta(c, c') * mean patch: one vector for every c.
    expected_mu = np.einsum("g...,cd->gc...d", dmu, eye)
    np.testing.assert_allclose(jac_mu, expected_mu, rtol=1e-10, atol=1e-12)
    expected_nu = np.einsum("g...c,cd->gc...d", dnu, eye)
    np.testing.assert_allclose(jac_nu, expected_nu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
  "kernel_size, strides, padding, dilation, spatial, stride",
  [
    ((3, 3), 1, "SAME", 1, (9, 10), 2),
    ((3, 3), 2, "SAME", 1, (10, 9), 2),
    ((3, 2), 1, "VALID", (2, 1), (11, 8), 3),
    ((1, 1), 1, ((2, 0), (1, 1)), 1, (8, 7), 2),
  ],
)
def test_strided_derivatives_equal_jacrev_of_the_moments_over_the_position_subset(
  kernel_size, strides, padding, dilation, spatial, stride
):
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(4,) + spatial + (2,)))
    kernel = jnp.asarray(rng.normal(size=kernel_size + (2, 3)))
    spec = F.ConvSpec.make(2, strides=strides, padding=padding, kernel_dilation=dilation)
    groups = 2

    def subset_moments(w):
      y = F.conv(x, w, spec)[:, ::stride, ::stride]
      return F.batch_moments(y, groups)

    jac_mu, jac_nu = jax.jacrev(subset_moments)(kernel)
    dmu, dnu = F.moment_derivatives(x, F.conv(x, kernel, spec), kernel, spec, groups, stride=stride)
    eye = np.eye(3)
    np.testing.assert_allclose(
      jac_mu, np.einsum("g...,cd->gc...d", dmu, eye), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
      jac_nu, np.einsum("g...c,cd->gc...d", dnu, eye), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("cin, cout, stride", [(2, 5, 1), (2, 5, 2), (5, 2, 1), (3, 3, 2)])
def test_pointwise_derivatives_take_the_cheaper_route_and_equal_jacrev(cin, cout, stride):
  # Pointwise kernels that widen the channels take d nu / d W from the inputs'
  # Gram matrix (one convolution fewer); both routes are the moments' jacobian.
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 7, 6, cin)))
    kernel = jnp.asarray(rng.normal(size=(1, 1, cin, cout)))
    spec = F.ConvSpec.make(2, strides=2, padding=((1, 0), (0, 1)))
    groups = 2

    def subset_moments(w):
      return F.batch_moments(F.conv(x, w, spec)[:, ::stride, ::stride], groups)

    def derivatives(x, kernel):
      return F.moment_derivatives(x, F.conv(x, kernel, spec), kernel, spec, groups, stride=stride)

    jac_mu, jac_nu = jax.jacrev(subset_moments)(kernel)
    dmu, dnu = derivatives(x, kernel)
    eye = np.eye(cout)
    np.testing.assert_allclose(
      jac_mu, np.einsum("g...,cd->gc...d", dmu, eye), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
      jac_nu, np.einsum("g...c,cd->gc...d", dnu, eye), rtol=1e-10, atol=1e-12
    )
    gram = F.gram_is_cheaper(kernel.shape)
    assert gram == (cin < cout)
    convs = str(jax.make_jaxpr(derivatives)(x, kernel)).count("conv_general_dilated")
    # The layer's own conv, d mu / d W, and d nu / d W unless from the Gram matrix.
    assert convs == (2 if gram else 3)
    # Constants of the step, by either route: no gradient flows through them.
    grads = jax.grad(lambda x, k: sum(jnp.sum(d**2) for d in derivatives(x, k)), argnums=(0, 1))(
      x, kernel
    )
    for grad in grads:
      np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_gram_route_is_only_for_pointwise_widening_kernels():
  assert F.gram_is_cheaper((1, 1, 64, 256))
  assert F.gram_is_cheaper((1, 64, 65))
  assert not F.gram_is_cheaper((1, 1, 256, 64))
  assert not F.gram_is_cheaper((1, 1, 64, 64))
  assert not F.gram_is_cheaper((3, 3, 64, 256))
  assert not F.gram_is_cheaper((1, 3, 16, 256))


def test_kernel_derivatives_convolution_takes_the_same_derivative_from_a_convolution():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 5, 5, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, 3, 6)), jnp.float32)
  spec = F.ConvSpec.make(2)
  y = F.conv(x, kernel, spec)
  assert F.gram_is_cheaper(kernel.shape)
  gram = F.moment_derivatives(x, y, kernel, spec, 2)
  convolution = F.moment_derivatives(x, y, kernel, spec, 2, kernel_derivatives="convolution")
  for a, b in zip(gram, convolution, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"kernel_derivatives must be one of"):
    F.moment_derivatives(x, y, kernel, spec, 2, kernel_derivatives="gram")

  # The option reaches the derivatives of the training step's new entries.
  whole_batch = F.moment_derivatives(x, y, kernel, spec, 1)[1]
  state = F.init_state(kernel.shape, 3)
  steps = {}
  for option in F.KERNEL_DERIVATIVES:
    config = F.CBNConfig(window=3, burn_in=0, kernel_derivatives=option)
    steps[option] = jax.make_jaxpr(
      lambda y, k, config=config: F.normalize_train(y, x, k, state, spec, config)
    )(y, kernel)
    _, new = F.normalize_train(y, x, kernel, state, spec, config)
    np.testing.assert_allclose(new.dnu_buffer[-1], whole_batch[0], rtol=1e-5, atol=1e-6)
  convs = {k: str(v).count("conv_general_dilated") for k, v in steps.items()}
  assert convs == {"auto": 1, "convolution": 2}


@pytest.mark.parametrize(
  "field, value, expected",
  [
    ("kernel_derivatives", "gram", r"one of \('auto', 'convolution'\), got 'gram'"),
    ("rematerialize", 1, "True or False, got 1"),
  ],
)
def test_cbn_options_are_validated_with_the_layer_name(field, value, expected):
  with pytest.raises(ValueError, match=rf"net/c1: {field} must be {expected}"):
    F.CBNConfig(**{field: value}).validate("net/c1")


def test_derivative_stride_is_validated_with_the_layer_name():
  x = jnp.ones((2, 6, 6, 3))
  model = mj.CrossIterationConvNorm(4, (3, 3), derivative_stride=0, name="c1")
  with pytest.raises(ValueError, match=r"c1.*derivative_stride must be an integer >= 1, got 0"):
    model.init(jax.random.PRNGKey(0), x, use_running_average=False)


def test_conv_matches_flax_conv():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
  for strides, padding in [(1, "SAME"), (2, "SAME"), (2, "VALID"), (1, ((1, 2), (0, 1))), (1, 1)]:
    layer = nn.Conv(4, (3, 2), strides=strides, padding=padding, use_bias=False)
    params = layer.init(jax.random.PRNGKey(0), x)
    spec = F.ConvSpec.make(2, strides, padding)
    np.testing.assert_allclose(
      F.conv(x, params["params"]["kernel"], spec),
      layer.apply(params, x),
      rtol=1e-6,
      atol=1e-6,
      err_msg=f"{strides} {padding}",
    )


def test_compensated_statistics_of_a_past_batch_are_closer_to_exact_than_naive():
  """A past batch's statistics carried to a new kernel by the Taylor term.

  The kernel change ``dW`` is random with a norm of 1%, 3% and 10% of ``W``.
  ``mu`` is linear in ``W`` (compensation exact); ``nu`` is quadratic, so the
  compensated error is second order in ``dW`` and the naive one first order.
  """
  rng = np.random.default_rng(3)
  x_old = jnp.asarray(rng.normal(size=(2, 8, 8, 4)) + 0.3, jnp.float32)
  w_old = jnp.asarray(rng.normal(size=(3, 3, 4, 6)) * 0.2, jnp.float32)
  direction = jnp.asarray(rng.normal(size=w_old.shape) * 0.2, jnp.float32)
  spec = F.ConvSpec.make(2)
  y_old = F.conv(x_old, w_old, spec)
  mu_old, nu_old = F.batch_moments(y_old, 1)
  dmu, dnu = F.moment_derivatives(x_old, y_old, w_old, spec, 1)

  def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  errors = {}
  for size in (0.01, 0.03, 0.1):
    w_new = w_old + size * direction
    offsets = F.taylor_offsets(mu_old, nu_old, dmu, dnu, w_old)
    mu_comp, nu_comp = F.compensate(*offsets, dmu, dnu, w_new)
    mu_exact, nu_exact = F.batch_moments(F.conv(x_old, w_new, spec), 1)
    var_exact = nu_exact - mu_exact**2
    errors[size] = {
      "mu naive": rel(mu_old, mu_exact),
      "mu compensated": rel(mu_comp, mu_exact),
      "nu naive": rel(nu_old, nu_exact),
      "nu compensated": rel(nu_comp, nu_exact),
      "var naive": rel(nu_old - mu_old**2, var_exact),
      "var compensated": rel(nu_comp - mu_comp**2, var_exact),
    }
    print(
      f"relative |dW|/|W| = {size}: relative errors vs exact recomputation:",
      {k: f"{v:.2e}" for k, v in errors[size].items()},
    )
    err = errors[size]
    # mu is linear in W: the first-order term is exact up to float32 rounding.
    assert err["mu compensated"] < 1e-4 < err["mu naive"]
    assert err["nu compensated"] < 0.5 * err["nu naive"]
    assert err["var compensated"] < 0.5 * err["var naive"]
  # At a realistic step size the compensation removes almost all of the error ...
  assert errors[0.01]["nu compensated"] < 0.05 * errors[0.01]["nu naive"]
  assert errors[0.01]["var compensated"] < 0.05 * errors[0.01]["var naive"]
  # ... and what remains is second order: ~10x smaller for a 3.3x smaller step.
  ratio = errors[0.1]["nu compensated"] / errors[0.03]["nu compensated"]
  assert 6.0 < ratio < 16.0, ratio


def _moments_at_old_and_new_kernel(x, w_old, w_new):
  """``(spec, y_old, (mu_old, nu_old), (mu_new, nu_new))`` of a 'SAME' conv
  of ``x`` with the kernel before and after a change (one group)."""
  spec = F.ConvSpec.make(2)
  y_old = F.conv(x, w_old, spec)
  return (spec, y_old, F.batch_moments(y_old, 1), F.batch_moments(F.conv(x, w_new, spec), 1))


def test_compensation_with_strided_derivatives_still_beats_the_naive_statistics():
  """Derivatives over every second position (a quarter of them) estimate the
  Taylor step from a sample, so on a spatially smooth input (a 3x3 box blur
  of noise, as image features are smooth) at a 1% kernel change they remove
  part of the naive error, and less than the exact derivatives do."""
  rng = np.random.default_rng(3)
  noise = rng.normal(size=(2, 16, 16, 4))
  smooth = sum(np.roll(noise, (i, j), axis=(1, 2)) for i in (-1, 0, 1) for j in (-1, 0, 1))
  x_old = jnp.asarray(smooth / smooth.std() + 0.3, jnp.float32)
  w_old = jnp.asarray(rng.normal(size=(3, 3, 4, 6)) * 0.2, jnp.float32)
  w_new = w_old + 0.01 * jnp.asarray(rng.normal(size=w_old.shape) * 0.2, jnp.float32)
  spec, y_old, (mu_old, nu_old), (mu_exact, nu_exact) = _moments_at_old_and_new_kernel(
    x_old, w_old, w_new
  )
  var_exact = nu_exact - mu_exact**2

  def var_error(mu, nu):
    return float(jnp.linalg.norm(nu - mu**2 - var_exact) / jnp.linalg.norm(var_exact))

  def compensated(stride):
    dmu, dnu = F.moment_derivatives(x_old, y_old, w_old, spec, 1, stride=stride)
    offsets = F.taylor_offsets(mu_old, nu_old, dmu, dnu, w_old)
    return F.compensate(*offsets, dmu, dnu, w_new)

  naive = var_error(mu_old, nu_old)
  exact, strided = var_error(*compensated(1)), var_error(*compensated(2))
  print(f"relative var error: naive {naive:.2e}, exact {exact:.2e}, stride 2 {strided:.2e}")
  assert exact < strided < 0.5 * naive


def _stepped_state(x_steps, kernels, spec, config, dtype):
  state = F.init_state(kernels[0].shape, config.window, dtype)
  for x, w in zip(x_steps, kernels, strict=True):
    _, state = F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)
  return state


def test_finite_difference_gradient_of_current_batch_path_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    spec = F.ConvSpec.make(2, padding="SAME")
    # One group per step: with several, a step's earlier groups enter later
    # groups' windows as (constant) past iterations, which finite differences
    # in x would see.
    config = F.CBNConfig(window=3, burn_in=0, **PUBLISHED)
    kernels = [jnp.asarray(rng.normal(size=(2, 2, 2, 3))) for _ in range(3)]
    xs = [jnp.asarray(rng.normal(size=(4, 4, 4, 2)) + 0.2) for _ in range(3)]
    state = _stepped_state(xs[:2], kernels[:2], spec, config, jnp.float64)
    assert int(state.count) == 2
    x, w0 = xs[2], kernels[2]
    g = jnp.asarray(rng.normal(size=(4, 4, 4, 3)))

    @jax.jit
    def loss_fixed_compensation(x, w):
      # The compensation target is a constant (w0): the current-batch path only.
      out, _ = F.normalize_train(F.conv(x, w, spec), x, w0, state, spec, config)
      return jnp.sum(out * g) + 0.5 * jnp.sum(out**2 * g)

    @jax.jit
    def loss_layer(x, w):
      out, _ = F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)
      return jnp.sum(out * g) + 0.5 * jnp.sum(out**2 * g)

    check_grads(loss_fixed_compensation, (x, w0), order=1, modes=["rev"], eps=1e-6)
    # Buffered terms are constants: the layer's gradient is that of the current path.
    grads_layer = jax.grad(loss_layer, argnums=(0, 1))(x, w0)
    grads_fixed = jax.grad(loss_fixed_compensation, argnums=(0, 1))(x, w0)
    for a, b in zip(grads_layer, grads_fixed, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # ... and it differs from plain BN (the pooled statistics matter).
    bn_grad = jax.grad(
      lambda x: jnp.sum(
        F.normalize_train(
          F.conv(x, w0, spec), x, w0, F.init_state(w0.shape, 3, jnp.float64), spec, config
        )[0]
        * g
      )
    )(x)
    assert float(jnp.max(jnp.abs(bn_grad - grads_layer[0]))) > 1e-3


def test_burn_in_is_plain_bn_then_window_grows_to_k():
  spec = F.ConvSpec.make(2)
  config = F.CBNConfig(window=3, burn_in=2)
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  state = F.init_state(w.shape, 3)
  counts = []
  for t in range(5):
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 2)) + t, jnp.float32)
    w = w + 0.1
    y = F.conv(x, w, spec)
    out, new_state = F.normalize_train(y, x, w, state, spec, config)
    mu, nu = F.batch_moments(y, 1)
    bn = (y - mu) / jnp.sqrt(jnp.maximum(nu - mu**2, 0) + 1e-5)
    if t < 3:  # burn-in steps 1, 2 and the first window step (1 entry) are BN.
      np.testing.assert_allclose(out, bn, rtol=1e-5, atol=1e-5)
    else:
      assert float(jnp.max(jnp.abs(out - bn))) > 1e-2
    if t < 2:  # nothing buffered during burn-in
      for name in ("mu_buffer", "nu_buffer", "dmu_buffer", "dnu_buffer", "mu_offset", "nu_offset"):
        np.testing.assert_array_equal(getattr(new_state, name), 0.0)
    counts.append(int(new_state.count))
    state = new_state
  assert counts == [0, 0, 1, 2, 2]
  assert int(state.step) == 5


def test_naive_ignores_kernel_change_and_compensated_equals_naive_for_fixed_kernel():
  spec = F.ConvSpec.make(2)
  rng = np.random.default_rng(6)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  xs = [jnp.asarray(rng.normal(size=(2, 5, 5, 2)) + 0.5, jnp.float32) for _ in range(3)]

  def run(naive, kernels):
    config = F.CBNConfig(window=3, burn_in=0, naive=naive)
    state = F.init_state(w.shape, 3, naive=naive)
    # As many steps as kernels: the first len(kernels) inputs.
    for x, k in zip(xs, kernels, strict=False):
      out, state = F.normalize_train(F.conv(x, k, spec), x, k, state, spec, config)
    return out, state

  same = [w, w, w]
  np.testing.assert_allclose(run(True, same)[0], run(False, same)[0], rtol=1e-6, atol=1e-6)
  moving = [w, w + 0.1, w + 0.2]
  out_naive, state = run(True, moving)
  out_comp, _ = run(False, moving)
  assert float(jnp.max(jnp.abs(out_naive - out_comp))) > 1e-3
  # Naive pooling = plain average of the raw buffered statistics with the current ones.
  y = F.conv(xs[2], moving[2], spec)
  mu, nu = F.batch_moments(y, 1)
  _, state2 = run(True, moving[:2])
  mu_bar = (mu[0] + state2.mu_buffer.sum(0)) / 3
  nu_bar = (nu[0] + state2.nu_buffer.sum(0)) / 3
  expected = (y - mu_bar) / jnp.sqrt(nu_bar - mu_bar**2 + 1e-5)
  np.testing.assert_allclose(out_naive, expected, rtol=1e-4, atol=1e-4)


def test_invalid_compensated_entries_are_dropped():
  mu = jnp.array([[0.0, 0.0]])
  nu = jnp.array([[1.0, 1.0]])
  past_mu = jnp.array([[2.0, 1.0], [0.0, 3.0]])
  past_nu = jnp.array([[3.0, 2.0], [1.0, 4.0]])  # entry (0, 0) and (1, 1) invalid
  mu_bar, nu_bar = F.pooled_moments(mu, nu, past_mu, past_nu, jnp.array([True, True]))
  np.testing.assert_allclose(mu_bar, [[0.0, 0.5]])
  np.testing.assert_allclose(nu_bar, [[1.0, 1.5]])
  mu_bar, _ = F.pooled_moments(mu, nu, past_mu, past_nu, jnp.array([False, True]))
  np.testing.assert_allclose(mu_bar, [[0.0, 0.0]])


# --------------------------------------------------------------------------
# Flax layer.
# --------------------------------------------------------------------------


class _ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
    return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, name="bn")(x)


class JitAgreementTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_training_step_agrees_with_and_without_jit(self):
    spec = F.ConvSpec.make(2)
    config = F.CBNConfig(window=3, burn_in=0, norm_batch_size=1)
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    xs = [jnp.asarray(rng.normal(size=(2, 5, 5, 2)), jnp.float32) for _ in range(2)]

    @self.variant
    def step(x, w, state):
      return F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)

    state = F.init_state(w.shape, 3)
    eager = F.init_state(w.shape, 3)
    for t, x in enumerate(xs):
      out, state = step(x, w + 0.1 * t, state)
      ref_out, eager = F.normalize_train(
        F.conv(x, w + 0.1 * t, spec), x, w + 0.1 * t, eager, spec, config
      )
      np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
      chex.assert_trees_all_close(state, eager, rtol=1e-5, atol=1e-6)
    assert int(state.count) == 2


@pytest.mark.parametrize("window,burn_in", [(1, 0), (4, 10)])
def test_equals_flax_conv_batchnorm_outputs_grads_and_running_stats(window, burn_in):
  rng = np.random.default_rng(7)
  model = CrossIterationConvNorm(
    features=4, kernel_size=(3, 3), window=window, burn_in=burn_in, **PUBLISHED
  )
  reference = _ConvBN()
  x0 = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x0, use_running_average=False)
  params = variables["params"]
  params = {
    "conv": params["conv"],
    "norm": {
      "scale": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    },
  }
  ref_params = {"conv": params["conv"], "bn": params["norm"]}
  stats = variables["batch_stats"]
  ref_stats = reference.init(jax.random.PRNGKey(0), x0)["batch_stats"]

  def loss(params, stats, x, g):
    out, upd = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(out * g), (out, upd["batch_stats"])

  def ref_loss(params, stats, x, g):
    out, upd = reference.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return jnp.sum(out * g), (out, upd["batch_stats"])

  grad = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
  ref_grad = jax.jit(jax.grad(ref_loss, argnums=(0, 2), has_aux=True))
  for t in range(3):
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)) * (1 + t), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)
    (gp, gx), (out, stats) = grad(params, stats, x, g)
    (rgp, rgx), (rout, ref_stats) = ref_grad(ref_params, ref_stats, x, g)
    np.testing.assert_allclose(out, rout, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, rgx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp["conv"]["kernel"], rgp["conv"]["kernel"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gp["norm"]["scale"], rgp["bn"]["scale"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp["norm"]["bias"], rgp["bn"]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["norm"]["mean"], ref_stats["bn"]["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["norm"]["var"], ref_stats["bn"]["var"], rtol=1e-5, atol=1e-6)
    # The kernel moves between steps.
    params = jax.tree_util.tree_map(lambda p, d: p - 0.1 * d, params, gp)
    ref_params = {"conv": params["conv"], "bn": params["norm"]}
  # Inference: conv then the affine map of the running statistics, as Flax.
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  out = model.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
  ref_eval = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
    {"params": params["norm"], "batch_stats": {k: ref_stats["bn"][k] for k in ("mean", "var")}},
    nn.Conv(4, (3, 3), use_bias=False).apply({"params": params["conv"]}, x),
  )
  np.testing.assert_allclose(out, ref_eval, rtol=1e-5, atol=1e-5)


def test_variable_layout_and_exports():
  model = mj.CrossIterationConvNorm(features=5, kernel_size=(3, 3), use_bias=True, centered=True)
  x = jnp.ones((2, 6, 6, 3))
  variables = model.init(jax.random.PRNGKey(0), x, use_running_average=False)
  shapes = jax.tree_util.tree_map(jnp.shape, variables)
  assert shapes["params"] == {
    "conv": {"kernel": (3, 3, 3, 5), "bias": (5,)},
    "norm": {"scale": (5,), "bias": (5,)},
  }
  assert shapes["batch_stats"] == {
    "norm": {
      "mean": (5,),
      "var": (5,),
      "mu_buffer": (3, 5),
      "nu_buffer": (3, 5),
      "dmu_buffer": (3, 3, 3, 3),
      "dnu_buffer": (3, 3, 3, 3, 5),
      "mu_offset": (3, 5),
      "nu_offset": (3, 5),
      "count": (),
      "step": (),
      "nonfinite_count": (),
    }
  }
  # No past kernel is stored (the offsets replace it), the naive variant keeps
  # no derivatives, and window 1 keeps no buffers: no zero-size variables.
  naive = mj.CrossIterationConvNorm(features=5, kernel_size=(3, 3), naive=True).init(
    jax.random.PRNGKey(0), x, use_running_average=False
  )
  assert sorted(naive["batch_stats"]["norm"]) == [
    "count",
    "mean",
    "mu_buffer",
    "nonfinite_count",
    "nu_buffer",
    "step",
    "var",
  ]
  single = mj.CrossIterationConvNorm(features=5, kernel_size=(3, 3), window=1).init(
    jax.random.PRNGKey(0), x, use_running_average=False
  )
  assert sorted(single["batch_stats"]["norm"]) == [
    "count",
    "mean",
    "nonfinite_count",
    "step",
    "var",
  ]
  assert model.window == 4 and model.momentum == 0.9 and model.burn_in == 100
  assert mj.functional.cross_iteration is F


def test_bad_configuration_raises_naming_the_layer():
  x = jnp.ones((2, 6, 6, 3))
  with pytest.raises(ValueError, match=r"CrossIterationConvNorm.*window"):
    CrossIterationConvNorm(features=2, kernel_size=(3, 3), window=0).init(
      jax.random.PRNGKey(0), x, use_running_average=False
    )
  with pytest.raises(ValueError, match=r"CrossIterationConvNorm.*padding"):
    CrossIterationConvNorm(features=2, kernel_size=(3, 3), padding="CIRCULAR").init(
      jax.random.PRNGKey(0), x, use_running_average=False
    )
  layer = CrossIterationConvNorm(features=2, kernel_size=(3, 3), norm_batch_size=3)
  variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)  # any batch
  with pytest.raises(ValueError, match=r"CrossIterationConvNorm.*norm_batch_size"):
    layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


@pytest.mark.parametrize("derivative_dtype", [None, jnp.bfloat16])
def test_pmap_with_axis_name_equals_one_device_with_concatenated_batch(derivative_dtype):
  devices = jax.devices()[:4]
  rng = np.random.default_rng(8)
  kwargs = dict(
    features=3, kernel_size=(3, 3), window=3, burn_in=1, derivative_dtype=derivative_dtype
  )
  single = CrossIterationConvNorm(**kwargs)
  synced = CrossIterationConvNorm(axis_name="batch", **kwargs)
  xs = [jnp.asarray(rng.normal(size=(8, 5, 5, 2)) + 0.3, jnp.float32) for _ in range(3)]
  gs = [jnp.asarray(rng.normal(size=(8, 5, 5, 3)), jnp.float32) for _ in range(3)]
  variables = single.init(jax.random.PRNGKey(0), xs[0], use_running_average=False)
  params, stats = variables["params"], variables["batch_stats"]

  def loss(model, params, stats, x, g):
    out, upd = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(out * g), (out, upd["batch_stats"])

  single_grad = jax.jit(jax.grad(functools.partial(loss, single), argnums=(0, 2), has_aux=True))
  pmap_grad = jax.pmap(
    jax.grad(functools.partial(loss, synced), argnums=(0, 2), has_aux=True),
    axis_name="batch",
    devices=devices,
  )
  replicate = lambda tree: jax.tree_util.tree_map(lambda a: jnp.stack([a] * 4), tree)
  shard = lambda a: a.reshape((4, 2) + a.shape[1:])
  p_params, p_stats = replicate(params), replicate(stats)
  for x, g in zip(xs, gs, strict=True):
    (gp, gx), (out, stats) = single_grad(params, stats, x, g)
    (pgp, pgx), (pout, p_stats) = pmap_grad(p_params, p_stats, shard(x), shard(g))
    np.testing.assert_allclose(pout.reshape(out.shape), out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pgx.reshape(gx.shape), gx, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a.sum(0), b, rtol=1e-4, atol=1e-4), pgp, gp
    )
    # Derivatives averaged across devices may round to a neighbouring bfloat16.
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(
        np.asarray(a[0], np.float32),
        np.asarray(b, np.float32),
        rtol=8e-3 if b.dtype == jnp.bfloat16 else 1e-4,
        atol=1e-5,
      ),
      p_stats,
      stats,
    )
    params = jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, params, gp)
    p_params = replicate(params)
  assert int(stats["norm"]["count"]) == 2
  expected = jnp.float32 if derivative_dtype is None else derivative_dtype
  assert stats["norm"]["dnu_buffer"].dtype == p_stats["norm"]["dnu_buffer"].dtype == expected


def test_sows_conv_output_moments_for_precise_bn():
  from mabn_jax.training import BATCH_MOMENTS

  rng = np.random.default_rng(10)
  model = CrossIterationConvNorm(
    features=3, kernel_size=(3, 3), use_bias=True, norm_batch_size=2, burn_in=0
  )
  x = jnp.asarray(rng.normal(size=(4, 5, 5, 2)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, use_running_average=False)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  params["conv"]["bias"] = np.array([1.0, -2.0, 0.5], np.float32)
  _, mutated = model.apply(
    {"params": params, "batch_stats": variables["batch_stats"]},
    x,
    use_running_average=False,
    mutable=["batch_stats", BATCH_MOMENTS],
  )
  y = nn.Conv(3, (3, 3)).apply({"params": params["conv"]}, x)
  sown = mutated[BATCH_MOMENTS]["norm"]
  np.testing.assert_allclose(sown["mean"][0], y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    sown["second_moment"][0], (y**2).mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  # Without the collection made mutable nothing is sown.
  _, mutated = model.apply(
    {"params": params, "batch_stats": variables["batch_stats"]},
    x,
    use_running_average=False,
    mutable=["batch_stats"],
  )
  assert BATCH_MOMENTS not in mutated


@pytest.mark.parametrize("naive", [False, True])
def test_group_history_equals_one_independent_layer_per_group(naive):
  """With group_history, group j of every step is an independent CBN run."""
  spec = F.ConvSpec.make(2)
  groups, b = 3, 2
  config = F.CBNConfig(window=3, burn_in=1, naive=naive, norm_batch_size=b, group_history=True)
  single = F.CBNConfig(window=3, burn_in=1, naive=naive)
  rng = np.random.default_rng(11)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  state = F.init_state(w.shape, 3, naive=naive, groups=groups)
  assert state.mu_buffer.shape == (2, groups, 4)
  states = [F.init_state(w.shape, 3, naive=naive) for _ in range(groups)]
  for t in range(5):
    x = jnp.asarray(rng.normal(size=(groups * b, 5, 5, 2)) + 0.3 * t, jnp.float32)
    w = w + 0.05 * jnp.asarray(rng.normal(size=w.shape), jnp.float32)
    out, state = F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)
    for j in range(groups):
      xj = x[j * b : (j + 1) * b]
      ref, states[j] = F.normalize_train(F.conv(xj, w, spec), xj, w, states[j], spec, single)
      np.testing.assert_allclose(
        out[j * b : (j + 1) * b], ref, rtol=1e-4, atol=1e-4, err_msg=f"step {t + 1} group {j}"
      )
      for name in ("mu_buffer", "nu_buffer", "dmu_buffer", "dnu_buffer", "mu_offset", "nu_offset"):
        np.testing.assert_allclose(
          getattr(state, name)[:, j],
          getattr(states[j], name),
          rtol=1e-4,
          atol=1e-5,
          err_msg=f"step {t + 1} {name}",
        )
    assert int(state.count) == int(states[0].count)
  assert int(state.count) == 2
  # The pooled windows differ from the shared-history layout.
  shared = F.CBNConfig(window=3, burn_in=1, naive=naive, norm_batch_size=b)
  with pytest.raises(ValueError, match="groups with their own history"):
    F.normalize_train(F.conv(x, w, spec), x, w, F.init_state(w.shape, 3, naive=naive), spec, config)
  assert (
    F.normalize_train(
      F.conv(x, w, spec), x, w, F.init_state(w.shape, 3, naive=naive), spec, shared
    )[0].shape
    == out.shape
  )


def test_group_history_layer_declares_per_group_buffers_and_trains():
  model = mj.make_normalizer("cbn", group_history=True, norm_batch_size=2, burn_in=0).conv_norm(
    4, (3, 3)
  )
  x = jnp.asarray(np.random.default_rng(12).normal(size=(6, 5, 5, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=True)
  stats = variables["batch_stats"]
  leaves = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(stats)}
  assert any(k.endswith("['dnu_buffer']") and v == (3, 3, 3, 3, 3, 4) for k, v in leaves.items())
  for _ in range(3):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **mutated}
  assert bool(jnp.all(jnp.isfinite(out)))
  counts = [
    v
    for p, v in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    if jax.tree_util.keystr(p).endswith("['count']")
  ]
  assert [int(c) for c in counts] == [3]
  # A batch with another number of groups does not fit the per-group buffers.
  with pytest.raises(ValueError, match="group"):
    model.apply(variables, x[:4], train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("backward", ["exact", "published"])
def test_group_history_with_one_group_is_the_shared_history(backward):
  """With one normalization group a step, a history per group is the
  ordinary history: same outputs, states and gradients, step by step."""
  spec = F.ConvSpec.make(2)
  per_group = F.CBNConfig(window=3, burn_in=1, backward=backward, group_history=True)
  shared = F.CBNConfig(window=3, burn_in=1, backward=backward)
  rng = np.random.default_rng(13)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  state_g = F.init_state(w.shape, 3, groups=1)
  state_s = F.init_state(w.shape, 3)

  def loss(x, w, state, config):
    out, new = F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)
    return jnp.sum(out * jnp.cos(out)), (out, new)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
  for t in range(5):
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 2)) + 0.3 * t, jnp.float32)
    w = w + 0.05 * jnp.asarray(rng.normal(size=w.shape), jnp.float32)
    (_, (out_g, state_g)), grads_g = grad(x, w, state_g, per_group)
    (_, (out_s, state_s)), grads_s = grad(x, w, state_s, shared)
    np.testing.assert_allclose(out_g, out_s, rtol=1e-5, atol=1e-5, err_msg=f"step {t + 1}")
    for a, b in zip(grads_g, grads_s, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"step {t + 1}")
    for name in (
      "mean",
      "var",
      "mu_buffer",
      "nu_buffer",
      "dmu_buffer",
      "dnu_buffer",
      "mu_offset",
      "nu_offset",
    ):
      g, s = getattr(state_g, name), getattr(state_s, name)
      g = g[:, 0] if name not in ("mean", "var") else g
      np.testing.assert_allclose(g, s, rtol=1e-5, atol=1e-6, err_msg=f"step {t + 1} {name}")
    assert int(state_g.count) == int(state_s.count)
  assert int(state_s.count) == 2


def test_channel_inner_products_and_their_gradients_equal_the_einsum():
  rng = np.random.default_rng(21)
  d = jnp.asarray(rng.normal(size=(5, 27, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(27, 6)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  einsum = lambda d, w: jnp.einsum("ekc,kc->ec", d, w)
  got, vjp = jax.vjp(F.channel_inner, d, w)
  expected, vjp_expected = jax.vjp(einsum, d, w)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for a, b in zip(vjp(ct), vjp_expected(ct), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,group_history", [(1, False), (2, False), (5, False), (2, True)])
def test_newest_entries_are_the_rows_the_step_pushed(groups, group_history):
  """What the layers check for finiteness before committing: exactly the
  buffer rows the step wrote (and the running statistics), nothing older."""
  config = F.CBNConfig(window=4, burn_in=0, group_history=group_history, norm_batch_size=2)
  spec = F.ConvSpec.make(2)
  rng = np.random.default_rng(22)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  state = F.init_state(w.shape, 4, groups=groups if group_history else None)
  x = jnp.asarray(rng.normal(size=(2 * groups, 5, 5, 2)), jnp.float32)
  for _ in range(2):
    _, state = F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)
  _, new = F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config)
  newest = F.newest_entries(new, config, groups)
  rows = 1 if group_history else min(groups, 3)
  for name in ("mu_buffer", "nu_buffer", "dmu_buffer", "dnu_buffer", "mu_offset", "nu_offset"):
    np.testing.assert_array_equal(getattr(newest, name), getattr(new, name)[3 - rows :])
  np.testing.assert_array_equal(newest.mean, new.mean)
  np.testing.assert_array_equal(newest.var, new.var)


def test_training_step_copies_the_derivative_buffer_at_most_once():
  """The (P, *K, C) derivative buffer dominates CBN's state: a training step
  must not copy it into another layout (a per-channel einsum did, forward and
  backward) nor materialize the pushed buffer beside the committed one."""
  layer = CrossIterationConvNorm(features=128, kernel_size=(3, 3), window=4, burn_in=0)
  x = jnp.ones((2, 4, 4, 128))
  variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)

  def loss_fn(variables, x):
    y, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y**2), updates

  def step(variables, x):
    (loss, updates), grads = mj.value_and_grad(loss_fn)(variables, x)
    return loss, updates, grads

  compiled = jax.jit(step, donate_argnums=0).lower(variables, x).compile()
  buffer = variables["batch_stats"]["norm"]["dnu_buffer"].nbytes
  # Under the tests' XLA flags 1.7 buffers; 2.7 with the einsum and the
  # separately pushed buffer.
  assert compiled.memory_analysis().temp_size_in_bytes <= 2.2 * buffer


def test_bfloat16_derivatives_are_exact_at_the_old_kernel_and_round_only_the_taylor_step():
  """Stored in bfloat16 (``derivative_dtype``), an entry's derivatives are
  rounded before its offsets are taken: carried back to the kernel it was
  measured with, it is the measured statistics to float32 rounding; carried
  to a new kernel it is the float32 compensation up to a rounding of the
  Taylor step alone, far below the naive error."""
  rng = np.random.default_rng(31)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 16)) + 0.3, jnp.float32)
  w_old = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) * 0.1, jnp.float32)
  w_new = w_old + 0.01 * jnp.asarray(rng.normal(size=w_old.shape) * 0.1, jnp.float32)
  spec, y_old, (mu_old, nu_old), (_, nu_new) = _moments_at_old_and_new_kernel(x, w_old, w_new)
  dmu, dnu = F.moment_derivatives(x, y_old, w_old, spec, 1)

  def carried(dtype, kernel):
    dmu_s, dnu_s, mu_offset, nu_offset = F.stored_entries(mu_old, nu_old, dmu, dnu, w_old, dtype)
    assert dmu_s.dtype == dnu_s.dtype == jnp.dtype(dtype)
    assert mu_offset.dtype == nu_offset.dtype == jnp.float32
    return F.compensate(mu_offset, nu_offset, dmu_s, dnu_s, kernel)

  mu_back, nu_back = carried(jnp.bfloat16, w_old)
  np.testing.assert_allclose(mu_back, mu_old, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nu_back, nu_old, rtol=1e-5, atol=1e-6)

  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  _, nu32 = carried(jnp.float32, w_new)
  _, nu16 = carried(jnp.bfloat16, w_new)
  naive = rel(nu_old, nu_new)
  # bfloat16 keeps 8 significant bits: the Taylor step is off by <= 2^-8 of itself.
  assert rel(nu16, nu32) <= 2.0**-8 * rel(nu_old, nu32)
  assert rel(nu16, nu_new) < 0.1 * naive


def test_layer_keeps_derivative_buffers_in_derivative_dtype_through_training_steps():
  x = jnp.asarray(np.random.default_rng(32).normal(size=(4, 6, 6, 3)), jnp.float32)
  layers = {
    dtype: CrossIterationConvNorm(
      features=4, kernel_size=(3, 3), window=4, burn_in=0, derivative_dtype=dtype
    )
    for dtype in (None, jnp.bfloat16)
  }
  outputs = {}
  for dtype, layer in layers.items():

    def loss_fn(variables, layer=layer):
      y, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      return jnp.mean(jnp.sin(y)), (updates, y)

    @jax.jit
    def step(variables, loss_fn=loss_fn):
      ((_, y), variables), grads = mj.value_and_grad(loss_fn, has_aux=True)(variables)
      params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, variables["params"], grads)
      return {**variables, "params": params}, y

    variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)
    for _ in range(5):
      variables, y = step(variables)
    stats = variables["batch_stats"]["norm"]
    expected = jnp.float32 if dtype is None else dtype
    assert stats["dmu_buffer"].dtype == stats["dnu_buffer"].dtype == jnp.dtype(expected)
    for name in ("mean", "var", "mu_buffer", "nu_buffer", "mu_offset", "nu_offset"):
      assert stats[name].dtype == jnp.float32, name
    assert int(stats["count"]) == 3 and int(stats["nonfinite_count"]) == 0
    outputs[dtype] = y
  # Same steps, only the stored derivatives rounded: the outputs agree closely.
  np.testing.assert_allclose(outputs[jnp.bfloat16], outputs[None], rtol=1e-3, atol=1e-3)


def test_state_in_another_derivative_dtype_raises_naming_the_layer():
  spec = F.ConvSpec.make(2)
  x = jnp.ones((2, 5, 5, 2))
  w = jnp.ones((3, 3, 2, 4)) * 0.1
  state = F.init_state(w.shape, 4)  # float32 buffers
  config = F.CBNConfig(window=4, derivative_dtype=jnp.bfloat16)
  with pytest.raises(
    ValueError,
    match=r"net/c1: state 'dmu_buffer' has dtype float32 but "
    r"derivative_dtype is bfloat16",
  ):
    F.normalize_train(F.conv(x, w, spec), x, w, state, spec, config, where="net/c1")
  ok = F.init_state(w.shape, 4, derivative_dtype=jnp.bfloat16)
  _, new = F.normalize_train(F.conv(x, w, spec), x, w, ok, spec, config, where="net/c1")
  assert new.dnu_buffer.dtype == jnp.bfloat16


def test_derivative_dtype_is_validated_with_the_layer_name():
  x = jnp.ones((2, 6, 6, 3))
  for bad in (jnp.int32, "not a dtype"):
    model = mj.CrossIterationConvNorm(4, (3, 3), derivative_dtype=bad, name="c1")
    with pytest.raises(
      ValueError,
      match=r"c1.*derivative_dtype must be None or a floating "
      r"dtype",
    ):
      model.init(jax.random.PRNGKey(0), x, use_running_average=False)


@pytest.mark.parametrize("backward", ["exact", "batch", "published"])
def test_training_step_keeps_its_moments_not_activations_for_the_backward(backward):
  # The backward pass recomputes y - mu_bar and xhat from y (which the conv
  # keeps anyway): y is the only activation-sized residual.
  kernel = jnp.ones((3, 3, 2, 4)) * 0.1
  x = jnp.ones((4, 5, 5, 2))
  spec = F.ConvSpec.make(2)
  config = F.CBNConfig(window=3, burn_in=0, backward=backward)
  state = F.init_state(kernel.shape, 3)
  y = F.conv(x, kernel, spec)
  _, vjp = jax.vjp(lambda y, k: F.normalize_train(y, x, k, state, spec, config)[0], y, kernel)
  residuals = [leaf.shape for leaf in jax.tree_util.tree_leaves(vjp)]
  assert residuals.count(y.shape) == 1, residuals


@pytest.mark.parametrize("backward", ["exact", "averaged"])
def test_without_rematerialization_the_step_computes_the_same_and_keeps_activations(backward):
  kernel = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 2, 4)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 5, 5, 2)), jnp.float32)
  spec = F.ConvSpec.make(2)
  averaged = backward == "averaged"
  state = F.init_state(kernel.shape, 3, averaged=averaged)
  state = state._replace(step=jnp.ones((), jnp.int32))
  y = F.conv(x, kernel, spec)
  ct = jnp.asarray(np.random.default_rng(5).normal(size=y.shape), jnp.float32)
  results = {}
  for rematerialize in (True, False):
    config = F.CBNConfig(window=3, burn_in=0, backward=backward, rematerialize=rematerialize)
    taps = (jnp.zeros_like(state.g_buffer), jnp.zeros_like(state.psi_buffer))

    def step(y, k, taps, config=config):
      return F.normalize_train(y, x, k, state, spec, config, tap=taps if averaged else None)[0]

    out, vjp = jax.vjp(step, y, kernel, taps)
    residuals = [leaf.shape for leaf in jax.tree_util.tree_leaves(vjp)]
    results[rematerialize] = out, vjp(ct), residuals.count(y.shape)
  (out, grads, kept), (out_saved, grads_saved, kept_saved) = results[True], results[False]
  np.testing.assert_allclose(out_saved, out, rtol=1e-6, atol=1e-6)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads_saved, grads
  )
  assert kept == 1
  # 'averaged' is a custom VJP whose residuals are y and the (G, C) statistics
  # either way; autodiff of the others saves activation-sized values.
  assert kept_saved == 1 if averaged else kept_saved > 1, kept_saved


def test_layers_of_equal_shapes_share_one_trace_of_the_training_step():
  kernel = jnp.ones((3, 3, 2, 4)) * 0.1
  x = jnp.ones((2, 5, 5, 2))
  spec = F.ConvSpec.make(2)
  config = F.CBNConfig(window=3, burn_in=0)
  state = F.init_state(kernel.shape, 3)
  y = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )

  def two_layers(y, state1, state2):
    a, new1 = F.normalize_train(y, x, kernel, state1, spec, config, None, "first")
    b, new2 = F.normalize_train(a, x, kernel, state2, spec, config, None, "second")
    return jnp.sum(b), (new1, new2)

  jaxpr = jax.make_jaxpr(two_layers)(y, state, state)
  steps = [e for e in jaxpr.eqns if e.params.get("name") == "_train_step"]
  assert len(steps) == 2
  assert steps[0].params["jaxpr"] is steps[1].params["jaxpr"]
