"""Flax NNX weight-centralized convolution and linear layers.

The math: ``docs/normalization.md``, section 2 (a).
"""

from __future__ import annotations

from typing import Any, cast

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import PromoteDtypeFn

from mabn_jax.functional.centering import center_kernel, centered_conv_general_dilated


class CenteredConv(nnx.Conv):
  """``nnx.Conv`` whose kernel is centred per output channel.

  Same arguments and state as ``nnx.Conv`` (``nnx.Param``: ``kernel``
  ``(*kernel_size, in_features // feature_group_count, out_features)``, the
  raw weight ``W``, and optional ``bias`` ``(out_features,)``); the
  convolution uses ``W - mean(W)`` over all but the output axis
  (:func:`~mabn_jax.functional.centering.centered_conv_general_dilated`, as
  :class:`mabn_jax.CenteredConv`), so gradients flow through the centring.
  Use it before :class:`~mabn_jax.nnx.MABN`. ``mask`` and a custom
  ``conv_general_dilated`` are not supported.
  """

  def __init__(
    self, in_features: int, out_features: int, kernel_size: Any, strides: Any = 1, **kwargs: Any
  ):
    where = f"mabn_jax.nnx.CenteredConv({in_features} -> {out_features})"
    if kwargs.get("mask") is not None:
      raise ValueError(
        f"{where}: mask is not supported (centring would move weight "
        "onto masked taps); use nnx.Conv."
      )
    if "conv_general_dilated" in kwargs:
      raise ValueError(
        f"{where}: the convolution function is set by CenteredConv "
        "(it centres the kernel); got a conv_general_dilated override."
      )
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      conv_general_dilated=centered_conv_general_dilated,
      **kwargs,
    )


def _centered_promote_dtype(arrays, /, *, dtype=None, inexact=True):
  """``nnx.Linear``'s dtype promotion of ``(inputs, kernel, bias)`` with the
  kernel centred first, in its own dtype (as :class:`mabn_jax.CenteredDense`
  centres the stored parameter before ``flax.linen.Dense`` promotes it)."""
  inputs, kernel, bias = arrays
  return dtypes.promote_dtype((inputs, center_kernel(kernel), bias), dtype=dtype, inexact=inexact)


class CenteredDense(nnx.Linear):
  """``nnx.Linear`` whose ``(in_features, out_features)`` kernel is centred per output.

  Named after the linen layer :class:`mabn_jax.CenteredDense`, which it
  equals: same arguments and state as ``nnx.Linear`` (the stored ``kernel``
  is the raw weight), and the product uses ``W - mean(W, axis=0)``, centred
  in ``param_dtype`` before the cast to ``dtype``. A custom
  ``promote_dtype`` is not supported.
  """

  def __init__(self, in_features: int, out_features: int, **kwargs: Any):
    if "promote_dtype" in kwargs:
      raise ValueError(
        f"mabn_jax.nnx.CenteredDense({in_features} -> {out_features}): the dtype "
        "promotion is set by CenteredDense (it centres the kernel first); got a "
        "promote_dtype override."
      )
    promote = cast(PromoteDtypeFn, _centered_promote_dtype)
    super().__init__(in_features, out_features, promote_dtype=promote, **kwargs)
