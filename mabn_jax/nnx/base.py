"""The generic Flax NNX module over :mod:`mabn_jax.functional.interface`.

Every batch-statistics normalizer of :mod:`mabn_jax.nnx` is a subclass of
:class:`BatchStatisticsNorm` that names its functional
:class:`~mabn_jax.functional.interface.Method` (``method_class``); its
constructor's keyword arguments are ``nnx.BatchNorm``'s layer options and
every field of the method and its config, with their defaults (shown by
``inspect.signature`` and ``help``). State, as the linen layers' variables:

* ``nnx.Param``: ``scale``/``bias`` ``(C,)`` in ``param_dtype`` (``None`` when
  disabled);
* ``nnx.BatchStat``: one per non-empty field of the method's state, plus the
  float32 ``nonfinite_count`` (:mod:`~mabn_jax.functional.counters`) when
  ``count_nonfinite`` (the default, except for ``BatchNorm`` and
  ``FrozenBatchNorm``, whose state is ``nnx.BatchNorm``'s: ``mean`` and
  ``var``);
* :class:`~mabn_jax.nnx.BackwardStat`: the method's taps.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, ClassVar, Dict, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mabn_jax.functional import counters, interface
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import check_state_shape, require_bound_axis
from mabn_jax.functional.layout import core_axis, feature_layout
from mabn_jax.nnx.variables import BackwardStat, BatchMoments
from mabn_jax.training import NONFINITE_COUNT, LayerCall, layer_step

_LAYER_OPTIONS = (
  ("use_running_average", False),
  ("dtype", None),
  ("param_dtype", jnp.float32),
  ("use_bias", True),
  ("use_scale", True),
  ("bias_init", initializers.zeros_init()),
  ("scale_init", initializers.ones_init()),
  ("use_fast_variance", True),
  ("force_float32_reductions", True),
  ("promote_dtype", None),
  ("bias_metadata", MappingProxyType({})),
  ("scale_metadata", MappingProxyType({})),
  ("count_nonfinite", True),
)


def options(method_class: type, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """``{keyword: default}`` of an NNX normalizer over ``method_class``: the
  layer options (with a class's ``overrides`` of their defaults), then the
  config's fields, then the method's layout fields."""
  defaults: Dict[str, Any] = {**dict(_LAYER_OPTIONS), **(overrides or {})}
  for field in dataclasses.fields(method_class.config_class):
    defaults.setdefault(field.name, field.default)
  for field in dataclasses.fields(method_class):
    if field.name != "config":
      defaults.setdefault(field.name, field.default)
  return defaults


def describe(module: Any, num_features: int) -> str:
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
      "model.train() / model.eval()."
    )
  return bool(mode)


def hashable_groups(axis_index_groups: Any):
  """``axis_index_groups`` as nested tuples (a hashable functional config field)."""
  if axis_index_groups is None:
    return None
  return tuple(tuple(group) for group in axis_index_groups)


def make_affine(
  module: Any,
  num_features: int,
  rngs: nnx.Rngs,
  scale_metadata: Any = MappingProxyType({}),
  bias_metadata: Any = MappingProxyType({}),
) -> None:
  """Sets ``module.scale``/``module.bias``: ``(C,)`` ``nnx.Param`` in the
  module's ``param_dtype`` with the given metadata, or ``None`` when disabled
  (as ``nnx.BatchNorm``)."""
  shape = (num_features,)
  module.scale = (
    nnx.Param(module.scale_init(rngs.params(), shape, module.param_dtype), **scale_metadata)
    if module.use_scale
    else nnx.data(None)
  )
  module.bias = (
    nnx.Param(module.bias_init(rngs.params(), shape, module.param_dtype), **bias_metadata)
    if module.use_bias
    else nnx.data(None)
  )


def make_state(module: Any, method: interface.Method, initial: Any) -> None:
  """Sets an ``nnx.BatchStat`` per non-empty field of ``initial`` (empty ones
  are constants, as in the linen layers), the float32 ``nonfinite_count`` if
  the module's ``count_nonfinite`` (default True) and a :class:`BackwardStat`
  per tap of ``method``."""
  for name, value in initial._asdict().items():
    if value.size:
      setattr(module, name, nnx.BatchStat(value))
  if getattr(module, "count_nonfinite", True):
    setattr(module, NONFINITE_COUNT, nnx.BatchStat(counters.zero()))
  for name, zeros in method.taps(initial).items():
    setattr(module, name, BackwardStat(zeros))


def make_method(module: Any) -> interface.Method:
  """``module.method_class`` built from the module's attributes of the same names."""
  method_class = module.method_class
  values = {f.name: getattr(module, f.name) for f in dataclasses.fields(method_class.config_class)}
  if "axis" in values:
    values["axis"] = core_axis(values["axis"])
  config = method_class.config_class(**values)
  layout = {
    f.name: getattr(module, f.name) for f in dataclasses.fields(method_class) if f.name != "config"
  }
  return method_class(config=config, **layout)


_METADATA = ("scale_metadata", "bias_metadata")


class RunningAverageView:
  """``set_view`` for ``nnx.view(model, use_running_average=...)`` (and
  ``nnx.view_info``): the mode switch of the batch-statistics modules."""

  use_running_average: Optional[bool]

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view``.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchStatisticsNorm(RunningAverageView, nnx.Module):
  """A normalizer with batch statistics over a functional method (NNX).

  Args:
    num_features: ``C``, the size of the feature axis (with a tuple
      ``axis``, the product of the feature axes' sizes, as ``nnx.BatchNorm``).
    rngs: ``nnx.Rngs`` for the parameter initializers.
    **options: see :func:`options` (and the subclass's docstring); unknown
      keywords raise a ``TypeError``. Besides the method's, they are
      ``nnx.BatchNorm``'s: ``promote_dtype`` (applied to ``(x, mean, var,
      scale, bias)``, ``mean``/``var`` ``None`` for a method without them;
      default ``None``, no promotion, the linen layer's dtype rule, where
      ``nnx.BatchNorm`` defaults to ``flax.nnx.nn.dtypes.promote_dtype``),
      ``scale_metadata``/``bias_metadata`` (the ``nnx.Param`` metadata),
      ``use_fast_variance``, ``force_float32_reductions``; and
      ``count_nonfinite``: whether the float32 ``nonfinite_count`` is kept.
  """

  method_class: ClassVar[type]
  option_defaults: ClassVar[Dict[str, Any]] = {}
  """A subclass's defaults of the layer options (see :func:`options`)."""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "method_class" in cls.__dict__ and "__init__" not in cls.__dict__:
      # The subclass's own __init__, with the real keywords as its signature.
      def __init__(self, num_features: int, *, rngs: nnx.Rngs, **kwargs: Any):
        BatchStatisticsNorm.__init__(self, num_features, rngs=rngs, **kwargs)

      positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
      keyword = inspect.Parameter.KEYWORD_ONLY
      parameters = (
        [inspect.Parameter("num_features", positional, annotation=int)]
        + [
          inspect.Parameter(name, keyword, default=default)
          for name, default in options(cls.method_class, cls.option_defaults).items()
        ]
        + [inspect.Parameter("rngs", keyword, annotation=nnx.Rngs)]
      )
      __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", positional)] + parameters
      )
      __init__.__qualname__ = f"{cls.__qualname__}.__init__"
      __init__.__doc__ = cls.__doc__
      cls.__init__ = __init__
      cls.__signature__ = inspect.Signature(parameters)

  def __init__(self, num_features: int, *, rngs: nnx.Rngs, **kwargs: Any):
    where = describe(self, num_features)
    defaults = options(self.method_class, self.option_defaults)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
      raise TypeError(
        f"{where}: unexpected keyword argument(s) {', '.join(unknown)}; "
        f"valid ones: {', '.join(defaults)}."
      )
    self.num_features = num_features
    self.param_dtype: Any = defaults["param_dtype"]
    for name, default in defaults.items():
      if name not in _METADATA:
        setattr(self, name, kwargs.get(name, default))
    self.axis_index_groups = hashable_groups(self.axis_index_groups)
    method = self._functional()
    with interface.named_errors(where):
      method.validate()
      interface.check_call(method, jnp.zeros(()), self._flax_options())
      initial = self._initial_state(method)
    metadata = {name: kwargs.get(name, defaults[name]) for name in _METADATA}
    make_affine(self, num_features, rngs, **metadata)
    make_state(self, method, initial)

  def functional(self) -> interface.Method:
    """The functional method this module runs, with its configuration."""
    return self._functional()

  def _functional(self) -> interface.Method:
    return make_method(self)

  def _initial_state(self, method: interface.Method) -> Any:
    """The functional state a new module starts from (its statistics in
    ``param_dtype`` if ``force_float32_reductions`` is False)."""
    return interface.stored_state(method, method.init(self.num_features), self.param_dtype)

  def _flax_options(self) -> Dict[str, Any]:
    return {name: getattr(self, name) for name in interface.FLAX_OPTIONS}

  def __call__(
    self,
    x: jax.Array,
    use_running_average: Optional[bool] = None,
    *,
    mask: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C)`` (any float or complex dtype the
    method takes; ``(C,)`` is one sample); returns its shape.

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to ``x``: only its True
        positions enter the batch statistics (as ``nnx.BatchNorm``).
    """
    return normalize(self, x, use_running_average, mask=mask)


def normalize(
  module: Any,
  x: jax.Array,
  use_running_average: Optional[bool],
  conv: Optional[interface.ConvContext] = None,
  where: Optional[str] = None,
  mask: Optional[jax.Array] = None,
) -> jax.Array:
  """The call of every batch-statistics module: inference with the stored
  statistics, or a training step whose state is committed unless non-finite
  (``mask``: see :meth:`BatchStatisticsNorm.__call__`)."""
  where = where or describe(module, module.num_features)
  use_running_average = resolve_mode(where, module.use_running_average, use_running_average)
  with interface.named_errors(where):
    layout, method = _layout_and_method(module, x, mask, where)
    initial = module._initial_state(method)
  state = _read_state(module, initial, where, method.mismatch_cause())
  taps = _read_taps(module, method, initial, where)
  x, state, scale, bias = _promote(module, x, state, use_running_average)
  if not use_running_average:
    require_bound_axis(where, method.config.axis_name)
  core_x = layout.to_core(x)
  axis = method.feature_axis(core_x.ndim)
  sow = lambda: _sow_moments(module, core_x, axis, method.config)
  commit = lambda new, checked: _commit_state(module, new, checked)
  masked = interface.with_mask(method, layout.mask_to_core(mask))
  call = LayerCall(masked, core_x, state, scale, bias, taps, conv, where, module.dtype)
  with interface.named_errors(where):
    return layout.from_core(layer_step(call, use_running_average, sow, commit))


def _layout_and_method(module: Any, x: jax.Array, mask: Optional[jax.Array], where: str):
  """``(layout, method)`` of a call: the input's :class:`FeatureLayout` and the
  module's method on the core's feature axis, checked against ``x``, ``mask``
  and ``num_features`` (unnamed errors, but the feature count's)."""
  method = module._functional()
  layout = feature_layout(
    x.shape, getattr(module, "axis", None), getattr(method.config, "norm_batch_size", None)
  )
  if layout.perm is not None:
    method = dataclasses.replace(
      method, config=dataclasses.replace(method.config, axis=layout.axis)
    )
  options = getattr(module, "_flax_options", dict)()
  interface.check_call(method, x, options)
  interface.with_mask(method, mask)
  axis = method.feature_axis(len(layout.core_shape))
  if layout.core_shape[axis] != module.num_features:
    shown = axis if layout.perm is None else module.axis
    raise ValueError(
      f"{where}: expected {module.num_features} features on axis {shown} of the input, "
      f"got {layout.core_shape[axis]} (input shape {tuple(x.shape)})."
    )
  return layout, method


def _promote(module: Any, x: jax.Array, state: Any, use_running_average: bool):
  """``(x, state, scale, bias)`` after the module's ``promote_dtype`` (if not
  ``None``) of ``(x, mean, var, scale, bias)``, as ``nnx.BatchNorm`` does:
  the promoted ``mean``/``var`` replace the state's for inference (training
  updates the stored ones). ``None``, the default, promotes nothing: the
  linen layer's dtype rule, so the NNX and linen layers agree bit for bit
  (``flax.nnx.nn.dtypes.promote_dtype`` is ``nnx.BatchNorm``'s default)."""
  scale = module.scale[...] if module.scale is not None else None
  bias = module.bias[...] if module.bias is not None else None
  promote = getattr(module, "promote_dtype", None)
  if promote is None:
    return x, state, scale, bias
  mean, var = getattr(state, "mean", None), getattr(state, "var", None)
  x, mean, var, scale, bias = promote((x, mean, var, scale, bias), dtype=module.dtype)
  if use_running_average and mean is not None:
    state = state._replace(mean=mean, var=var)
  return x, state, scale, bias


def _sow_moments(module: Any, x: jax.Array, axis: int, config: Any) -> None:
  """Sows the input's :class:`BatchMoments` while a caller captures them
  (precise BN); otherwise adds nothing to the computation."""
  captures = getattr(module, "__captures__", ())
  if not any(type(capture) is BatchMoments for capture in captures):
    return
  groups = st.num_groups(x.shape[0], config.norm_batch_size, None)
  mean, second = st.input_moments(x, groups, axis, config.axis_name, config.axis_index_groups)
  module.sow(BatchMoments, "mean", mean)
  module.sow(BatchMoments, "second_moment", second)


def _read_state(module: Any, initial: Any, where: str, cause: str) -> Any:
  """``initial`` with each field held by the module replaced by its value;
  raises if a stored shape differs (a state restored from another layout).
  An int32 counter (state saved before counters were float32) is converted
  to float32 in place."""
  values = {}
  for name in initial._fields + (NONFINITE_COUNT,):
    variable = getattr(module, name, None)
    if isinstance(variable, nnx.BatchStat) and jnp.issubdtype(variable[...].dtype, jnp.integer):
      variable.set_value(counters.as_counter(variable[...]))  # an int32 counter of old state
    if isinstance(variable, nnx.BatchStat) and name != NONFINITE_COUNT:
      check_state_shape(where, name, variable[...], getattr(initial, name).shape, cause)
      values[name] = variable[...]
  return initial._replace(**values)


def _read_taps(module: Any, method: interface.Method, initial: Any, where: str) -> Optional[dict]:
  expected = method.taps(initial)
  if not expected:
    return None
  taps = {name: getattr(module, name).get_value() for name in expected}
  for name, tap in taps.items():
    check_state_shape(where, name, tap, expected[name].shape, method.mismatch_cause())
  return taps


def _commit_state(module: Any, new_state: Any, checked: Any) -> None:
  """Writes a step's new state into the ``nnx.BatchStat`` attributes, under
  ``stop_gradient`` (statistics are not differentiated; required of writes
  to Variables that are mutable arrays), unless a value of ``checked``
  (default: the new state) is non-finite; then the old values stay and
  ``nonfinite_count``, if kept, grows by one."""
  old = {
    name: getattr(module, name)[...]
    for name in new_state._fields
    if isinstance(getattr(module, name, None), nnx.BatchStat)
  }
  counter = getattr(module, NONFINITE_COUNT, None)
  count = counter[...] if isinstance(counter, nnx.BatchStat) else counters.zero()
  kept, count = st.commit_values(new_state, old, count, checked)
  if isinstance(counter, nnx.BatchStat):
    counter[...] = jax.lax.stop_gradient(count)
  for name, value in kept.items():
    getattr(module, name)[...] = jax.lax.stop_gradient(value)
