"""CBN's ``backward='averaged'``: BN's backward with averaged backward statistics.

The forward is ``(y - mu_bar) * inv_std`` with the pooled statistics
(constants). The backward, with ``g`` the gradient at ``xhat``, is::

  g_B, Psi_B = mean(g), mean(g * xhat)     (per group, over axis_name)
  g_y = (g - g_avg - xhat * Psi_avg) * inv_std

with ``g_avg``, ``Psi_avg`` the means over the group's filled window entries
and itself (``g_B``, ``Psi_B`` in burn-in). It is a :func:`jax.custom_vjp`
whose step statistics leave through two taps: their cotangents are the
increments of ``g_buffer``/``psi_buffer``, pushed as the forward pushes
``mu_buffer`` (``docs/normalization.md``, section 4, "Gradient options").
Errors raised here are
:class:`~mabn_jax.functional._checks.UnnamedLayerError`s (the trace is shared
by layers); :func:`~mabn_jax.functional.cross_iteration.normalize_train`
names the layer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from mabn_jax.functional import backward_stats as bs
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import UnnamedLayerError
from mabn_jax.functional.cross_iteration.window import history_entries, window_entries, window_mean


def _centred_scaled(y, mu_bar, inv_std):
  """``(y - mu_bar) * inv_std`` with ``(G, C)`` group statistics."""
  axis = y.ndim - 1
  return (y - st.broadcast_groups(mu_bar, y, axis)) * st.broadcast_groups(inv_std, y, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _averaged_normalize(
  y, g_tap, psi_tap, mu_bar, inv_std, g_buffer, psi_buffer, past_filled, burning, groups, config
):
  del g_tap, psi_tap, g_buffer, psi_buffer, past_filled, burning, groups, config
  return _centred_scaled(y, mu_bar, inv_std)


def _averaged_fwd(
  y, g_tap, psi_tap, mu_bar, inv_std, g_buffer, psi_buffer, past_filled, burning, groups, config
):
  if y.perturbed and not (g_tap.perturbed and psi_tap.perturbed):
    raise UnnamedLayerError(
      "the CBN backward statistics (backward='averaged') are not being "
      "fed: the gradient is taken with respect to the input or the kernel but not "
      "the 'backward_stats' taps (g_increment, psi_increment), so g_buffer and "
      "psi_buffer would go stale. Compute gradients with "
      "mabn_jax.value_and_grad(loss_fn)(variables, ...) (Flax NNX: "
      "mabn_jax.nnx.value_and_grad(loss_fn)(model, ...); or differentiate the "
      "taps and add their cotangents to the buffers) instead of "
      "jax.grad/jax.value_and_grad (nnx.grad) on the params alone."
    )
  for tap in (g_tap, psi_tap):
    bs.check_tap_varies_like_input(y.value, tap.value, config, normalizer="cbn")
  res = tuple(p.value for p in (y, mu_bar, inv_std, g_buffer, psi_buffer, past_filled, burning))
  return _centred_scaled(res[0], res[1], res[2]), res


def _averaged_bwd(groups, config, res, ct):
  y, mu_bar, inv_std, g_buffer, psi_buffer, past_filled, burning = res
  if isinstance(ct, SymbolicZero):
    aval: Any = ct.aval
    ct = jnp.zeros(aval.shape, aval.dtype)
  axis = y.ndim - 1
  xhat = _centred_scaled(y, mu_bar, inv_std)
  g = ct.astype(xhat.dtype)
  g_batch, psi_batch = bs.backward_statistics(
    xhat, g, groups, axis, config.axis_name, config.axis_index_groups, with_mean=True
  )
  past = (g_buffer.astype(g.dtype), psi_buffer.astype(g.dtype))
  if config.group_history:
    windows, filled = history_entries(past, past_filled, groups)

    def new_rows(a):
      return a[None]  # one entry per step, every group's value
  else:
    windows, filled = window_entries(past, (g_batch, psi_batch), past_filled)
    newest = min(groups, g_buffer.shape[0])

    def new_rows(a):
      return a[-newest:]

  g_mean = jnp.where(burning, g_batch, window_mean(g_batch, windows[0], filled))
  psi = jnp.where(burning, psi_batch, window_mean(psi_batch, windows[1], filled))
  grad_y = bs.stabilized_input_gradient(g, xhat, inv_std, psi, axis, g_mean=g_mean)
  increments = tuple(
    bs.tap_increment(st.push_unless(buffer, new_rows(batch), burning), buffer, g_batch, psi_batch)
    for buffer, batch in ((g_buffer, g_batch), (psi_buffer, psi_batch))
  )
  return (grad_y.astype(y.dtype),) + increments + (None,) * 6


_averaged_normalize.defvjp(_averaged_fwd, _averaged_bwd, symbolic_zeros=True)
