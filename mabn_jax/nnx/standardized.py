"""Flax NNX weight-standardized convolution (``docs/normalization.md``, section 5 (a))."""

from __future__ import annotations

import functools
from typing import Any, Sequence, Union, cast

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import PromoteDtypeFn

from mabn_jax.functional import standardization as F


def _standardized_promote_dtype(arrays, /, *, epsilon, dtype=None, inexact=True):
  """``nnx.Conv``'s dtype promotion of ``(inputs, kernel, bias)`` with the
  kernel standardized first, in its own dtype (as
  :class:`mabn_jax.StandardizedConv` standardizes the stored parameter before
  ``flax.linen.Conv`` promotes it)."""
  inputs, kernel, bias = arrays
  kernel = F.standardize_kernel(kernel, epsilon)
  return dtypes.promote_dtype((inputs, kernel, bias), dtype=dtype, inexact=inexact)


def _kernel_shape(in_features, out_features, kernel_size, feature_group_count) -> tuple:
  sizes = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
  return sizes + (in_features // feature_group_count, out_features)


class StandardizedConv(nnx.Conv):
  """The NNX twin of :class:`mabn_jax.StandardizedConv`: ``nnx.Conv`` whose
  kernel is standardized per output channel.

  Same arguments and state as ``nnx.Conv`` (``nnx.Param``: ``kernel``
  ``(*kernel_size, in_features // feature_group_count, out_features)``, the
  raw weight ``W``, and optional ``bias``), plus ``epsilon``; the
  convolution uses ``(W - mean(W)) / (std(W) + epsilon)`` over all but the
  output axis, standardized in ``param_dtype`` before the cast to ``dtype``
  (:func:`~mabn_jax.functional.standardization.standardize_kernel`). An int
  ``kernel_size`` means a square 2-D kernel, as in ``nnx.Conv``. ``mask``
  and a custom ``promote_dtype`` are not supported.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Any = 1,
    *,
    epsilon: float = F.DEFAULT_EPSILON,
    **kwargs: Any,
  ):
    where = f"mabn_jax.nnx.StandardizedConv({in_features} -> {out_features})"
    if kwargs.get("mask") is not None:
      raise ValueError(
        f"{where}: mask is not supported (standardization would move weight "
        "onto masked taps); use nnx.Conv."
      )
    if "promote_dtype" in kwargs:
      raise ValueError(
        f"{where}: the dtype promotion is set by StandardizedConv (it "
        "standardizes the kernel first); got a promote_dtype override."
      )
    if not epsilon > 0:
      raise ValueError(f"{where}: epsilon must be positive, got {epsilon!r}.")
    groups = kwargs.get("feature_group_count", 1)
    shape = _kernel_shape(in_features, out_features, kernel_size, groups)
    F.check_kernel_shape(shape, where)
    self.epsilon = epsilon
    promote = cast(PromoteDtypeFn, functools.partial(_standardized_promote_dtype, epsilon=epsilon))
    super().__init__(
      in_features, out_features, kernel_size, strides, promote_dtype=promote, **kwargs
    )
