"""The generic Flax linen layer over :mod:`mabn_jax.functional.interface`.

Every batch-statistics normalizer of :mod:`mabn_jax` is a subclass of
:class:`BatchStatisticsNorm` that declares its fields and its functional
:class:`~mabn_jax.functional.interface.Method` (``method_class``); the call
itself lives here once:

* ``'batch_stats'``: one variable per non-empty field of the method's state
  (same names, shapes and dtypes as ``method.init``; counters are float32,
  see :mod:`~mabn_jax.functional.counters`; with several feature axes the
  channel axis is stored as their sizes, as Flax does), plus the float32
  ``nonfinite_count`` (declared at initialization when ``count_nonfinite``;
  variables saved without it, e.g. ``flax.linen.BatchNorm``'s, apply and
  train without it);
* ``'backward_stats'``: the method's taps (:data:`mabn_jax.BACKWARD_STATS`),
  declared when the collection is present or mutable;
* ``'params'``: ``scale``/``bias`` ``(C,)`` in ``param_dtype``;
* ``'batch_moments'``: the input moments, sown for precise BN when a caller
  makes the collection mutable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from mabn_jax.functional import counters, interface
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import check_state_shape, require_bound_axis
from mabn_jax.functional.layout import FeatureLayout, core_axis, feature_layout
from mabn_jax.training import (
  BACKWARD_STATS,
  BATCH_MOMENTS,
  LEGACY_TAP_NAMES,
  NONFINITE_COUNT,
  LayerCall,
  layer_step,
  legacy_tap_message,
)

__all__ = [
  "BATCH_MOMENTS",
  "NONFINITE_COUNT",
  "BatchStatisticsNorm",
  "check_state_shape",
  "functional_config",
  "layer_path",
  "normalize",
  "require_bound_axis",
  "sow_moments",
]


def layer_path(module: nn.Module) -> str:
  """``ClassName 'Outer/Inner'``: the module's Flax path, for error messages."""
  scope = module.scope
  path = "/".join(str(p) for p in scope.path) if scope is not None else ""
  return f"{type(module).__name__} '{path or module.name or '<root>'}'"


def functional_config(module: nn.Module, config_class):
  """The functional config: every field of ``config_class`` read from the
  layer's field of the same name; ``axis_name`` and ``axis_index_groups``
  as hashable statics, with no mapped axis while initializing (an unbound
  layer gives its configuration as declared)."""
  groups = module.axis_index_groups
  if groups is not None:
    groups = tuple(tuple(g) for g in groups)
  initializing = module.scope is not None and module.is_initializing()
  mapped = dict(axis_name=None if initializing else module.axis_name, axis_index_groups=groups)
  if hasattr(module, "axis"):
    mapped["axis"] = core_axis(module.axis)
  return config_class(
    **{
      f.name: mapped[f.name] if f.name in mapped else getattr(module, f.name)
      for f in dataclasses.fields(config_class)
    }
  )


def make_method(module: nn.Module) -> interface.Method:
  """``module.method_class`` built from the layer's fields of the same names."""
  method_class = module.method_class
  layout = {
    f.name: getattr(module, f.name) for f in dataclasses.fields(method_class) if f.name != "config"
  }
  return method_class(config=functional_config(module, method_class.config_class), **layout)


class BatchStatisticsNorm(nn.Module):
  """A normalizer with batch statistics: ``flax.linen.BatchNorm``'s fields
  (plus ``norm_batch_size``) over a functional method.

  Subclasses set ``method_class`` and declare the method's further fields.

  Attributes:
    use_running_average: if True, normalize with the stored statistics.
    axis: the feature axis, or a tuple of them (one statistic per
      combination, stored in their shape, as Flax's); a rank-1 input is one
      sample.
    momentum: decay of the running averages (Flax convention).
    epsilon: added inside the square root.
    dtype: result dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: the affine map, as in Flax.
    axis_name: mapped axis over which batch statistics are averaged.
    axis_index_groups: device groups for that average.
    use_fast_variance: the one-pass variance ``E[|x|^2] - |E[x]|^2`` (Flax's
      default) or, if False, ``E[|x - E[x]|^2]``.
    force_float32_reductions: reduce in at least float32 and keep the
      statistics in float32 (Flax's default); False reduces in the input's
      dtype (or ``dtype``) and keeps them in ``param_dtype``.
    norm_batch_size: samples normalized together; ``None`` is the whole
      per-device batch, which must be a multiple of it.
    count_nonfinite: declare the float32 ``nonfinite_count`` (steps skipped
      because their statistics were not finite; a non-finite step is skipped
      either way). Default True; ``BatchNorm`` and ``FrozenBatchNorm``
      default to False, so that their variables are Flax's.

  Options of ``flax.linen.BatchNorm`` that a method has no use for
  (``use_fast_variance`` and ``force_float32_reductions`` for MABN, whose
  statistics are float32 second moments) raise a ``ValueError`` when set to
  anything but their defaults.
  """

  method_class: ClassVar[type]

  use_running_average: Optional[bool] = None
  axis: Any = -1
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
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  norm_batch_size: Optional[int] = None
  count_nonfinite: bool = True

  @nn.nowrap
  def functional(self) -> interface.Method:
    """The functional method this layer runs, with its configuration."""
    return make_method(self)

  @nn.nowrap
  def config(self):
    """The functional config of this layer."""
    return self.functional().config

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: Optional[bool] = None,
    *,
    mask: Optional[jax.Array] = None,
  ):
    """Normalizes ``x`` of shape ``(N, ..., C)`` (or ``(C,)``, one sample);
    returns the same shape.

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to ``x``: only its True
        positions enter the batch statistics (as ``flax.linen.BatchNorm``).
    """
    return normalize(self, x, use_running_average, mask=mask)


def normalize(
  module: nn.Module,
  x: jax.Array,
  use_running_average: Optional[bool],
  conv: Optional[interface.ConvContext] = None,
  where: Optional[str] = None,
  mask: Optional[jax.Array] = None,
):
  """The call of every batch-statistics layer (inside its compact method).

  ``conv`` is the producing convolution of methods that need it; ``where``
  names the layer in errors (default: the module's path); ``mask`` (boolean,
  broadcastable to ``x``) restricts the batch statistics.
  """
  where = where or layer_path(module)
  use_running_average = nn.merge_param(
    "use_running_average", module.use_running_average, use_running_average
  )
  with interface.named_errors(where):
    layout, method = _layout_and_method(module, x, mask)
    if not use_running_average and not module.is_initializing():
      require_bound_axis(where, method.config.axis_name)
    core_x = layout.to_core(x)
    initial = interface.stored_state(method, method.init_for(core_x, conv), module.param_dtype)
  stats = _state_variables(module, where, initial, method.mismatch_cause(), layout)
  if module.is_initializing() and not _forms_groups(core_x.shape[0], method.config):
    # An initialization batch smaller than (or not a multiple of) one group
    # (Flax's examples initialize with one sample): declare the variables and
    # return the inference output; training batches are checked as usual.
    use_running_average = True
  state = initial._replace(
    **{
      name: layout.from_stored(var.value, getattr(initial, name).shape)
      for name, var in stats.items()
      if name != NONFINITE_COUNT
    }
  )
  taps = _tap_variables(module, where, method.taps(initial))
  scale, bias = _affine_params(module, layout, core_x.shape[layout.axis])
  axis = method.feature_axis(core_x.ndim)
  sow = lambda: _sow_input(module, core_x, axis, method.config)
  commit = lambda new, checked: _commit_state(module, stats, new, checked, layout)
  call = LayerCall(
    interface.with_mask(method, layout.mask_to_core(mask)),
    core_x,
    state,
    scale,
    bias,
    taps,
    conv,
    where,
    module.dtype,
  )
  with interface.named_errors(where):
    return layout.from_core(layer_step(call, use_running_average, sow, commit))


def _layout_and_method(module: nn.Module, x: jax.Array, mask: Optional[jax.Array]):
  """``(layout, method)`` of a call: the input's :class:`FeatureLayout` and the
  layer's method on the core's feature axis, validated for ``x`` and ``mask``
  (unnamed errors)."""
  method = module.functional()
  method.validate()
  layout = feature_layout(
    x.shape, getattr(module, "axis", None), getattr(method.config, "norm_batch_size", None)
  )
  if layout.perm is not None:
    method = dataclasses.replace(
      method, config=dataclasses.replace(method.config, axis=layout.axis)
    )
  options = {
    name: getattr(module, name) for name in interface.FLAX_OPTIONS if hasattr(module, name)
  }
  interface.check_call(method, x, options)
  interface.with_mask(method, mask)
  return layout, method


def _forms_groups(batch: int, config: Any) -> bool:
  """False only for a valid ``norm_batch_size`` the batch does not fill
  (an invalid one is reported by the method)."""
  size = config.norm_batch_size
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    return True
  return batch >= size and batch % size == 0


def _state_variables(
  module: nn.Module, where: str, initial: Any, cause: str, layout: FeatureLayout
) -> dict:
  """Declares a ``'batch_stats'`` variable per non-empty field of ``initial``
  (empty ones are constants: checkpointers reject zero-size arrays), stored
  in ``layout``'s shapes, and the float32 counter :data:`NONFINITE_COUNT` if
  stored or, while initializing, if the layer's ``count_nonfinite`` (default
  True): variables saved without it (``flax.linen.BatchNorm``'s) keep their
  structure in training too, where a non-finite step is skipped uncounted.
  Raises if a stored shape differs."""
  values = {name: value for name, value in initial._asdict().items() if value.size}
  wanted = module.is_initializing() and getattr(module, "count_nonfinite", True)
  if wanted or module.has_variable("batch_stats", NONFINITE_COUNT):
    values[NONFINITE_COUNT] = counters.zero()
  variables = {}
  for name, value in values.items():
    var = module.variable("batch_stats", name, lambda v=value: layout.to_stored(v))
    check_state_shape(where, name, var.value, layout.stored_shape(value.shape), cause)
    variables[name] = var
  return variables


def _tap_variables(module: nn.Module, where: str, initial: dict) -> Optional[dict]:
  """The ``'backward_stats'`` taps' values, or ``None`` for forward-only use
  (the collection neither given nor mutable; differentiating then raises)."""
  if not initial:
    return None
  for old in LEGACY_TAP_NAMES:
    if module.has_variable(BACKWARD_STATS, old):
      raise ValueError(legacy_tap_message(where, f"{BACKWARD_STATS}/{old}"))
  first = next(iter(initial))
  if not (
    module.has_variable(BACKWARD_STATS, first) or module.is_mutable_collection(BACKWARD_STATS)
  ):
    return None
  taps = {}
  for name, zeros in initial.items():
    taps[name] = module.variable(BACKWARD_STATS, name, jnp.zeros, zeros.shape, jnp.float32).value
    check_state_shape(where, f"{BACKWARD_STATS}/{name}", taps[name], zeros.shape)
  return taps


def _affine_params(module: nn.Module, layout: FeatureLayout, features: int):
  """``(scale, bias)``: the ``(C,)`` ``'params'`` (stored in ``layout``'s
  feature shape), ``None`` when disabled."""
  shape = layout.stored_shape((features,))
  scale = bias = None
  if module.use_scale:
    scale = module.param("scale", module.scale_init, shape, module.param_dtype).reshape(features)
  if module.use_bias:
    bias = module.param("bias", module.bias_init, shape, module.param_dtype).reshape(features)
  return scale, bias


def _commit_state(
  module: nn.Module, variables: dict, new_state: Any, checked: Any, layout: FeatureLayout
) -> None:
  """Writes the step's state (under ``stop_gradient``: statistics are not
  differentiated) unless a value of ``checked`` (default: the new state) is
  non-finite: then the old values stay and ``nonfinite_count``, if stored,
  grows by one (:func:`~mabn_jax.functional.statistics.commit_if_finite`).
  Nothing is written while initializing."""
  if module.is_initializing():
    return
  counter = variables.get(NONFINITE_COUNT)
  old = {
    name: layout.from_stored(var.value, getattr(new_state, name).shape)
    for name, var in variables.items()
    if name != NONFINITE_COUNT
  }
  count = counters.zero() if counter is None else counter.value
  kept, count = st.commit_values(new_state, old, count, checked)
  if counter is not None:
    counter.value = count
  for name, value in kept.items():
    variables[name].value = jax.lax.stop_gradient(layout.to_stored(value))


def _sow_input(module: nn.Module, x: jax.Array, axis: int, config: Any) -> None:
  groups = st.num_groups(x.shape[0], config.norm_batch_size, None)
  sow_moments(module, x, groups, axis, config.axis_name, config.axis_index_groups)


def sow_moments(
  module: nn.Module,
  x: jax.Array,
  groups: int,
  axis: int,
  axis_name: Optional[str] = None,
  axis_index_groups: Any = None,
) -> None:
  """Sows the batch moments of a normalizer's input for precise BN.

  If the :data:`BATCH_MOMENTS` collection is mutable, two float32 ``(C,)``
  arrays are sown (one tuple entry per call): ``'mean'``, the per-channel
  mean of ``x``, and ``'second_moment'``, the mean of ``x**2``, over the
  whole device batch (the mean of the ``groups`` equal-sized group moments)
  and over ``axis_name`` if given. Otherwise, and while initializing, it
  does nothing and adds nothing to the computation.
  """
  if module.is_initializing() or not module.is_mutable_collection(BATCH_MOMENTS):
    return
  mean, second = st.input_moments(x, groups, axis, axis_name, axis_index_groups)
  module.sow(BATCH_MOMENTS, "mean", mean)
  module.sow(BATCH_MOMENTS, "second_moment", second)
