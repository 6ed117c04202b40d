"""The convolution CBN normalizes: its description, and its geometry.

:class:`ConvSpec` describes ``y = conv(x, W)`` in Flax's layout; :func:`conv`
computes it as ``flax.linen.Conv`` does. The private helpers give the
convolution's padding per axis and the convolution restricted to a subset
of its output positions (``CBNConfig.derivative_stride``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union, cast

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional._checks import layer_error

Padding = Union[str, Tuple[Tuple[int, int], ...]]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A convolution ``y = conv(x, W)`` in Flax's layout (hashable).

  ``x`` is ``(N, *spatial, cin)``, ``W`` is ``(*kernel_size, cin, cout)``,
  ``y`` is ``(N, *spatial_out, cout)``; no bias, no feature groups.

  Attributes:
    strides: one stride per spatial axis.
    padding: ``'SAME'``, ``'VALID'`` or one ``(low, high)`` pair per axis.
    kernel_dilation: one dilation per spatial axis.
  """

  strides: Tuple[int, ...]
  padding: Padding
  kernel_dilation: Tuple[int, ...]

  @classmethod
  def make(
    cls,
    rank: int,
    strides: Union[int, Sequence[int]] = 1,
    padding: Union[str, int, Sequence] = "SAME",
    kernel_dilation: Union[int, Sequence[int]] = 1,
    where: Optional[str] = "CBN",
  ) -> "ConvSpec":
    """Canonicalizes Flax-style conv arguments for ``rank`` spatial axes.

    Raises:
      ValueError: for padding modes other than ``'SAME'``, ``'VALID'``,
        integers and ``(low, high)`` pairs, or wrong lengths.
    """

    def per_axis(name, value):
      value = (value,) * rank if isinstance(value, int) else tuple(value)
      if len(value) != rank or not all(isinstance(v, int) and v >= 1 for v in value):
        raise layer_error(
          where, f"{name} must be a positive integer or {rank} of them, got {value!r}."
        )
      return value

    if isinstance(padding, str):
      pad = padding.upper()
      if pad not in ("SAME", "VALID"):
        raise layer_error(
          where,
          f"padding must be 'SAME', 'VALID', an integer or {rank} "
          f"(low, high) pairs, got {padding!r} (other modes are not supported).",
        )
    elif isinstance(padding, int):
      pad = ((padding, padding),) * rank
    else:
      pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
      if len(pad) != rank or not all(len(p) == 2 for p in pad):
        raise layer_error(
          where,
          f"padding must be 'SAME', 'VALID', an integer or {rank} "
          f"(low, high) pairs, got {padding!r}.",
        )
    return cls(
      per_axis("strides", strides), cast(Padding, pad), per_axis("kernel_dilation", kernel_dilation)
    )


def conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """``conv(x, kernel)`` as ``flax.linen.Conv`` computes it (no bias).

  Args:
    x: ``(N, *spatial, cin)``.
    kernel: ``(*kernel_size, cin, cout)``.
    spec: strides, padding and dilation.

  Returns:
    ``(N, *spatial_out, cout)`` in the promoted dtype of ``x`` and ``kernel``.
  """
  ndim = x.ndim
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  return lax.conv_general_dilated(
    x.astype(dtype),
    kernel.astype(dtype),
    window_strides=spec.strides,
    padding=spec.padding,
    rhs_dilation=spec.kernel_dilation,
    dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, lhs),
  )


def _explicit_pads(spec, in_spatial, kernel_spatial):
  """``spec``'s padding as one ``(low, high)`` pair per spatial axis."""
  if not isinstance(spec.padding, str):
    return spec.padding
  return lax.padtype_to_pads(in_spatial, _dilated(spec, kernel_spatial), spec.strides, spec.padding)


def _dilated(spec, kernel_spatial):
  """The kernel's spatial extent per axis with ``spec``'s dilation."""
  return [(k - 1) * d + 1 for k, d in zip(kernel_spatial, spec.kernel_dilation, strict=True)]


def _position_subset(spec, in_spatial, kernel_spatial, out_spatial, stride):
  """The :class:`ConvSpec` whose outputs are ``conv(x, W, spec)`` at the
  positions ``(stride * i, ...)``: ``stride`` times the strides, the same low
  padding, and a high padding (negative: a crop) that ends at the last of
  those positions."""
  dilated = _dilated(spec, kernel_spatial)
  pads = _explicit_pads(spec, in_spatial, kernel_spatial)
  strides = tuple(stride * s for s in spec.strides)
  padding = tuple(
    (low, (-(-out // stride) - 1) * step + window - size - low)
    for (low, _), out, step, window, size in zip(
      pads, out_spatial, strides, dilated, in_spatial, strict=True
    )
  )
  return ConvSpec(strides, padding, spec.kernel_dilation)
