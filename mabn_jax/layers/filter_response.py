"""Flax linen filter response normalization (``docs/normalization.md``, section 5 (b))."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from mabn_jax.functional import filter_response as F
from mabn_jax.layers.base import layer_path


class FilterResponseNorm(nn.Module):
  """Filter response normalization with a thresholded linear unit (TLU).

  ``max(scale * x / sqrt(nu2 + eps) + bias, tau)``, ``nu2`` the mean square
  of each sample's channel over the spatial axes
  (:func:`~mabn_jax.functional.filter_response.filter_response_norm`). No
  batch statistics: called as ``layer(x)``, the same map in training and
  inference; it replaces both the normalization and the activation.

  Input ``(N, *spatial, C)``, channels last, at least one spatial axis; the
  output has its shape, in ``dtype`` (default: the promotion of the input
  and the parameters). Variables, all in ``'params'`` and ``param_dtype``:
  ``scale``, ``bias`` and ``tau`` ``(C,)`` (each absent when disabled) and,
  with ``learn_epsilon``, the scalar ``learned_epsilon`` (``eps = epsilon +
  |learned_epsilon|``).

  Attributes:
    epsilon: the constant ``eps`` (the floor of a learned one); positive.
    learn_epsilon: learn an offset of ``eps`` (the paper's choice for
      layers with small spatial maps).
    use_tlu: apply the TLU ``max(y, tau)``; without it, plain FRN.
    use_scale, use_bias: learn ``scale`` / ``bias``.
    dtype, param_dtype: result and parameter dtypes.
    scale_init, bias_init, tau_init, learned_epsilon_init: initializers
      (ones, zeros, zeros, the constant 1e-4).
  """

  epsilon: float = F.DEFAULT_EPSILON
  learn_epsilon: bool = False
  use_tlu: bool = True
  use_scale: bool = True
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  scale_init: Any = initializers.ones
  bias_init: Any = initializers.zeros
  tau_init: Any = initializers.zeros
  learned_epsilon_init: Any = initializers.constant(F.LEARNED_EPSILON_INIT)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``(N, *spatial, C)`` -> the same shape."""
    where = layer_path(self)
    F.check_input_shape(x.shape, where)
    if not self.epsilon > 0:
      raise ValueError(f"{where}: epsilon must be positive, got {self.epsilon!r}.")
    channels = (x.shape[-1],)

    def optional(name, init, enabled, shape=channels):
      return self.param(name, init, shape, self.param_dtype) if enabled else None

    return F.filter_response_norm(
      x,
      optional("scale", self.scale_init, self.use_scale),
      optional("bias", self.bias_init, self.use_bias),
      optional("tau", self.tau_init, self.use_tlu),
      self.epsilon,
      optional("learned_epsilon", self.learned_epsilon_init, self.learn_epsilon, ()),
      self.dtype,
    )
