"""Per-channel moments over normalization groups, and moving-average helpers.

Every batch-dependent normalizer in this package reduces activations the same
way: the feature (channel) axis is kept, everything else is reduced, and the
batch may be split into groups of ``norm_batch_size`` consecutive samples that
are normalized separately (``docs/normalization.md``, section 2, "Simulated small normalization
batch"). Group statistics have shape ``(G, C)``: one row per group, in batch
order. The helpers here are the only place that math lives.

Buffers of past statistics are shift buffers of shape ``(m, C)`` with the
newest row last. ``push`` appends rows and keeps the last ``m``;
``window_means`` gives the simple moving average (SMA) that each new row sees.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional import counters
from mabn_jax.functional._checks import layer_error


def canonical_axis(axis: int, ndim: int, where: Optional[str] = "normalizer") -> int:
  """Returns ``axis`` as a non-negative index of an ``ndim``-dimensional array.

  Raises:
    ValueError: if ``axis`` is the batch axis (0) or out of range.
  """
  if ndim < 2:
    raise layer_error(
      where, f"expected an input of rank >= 2 (batch, ..., features), got rank {ndim}."
    )
  if not -ndim <= axis < ndim:
    raise layer_error(
      where,
      f"axis {axis} is out of range for an input of rank {ndim} "
      f"(expected an integer in [{-ndim}, {ndim - 1}]).",
    )
  axis = axis % ndim
  if axis == 0:
    raise layer_error(
      where,
      f"axis 0 is the batch axis; the feature axis must be one of 1..{ndim - 1} (or negative).",
    )
  return axis


def num_groups(
  batch_size: int, norm_batch_size: Optional[int], where: Optional[str] = "normalizer"
) -> int:
  """Number of normalization groups ``G`` in a batch of ``batch_size`` samples.

  ``norm_batch_size=None`` means the whole batch is one group.

  Raises:
    ValueError: if the batch is smaller than one group or not a multiple of it.
  """
  if norm_batch_size is None:
    return 1
  if not isinstance(norm_batch_size, int) or norm_batch_size < 1:
    raise layer_error(
      where, f"norm_batch_size must be None or a positive integer, got {norm_batch_size!r}."
    )
  if batch_size < norm_batch_size:
    raise layer_error(
      where,
      f"the batch of {batch_size} samples is smaller than one "
      f"normalization group (norm_batch_size={norm_batch_size}).",
    )
  if batch_size % norm_batch_size:
    raise layer_error(
      where,
      f"the batch of {batch_size} samples is not a multiple of norm_batch_size={norm_batch_size}.",
    )
  return batch_size // norm_batch_size


def split_groups(x: jax.Array, groups: int) -> jax.Array:
  """Reshapes ``(N, ...)`` to ``(G, N // G, ...)``: consecutive samples per group."""
  return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


def merge_groups(x: jax.Array) -> jax.Array:
  """Inverse of :func:`split_groups`."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _grouped_reduction_axes(ndim: int, axis: int) -> Tuple[int, ...]:
  # Axes of the grouped array (G, b, ...) reduced for per-group statistics:
  # everything but the group axis 0 and the feature axis (shifted by one).
  return tuple(a for a in range(1, ndim + 1) if a != axis + 1)


def group_mean(x: jax.Array, groups: int, axis: int, axis_name=None, axis_index_groups=None):
  """Per-group, per-channel mean of ``x``.

  Args:
    x: ``(N, ..., C, ...)`` array; ``axis`` (non-negative) is the feature axis.
    groups: number of normalization groups ``G`` (divides ``N``).
    axis: feature axis of ``x``.
    axis_name: if given, the means are also averaged over this mapped axis
      (``pmap``/``shard_map``), so every device gets the same statistics.
    axis_index_groups: optional device groups for that average.

  Returns:
    ``(G, C)`` array in ``x``'s dtype promoted to at least float32.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  grouped = split_groups(x.astype(dtype), groups)
  means = jnp.mean(grouped, axis=_grouped_reduction_axes(x.ndim, axis))
  if axis_name is not None:
    means = lax.pmean(means, axis_name, axis_index_groups=axis_index_groups)
  return means


def stats_dtype(x_dtype, dtype=None, float32: bool = True):
  """The dtype statistics are reduced in, as Flax's: ``dtype`` (default: the
  input's), promoted to at least float32 unless ``float32`` is False."""
  dtype = jnp.dtype(x_dtype if dtype is None else dtype)
  return jnp.promote_types(dtype, jnp.float32) if float32 else dtype


def abs_square(x: jax.Array) -> jax.Array:
  """``|x|^2`` elementwise: ``re^2 + im^2`` for complex ``x``, else ``x^2``."""
  if jnp.iscomplexobj(x):
    return lax.square(lax.real(x)) + lax.square(lax.imag(x))
  return lax.square(x)


def _group_mask(mask: jax.Array, x: jax.Array, groups: int) -> jax.Array:
  """A boolean ``mask`` broadcastable to ``x``, split like ``x`` into groups
  (without broadcasting it first: a smaller mask reduces as Flax's does)."""
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
  if mask.shape[0] == 1:
    return mask[None]
  return split_groups(jnp.broadcast_to(mask, (x.shape[0],) + mask.shape[1:]), groups)


def group_moments(
  x: jax.Array,
  groups: int,
  axis: int,
  axis_name=None,
  axis_index_groups=None,
  *,
  mask: Optional[jax.Array] = None,
  fast_variance: bool = True,
  dtype=None,
  float32: bool = True,
):
  """Per-group, per-channel mean and biased variance of ``x``, as Flax does.

  With ``fast_variance`` (``flax.linen.BatchNorm``'s ``use_fast_variance``)
  the variance is ``max(0, mean(|x|^2) - |mean(x)|^2)``, both means taken in
  one fused pass over ``x`` (and, with ``axis_name``, one ``pmean``);
  otherwise it is ``mean(|x - mean(x)|^2)``, a second pass. With one group
  the values, and their gradients, equal Flax's. Complex ``x`` gives a
  complex mean and a real variance.

  Args:
    x: ``(N, ..., C, ...)`` array; ``axis`` (non-negative) is the feature axis.
    groups: number of normalization groups ``G`` (divides ``N``).
    axis: feature axis of ``x``.
    axis_name: if given, both means are also averaged over this mapped axis.
    axis_index_groups: optional device groups for that average.
    mask: optional boolean array broadcastable to ``x``: only its True
      positions enter the statistics.
    fast_variance: the one-pass variance (see above).
    dtype, float32: the reduction dtype (see :func:`stats_dtype`).

  Returns:
    ``(mean, var)``, each ``(G, C)`` in the reduction dtype.
  """
  x = x.astype(stats_dtype(x.dtype, dtype, float32))
  reduced = _grouped_reduction_axes(x.ndim, axis)
  grouped = split_groups(x, groups)
  where = None if mask is None else _group_mask(mask, x, groups)

  def mean_of(value):
    return jnp.mean(value, axis=reduced, where=where)

  def synced(*means):
    if axis_name is None:
      return means
    # One collective for all the means (as Flax does).
    return tuple(lax.pmean(jnp.stack(means), axis_name, axis_index_groups=axis_index_groups))

  if fast_variance:
    # Two means of the same input, as Flax takes them: XLA fuses them into one
    # pass over x. (Concatenating [x, x^2] first wrote a 2C-channel copy of x.)
    mean, mean_sq = synced(mean_of(grouped), mean_of(abs_square(grouped)))
    return mean, jnp.maximum(0.0, mean_sq - abs_square(mean))
  (mean,) = synced(mean_of(grouped))
  shape = [1] * grouped.ndim
  shape[0], shape[axis + 1] = mean.shape
  (var,) = synced(mean_of(abs_square(grouped - mean.reshape(shape))))
  return mean, var


def input_moments(
  x: jax.Array, groups: int, axis: int, axis_name: Optional[str] = None, axis_index_groups=None
) -> Tuple[jax.Array, jax.Array]:
  """``(E[x], E[x^2])``, float32 ``(C,)`` each, over the whole device batch (the
  mean of the ``groups`` equal-sized group moments) and over ``axis_name``:
  the moments precise BN averages over batches."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = group_mean(x, groups, axis, axis_name, axis_index_groups)
  second = group_mean(jnp.square(x), groups, axis, axis_name, axis_index_groups)
  return (jnp.mean(mean, axis=0).astype(jnp.float32), jnp.mean(second, axis=0).astype(jnp.float32))


def broadcast_groups(stats: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """Expands ``(G, C)`` group statistics to ``x``'s shape ``(N, ..., C, ...)``."""
  groups, channels = stats.shape
  shape = [1] * (x.ndim + 1)
  shape[0] = groups
  shape[axis + 1] = channels
  expanded = jnp.broadcast_to(stats.reshape(shape), (groups, x.shape[0] // groups) + x.shape[1:])
  return merge_groups(expanded)


def broadcast_channels(stat: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """Reshapes a ``(C,)`` vector to broadcast against ``x`` along ``axis``."""
  shape = [1] * x.ndim
  shape[axis] = stat.shape[0]
  return stat.reshape(shape)


def push(buffer: jax.Array, rows: jax.Array) -> jax.Array:
  """Appends ``rows`` ``(G, C)`` to the shift buffer ``(m, C)``; keeps the last m."""
  size = buffer.shape[0]
  return jnp.concatenate([buffer, rows.astype(buffer.dtype)], axis=0)[-size:]


def push_unless(buffer: jax.Array, rows: jax.Array, keep: jax.Array) -> jax.Array:
  """``buffer`` if ``keep`` (a scalar bool) else :func:`push` ``(buffer, rows)``.

  Written as the concatenation of two selects, so that the rows a step writes
  stay a separate operand: XLA then reads them directly when a caller looks
  at the newest rows (a finiteness check), instead of materializing the whole
  pushed buffer (which, for a large buffer, is one more copy of it).
  """
  size, added = buffer.shape[0], rows.shape[0]
  if added >= size:
    return jnp.where(keep, buffer, rows[-size:].astype(buffer.dtype))
  head = jnp.where(keep, buffer[: size - added], buffer[added:])
  tail = jnp.where(keep, buffer[size - added :], rows.astype(buffer.dtype))
  return jnp.concatenate([head, tail], axis=0)


def window_means(buffer: jax.Array, rows: jax.Array) -> jax.Array:
  """Simple moving averages that each new row sees (``docs/normalization.md``, section 2 (b)).

  Row ``j`` of the result is the mean of the ``m`` most recent values ending
  at ``rows[j]``: ``rows[j], rows[j-1], ..., rows[0]``, then the newest rows of
  ``buffer``.

  Args:
    buffer: ``(m, C)`` past values, newest last.
    rows: ``(G, C)`` this step's values, in order.

  Returns:
    ``(G, C)`` array.
  """
  size = buffer.shape[0]
  if rows.shape[0] == 1:  # one group: a plain sum, which XLA fuses with its users
    return (jnp.sum(buffer[1:], axis=0, keepdims=True) + rows.astype(buffer.dtype)) / size
  sequence = jnp.concatenate([buffer, rows.astype(buffer.dtype)], axis=0)
  sums = lax.reduce_window(
    sequence, 0.0, lax.add, (size, 1), (1, 1), "VALID"
  )  # (G + 1, C): windows ending at each position from the last old row on.
  return sums[1:] / size


def ema_means(last: jax.Array, rows: jax.Array, decay: float) -> jax.Array:
  """Exponential moving averages that each new row sees.

  ``e_j = decay * e_{j-1} + (1 - decay) * rows[j]`` with ``e_{-1} = last``,
  for all ``j`` at once (no loop over rows).

  Args:
    last: ``(C,)`` the average before this step's rows.
    rows: ``(G, C)`` this step's values, in order.
    decay: weight of the previous average.

  Returns:
    ``(G, C)`` array.
  """
  groups = rows.shape[0]
  j = jnp.arange(groups)
  # weights[j, i] = (1 - decay) * decay**(j - i) for i <= j, else 0.
  powers = jnp.where(j[:, None] >= j[None, :], j[:, None] - j[None, :], 0)
  weights = jnp.where(j[:, None] >= j[None, :], (1.0 - decay) * decay**powers, 0.0)
  carried = decay ** (j + 1.0)
  return carried[:, None] * last[None, :] + weights.astype(rows.dtype) @ rows


def ema(running: jax.Array, value: jax.Array, momentum: float) -> jax.Array:
  """Flax's exponential moving average ``momentum * running + (1 - momentum) * value``,
  in ``running``'s dtype; a complex ``value`` makes it complex (Flax keeps
  complex statistics)."""
  dtype = running.dtype
  if jnp.iscomplexobj(value) and not jnp.iscomplexobj(running):
    dtype = jnp.promote_types(dtype, value.dtype)
  return momentum * running + (1.0 - momentum) * value.astype(dtype)


# Above this many elements all_finite tests a leaf as all(isfinite(leaf)).
LARGE_LEAF = 2**16


def all_finite(tree, large_leaf: float = LARGE_LEAF) -> jax.Array:
  """Scalar bool: every element of every array leaf of ``tree`` is finite.

  A float leaf of up to ``large_leaf`` elements is tested as
  ``sum(leaf * 0) == 0``: ``leaf * 0`` is exactly 0 for a finite element and
  NaN for NaN or +-Inf, so the sum is 0 exactly when all are finite (it
  cannot overflow: every term is 0 or NaN). The same decision as
  ``all(isfinite(leaf))``, as one float reduction: XLA's CPU backend
  compiles a reduction of more than 32 booleans as three kernels, and a
  float sum over a buffer as one library call. That call reads a buffer, so
  ``leaf * 0`` is first written out in full; for a larger leaf (CBN's
  kernel derivatives: up to 2.4M elements per ResNet-50 layer) that copy
  costs more memory and time than the boolean reduction, which is used
  there.
  """
  leaves = []
  for leaf in jax.tree_util.tree_leaves(tree):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    if jnp.size(leaf) > large_leaf:
      leaves.append(jnp.all(jnp.isfinite(leaf)))
    else:
      leaves.append(jnp.sum(leaf * jnp.zeros((), jnp.result_type(leaf))) == 0)
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def keep_if_finite(new, old, checked=None):
  """``(new, True)`` if every float leaf of ``checked`` is finite, else ``(old, False)``.

  The guard every stateful normalizer applies before committing a step, so a
  batch (or gradient) with NaN or Inf never reaches running statistics,
  buffers or step counters. ``checked`` (default: ``new``) is what the step
  computed: a layer whose state holds shift buffers passes only their new
  rows (the older rows were checked when they were written), which spares
  a reduction over, and a copy of, every buffer.
  """
  finite = all_finite(new if checked is None else checked)
  kept = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  return kept, finite


def commit_values(new_state, old: dict, nonfinite_count: jax.Array, checked=None):
  """:func:`commit_if_finite` of the fields of ``new_state`` (a ``NamedTuple``)
  named in ``old`` (``{name: stored value}``): what a layer writes back."""
  new = {name: getattr(new_state, name) for name in old}
  return commit_if_finite(new, old, nonfinite_count, checked)


# Jitted so that a network's layers of equal shapes share one trace of it.
@jax.jit
def commit_if_finite(new, old, nonfinite_count: jax.Array, checked=None):
  """``(values, nonfinite_count)`` after a step: the guard of every stateful layer.

  ``new`` (the step's state) if all float leaves of ``checked`` (default:
  ``new``; see :func:`keep_if_finite`) are finite, else ``old`` with
  ``nonfinite_count`` incremented by one. The count comes back a ``()``
  float32 counter (:mod:`~mabn_jax.functional.counters`; an int32 one of an
  older checkpoint is converted).
  """
  kept, finite = keep_if_finite(new, old, checked)
  return kept, counters.as_counter(nonfinite_count) + jnp.where(finite, 0.0, 1.0)
