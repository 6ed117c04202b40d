"""CBN with ``backward='averaged'``: BN's backward on the pooled normalization
with the backward statistics ``g_B = mean(g)``, ``Psi_B = mean(g * xhat)``
averaged over the forward's window (MABN-style), fed through taps.

The reference below is written out independently in float64: it keeps the
past iterations' inputs and kernels (no offsets or buffered derivatives),
compensates with jacobians of the past moments, and applies the averaged
backward rule to the conv output's gradient by hand.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax import lax
from jax.test_util import check_grads

import mabn_jax as mj
from mabn_jax.functional import cross_iteration as F

CIN, C, KSIZE, HW = 2, 3, (2, 2), (4, 4)
EPS, MOMENTUM = 1e-5, 0.9
SPEC = F.ConvSpec.make(2, padding="SAME")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _moments(x, w):
  y = _conv(x, w)
  return jnp.mean(y, axis=(0, 1, 2)), jnp.mean(y**2, axis=(0, 1, 2))


def _loss_of_out(out, cot):
  return jnp.sum(out * cot) + 0.25 * jnp.sum(out**2)


class Reference:
  """CBN forward and the averaged backward, float64, from stored past iterations."""

  def __init__(self, window, burn_in, groups, group_history):
    self.past, self.burn_in, self.groups, self.gh = window - 1, burn_in, groups, group_history
    self.hist = [[] for _ in range(groups)] if group_history else []
    self.mean, self.var, self.step = np.zeros(C), np.ones(C), 0

  def _compensated(self, entry, w):
    xe, we, mu, nu = entry["x"], entry["w"], entry["mu"], entry["nu"]
    jm, jn = jax.jacrev(lambda k: _moments(xe, k))(we)  # (C, *K, C) each
    delta = np.asarray(w - we)
    return (
      mu + np.tensordot(np.asarray(jm), delta, axes=delta.ndim),
      nu + np.tensordot(np.asarray(jn), delta, axes=delta.ndim),
    )

  def step_(self, x, w, cot):
    """One step: ``(loss, grad_x, grad_w, grad_scale, grad_bias)``; advances the state."""
    self.step += 1
    burning = self.step <= self.burn_in
    y = np.asarray(_conv(x, w))
    b = x.shape[0] // self.groups
    new = []  # this step's entries, one per group
    outs, windows, inv_stds, mu_bars, var_bars = [], [], [], [], []
    for j in range(self.groups):
      yj, xj = y[j * b : (j + 1) * b], x[j * b : (j + 1) * b]
      mu, nu = yj.mean(axis=(0, 1, 2)), (yj**2).mean(axis=(0, 1, 2))
      entry = dict(x=xj, w=w, mu=mu, nu=nu)
      if burning or self.past == 0:
        window = []
      elif self.gh:
        window = self.hist[j][-self.past :]
      else:
        window = (self.hist + new)[-self.past :]
      mus, nus, count = mu.copy(), nu.copy(), np.ones(C)
      for e in window:
        m, n = self._compensated(e, w)
        keep = n >= m**2
        mus, nus, count = mus + keep * m, nus + keep * n, count + keep
      mu_bar, nu_bar = mus / count, nus / count
      var_bar = np.maximum(nu_bar - mu_bar**2, 0.0)
      inv = 1.0 / np.sqrt(var_bar + EPS)
      outs.append((yj - mu_bar) * inv)
      windows.append(window)
      inv_stds.append(inv)
      mu_bars.append(mu_bar)
      var_bars.append(var_bar)
      new.append(entry)
    out = np.concatenate(outs)
    loss, dout = jax.value_and_grad(_loss_of_out)(jnp.asarray(out), cot)
    dout = np.asarray(dout)
    grad_y = []
    for j in range(self.groups):
      g, xhat = dout[j * b : (j + 1) * b], outs[j]
      new[j]["g"], new[j]["psi"] = g.mean(axis=(0, 1, 2)), (g * xhat).mean(axis=(0, 1, 2))
    for j in range(self.groups):
      g, xhat, window = dout[j * b : (j + 1) * b], outs[j], windows[j]
      # Same-step entries of the window are the earlier groups' new entries:
      # their g/psi were set just above.
      g_avg = (new[j]["g"] + sum(e["g"] for e in window)) / (1 + len(window))
      psi_avg = (new[j]["psi"] + sum(e["psi"] for e in window)) / (1 + len(window))
      grad_y.append((g - g_avg - xhat * psi_avg) * inv_stds[j])
    grad_y = np.concatenate(grad_y)
    _, vjp = jax.vjp(_conv, x, w)
    grad_x, grad_w = vjp(jnp.asarray(grad_y))
    if not burning and self.past:
      if self.gh:
        for j in range(self.groups):
          self.hist[j] = (self.hist[j] + [new[j]])[-self.past :]
      else:
        self.hist = (self.hist + new)[-self.past :]
    self.mean = MOMENTUM * self.mean + (1 - MOMENTUM) * np.mean(mu_bars, axis=0)
    self.var = MOMENTUM * self.var + (1 - MOMENTUM) * np.mean(var_bars, axis=0)
    return (
      float(loss),
      np.asarray(grad_x),
      np.asarray(grad_w),
      np.sum(dout * out, axis=(0, 1, 2)),
      np.sum(dout, axis=(0, 1, 2)),
    )

  def state(self):
    """The buffers as the layer lays them out (zero rows first, newest last)."""

    def buffer(key):
      if self.gh:
        rows = [np.stack([h[i][key] for h in self.hist]) for i in range(len(self.hist[0]))]
        shape = (self.past, self.groups, C)
      else:
        rows = [e[key] for e in self.hist]
        shape = (self.past, C)
      out = np.zeros(shape)
      if rows:
        out[self.past - len(rows) :] = np.stack(rows)
      return out

    count = len(self.hist[0]) if self.gh else len(self.hist)
    return dict(
      mean=self.mean,
      var=self.var,
      mu_buffer=buffer("mu"),
      nu_buffer=buffer("nu"),
      g_buffer=buffer("g"),
      psi_buffer=buffer("psi"),
      count=count,
      step=self.step,
    )


class InputGradNet(nn.Module):
  """The layer, with a zero ``dx`` parameter added to its input: its gradient
  is the gradient to the input under ``mj.value_and_grad``."""

  kwargs: dict

  @nn.compact
  def __call__(self, x):
    dx = self.param("dx", nn.initializers.zeros, x.shape, x.dtype)
    return mj.CrossIterationConvNorm(C, KSIZE, name="cbn", param_dtype=x.dtype, **self.kwargs)(
      x + dx, use_running_average=False
    )


def _data(steps, batch, seed, spread=0.2, dtype=np.float64):
  """Inputs, kernels (changing from step to step) and output cotangents."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=KSIZE + (CIN, C))
  for t in range(steps):
    x = rng.normal(size=(batch,) + HW + (CIN,)) * (1.0 + 0.2 * t) + 0.3
    w = base + spread * rng.normal(size=base.shape)
    cot = rng.normal(size=(batch,) + HW + (C,))
    yield tuple(jnp.asarray(a, dtype) for a in (x, w, cot))


def _linen_step(net):
  def loss_fn(variables, x, cot):
    out, mutated = net.apply(variables, x, mutable=["batch_stats"])
    return _loss_of_out(out, cot), (mutated, out)

  return jax.jit(mj.value_and_grad(loss_fn, has_aux=True))


def _set_kernel(variables, w):
  params = {**variables["params"], "cbn": {**variables["params"]["cbn"], "conv": {"kernel": w}}}
  return {**variables, "params": params}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CASES = {
  # name: (window, burn_in, batch, norm_batch_size, group_history)
  "window3_burnin2": (3, 2, 4, None, False),
  "window4_burnin1": (4, 1, 4, None, False),
  "window3_groups_of_2": (3, 1, 6, 2, False),  # 3 groups > 2 buffer rows
  "window4_groups_of_2": (4, 2, 4, 2, False),
  "window4_group_history": (4, 1, 6, 2, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_and_state_equal_an_independent_float64_reference_over_steps(case):
  window, burn_in, batch, nbs, gh = CASES[case]
  steps = burn_in + window + 1  # burn-in, a growing window, then a full one
  errors = {}
  with jax.enable_x64(True):
    kwargs = dict(
      window=window,
      burn_in=burn_in,
      backward="averaged",
      running_stats="pooled",
      norm_batch_size=nbs,
      group_history=gh,
      momentum=MOMENTUM,
      epsilon=EPS,
    )
    net = InputGradNet(kwargs)
    x0 = jnp.zeros((batch,) + HW + (CIN,), jnp.float64)
    variables = net.init(jax.random.key(0), x0)
    step = _linen_step(net)
    ref = Reference(window, burn_in, batch // (nbs or batch), gh)
    for x, w, cot in _data(steps, batch, seed=list(CASES).index(case)):
      variables = _set_kernel(variables, w)
      ((loss, _), variables), grads = step(variables, x, cot)
      loss_ref, gx, gw, gscale, gbias = ref.step_(x, w, cot)
      got = dict(
        x=grads["dx"],
        kernel=grads["cbn"]["conv"]["kernel"],
        scale=grads["cbn"]["norm"]["scale"],
        bias=grads["cbn"]["norm"]["bias"],
        loss=loss,
      )
      want = dict(x=gx, kernel=gw, scale=gscale, bias=gbias, loss=loss_ref)
      stats = variables["batch_stats"]["cbn"]["norm"]
      for name, value in ref.state().items():
        got[name], want[name] = stats[name], value
      for name in want:
        errors[name] = max(errors.get(name, 0.0), _rel_err(got[name], want[name]))
      np.testing.assert_array_equal(variables[mj.BACKWARD_STATS]["cbn"]["norm"][mj.G_TAP], 0)
    # The state is float32 (buffers, offsets), the rest float64.
    print(case, {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["count"] == errors["step"] == 0.0
    assert max(errors.values()) < 1e-6, errors
    assert np.abs(np.asarray(stats["g_buffer"])).max() > 0


def _functional_steps(config, data, dtype=jnp.float64):
  """``[(grad_x, grad_w)]`` per step of the functional layer, its backward
  statistics fed through the taps (``'averaged'``) by hand."""
  averaged = config.backward == "averaged"
  state = F.init_state(
    KSIZE + (CIN, C), config.window, dtype, naive=config.naive, averaged=averaged, groups=None
  )

  def loss(x, w, taps, state, cot):
    out, new_state = F.normalize_train(
      F.conv(x, w, SPEC), x, w, state, SPEC, config, tap=taps if averaged else None
    )
    return _loss_of_out(out, cot), new_state

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  results = []
  for x, w, cot in data:
    taps = (jnp.zeros_like(state.g_buffer), jnp.zeros_like(state.psi_buffer))
    (_, state), (gx, gw, (dg, dpsi)) = grad(x, w, taps, state, cot)
    if averaged:
      state = state._replace(g_buffer=state.g_buffer + dg, psi_buffer=state.psi_buffer + dpsi)
    results.append((gx, gw, state))
  return results


@pytest.mark.parametrize("window,norm_batch_size", [(3, None), (4, None), (4, 2)])
def test_identical_window_entries_give_the_batch_backward_and_bn_finite_differences(
  window, norm_batch_size
):
  """Same input, kernel and cotangent every step (with groups: identical
  groups): every pooled moment and every averaged backward statistic equals
  the current one, so 'averaged' is 'batch', i.e. the derivative of plain BN."""
  with jax.enable_x64(True):
    x, w, cot = next(_data(1, 2, seed=7))
    if norm_batch_size:  # four identical groups of two
      x, cot = jnp.tile(x, (4, 1, 1, 1)), jnp.tile(cot, (4, 1, 1, 1))
    data = [(x, w, cot)] * (window + 2)
    results = {}
    for backward in ("averaged", "batch"):
      config = F.CBNConfig(
        window=window, burn_in=1, backward=backward, norm_batch_size=norm_batch_size, epsilon=EPS
      )
      results[backward] = _functional_steps(config, data)
    last = results["averaged"][-1][2]
    assert int(last.count) == window - 1 and np.abs(np.asarray(last.psi_buffer)).max() > 0
    for t, (a, b) in enumerate(zip(results["averaged"], results["batch"], strict=True)):
      for ga, gb in zip(a[:2], b[:2], strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")

    groups = x.shape[0] // (norm_batch_size or x.shape[0])

    def bn_loss(x, w):  # the surrogate: plain BN per group, biased variance
      y = _conv(x, w).reshape((groups, -1) + HW + (C,))
      mu = y.mean(axis=(1, 2, 3), keepdims=True)
      var = ((y - mu) ** 2).mean(axis=(1, 2, 3), keepdims=True)
      return _loss_of_out(((y - mu) / jnp.sqrt(var + EPS)).reshape(cot.shape), cot)

    check_grads(bn_loss, (x, w), order=1, modes=["rev"], eps=1e-6)
    want = jax.grad(bn_loss, argnums=(0, 1))(x, w)
    for got, ref in zip(results["averaged"][-1][:2], want, strict=True):
      np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)


def test_averaged_backward_differs_from_batch_when_window_entries_differ():
  with jax.enable_x64(True):
    data = list(_data(4, 4, seed=8))
    got = {
      b: _functional_steps(F.CBNConfig(window=3, burn_in=1, backward=b), data)
      for b in ("averaged", "batch")
    }
    # Burn-in: both are BN's backward; afterwards they differ.
    np.testing.assert_allclose(got["averaged"][0][1], got["batch"][0][1], rtol=1e-12)
    assert _rel_err(got["averaged"][-1][1], got["batch"][-1][1]) > 1e-3


@pytest.mark.parametrize("norm_batch_size,group_history", [(None, False), (2, False), (2, True)])
def test_forward_output_and_forward_state_equal_the_other_options(norm_batch_size, group_history):
  outs = {}
  for backward in F.BACKWARDS:
    kwargs = dict(
      window=3,
      burn_in=1,
      backward=backward,
      norm_batch_size=norm_batch_size,
      group_history=group_history,
    )
    net = InputGradNet(kwargs)
    variables = net.init(jax.random.key(1), jnp.zeros((6,) + HW + (CIN,)))
    step = _linen_step(net)
    trace = []
    for x, w, cot in _data(5, 6, seed=9, dtype=np.float32):
      variables = _set_kernel(variables, w)
      ((_, out), variables), _ = step(variables, x, cot)
      trace.append((out, variables["batch_stats"]["cbn"]["norm"]))
    outs[backward] = trace
  for backward, trace in outs.items():
    pairs = zip(trace, outs["published"], strict=True)
    for t, ((out, stats), (ref_out, ref_stats)) in enumerate(pairs):
      if backward in ("averaged", "exact"):  # the same pooled moments, bit for bit
        np.testing.assert_array_equal(out, ref_out, err_msg=f"{backward} step {t}")
      else:  # 'batch' forms them as mu + (mu_bar - mu)
        np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
      assert set(stats) - set(ref_stats) == (
        {"g_buffer", "psi_buffer"} if backward == "averaged" else set()
      )
      for name in ref_stats:
        np.testing.assert_allclose(
          stats[name], ref_stats[name], rtol=1e-6, atol=1e-6, err_msg=f"{backward} {name} step {t}"
        )


def _nnx_pair(seed, **kwargs):
  linen = mj.CrossIterationConvNorm(C, KSIZE, **kwargs)
  variables = linen.init(
    jax.random.key(seed), jnp.zeros((6,) + HW + (CIN,)), use_running_average=False
  )
  groups = 6 // kwargs["norm_batch_size"] if kwargs.get("group_history") else None
  model = mj.nnx.CrossIterationConvNorm(
    CIN, C, KSIZE, num_groups=groups, **kwargs, rngs=nnx.Rngs(seed)
  )
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))))
  linen_flat = {tuple(p): v for (_, *p), v in traverse_util.flatten_dict(dict(variables)).items()}
  assert flat.keys() == linen_flat.keys(), sorted(set(flat) ^ set(linen_flat))
  for path, value in linen_flat.items():
    flat[path][...] = value
  return linen, variables, model


@pytest.mark.parametrize("norm_batch_size,group_history", [(None, False), (2, False), (2, True)])
def test_nnx_layer_matches_linen_step_by_step(norm_batch_size, group_history):
  kwargs = dict(
    window=3,
    burn_in=1,
    backward="averaged",
    norm_batch_size=norm_batch_size,
    group_history=group_history,
    momentum=0.8,
  )
  linen, variables, model = _nnx_pair(3, **kwargs)

  def linen_loss(variables, x, cot):
    out, mutated = linen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return _loss_of_out(out, cot), mutated

  linen_step = jax.jit(mj.value_and_grad(linen_loss))
  nnx_step = nnx.jit(mj.nnx.value_and_grad(lambda m, x, cot: _loss_of_out(m(x), cot)))
  for t, (x, w, cot) in enumerate(_data(5, 6, seed=10, dtype=np.float32)):
    variables = {**variables, "params": {**variables["params"], "conv": {"kernel": w}}}
    model.conv.kernel[...] = w
    (loss, variables), grads = linen_step(variables, x, cot)
    nnx_loss, nnx_grads = nnx_step(model, x, cot)
    np.testing.assert_allclose(nnx_loss, loss, rtol=1e-6)
    want = {tuple(p): v for p, v in traverse_util.flatten_dict(dict(grads)).items()}
    got = {p: v[...] for p, v in nnx.to_flat_state(nnx_grads)}
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_allclose(
        got[path], want[path], rtol=1e-6, atol=1e-6, err_msg=f"grad {path} step {t}"
      )
    for name, value in variables["batch_stats"]["norm"].items():
      np.testing.assert_allclose(
        getattr(model.norm, name)[...], value, rtol=1e-6, atol=1e-7, err_msg=f"{name} step {t}"
      )
  assert np.abs(np.asarray(model.norm.psi_buffer[...])).max() > 0


# --- errors name the layer -------------------------------------------------------


def _net_and_variables(**kwargs):
  net = InputGradNet(dict(window=3, burn_in=0, backward="averaged", **kwargs))
  x = jnp.asarray(next(_data(1, 4, seed=11, dtype=np.float32))[0])
  return net, net.init(jax.random.key(0), x), x


def test_gradient_without_the_taps_raises_naming_the_layer():
  net, variables, x = _net_and_variables()

  def loss(params):
    out, _ = net.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(out**3)

  with pytest.raises(
    ValueError,
    match=r"CrossIterationConvNorm 'cbn'.*backward='averaged'.*"
    r"not being fed.*mabn_jax.value_and_grad",
  ):
    jax.grad(loss)(variables["params"])


def test_nnx_gradient_without_the_taps_raises_naming_the_layer():
  model = mj.nnx.CrossIterationConvNorm(
    CIN, C, KSIZE, window=3, burn_in=0, backward="averaged", rngs=nnx.Rngs(0)
  )
  x = jnp.asarray(next(_data(1, 4, seed=11, dtype=np.float32))[0])
  with pytest.raises(
    ValueError,
    match=r"nnx.CrossIterationConvNorm\(num_features=3\).*"
    r"not being fed.*mabn_jax.nnx.value_and_grad",
  ):
    nnx.grad(lambda m: jnp.sum(m(x) ** 3))(model)


def test_two_training_calls_in_one_step_raise_naming_the_layer():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = mj.CrossIterationConvNorm(
        CIN, KSIZE, window=3, burn_in=0, backward="averaged", name="shared"
      )
      return layer(layer(x, use_running_average=False), use_running_average=False)

  x = jnp.asarray(next(_data(1, 4, seed=12, dtype=np.float32))[0])
  variables = Twice().init(jax.random.key(0), x)

  def loss(variables, x):
    out, mutated = Twice().apply(variables, x, mutable=["batch_stats"])
    return jnp.sum(out**2), mutated

  with pytest.raises(
    ValueError,
    match=r"CrossIterationConvNorm 'shared'.*second time in "
    r"training mode.*one layer instance per call",
  ):
    mj.value_and_grad(loss)(variables, x)


def test_training_step_in_inference_mode_raises_naming_the_layer():
  net = mj.CrossIterationConvNorm(C, KSIZE, window=3, backward="averaged")
  x = jnp.asarray(next(_data(1, 4, seed=13, dtype=np.float32))[0])
  variables = net.init(jax.random.key(0), x, use_running_average=False)

  def loss(variables, x):
    out, mutated = net.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    return jnp.sum(out**2), mutated

  with pytest.raises(ValueError, match=r"CrossIterationConvNorm '.*'.*use_running_average=True"):
    mj.value_and_grad(loss)(variables, x)


def test_state_without_backward_buffers_and_stray_taps_are_rejected():
  w = jnp.ones(KSIZE + (CIN, C))
  x = jnp.ones((2,) + HW + (CIN,))
  averaged = F.CBNConfig(window=3, backward="averaged")
  with pytest.raises(
    ValueError,
    match=r"CBN 'my/layer'.*'g_buffer' has shape \(0, 3\).*"
    r"backward='averaged'.*averaged=True",
  ):
    F.normalize_train(
      F.conv(x, w, SPEC), x, w, F.init_state(w.shape, 3), SPEC, averaged, where="CBN 'my/layer'"
    )
  state = F.init_state(w.shape, 3, averaged=True)
  with pytest.raises(ValueError, match=r"CBN 'my/layer'.*g_tap has shape \(3, 3\)"):
    F.normalize_train(
      F.conv(x, w, SPEC),
      x,
      w,
      state,
      SPEC,
      averaged,
      where="CBN 'my/layer'",
      tap=(jnp.zeros((3, 3)), jnp.zeros((2, 3))),
    )
  with pytest.raises(ValueError, match=r"CBN 'my/layer'.*tap was given but backward='exact'"):
    F.normalize_train(
      F.conv(x, w, SPEC),
      x,
      w,
      F.init_state(w.shape, 3),
      SPEC,
      F.CBNConfig(window=3),
      where="CBN 'my/layer'",
      tap=(jnp.zeros((2, 3)), jnp.zeros((2, 3))),
    )


def test_layout_and_registry():
  model = mj.make_normalizer("cbn", backward="averaged", window=3).conv_norm(C, 2, name="c")
  x = jnp.ones((4,) + HW + (CIN,))
  variables = model.init(jax.random.key(0), x, train=True)
  assert set(variables[mj.BACKWARD_STATS]["norm"]) == {mj.G_TAP, mj.PSI_TAP}
  assert mj.TAP_TARGETS[mj.G_TAP] == "g_buffer" and mj.TAP_TARGETS[mj.PSI_TAP] == "psi_buffer"
  assert variables["batch_stats"]["norm"]["g_buffer"].shape == (2, C)
  # The other options keep their layout: no taps, no backward buffers.
  plain = mj.make_normalizer("cbn", window=3).conv_norm(C, 2).init(jax.random.key(0), x, train=True)
  assert mj.BACKWARD_STATS not in plain and "g_buffer" not in plain["batch_stats"]["norm"]
  nnx_model = mj.make_normalizer("cbn", backward="averaged", window=3).nnx_conv_norm(
    CIN, C, 2, rngs=nnx.Rngs(0)
  )
  assert nnx_model.norm.g_increment[...].shape == (2, C)
