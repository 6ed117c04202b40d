"""Weight-centralized convolution and dense layers (``docs/normalization.md``, section 2 (a))."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mabn_jax.functional.centering import center_kernel, centered_conv_general_dilated
from mabn_jax.layers.base import layer_path


class CenteredConv(nn.Conv):
  """``flax.linen.Conv`` whose kernel is centred per output channel.

  Same fields and variables as ``nn.Conv`` (``params``: ``kernel``
  ``(*kernel_size, in_features // feature_group_count, features)`` and
  optional ``bias``); the stored ``kernel`` is the raw weight ``W`` and the
  convolution uses ``W - mean(W)`` over all but the output axis, so gradients
  flow through the centring. Use it before :class:`~mabn_jax.MABN`.

  The centring happens in the convolution function
  (:func:`~mabn_jax.functional.centering.centered_conv_general_dilated`), so
  each layer's centred kernel lives only while that layer runs. ``mask`` is
  not supported (centring would move weight onto masked taps).
  """

  conv_general_dilated: Any = centered_conv_general_dilated

  def __call__(self, inputs):
    where = layer_path(self)
    if self.mask is not None:
      raise ValueError(
        f"{where}: mask is not supported (got one of shape "
        f"{tuple(self.mask.shape)}); use flax.linen.Conv."
      )
    if (
      self.conv_general_dilated is not centered_conv_general_dilated
      or self.conv_general_dilated_cls is not None
    ):
      raise ValueError(
        f"{where}: the convolution function is set by CenteredConv "
        "(it centres the kernel); got a conv_general_dilated(_cls) override."
      )
    return super().__call__(inputs)


class CenteredDense(nn.Dense):
  """``flax.linen.Dense`` whose ``(in, out)`` kernel is centred per output."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    return center_kernel(value) if name == "kernel" else value
