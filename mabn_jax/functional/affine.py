"""The affine map after normalization: ``gamma * normalized + beta``.

Every normalizer ends with it; the Flax linen and NNX wrappers pass their
``scale`` and ``bias`` parameters (or ``None`` when disabled).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from mabn_jax.functional import statistics as st


def result_dtype(*args: Any, dtype: Optional[Any] = None):
  """The output dtype: ``dtype`` if given, else the inexact promotion of ``args``.

  Flax's rule (``flax.linen.dtypes.canonicalize_dtype``): ``None`` arguments
  are ignored and an integer result type is promoted with float32.
  """
  if dtype is None:
    dtype = jnp.result_type(*[jnp.asarray(a) for a in args if a is not None])
    if not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"the result dtype must be inexact, got {dtype}.")
  return dtype


def apply_affine(
  x: jax.Array,
  normalized: jax.Array,
  scale: Optional[jax.Array],
  bias: Optional[jax.Array],
  axis: int,
  dtype: Optional[Any] = None,
) -> jax.Array:
  """``scale * normalized + bias`` along ``axis``, in Flax's result dtype.

  Args:
    x: the normalizer's input (only its dtype is used).
    normalized: the normalized activations, ``x``'s shape.
    scale: ``(C,)`` gamma, or ``None`` (no scaling).
    bias: ``(C,)`` beta, or ``None`` (no shift).
    axis: non-negative feature axis.
    dtype: result dtype; ``None`` infers it from ``x``, ``scale`` and ``bias``
      as ``flax.linen.BatchNorm`` does.

  Returns:
    Array of ``normalized``'s shape in the result dtype.
  """
  return jnp.asarray(
    affine_map(normalized, scale, bias, axis), result_dtype(x, scale, bias, dtype=dtype)
  )


def affine_map(
  normalized: jax.Array, scale: Optional[jax.Array], bias: Optional[jax.Array], axis: int
) -> jax.Array:
  """``normalized * scale + bias`` along ``axis``, in the promoted dtype (no
  cast: the layers cast to their result dtype once, at the end)."""
  y = normalized
  if scale is not None:
    y = y * st.broadcast_channels(scale, normalized, axis)
  if bias is not None:
    y = y + st.broadcast_channels(bias, normalized, axis)
  return y
