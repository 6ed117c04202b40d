"""Weight-standardized convolution (``docs/normalization.md``, section 5 (a))."""

from __future__ import annotations

import flax.linen as nn

from mabn_jax.functional import standardization as F
from mabn_jax.layers.base import layer_path


class StandardizedConv(nn.Conv):
  """``flax.linen.Conv`` whose kernel is standardized per output channel.

  Same fields and variables as ``nn.Conv`` (``params``: ``kernel``
  ``(*kernel_size, in_features // feature_group_count, features)`` and
  optional ``bias``), plus ``epsilon``. The stored ``kernel`` is the raw
  weight ``W``; the convolution uses ``(W - mean(W)) / (std(W) + epsilon)``
  over all but the output axis
  (:func:`~mabn_jax.functional.standardization.standardize_kernel`,
  big_vision's ``StdConv``), standardized in ``param_dtype`` before the cast
  to ``dtype``, so gradients flow through the standardization. Use it before
  ``flax.linen.GroupNorm`` (registry ``'ws_gn'``). ``mask`` is not supported.

  Attributes:
    epsilon: added to the standard deviation (big_vision: 1e-5).
  """

  epsilon: float = F.DEFAULT_EPSILON

  def param(self, name, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name != "kernel":
      return value
    F.check_kernel_shape(value.shape, layer_path(self))
    return F.standardize_kernel(value, self.epsilon)

  def __call__(self, inputs):
    if self.mask is not None:
      raise ValueError(
        f"{layer_path(self)}: mask is not supported (got one of shape "
        f"{tuple(self.mask.shape)}; standardization would move weight onto "
        "masked taps); use flax.linen.Conv."
      )
    if not self.epsilon > 0:
      raise ValueError(f"{layer_path(self)}: epsilon must be positive, got {self.epsilon!r}.")
    return super().__call__(inputs)
