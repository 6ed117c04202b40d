"""Helpers shared by the NNX modules: names for errors, mode, state, affine."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mabn_jax.functional import statistics as st
from mabn_jax.functional.affine import apply_affine
from mabn_jax.layers._common import NONFINITE_COUNT, check_state_shape, require_bound_axis

__all__ = ["NONFINITE_COUNT", "check_state_shape", "require_bound_axis"]


def describe(module: nnx.Module, num_features: int) -> str:
  """``mabn_jax.nnx.MABN(num_features=C)``: how errors name an NNX layer."""
  return f"mabn_jax.nnx.{type(module).__name__}(num_features={num_features})"


def resolve_mode(where: str, field: Optional[bool], argument: Optional[bool]) -> bool:
  """``use_running_average``: the call argument if given, else the attribute
  (``model.train()`` / ``model.eval()`` set it); an error if both are None."""
  mode = field if argument is None else argument
  if mode is None:
    raise ValueError(
        f"{where}: use_running_average is None both as an attribute and as a "
        "call argument; pass use_running_average=True/False, or call "
        "model.train() / model.eval().")
  return bool(mode)


def hashable_groups(axis_index_groups: Any):
  """``axis_index_groups`` as nested tuples (a hashable functional config field)."""
  if axis_index_groups is None:
    return None
  return tuple(tuple(group) for group in axis_index_groups)


def check_features(where: str, num_features: int, x: jax.Array, axis: int) -> None:
  """Raises if ``x``'s feature axis does not have ``num_features`` channels."""
  if x.shape[axis] != num_features:
    raise ValueError(
        f"{where}: expected {num_features} features on axis {axis} of the input, "
        f"got {x.shape[axis]} (input shape {tuple(x.shape)}).")


def make_affine(module: nnx.Module, num_features: int, *, use_scale: bool,
                use_bias: bool, scale_init, bias_init, param_dtype,
                rngs: nnx.Rngs) -> None:
  """Sets ``module.scale``/``module.bias``: ``(C,)`` ``nnx.Param`` in
  ``param_dtype``, or ``None`` when disabled (as ``nnx.BatchNorm``)."""
  shape = (num_features,)
  module.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype))
                  if use_scale else nnx.data(None))
  module.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype))
                 if use_bias else nnx.data(None))


def affine_params(module: nnx.Module):
  """``(scale, bias)``: the module's ``(C,)`` param values, ``None`` if disabled."""
  scale = module.scale[...] if module.scale is not None else None
  bias = module.bias[...] if module.bias is not None else None
  return scale, bias


def affine(module: nnx.Module, x: jax.Array, normalized: jax.Array, axis: int) -> jax.Array:
  """``scale * normalized + bias`` with the module's params and ``dtype``."""
  scale, bias = affine_params(module)
  return apply_affine(x, normalized, scale, bias, axis, module.dtype)


def make_state(module: nnx.Module, initial: NamedTuple,
               fields: Optional[Sequence[str]] = None) -> None:
  """Sets one ``nnx.BatchStat`` attribute per field of the functional state
  ``initial`` (all fields, or ``fields``) and the int32 ``nonfinite_count``."""
  for name in initial._fields if fields is None else fields:
    setattr(module, name, nnx.BatchStat(getattr(initial, name)))
  setattr(module, NONFINITE_COUNT, nnx.BatchStat(jnp.zeros((), jnp.int32)))


def read_state(module: nnx.Module, initial: NamedTuple, where: str,
               cause: str = "number of features (or buffer size)") -> NamedTuple:
  """``initial`` with each field held by the module replaced by its value.

  Raises if a stored value's shape differs from ``initial``'s (e.g. a state
  restored from another configuration).
  """
  values = {}
  for name in initial._fields:
    variable = getattr(module, name, None)
    if isinstance(variable, nnx.BatchStat):
      check_state_shape(where, name, variable[...], getattr(initial, name).shape, cause)
      values[name] = variable[...]
  return initial._replace(**values)


def commit_state(module: nnx.Module, new_state: NamedTuple, checked: Any = None) -> None:
  """Writes a step's new state into the module's ``nnx.BatchStat`` attributes,
  unless any value of ``checked`` (default: ``new_state``) is non-finite:
  then every old value is kept and ``nonfinite_count`` is incremented
  (:func:`~mabn_jax.functional.statistics.commit_if_finite`)."""
  names = [name for name in new_state._fields
           if isinstance(getattr(module, name, None), nnx.BatchStat)]
  new = {name: getattr(new_state, name) for name in names}
  old = {name: getattr(module, name)[...] for name in names}
  counter = getattr(module, NONFINITE_COUNT)
  kept, counter[...] = st.commit_if_finite(new, old, counter[...], checked)
  for name, value in kept.items():
    getattr(module, name)[...] = value
