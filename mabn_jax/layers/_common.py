"""Helpers shared by the Flax layers: names for errors, state checks, affine."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn
from flax.linen import initializers

from mabn_jax.functional import statistics as st
from mabn_jax.functional.affine import apply_affine


def layer_path(module: nn.Module) -> str:
  """``ClassName 'Outer/Inner'``: the module's Flax path, for error messages."""
  scope = module.scope
  path = "/".join(str(p) for p in scope.path) if scope is not None else ""
  return f"{type(module).__name__} '{path or module.name or '<root>'}'"


def check_state_shape(where: str, name: str, value: jax.Array, expected: Sequence[int],
                      cause: str = "number of channels (or buffer size)"):
  """Raises if a stored variable's shape differs from what the input implies."""
  if tuple(value.shape) != tuple(expected):
    raise ValueError(
        f"{where}: stored variable '{name}' has shape {tuple(value.shape)} but the "
        f"input implies {tuple(expected)}; was the layer initialized with a "
        f"different {cause}?"
    )


def affine_params(module: nn.Module, features: int):
  """``(scale, bias)``: the ``(C,)`` params of :func:`affine`, ``None`` if disabled."""
  scale = bias = None
  if module.use_scale:
    scale = module.param("scale", module.scale_init, (features,), module.param_dtype)
  if module.use_bias:
    bias = module.param("bias", module.bias_init, (features,), module.param_dtype)
  return scale, bias


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
  as in ``flax.linen.BatchNorm`` (:func:`mabn_jax.functional.affine.apply_affine`).
  """
  scale, bias = affine_params(module, features)
  return apply_affine(x, normalized, scale, bias, axis, module.dtype)


NONFINITE_COUNT = "nonfinite_count"
"""``'batch_stats'`` variable counting the steps a layer skipped as non-finite."""


class BatchStatisticsNorm(nn.Module):
  """Fields shared by normalizers with batch statistics, named as in
  ``flax.linen.BatchNorm`` (plus ``norm_batch_size``), and their state helpers.

  Attributes:
    use_running_average: if True, normalize with the stored statistics.
    axis: the feature axis.
    momentum: decay of the running averages (Flax convention).
    epsilon: added inside the square root.
    dtype: result dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: the affine map, as in Flax.
    axis_name: mapped axis over which batch statistics are averaged.
    axis_index_groups: device groups for that average.
    norm_batch_size: samples normalized together; ``None`` is the whole
      per-device batch, which must be a multiple of it.
  """

  use_running_average: Optional[bool] = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Optional[str] = None
  axis_index_groups: Any = None
  norm_batch_size: Optional[int] = None

  def resolve_call(self, x: jax.Array, use_running_average: Optional[bool]):
    """``(where, use_running_average, axis, features)`` of a call on ``x``.

    ``where`` names the layer in errors; ``axis`` is the validated
    non-negative feature axis and ``features`` its size.
    """
    where, use_running_average = call_mode(self, use_running_average)
    axis = st.canonical_axis(self.axis, x.ndim, where)
    return where, use_running_average, axis, x.shape[axis]

  def make_config(self, config_class):
    """:func:`functional_config` of this layer."""
    return functional_config(self, config_class)

  def sow_input(self, x: jax.Array, axis: int, config: Any, where: str) -> None:
    """:func:`sow_moments` of the layer's input ``x`` with ``config``'s
    ``norm_batch_size``, ``axis_name`` and ``axis_index_groups``."""
    groups = st.num_groups(x.shape[0], config.norm_batch_size, where)
    sow_moments(self, x, groups, axis, config.axis_name, config.axis_index_groups)


def call_mode(module: nn.Module, use_running_average: Optional[bool]):
  """``(where, use_running_average)`` of a call: the layer's name for errors
  and the mode merged from the field and the call argument (Flax's rule). A
  training call with an ``axis_name`` checks that the axis is bound."""
  where = layer_path(module)
  use_running_average = nn.merge_param(
      "use_running_average", module.use_running_average, use_running_average)
  if not use_running_average and not module.is_initializing():
    require_bound_axis(where, module.axis_name)
  return where, use_running_average


def functional_config(module: nn.Module, config_class):
  """The functional config: every field of ``config_class`` read from the
  layer's field of the same name (a field the layer does not have keeps the
  config's default); ``axis_name`` and ``axis_index_groups`` as hashable
  statics, with no mapped axis while initializing."""
  groups = module.axis_index_groups
  if groups is not None:
    groups = tuple(tuple(g) for g in groups)
  mapped = dict(axis_name=None if module.is_initializing() else module.axis_name,
                axis_index_groups=groups)
  return config_class(**{
      f.name: mapped[f.name] if f.name in mapped else getattr(module, f.name)
      for f in dataclasses.fields(config_class) if f.name in mapped or hasattr(module, f.name)})


def require_bound_axis(where: str, axis_name: Optional[str]) -> None:
  """Raises ``ValueError`` naming the layer if ``axis_name`` is not a mapped
  axis of the current trace (the layer runs outside ``pmap``/``shard_map``
  or under another axis name); does nothing for ``axis_name=None``."""
  if axis_name is None:
    return
  try:
    lax.axis_size(axis_name)
  except NameError as error:
    raise ValueError(
        f"{where}: axis_name {axis_name!r} is not bound: a training step with "
        f"synchronized statistics must run under jax.pmap or shard_map with that "
        f"axis name (or use axis_name=None)."
    ) from error


def state_variables(module: nn.Module, where: str, specs: Mapping[str, tuple],
                    cause: str = "number of channels (or buffer size)") -> dict:
  """Declares ``'batch_stats'`` variables ``{name: (init, shape[, dtype])}``.

  ``init(shape, dtype)`` makes the initial value (dtype default float32).
  Also declares the int32 ``nonfinite_count`` (see :func:`commit_state`), so
  the collection has the same layout whichever mode initialized it. Raises if
  a stored variable's shape differs from ``shape`` (``cause`` names what may
  have changed since init). Returns ``{name: Variable}``.
  """
  variables = {}
  for name, (init, shape, *dtype) in {
      **specs, NONFINITE_COUNT: (jnp.zeros, (), jnp.int32)}.items():
    var = module.variable("batch_stats", name, init, shape, *(dtype or [jnp.float32]))
    check_state_shape(where, name, var.value, shape, cause)
    variables[name] = var
  return variables


def read_state(variables: dict, initial: Any) -> Any:
  """The functional state (a ``NamedTuple``) ``initial`` with every field that
  is a declared variable (:func:`state_variables`) replaced by its value."""
  return initial._replace(**{
      name: variables[name].value for name in initial._fields if name in variables})


def commit_state(module: nn.Module, variables: dict, new_state: Any, checked: Any = None) -> None:
  """Writes a step's new ``'batch_stats'`` values unless any is non-finite.

  ``variables`` maps names to the layer's ``flax`` variables (as returned by
  :func:`state_variables`, with the counter) and ``new_state`` is the
  functional state after the step (a ``NamedTuple``); its fields that are
  declared variables are written. A step with any NaN or Inf keeps
  every old value and increments the layer's ``nonfinite_count`` (an int32
  ``'batch_stats'`` variable the training loop can read, see
  :func:`mabn_jax.nonfinite_counts`). ``checked`` (default: ``new_state``)
  is what is tested for finiteness (see
  :func:`~mabn_jax.functional.statistics.keep_if_finite`). Nothing is
  written while initializing.
  """
  counter = variables[NONFINITE_COUNT]
  if module.is_initializing():
    return
  new_values = {name: value for name, value in new_state._asdict().items()
                if name in variables}
  old = {name: variables[name].value for name in new_values}
  kept, counter.value = st.commit_if_finite(new_values, old, counter.value, checked)
  for name, value in kept.items():
    variables[name].value = value


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
