"""The derivatives of a CBN entry's moments with respect to the kernel.

``d mu / d W`` and ``d nu / d W`` of ``y = conv(x, W)`` (``docs/normalization.md``,
section 4, "Cross-Iteration Batch Normalization (CBN)") are kernel gradients
of the convolution: one backward-weight convolution each
(:func:`jax.linear_transpose` of the convolution in its kernel), or for
widening pointwise kernels ``d nu / d W`` from the inputs' Gram matrix
(:func:`gram_is_cheaper`). Optionally they are taken over a subset of the
output positions (``CBNConfig.derivative_stride``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional import statistics as st
from mabn_jax.functional.cross_iteration.geometry import (
  ConvSpec,
  _explicit_pads,
  _position_subset,
  conv,
)

KERNEL_DERIVATIVES = ("auto", "convolution")
"""How :func:`moment_derivatives` takes ``d nu / d W`` (``CBNConfig.kernel_derivatives``):
``'auto'`` from the inputs' Gram matrix where :func:`gram_is_cheaper`, else
the backward-weight convolution; ``'convolution'`` always the convolution."""


def moment_derivatives(
  x: jax.Array,
  y: jax.Array,
  kernel: jax.Array,
  spec: ConvSpec,
  groups: int,
  axis_name: Optional[str] = None,
  axis_index_groups=None,
  stride: int = 1,
  kernel_derivatives: str = "auto",
) -> Tuple[jax.Array, jax.Array]:
  """Per-group ``d mu / d W`` and ``d nu / d W`` of ``y = conv(x, W)``.

  Both are backward-weight convolutions (``docs/normalization.md``, section
  4): the kernel cotangent of ``conv(x_g, .)`` for the output cotangent
  ``1 / M`` (one output channel: ``d mu_c / d W[..., c]`` is the same mean
  input patch for every ``c``) and for ``2 y / M``. ``M`` is the number of elements per
  channel in a group. Where it is cheaper (:func:`gram_is_cheaper`) and
  ``kernel_derivatives`` is ``'auto'``, ``d nu / d W`` is the same derivative
  taken from the inputs' Gram matrix. No gradient flows through the results.

  Args:
    x: ``(N, *spatial, cin)`` conv input.
    y: ``(N, *spatial_out, C)``, ``conv(x, kernel)`` without bias.
    kernel: ``(*K, C)`` kernel with ``K = (*kernel_size, cin)``.
    spec: the convolution.
    groups: ``G``, normalization groups in the batch.
    stride: ``s`` (``CBNConfig.derivative_stride``): the derivatives of the
      moments over the output positions whose spatial indices are all
      multiples of ``s`` only (a strided convolution over the same ``x``);
      ``1`` is every position.
    kernel_derivatives: one of :data:`KERNEL_DERIVATIVES`
      (``CBNConfig.kernel_derivatives``): ``'auto'`` or ``'convolution'``
      (``d nu / d W`` always from the backward-weight convolution).

  Returns:
    ``(dmu, dnu)`` of shapes ``(G, *K)`` and ``(G, *K, C)``, float32 (or
    wider), averaged over ``axis_name`` if given.

  Raises:
    ValueError: for a ``kernel_derivatives`` not in :data:`KERNEL_DERIVATIVES`.
  """
  if kernel_derivatives not in KERNEL_DERIVATIVES:
    raise ValueError(
      f"kernel_derivatives must be one of {KERNEL_DERIVATIVES}, got {kernel_derivatives!r}."
    )
  dtype = jax.dtypes.canonicalize_dtype(
    jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
  )
  x = lax.stop_gradient(x).astype(dtype)
  y = lax.stop_gradient(y).astype(dtype)
  if stride > 1:
    spec = _position_subset(spec, x.shape[1:-1], kernel.shape[:-2], y.shape[1:-1], stride)
    y = y[(slice(None),) + (slice(None, None, stride),) * (y.ndim - 2)]
  elements = (y.shape[0] // groups) * math.prod(y.shape[1:-1])
  kshape = tuple(kernel.shape)

  def kernel_cotangent(xg, ct, out_features):
    transpose = jax.linear_transpose(
      functools.partial(conv, xg, spec=spec),
      jax.ShapeDtypeStruct(kshape[:-1] + (out_features,), dtype),
    )
    return transpose(ct)[0]

  xg = st.split_groups(x, groups)
  ones = jnp.full(st.split_groups(y, groups).shape[:-1] + (1,), 1.0 / elements, dtype)
  dmu = jax.vmap(lambda a, c: kernel_cotangent(a, c, 1))(xg, ones)[..., 0]
  if kernel_derivatives == "auto" and gram_is_cheaper(kshape):
    dnu = _dnu_from_gram(x, lax.stop_gradient(kernel).astype(dtype), spec, groups, elements)
  else:
    ct = st.split_groups(2.0 * y / elements, groups)
    dnu = jax.vmap(lambda a, c: kernel_cotangent(a, c, kshape[-1]))(xg, ct)
  if axis_name is not None:
    dmu, dnu = lax.pmean((dmu, dnu), axis_name, axis_index_groups=axis_index_groups)
  return dmu, dnu


def gram_is_cheaper(kernel_shape: Sequence[int]) -> bool:
  """Whether :func:`moment_derivatives` takes ``d nu / d W`` from the inputs'
  Gram matrix: for pointwise (``1 x ... x 1``) kernels with fewer input than
  output channels, where it costs ``N cin^2`` multiply-adds instead of the
  backward-weight convolution's ``N cin C``."""
  *window, cin, cout = kernel_shape
  return math.prod(window) == 1 and cin < cout


def _dnu_from_gram(x, kernel, spec, groups, elements):
  """``d nu / d W = 2 S W`` for a pointwise conv, ``S`` the per-group mean of
  ``p p^T`` over the input ``p`` each output position reads (zero in the
  padding): the same derivative as the backward-weight convolution
  ``2 mean(p y^T)``, since ``y = W^T p``.

  Args:
    x: ``(N, *spatial, cin)``; kernel: ``(1, ..., 1, cin, C)``, both in the
      derivatives' dtype; ``elements``: ``M``, output positions per group.

  Returns:
    ``(G, 1, ..., 1, cin, C)``.
  """
  rank = x.ndim - 2
  pads = _explicit_pads(spec, x.shape[1:-1], (1,) * rank)
  zero = jnp.zeros((), x.dtype)
  # The input under each output position: x padded (or cropped) as the conv
  # pads it, then every stride-th position.
  padded = lax.pad(x, zero, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
  inputs = lax.slice(padded, (0,) * x.ndim, padded.shape, (1,) + tuple(spec.strides) + (1,))
  inputs = st.split_groups(inputs, groups).reshape(groups, -1, x.shape[-1])
  gram = jnp.einsum("gpi,gpj->gij", inputs, inputs) / elements
  w = kernel.reshape(kernel.shape[-2:])
  return (2.0 * jnp.einsum("gij,jc->gic", gram, w)).reshape((groups,) + kernel.shape)
