"""Backward statistics shared by the normalizers that replace them.

BN's input gradient uses two backward statistics per channel, ``g_B =
mean(g)`` and ``Psi_B = mean(g * xhat)`` (``docs/normalization.md``, section
1, "Batch normalization (BN) and its four batch statistics"). MABN
(section 2, "MABN: Moving Average Batch Normalization") and CBN's
``backward='averaged'`` (section 4, "Cross-Iteration Batch Normalization
(CBN)") replace them with averages over past steps. A step's statistics are
known only in its backward pass, inside a :func:`jax.custom_vjp`; they leave
it through the cotangent of a *tap*, a zero-valued array shaped like the
buffer they update, whose cotangent is the buffer's increment.

This module holds what those backward passes share: the statistics
(:func:`backward_statistics`), the input gradient they give
(:func:`stabilized_input_gradient`), a tap's cotangent
(:func:`tap_increment`) and the check that a tap can carry it under
``jax.shard_map`` (:func:`check_tap_varies_like_input`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import UnnamedLayerError


def varying_axes(value) -> frozenset:
  """Mesh axes over which ``value`` varies under ``jax.shard_map`` (else empty)."""
  aval = jax.typeof(value)
  manual = getattr(aval, "manual_axis_type", None)  # newer JAX
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", None) or ())


def check_tap_varies_like_input(x, tap, config, normalizer: str = "mabn") -> None:
  """Raises if this device's ``Psi_B`` could not be returned through ``tap``.

  ``config`` is any config with ``axis_name``/``axis_index_groups`` (MABN's,
  CBN's); ``normalizer`` is the registry name the message suggests. The
  error is an :class:`~mabn_jax.functional._checks.UnnamedLayerError`: this
  runs inside a trace shared by layers, whose caller names the layer.

  Under ``jax.shard_map`` a tap that is replicated over a mesh axis (the
  variables passed with ``P()``) while the input is split along it would get
  a cotangent that differs per device, unless the statistics are averaged
  over that axis (``axis_name``); JAX then fails in the custom VJP with a
  type error that names neither the layer nor the fix.
  """
  synced = set()
  if config.axis_index_groups is None and config.axis_name is not None:
    names = config.axis_name
    synced = set(names) if isinstance(names, (tuple, list)) else {names}
  axes = sorted(varying_axes(x) - varying_axes(tap) - synced, key=str)
  if axes:
    name = axes[0] if len(axes) == 1 else tuple(axes)
    raise UnnamedLayerError(
      f"under jax.shard_map the input varies over mesh axis {name!r} but the "
      "layer's state (its backward-statistics tap) is replicated over it (passed with "
      "P()), so this device's statistics cannot be stored in replicated state. Keep "
      f"per-device state: give the variables a leading device axis sharded with "
      f"in_specs/out_specs P({name!r}) (as pmap does), or synchronize the statistics "
      f"over the devices with axis_name={name!r} (registry: "
      f"make_normalizer({normalizer!r}, axis_name={name!r}))."
    )


def backward_statistics(
  xhat: jax.Array,
  g: jax.Array,
  groups: int,
  axis: int,
  axis_name=None,
  axis_index_groups=None,
  with_mean: bool = False,
):
  """This step's backward statistics per group (``docs/normalization.md``,
  sections 1 and 2 (b)).

  ``Psi_B = mean(xhat * g)`` and, with ``with_mean`` (a normalizer that
  subtracts a mean, like BN), ``g_B = mean(g)``: per group and channel,
  averaged over ``axis_name`` if given.

  Args:
    xhat: ``(N, ..., C)`` the normalized input (before ``r``).
    g: ``(N, ..., C)`` the gradient arriving at ``xhat``.
    groups: ``G``, normalization groups in the batch.
    axis: the feature axis (non-negative).

  Returns:
    ``Psi_B`` ``(G, C)``, or ``(g_B, Psi_B)`` with ``with_mean``.
  """
  psi = st.group_mean(xhat * g, groups, axis, axis_name, axis_index_groups)
  if not with_mean:
    return psi
  return st.group_mean(g, groups, axis, axis_name, axis_index_groups), psi


def stabilized_input_gradient(
  g: jax.Array,
  xhat: jax.Array,
  inv_std: jax.Array,
  psi: jax.Array,
  axis: int,
  g_mean: Optional[jax.Array] = None,
) -> jax.Array:
  """``(g - g_mean - xhat * psi) * inv_std``: BN's input gradient with the given
  backward statistics (``docs/normalization.md``, section 1; MABN's
  stabilized one, section 2 (b), has no ``g_mean`` and the moving average
  ``psi``).

  Args:
    g: ``(N, ..., C)`` gradient at ``xhat``; xhat: ``(N, ..., C)``.
    inv_std, psi: ``(G, C)`` per-group values; g_mean: ``(G, C)`` or ``None``.
    axis: the feature axis (non-negative).
  """
  centred = g if g_mean is None else g - st.broadcast_groups(g_mean, g, axis)
  return (centred - xhat * st.broadcast_groups(psi, g, axis)) * st.broadcast_groups(
    inv_std, g, axis
  )


def tap_increment(new_buffer: jax.Array, buffer: jax.Array, *batch_stats) -> jax.Array:
  """A tap's cotangent: ``new_buffer - buffer``, or NaN if any of this step's
  ``batch_stats`` is not finite.

  With more groups than buffer rows a group's statistic may be pushed out at
  once; a non-finite one must still mark the whole increment non-finite, so
  that the training loop keeps the buffer (as the forward state is kept,
  :func:`mabn_jax.training.add_increment`).
  """
  finite = st.all_finite(batch_stats)
  return jnp.where(finite, new_buffer - buffer, jnp.nan)
