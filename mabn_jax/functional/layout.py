"""How a layer's input maps onto the functional core's ``(N, ..., C)`` layout.

The core normalizes along one feature axis, with the batch on axis 0. Flax's
``BatchNorm`` also takes a rank-1 input (one sample: no reduction) and a
tuple ``axis`` (several feature axes, one statistic per combination). A
:class:`FeatureLayout` maps such an input onto the core's layout, a copy in
which the non-feature axes come first (the batch axis, if it is not a
feature axis, leading) and the feature axes are merged into the last one of
``C = prod(feature sizes)`` channels, and maps the output back. Inputs the
core takes as they are (one feature axis other than 0, rank >= 2) are not
touched.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from mabn_jax.functional._checks import layer_error

Axes = Union[int, Sequence[int]]


def canonical_axes(axis: Axes, ndim: int, where: Optional[str] = None) -> Tuple[int, ...]:
  """``axis`` (an int or a sequence) as sorted, distinct, non-negative axes.

  Raises:
    ValueError: for an axis outside ``[-ndim, ndim)`` or an input of rank 0.
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if ndim < 1 or not axes:
    raise layer_error(
      where,
      f"expected an input of rank >= 1 and a feature axis, got rank {ndim} and axis {axis!r}.",
    )
  for a in axes:
    if not isinstance(a, int) or not -ndim <= a < ndim:
      raise layer_error(
        where,
        f"axis {axis!r} is out of range for an input of rank {ndim} "
        f"(expected integers in [{-ndim}, {ndim - 1}]).",
      )
  return tuple(sorted({a % ndim for a in axes}))


def core_axis(axis: Axes) -> int:
  """The core's feature axis for a layer's ``axis`` as declared: the axis
  itself for one axis, else ``-1`` (the merged feature axis)."""
  if isinstance(axis, int):
    return axis
  axes = tuple(axis)
  return axes[0] if len(axes) == 1 else -1


class FeatureLayout(NamedTuple):
  """The map of one input shape onto the core's layout.

  Attributes:
    shape: the input's shape.
    feature_axes: its feature axes (sorted, non-negative).
    perm: the transposition to the core's axis order, ``None`` when the
      input is used as it is.
    core_shape: the core's input shape (``(N, ..., C)``; the input's shape
      when ``perm`` is ``None``).
    axis: the feature axis the core uses.
  """

  shape: Tuple[int, ...]
  feature_axes: Tuple[int, ...]
  perm: Optional[Tuple[int, ...]]
  core_shape: Tuple[int, ...]
  axis: int

  @property
  def feature_shape(self) -> Tuple[int, ...]:
    """The sizes of the feature axes: the shape of Flax's statistics."""
    return tuple(self.shape[a] for a in self.feature_axes)

  @property
  def num_features(self) -> int:
    """``C``: the number of channels the core sees."""
    return math.prod(self.feature_shape)

  def to_core(self, x: jax.Array) -> jax.Array:
    """The input (or an array of its shape) in the core's layout."""
    if self.perm is None:
      return x
    return jnp.transpose(x, self.perm).reshape(self.core_shape)

  def from_core(self, y: jax.Array) -> jax.Array:
    """The core's output back in the input's layout."""
    if self.perm is None:
      return y
    moved = tuple(self.shape[a] for a in self.perm)
    return jnp.transpose(y.reshape(moved), tuple(self.perm.index(a) for a in range(len(moved))))

  def mask_to_core(self, mask: Optional[Any]) -> Optional[jax.Array]:
    """A mask broadcastable to the input, in the core's layout (``None`` stays)."""
    if mask is None or self.perm is None:
      return mask  # not broadcast: a smaller mask reduces as Flax's does
    return self.to_core(jnp.broadcast_to(jnp.asarray(mask, bool), self.shape))

  def to_stored(self, value: jax.Array) -> jax.Array:
    """A ``(..., C)`` statistic or parameter as stored: ``(..., *feature_shape)``
    (Flax's shapes) when there are several feature axes; else as it is."""
    if len(self.feature_shape) < 2 or not value.ndim or value.shape[-1] != self.num_features:
      return value
    return value.reshape(value.shape[:-1] + self.feature_shape)

  def stored_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The stored shape of a core value of ``shape`` (see :meth:`to_stored`)."""
    if len(self.feature_shape) < 2 or not shape or shape[-1] != self.num_features:
      return tuple(shape)
    return tuple(shape[:-1]) + self.feature_shape

  def from_stored(self, value: jax.Array, core_shape: Tuple[int, ...]) -> jax.Array:
    """A stored value back in the core's ``core_shape``."""
    return value if tuple(value.shape) == tuple(core_shape) else value.reshape(core_shape)


def feature_layout(
  shape: Sequence[int],
  axis: Optional[Axes],
  norm_batch_size: Optional[int] = None,
  where: Optional[str] = None,
) -> FeatureLayout:
  """The :class:`FeatureLayout` of an input of ``shape`` for a layer's ``axis``.

  ``axis=None`` (a layer without a feature-axis option) and one feature axis
  other than 0 of an input of rank >= 2 leave the input as it is. A rank-1
  input is one sample. If the batch axis 0 is a feature axis, the input is
  one sample whose other axes are reduced; normalization groups then have no
  batch to split, so ``norm_batch_size`` must be ``None``.
  """
  shape = tuple(int(n) for n in shape)
  if axis is None:
    return FeatureLayout(shape, (), None, shape, -1)
  axes = canonical_axes(axis, len(shape), where)
  if len(shape) >= 2 and len(axes) == 1 and axes[0] != 0:
    return FeatureLayout(shape, axes, None, shape, core_axis(axis))
  if len(shape) >= 2 and 0 in axes and norm_batch_size is not None:
    raise layer_error(
      where,
      f"axis {axis!r} includes the batch axis 0 of the input of shape {shape}; "
      f"normalization groups (norm_batch_size={norm_batch_size}) split the batch "
      "axis, so use norm_batch_size=None or another axis.",
    )
  reduced = tuple(a for a in range(len(shape)) if a not in axes)
  leads = 0 not in axes  # the batch axis is reduced: it stays the leading axis
  batch = shape[:1] if leads else (1,)
  rest = reduced[1:] if leads else reduced
  middle = (math.prod(shape[a] for a in rest),) if rest else ()
  core = batch + middle + (math.prod(shape[a] for a in axes),)
  return FeatureLayout(shape, axes, reduced + axes, core, -1)
