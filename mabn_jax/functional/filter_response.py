"""Filter response normalization with a thresholded linear unit
(``docs/normalization.md``, section 5 (b); Singh & Krishnan, 2020).

For ``x`` of shape ``(N, *spatial, C)``, per sample and channel::

  nu2 = mean(x ** 2 over the spatial axes)
  y   = scale * x / sqrt(nu2 + eps) + bias
  z   = max(y, tau)                                  (TLU)

with ``eps = epsilon + |learned_epsilon|`` when the offset is learned. No
batch statistic and no state: training and inference compute the same map,
which depends on each sample's ``nu2`` and so cannot be folded into the
convolution.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import layer_error
from mabn_jax.functional.affine import affine_map, result_dtype

DEFAULT_EPSILON = 1e-6
"""The paper's constant ``eps`` (also the floor of a learned one)."""
LEARNED_EPSILON_INIT = 1e-4
"""The paper's initial value of the learned offset ``|eps_l|``."""


def check_input_shape(shape: Sequence[int], where: Optional[str] = None) -> None:
  """Raises unless ``shape`` is ``(N, *spatial, C)`` with a spatial axis."""
  if len(shape) < 3:
    raise layer_error(
      where,
      f"input of shape {tuple(shape)} has no spatial axis; FRN normalizes every "
      "channel of a sample by its mean square over the spatial axes, so it takes "
      "(N, *spatial, C) inputs (a convolution's output, not a dense layer's).",
    )


def mean_square(x: jax.Array) -> jax.Array:
  """``nu2``: ``mean(x ** 2)`` over the spatial axes, ``(N, 1, ..., 1, C)``, in
  at least float32."""
  compute = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.mean(jnp.square(x.astype(compute)), axis=tuple(range(1, x.ndim - 1)), keepdims=True)


def effective_epsilon(epsilon: float, learned_epsilon: Optional[jax.Array] = None) -> Any:
  """``epsilon + |learned_epsilon|`` (``epsilon`` when nothing is learned)."""
  if learned_epsilon is None:
    return epsilon
  return epsilon + jnp.abs(learned_epsilon)


def normalize(
  x: jax.Array, epsilon: float, learned_epsilon: Optional[jax.Array] = None
) -> jax.Array:
  """``x / sqrt(nu2 + eps)``, ``x``'s shape, in at least float32."""
  nu2 = mean_square(x)
  eps = effective_epsilon(epsilon, learned_epsilon)
  return x.astype(nu2.dtype) * lax.rsqrt(nu2 + jnp.asarray(eps, nu2.dtype))


def filter_response_norm(
  x: jax.Array,
  scale: Optional[jax.Array],
  bias: Optional[jax.Array],
  tau: Optional[jax.Array],
  epsilon: float = DEFAULT_EPSILON,
  learned_epsilon: Optional[jax.Array] = None,
  dtype: Optional[Any] = None,
) -> jax.Array:
  """FRN followed by the TLU.

  Args:
    x: ``(N, *spatial, C)`` input, channels last.
    scale, bias: ``(C,)`` ``gamma`` and ``beta``, or ``None`` (not applied).
    tau: ``(C,)`` TLU threshold, or ``None`` (no TLU: plain FRN).
    epsilon: the constant ``eps``.
    learned_epsilon: scalar learned offset (``eps = epsilon + |offset|``),
      or ``None``.
    dtype: result dtype; ``None`` promotes ``x`` and the parameters (Flax's
      rule).

  Returns:
    Array of ``x``'s shape in the result dtype.
  """
  check_input_shape(x.shape)
  axis = x.ndim - 1
  y = affine_map(normalize(x, epsilon, learned_epsilon), scale, bias, axis)
  if tau is not None:
    y = jnp.maximum(y, st.broadcast_channels(tau, y, axis).astype(y.dtype))
  return jnp.asarray(y, result_dtype(x, scale, bias, tau, learned_epsilon, dtype=dtype))
