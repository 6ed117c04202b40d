"""CBN's training step: :func:`normalize_train`.

A step computes its per-group moments, pools them with the compensated
buffered entries (plain BN's during burn-in), normalizes with the pooled
statistics, updates the running statistics and pushes its own entries into
the buffers (``docs/normalization.md``, section 4, "Cross-Iteration Batch
Normalization (CBN)"). The gradient is ``config.gradient``
(:mod:`.gradients`).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mabn_jax.functional import counters
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import layer_error
from mabn_jax.functional.cross_iteration.compensation import compensate, stored_entries
from mabn_jax.functional.cross_iteration.derivatives import moment_derivatives
from mabn_jax.functional.cross_iteration.geometry import ConvSpec
from mabn_jax.functional.cross_iteration.state import CBNConfig, CBNState, in_burn_in, state_shapes
from mabn_jax.functional.cross_iteration.window import (
  batch_moments,
  pooled_moments,
  pooled_moments_per_group,
)
from mabn_jax.functional.interface import named_errors

_DEFAULT_CONFIG = CBNConfig()


def normalize_train(
  y: jax.Array,
  x: jax.Array,
  kernel: jax.Array,
  state: CBNState,
  spec: ConvSpec,
  config: CBNConfig = _DEFAULT_CONFIG,
  bias: Optional[jax.Array] = None,
  where: Optional[str] = "CBN",
  tap: Optional[Tuple[jax.Array, jax.Array]] = None,
) -> Tuple[jax.Array, CBNState]:
  """One CBN training step: ``(y - mu_bar) / sqrt(var_bar + eps)`` and the new state.

  Args:
    y: ``(N, *spatial_out, C)`` conv output *without* the conv bias; it
      carries the gradient (to ``x`` and the kernel through the caller's
      convolution). ``N`` must be a multiple of ``config.norm_batch_size``.
    x: ``(N, *spatial, cin)`` the conv input (for the derivatives only).
    kernel: ``(*K, C)`` the effective kernel with ``y = conv(x, kernel)``:
      the compensation target (differentiated through the Taylor terms with
      ``backward='exact'``, a constant otherwise) and the kernel the new
      entries' offsets are taken with (a constant).
    state: the current :class:`CBNState` (buffer ``P`` = ``config.window - 1``).
    spec: the convolution.
    config: static hyper-parameters.
    bias: optional ``(C,)`` conv bias; only shifts the running ``mean`` (the
      normalized output does not depend on it).
    where: name used in error messages.
    tap: ``backward='averaged'`` only: ``(g_tap, psi_tap)``, zeros shaped
      like ``state.g_buffer``/``state.psi_buffer``; their cotangents are this
      step's increments of those buffers (the returned state leaves them
      unchanged). ``None`` is allowed only when no gradient is taken.

  Returns:
    ``(xhat, new_state)``: ``xhat`` has ``y``'s shape, dtype promoted to at
    least float32 (apply gamma and beta outside).
  """
  config.validate(where)
  groups = st.num_groups(y.shape[0], config.norm_batch_size, where)
  tap = _checked_tap(y, x, kernel, state, config, groups, tap, where)
  if where is None:  # the functional interface: the caller names the layer
    return _train_step(y, x, kernel, state, bias, tap, spec, config, groups)
  with named_errors(where):
    return _train_step(y, x, kernel, state, bias, tap, spec, config, groups)


SAVED_STATISTICS = ("cbn_batch_moments", "cbn_pooled_moments")
"""Names (``jax.ad_checkpoint.checkpoint_name``) of the per-group moments the
training step keeps for its backward pass with ``CBNConfig.rematerialize``;
everything else it recomputes."""


def _train_step_body(y, x, kernel, state, bias, tap, spec, config, groups):
  """:func:`normalize_train` after its checks (``tap`` as ``_checked_tap`` returns it)."""
  past = config.window - 1
  gradient = config.gradient
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  y32 = y.astype(dtype)

  mu, nu = checkpoint_name(
    batch_moments(y32, groups, config.axis_name, config.axis_index_groups), SAVED_STATISTICS[0]
  )
  step = counters.read(state.step) + 1
  burning = in_burn_in(step, config.burn_in)
  past_filled = jnp.arange(past) >= past - counters.read(state.count)
  mu_bar, nu_bar = checkpoint_name(
    _window_moments(mu, nu, kernel, state, config, gradient, past_filled, burning),
    SAVED_STATISTICS[1],
  )
  var_bar = jnp.maximum(nu_bar - jnp.square(mu_bar), 0.0)

  inv_std = lax.rsqrt(var_bar + config.epsilon)
  xhat = gradient.normalize(y32, mu_bar, inv_std, tap, state, past_filled, burning, groups, config)

  mu_c, nu_c = lax.stop_gradient(mu), lax.stop_gradient(nu)
  new_state = _with_running_stats(state, mu_c, nu_c, mu_bar, var_bar, bias, config, step)
  if past > 0:
    new_state = _with_new_entries(
      new_state, state, x, y32, mu_c, nu_c, kernel, spec, config, groups, burning
    )
  return xhat, new_state


# One jit per (shapes, config), as MABN's (functional.mabn._train_step): a
# network's layers of equal shapes share one trace of the step. With
# config.rematerialize its backward pass keeps only the (G, C) moments and
# recomputes the activation-sized values (y - mu_bar, xhat, ...) from y, which
# the caller's convolution keeps anyway: without the checkpoint XLA keeps two
# more activation-sized arrays per layer (BENCHMARKS.md, "Tried and dropped").
@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _train_step(y, x, kernel, state, bias, tap, spec, config, groups):
  """:func:`_train_step_body`, keeping only :data:`SAVED_STATISTICS` for the
  backward pass if ``config.rematerialize``."""
  body = _CHECKPOINTED_STEP if config.rematerialize else _train_step_body
  return body(y, x, kernel, state, bias, tap, spec, config, groups)


_CHECKPOINTED_STEP = jax.checkpoint(
  _train_step_body,
  static_argnums=(6, 7, 8),
  policy=jax.checkpoint_policies.save_only_these_names(*SAVED_STATISTICS),
)


def _checked_tap(y, x, kernel, state, config, groups, tap, where):
  """Raises an error (:func:`~mabn_jax.functional._checks.layer_error`) for a
  state, tap or kernel that does not fit; returns the tap (zeros when
  ``'averaged'`` is called without one)."""
  past = config.window - 1
  history_groups = groups if config.group_history else None
  averaged = config.gradient.averages_backward_statistics
  expected = state_shapes(kernel.shape, config.window, config.naive, history_groups, averaged)
  for name, shape in expected.items():
    actual = tuple(getattr(state, name).shape)
    if actual != tuple(shape):
      raise layer_error(
        where,
        f"state '{name}' has shape {actual} but the kernel "
        f"{tuple(kernel.shape)}, window {config.window}, naive={config.naive}"
        + (f", backward={config.backward!r}" if name in ("g_buffer", "psi_buffer") else "")
        + (f" and {groups} groups with their own history" if history_groups else "")
        + f" imply {tuple(shape)}"
        + (
          " (make it with init_state(..., averaged=True))"
          if averaged and name in ("g_buffer", "psi_buffer")
          else ""
        )
        + ".",
      )
  if past > 0 and not config.naive and config.derivative_dtype is not None:
    expected_dtype = jnp.dtype(config.derivative_dtype)
    for name in ("dmu_buffer", "dnu_buffer"):
      actual = getattr(state, name).dtype
      if actual != expected_dtype:
        raise layer_error(
          where,
          f"state '{name}' has dtype {actual} but derivative_dtype is "
          f"{expected_dtype.name} (make it with init_state(..., "
          f"derivative_dtype={expected_dtype.name!r})).",
        )
  if tap is not None and not averaged:
    raise layer_error(
      where,
      f"a backward-statistics tap was given but backward="
      f"{config.backward!r} keeps no backward statistics (only 'averaged' does).",
    )
  if averaged and past > 0:
    if tap is None:
      tap = (jnp.zeros_like(state.g_buffer), jnp.zeros_like(state.psi_buffer))
    for name, value, buffer in zip(
      ("g_tap", "psi_tap"), tap, (state.g_buffer, state.psi_buffer), strict=True
    ):
      if tuple(value.shape) != tuple(buffer.shape):
        raise layer_error(
          where,
          f"{name} has shape {tuple(value.shape)} but the buffer it "
          f"updates has {tuple(buffer.shape)}.",
        )
  if y.shape[-1] != kernel.shape[-1] or x.shape[-1] != kernel.shape[-2]:
    raise layer_error(
      where,
      f"kernel {tuple(kernel.shape)} does not match the conv input "
      f"{tuple(x.shape)} and output {tuple(y.shape)}.",
    )
  return tap


def _window_moments(mu, nu, kernel, state, config, gradient, past_filled, burning):
  """``(mu_bar, nu_bar)``, ``(G, C)``: the group moments pooled with the
  compensated buffered ones (plain BN's during burn-in), differentiable as
  ``gradient`` (``config.gradient``) says."""
  past = config.window - 1
  dtype = mu.dtype
  exact = gradient.differentiates_window
  if past > 0:
    if config.naive:
      past_mu, past_nu = state.mu_buffer, state.nu_buffer
    else:
      past_mu, past_nu = compensate(
        state.mu_offset,
        state.nu_offset,
        state.dmu_buffer,
        state.dnu_buffer,
        kernel,
        differentiable=exact,
      )
    past_mu, past_nu = past_mu.astype(dtype), past_nu.astype(dtype)
    if config.group_history:
      mu_win, nu_win = pooled_moments_per_group(mu, nu, past_mu, past_nu, past_filled)
    else:
      mu_win, nu_win = pooled_moments(mu, nu, past_mu, past_nu, past_filled, exact)
    mu_win, nu_win = gradient.pooled(mu, nu, mu_win, nu_win)
    mu_bar = jnp.where(burning, mu, mu_win)
    nu_bar = jnp.where(burning, nu, nu_win)
  else:
    mu_bar, nu_bar = mu, nu
  return mu_bar, nu_bar


def _with_running_stats(state, mu_c, nu_c, mu_bar, var_bar, bias, config, step):
  """``state`` with the running ``mean``/``var`` EMAs updated (from the pooled
  statistics or the group's own, ``config.running_stats``) and ``step``."""
  dtype = mu_c.dtype
  var_c = jnp.maximum(nu_c - jnp.square(mu_c), 0.0)
  if config.running_stats == "pooled":
    # The statistics this step normalized with (the published rule,
    # docs/normalization.md section 4, averages the batch's).
    run_mu, run_var = lax.stop_gradient(mu_bar), lax.stop_gradient(var_bar)
  else:
    run_mu, run_var = mu_c, var_c
  batch_mean = jnp.mean(run_mu, axis=0)
  if bias is not None:
    batch_mean = batch_mean + lax.stop_gradient(bias).astype(dtype)
  new_state = state._replace(
    mean=st.ema(state.mean, batch_mean, config.momentum),
    var=st.ema(state.var, jnp.mean(run_var, axis=0), config.momentum),
    step=step,
  )
  return new_state


def _with_new_entries(new_state, state, x, y32, mu_c, nu_c, kernel, spec, config, groups, burning):
  """``new_state`` with this step's entries pushed into the window buffers
  (moments, and for the compensated layer their derivatives and Taylor
  offsets); the buffers are kept as they were during burn-in."""
  past = config.window - 1
  if config.group_history:
    # One new entry per step, holding every group's statistics.
    newest, entries, added = groups, lambda a: a[None], 1
  else:
    # Only the newest min(G, P) groups stay in the buffers: derivatives of
    # the others would be pushed out at once, so they are never computed.
    newest, entries, added = min(groups, past), lambda a: a, groups

  count = counters.read(state.count)

  def push(name, rows):
    return st.push_unless(getattr(state, name), entries(rows), burning)

  pushed = dict(
    mu_buffer=push("mu_buffer", mu_c[-newest:]),
    nu_buffer=push("nu_buffer", nu_c[-newest:]),
    count=jnp.where(burning, count, jnp.minimum(count + added, past)),
  )
  if not config.naive:
    rows = newest * (y32.shape[0] // groups)
    dmu, dnu = moment_derivatives(
      x[-rows:],
      y32[-rows:],
      kernel,
      spec,
      newest,
      config.axis_name,
      config.axis_index_groups,
      config.derivative_stride,
      config.kernel_derivatives,
    )
    dmu, dnu, mu_offset, nu_offset = stored_entries(
      mu_c[-newest:], nu_c[-newest:], dmu, dnu, kernel, state.dnu_buffer.dtype
    )
    pushed.update(
      dmu_buffer=push("dmu_buffer", dmu),
      dnu_buffer=push("dnu_buffer", dnu),
      mu_offset=push("mu_offset", mu_offset),
      nu_offset=push("nu_offset", nu_offset),
    )
  return new_state._replace(**pushed)
