"""Flax NNX filter response normalization (``docs/normalization.md``, section 5 (b))."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mabn_jax.functional import filter_response as F

_LEARNED_EPSILON_INIT = initializers.constant(F.LEARNED_EPSILON_INIT)


class FilterResponseNorm(nnx.Module):
  """The NNX twin of :class:`mabn_jax.FilterResponseNorm`: FRN with a TLU.

  Same options as the linen layer (``epsilon``, ``learn_epsilon``,
  ``use_tlu``, ``use_scale``, ``use_bias``, ``dtype``, ``param_dtype`` and
  the initializers) and the same ``nnx.Param`` state under the linen names:
  ``scale``, ``bias``, ``tau`` ``(num_features,)`` and the scalar
  ``learned_epsilon`` (each ``None`` when disabled). No ``BatchStat``: called
  as ``module(x)`` on ``(N, *spatial, num_features)``, the same map in
  ``train()`` and ``eval()`` modes.
  """

  def __init__(
    self,
    num_features: int,
    *,
    epsilon: float = F.DEFAULT_EPSILON,
    learn_epsilon: bool = False,
    use_tlu: bool = True,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: Optional[Any] = None,
    param_dtype: Any = jnp.float32,
    scale_init: Any = initializers.ones_init(),
    bias_init: Any = initializers.zeros_init(),
    tau_init: Any = initializers.zeros_init(),
    learned_epsilon_init: Any = _LEARNED_EPSILON_INIT,
    rngs: nnx.Rngs,
  ):
    self.where = f"mabn_jax.nnx.FilterResponseNorm(num_features={num_features})"
    if not epsilon > 0:
      raise ValueError(f"{self.where}: epsilon must be positive, got {epsilon!r}.")
    self.num_features = num_features
    self.epsilon, self.dtype = epsilon, dtype

    def optional(init, enabled, shape=(num_features,)):
      return nnx.Param(init(rngs.params(), shape, param_dtype)) if enabled else nnx.data(None)

    self.scale = optional(scale_init, use_scale)
    self.bias = optional(bias_init, use_bias)
    self.tau = optional(tau_init, use_tlu)
    self.learned_epsilon = optional(learned_epsilon_init, learn_epsilon, ())

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(N, *spatial, num_features)`` -> the same shape."""
    F.check_input_shape(x.shape, self.where)
    if x.shape[-1] != self.num_features:
      raise ValueError(
        f"{self.where}: input of shape {tuple(x.shape)} has {x.shape[-1]} channels "
        f"(last axis); the layer was built for {self.num_features}."
      )
    value = lambda param: None if param is None else param[...]
    return F.filter_response_norm(
      x,
      value(self.scale),
      value(self.bias),
      value(self.tau),
      self.epsilon,
      value(self.learned_epsilon),
      self.dtype,
    )
