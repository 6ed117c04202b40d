"""Weight-centralized convolution and dense layers (spec, section 2 (a))."""

from __future__ import annotations

import flax.linen as nn

from mabn_jax.functional.centering import center_kernel


class CenteredConv(nn.Conv):
  """``flax.linen.Conv`` whose kernel is centred per output channel.

  Same fields and variables as ``nn.Conv`` (``params``: ``kernel``
  ``(*kernel_size, in_features // feature_group_count, features)`` and
  optional ``bias``); the stored ``kernel`` is the raw weight ``W`` and the
  convolution uses ``W - mean(W)`` over all but the output axis, so gradients
  flow through the centring. Use it before :class:`~mabn_jax.MABN`.
  """

  def param(self, name, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    return center_kernel(value) if name == "kernel" else value


class CenteredDense(nn.Dense):
  """``flax.linen.Dense`` whose ``(in, out)`` kernel is centred per output."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    return center_kernel(value) if name == "kernel" else value
