"""Helpers shared by the Flax layers: names for errors, state checks, affine."""

from __future__ import annotations

from typing import Any, Sequence

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
