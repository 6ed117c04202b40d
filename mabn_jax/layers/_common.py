"""Helpers shared by the Flax layers: names for errors, state checks, affine."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.linen import dtypes

from mabn_jax.functional import statistics as st


def layer_path(module: nn.Module) -> str:
  """``ClassName 'Outer/Inner'``: the module's Flax path, for error messages."""
  scope = module.scope
  path = "/".join(str(p) for p in scope.path) if scope is not None else ""
  return f"{type(module).__name__} '{path or module.name or '<root>'}'"


def check_state_shape(where: str, name: str, value: jax.Array, expected: Sequence[int]):
  """Raises if a stored variable's shape differs from what the input implies."""
  if tuple(value.shape) != tuple(expected):
    raise ValueError(
        f"{where}: stored variable '{name}' has shape {tuple(value.shape)} but the "
        f"input implies {tuple(expected)}; was the layer initialized with a "
        "different number of channels (or buffer size)?"
    )


def affine(
    module: nn.Module,
    x: jax.Array,
    normalized: jax.Array,
    axis: int,
    features: int,
) -> jax.Array:
  """``gamma * normalized + beta`` with Flax's ``scale``/``bias`` params.

  ``scale`` and ``bias`` are ``(C,)`` arrays in the ``'params'`` collection,
  created with ``module.scale_init``/``bias_init`` in ``module.param_dtype``.
  The result dtype is ``module.dtype`` or inferred from ``x`` and the params,
  as in ``flax.linen.BatchNorm``.
  """
  args = [x]
  y = normalized
  if module.use_scale:
    scale = module.param("scale", module.scale_init, (features,), module.param_dtype)
    y = y * st.broadcast_channels(scale, x, axis)
    args.append(scale)
  if module.use_bias:
    bias = module.param("bias", module.bias_init, (features,), module.param_dtype)
    y = y + st.broadcast_channels(bias, x, axis)
    args.append(bias)
  return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=module.dtype))


NONFINITE_COUNT = "nonfinite_count"
"""``'batch_stats'`` variable counting the steps a layer skipped as non-finite."""


def commit_state(module: nn.Module, variables: dict, new_values: dict) -> None:
  """Writes a step's new ``'batch_stats'`` values unless any is non-finite.

  ``variables`` maps names to the layer's ``flax`` variables and
  ``new_values`` names to their new values. A step with any NaN or Inf keeps
  every old value and increments the layer's ``nonfinite_count`` (an int32
  ``'batch_stats'`` variable the training loop can read, see
  :func:`mabn_jax.nonfinite_counts`). Nothing is written while initializing.
  """
  counter = module.variable("batch_stats", NONFINITE_COUNT, jnp.zeros, (), jnp.int32)
  if module.is_initializing():
    return
  old = {name: variables[name].value for name in new_values}
  kept, finite = st.keep_if_finite(new_values, old)
  for name, value in kept.items():
    variables[name].value = value
  counter.value = counter.value + jnp.where(finite, 0, 1).astype(jnp.int32)


BATCH_MOMENTS = "batch_moments"
"""Collection the normalizers sow their input moments into (precise BN).

Only :func:`sow_moments` writes it, and only when a caller made it mutable
(``model.apply(..., mutable=['batch_moments', ...])``, as
:func:`mabn_jax.recompute_batch_stats` does); it never exists otherwise.
"""


def sow_moments(
    module: nn.Module,
    x: jax.Array,
    groups: int,
    axis: int,
    axis_name: Optional[str] = None,
    axis_index_groups: Any = None,
) -> None:
  """Sows the batch moments of a normalizer's input for precise BN (spec, section 1).

  Call it in the training path of a batch-statistics normalizer with the
  layer's input ``x`` (before normalization), its number of normalization
  groups and its (non-negative) feature axis. If the :data:`BATCH_MOMENTS`
  collection is mutable, two float32 ``(C,)`` arrays are sown (appended to a
  tuple, one entry per call): ``'mean'``, the per-channel mean of ``x`` and
  ``'second_moment'``, the mean of ``x**2``, both over the whole device batch
  (the mean of the ``groups`` group moments, which have equal sizes) and over
  ``axis_name`` if given. Otherwise, and while initializing, it does nothing
  and adds nothing to the computation (a static check).
  """
  if module.is_initializing() or not module.is_mutable_collection(BATCH_MOMENTS):
    return
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  mean = st.group_mean(x, groups, axis, axis_name, axis_index_groups)
  second = st.group_mean(jnp.square(x), groups, axis, axis_name, axis_index_groups)
  module.sow(BATCH_MOMENTS, "mean", jnp.mean(mean, axis=0).astype(jnp.float32))
  module.sow(BATCH_MOMENTS, "second_moment", jnp.mean(second, axis=0).astype(jnp.float32))
