"""CBN at inference: the running statistics' affine map."""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax


def inference_scale_shift(
  mean: jax.Array, var: jax.Array, epsilon: float = 1e-5
) -> Tuple[jax.Array, jax.Array]:
  """``(scale, shift)`` ``(C,)`` of the inference map ``y * scale + shift``."""
  scale = lax.rsqrt(var + epsilon)
  return scale, -mean * scale


def normalize_inference(
  y: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float = 1e-5
) -> jax.Array:
  """``(y - mean) / sqrt(var + eps)`` with the running statistics.

  Args:
    y: ``(N, ..., C)`` conv output *including* its bias.
    mean, var: ``(C,)`` float32 running statistics.

  Returns:
    Array of ``y``'s shape in its dtype promoted to at least float32.
  """
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  scale, shift = inference_scale_shift(mean, var, epsilon)
  return y.astype(dtype) * scale + shift
