"""A CBN step's moments and the windows of entries each group pools.

The per-group moments ``mu = mean(y)``, ``nu = mean(y^2)`` of a step
(:func:`batch_moments`), and their averages with the past entries of each
group's window (:func:`pooled_moments`; with a history per group,
:func:`pooled_moments_per_group`). :func:`window_entries`,
:func:`history_entries` and :func:`window_mean` also serve the averaged
backward statistics (``CBNConfig.backward='averaged'``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional import statistics as st


def batch_moments(
  y: jax.Array, groups: int, axis_name: Optional[str] = None, axis_index_groups=None
) -> Tuple[jax.Array, jax.Array]:
  """Per-group ``mu = mean(y)`` and ``nu = mean(y^2)``, each ``(G, C)``."""
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  y = y.astype(dtype)
  axis = y.ndim - 1
  mu = st.group_mean(y, groups, axis, axis_name, axis_index_groups)
  nu = st.group_mean(jnp.square(y), groups, axis, axis_name, axis_index_groups)
  return mu, nu


def pooled_moments(
  mu: jax.Array,
  nu: jax.Array,
  past_mu: jax.Array,
  past_nu: jax.Array,
  past_filled: jax.Array,
  same_step_gradient: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """Averages of the current and the valid past entries, per group.

  Group ``j`` pools its own ``(mu[j], nu[j])`` (always kept) and the ``P``
  entries of the sequence ``past ++ current`` that precede it,
  ``seq[j], ..., seq[j + P - 1]``, keeping those that are filled and
  consistent (``nu >= mu^2``).

  Args:
    mu, nu: ``(G, C)`` current group statistics.
    past_mu, past_nu: ``(P, C)`` (compensated) past entries, newest last;
      whatever gradient they carry is kept.
    past_filled: ``(P,)`` bool, which past entries hold real values.
    same_step_gradient: whether the earlier groups of this step carry their
      gradient into later groups' windows (``backward='exact'``); otherwise
      a group's own entry is its only term with gradient from this step.

  Returns:
    ``(mu_bar, nu_bar)``, each ``(G, C)``.
  """
  same_mu, same_nu = (
    (mu, nu) if same_step_gradient else (lax.stop_gradient(mu), lax.stop_gradient(nu))
  )
  (win_mu, win_nu), filled = window_entries((past_mu, past_nu), (same_mu, same_nu), past_filled)
  return _average_windows(mu, nu, win_mu, win_nu, filled)


def window_entries(past, current, past_filled):
  """The ``P`` window entries each group of a step pools with its own.

  Group ``j``'s entries are ``seq[j], ..., seq[j + P - 1]`` of the sequence
  ``past ++ current`` (the past entries, then the earlier groups of this
  step), for each statistic in the tuples ``past`` and ``current``.

  Args:
    past: tuple of ``(P, C)`` past entries, newest last.
    current: tuple of ``(G, C)`` this step's group values, in order.
    past_filled: ``(P,)`` bool, which past entries hold real values.

  Returns:
    ``(windows, filled)``: a tuple of ``(G, P, C)`` arrays and the ``(G, P)``
    bool mask of the entries that hold real values.
  """
  groups, size = current[0].shape[0], past[0].shape[0]

  def windows_of(sequence):  # (P + G, ...) -> (G, P, ...), by static slices
    return jnp.stack([sequence[j : j + size] for j in range(groups)])

  windows = tuple(
    windows_of(jnp.concatenate([p, c.astype(p.dtype)], axis=0))
    for p, c in zip(past, current, strict=True)
  )
  filled = windows_of(jnp.concatenate([past_filled, jnp.ones((groups,), bool)]))
  return windows, filled


def history_entries(past, past_filled, groups: int):
  """:func:`window_entries` with a history per group (``group_history``).

  Args:
    past: tuple of ``(P, G, C)`` each group's past entries, newest last.
    past_filled: ``(P,)`` bool, which past steps hold real values.
    groups: ``G``.

  Returns:
    ``(windows, filled)``: ``(G, P, C)`` arrays and the ``(G, P)`` mask.
  """
  windows = tuple(jnp.swapaxes(p, 0, 1) for p in past)
  return windows, jnp.broadcast_to(past_filled, (groups, past_filled.shape[0]))


def window_mean(value: jax.Array, window: jax.Array, keep: jax.Array) -> jax.Array:
  """Per group, the mean of ``value`` ``(G, C)`` and the entries of ``window``
  ``(G, P, C)`` selected by ``keep`` (``(G, P)`` or ``(G, P, C)``, bool)."""
  keep = keep if keep.ndim == window.ndim else keep[..., None]
  keep = keep.astype(value.dtype)
  return (value + jnp.sum(keep * window, axis=1)) / (1.0 + jnp.sum(keep, axis=1))


def _average_windows(mu, nu, win_mu, win_nu, filled):
  """Per group, the mean of ``(mu, nu)`` and its window entries ``(G, P, C)``
  that are ``filled`` ``(G, P)`` and consistent (``nu >= mu^2``)."""
  keep = filled[..., None] & (lax.stop_gradient(win_nu) >= jnp.square(lax.stop_gradient(win_mu)))
  return window_mean(mu, win_mu, keep), window_mean(nu, win_nu, keep)


def pooled_moments_per_group(
  mu: jax.Array, nu: jax.Array, past_mu: jax.Array, past_nu: jax.Array, past_filled: jax.Array
) -> Tuple[jax.Array, jax.Array]:
  """:func:`pooled_moments` with a history per group (``group_history``).

  Args:
    mu, nu: ``(G, C)`` current group statistics (with gradient).
    past_mu, past_nu: ``(P, G, C)`` each group's (compensated) past steps.
    past_filled: ``(P,)`` bool, which past steps hold real values.

  Returns:
    ``(mu_bar, nu_bar)``, each ``(G, C)``: group ``j`` averages its own
    entry and its filled, consistent (``nu >= mu^2``) past entries.
  """
  (win_mu, win_nu), filled = history_entries((past_mu, past_nu), past_filled, mu.shape[0])
  return _average_windows(mu, nu, win_mu, win_nu, filled)
