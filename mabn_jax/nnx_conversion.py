"""Converting a trained Flax NNX BatchNorm model in place (``mabn_jax.nnx.convert_batch_norm``).

Every BN-type normalizer (``flax.nnx.BatchNorm``, :class:`mabn_jax.nnx.BatchNorm`,
any layer whose running state is BN's ``mean``/``var``) becomes the registry
normalizer ``name`` (its NNX twin) holding converted statistics and
``scale``/``bias`` that keep BN's inference map
(:mod:`mabn_jax.conversion_math`) when calibrated. For a weight-centralized target
(``'mabn'``) the layer feeding each converted normalizer becomes
:class:`~mabn_jax.nnx.CenteredConv` (``CenteredDense``) with its weights
kept; which layer that is comes from the model's data flow on an example
input (:mod:`mabn_jax.dataflow`). With ``calibration_batches`` the converted
layers' statistics and affine maps are then measured, layer by layer in
call order (:mod:`mabn_jax.nnx_calibration`).

This module imports no linen layer module at import time (``mabn_jax.nnx``
exposes it); the registry is read when a conversion runs.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, cast

import numpy as np
from flax import nnx

from mabn_jax import conversion_math as cm
from mabn_jax import dataflow, discovery
from mabn_jax.functional import batch_norm as bn
from mabn_jax.nnx.centered import CenteredConv, CenteredDense

_CARRIED = ("epsilon", "axis_name", "norm_batch_size")
"""Options a converted normalizer takes from the BN layer unless given."""


class _Slot(NamedTuple):
  """Where a module is held: ``parent.attribute`` or ``parent[index]``."""

  parent: Any
  key: Any

  def get(self) -> Any:
    return self.parent[self.key] if isinstance(self.key, int) else getattr(self.parent, self.key)

  def set(self, module: Any) -> None:
    if isinstance(self.key, int):
      self.parent[self.key] = module
    else:
      setattr(self.parent, self.key, module)


def _slot(model: Any, path: Tuple) -> _Slot:
  node = model
  for key in path[:-1]:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return _Slot(node, path[-1])


class Converted(NamedTuple):
  """A converted normalizer: where it sits and the BN layer it replaced."""

  path: Tuple
  slot: _Slot
  source: cm.Source


def _name(path: Tuple) -> str:
  return "/".join(map(str, path))


def _bn_layers(model: nnx.Module) -> Dict[Tuple, Any]:
  """``{path: module}`` of the BN-type normalizers, in graph order."""
  return {
    path: module
    for path, module, method in discovery.nnx_normalizers(model)
    if isinstance(method, bn.MeanVarMethod)
  }


def _plan(model, centred: bool, example_input, pairs) -> List[Tuple[Tuple, _Slot, Optional[_Slot]]]:
  """``[(norm path, norm slot, producer slot or None)]``: which norms to convert and
  which layer to centre for each."""
  if pairs is not None or (example_input is None and centred):
    found = []
    paths = {id(module): tuple(path) for path, module in discovery.nnx_modules(model)}
    for pair in discovery.nnx_conv_norm_pairs(model, pairs):
      if not isinstance(discovery.method_of(pair.norm), bn.MeanVarMethod):
        raise ValueError(
          f"convert_batch_norm: '{pair.where}' ({type(pair.norm).__name__}) is not a "
          "BatchNorm with running mean/var statistics."
        )
      path = paths.get(id(pair.norm), tuple(pair.where.split("/")))
      norm_slot = _Slot(pair.norm_parent, pair.norm_attribute)
      found.append((path, norm_slot, _Slot(pair.conv_parent, pair.conv_attribute)))
    return found
  layers = _bn_layers(model)
  if not centred:
    return [(path, _slot(model, path), None) for path in layers]
  producers = dataflow.nnx_norm_producers(model, example_input, list(layers))
  return [(path, _slot(model, path), _slot(model, producers[path].path)) for path in layers]


def convert_batch_norm(
  model: nnx.Module,
  name: str = "mabn",
  *,
  x: Any = None,
  example_input: Any = None,
  pairs: Any = None,
  step: Optional[int] = None,
  compensate: Optional[bool] = None,
  calibration_batches: Optional[Iterable[Any]] = None,
  **kwargs: Any,
) -> nnx.Module:
  """Converts a trained BatchNorm NNX model in place; returns ``model``.

  Every BN-type normalizer becomes the registry normalizer ``name`` (its NNX
  twin, built with ``kwargs``; ``epsilon``, ``axis_name`` and
  ``norm_batch_size`` default to the BN layer's), in the same mode
  (``use_running_average``). Its state comes from BN's running ``mean``/``var``
  (``Method.from_batch_norm``; ``step`` defaults to the last warm-up step,
  ``max(buffer_size, warmup_steps)``, so MABN uses its moving averages from
  the first fine-tuning step).

  For a weight-centralized target (``'mabn'``), the layer feeding each norm
  becomes :class:`~mabn_jax.nnx.CenteredConv` / ``CenteredDense`` (weights
  kept). It is found from the data flow of one traced call
  ``model(x)`` (:func:`mabn_jax.dataflow.nnx_norm_producers`: dropout, casts
  and reshapes between the layer and the norm are followed; a norm fed by a
  residual add, a ReLU, the model input or a layer without a centred twin
  raises a ``ValueError`` naming it and the cause). Without ``x``: the
  ``pairs`` given (``[(conv_path, norm_path)]``), or else the attribute
  pairing of :func:`mabn_jax.discovery.nnx_conv_norm_pairs` (a module's
  ``conv``/``dense`` child next to its ``norm`` child, the registry's
  modules), converting only the norms it pairs. Non-centred targets need no
  producer: every BN-type norm is converted (or the ``pairs``' norms).

  Args:
    model: the NNX model (changed in place).
    name: the target's registry name (:func:`mabn_jax.normalizer_names`).
    x: an example input of ``model(x)`` (``example_input`` is the same).
    pairs: explicit (producer, norm) attribute paths, e.g. ``[('conv', 'bn')]``.
    step: the converted layers' ``step`` (if their state has one).
    compensate: set ``scale``/``bias`` so that each converted layer's
      inference map is BN's on its input (:mod:`mabn_jax.conversion_math`);
      else copy them. Default: with ``calibration_batches`` only (without
      data it is exact only for zero-mean producing kernels).
    calibration_batches: inputs of ``model(batch)``; if given, each converted
      layer's statistics are set from its input's moments over these batches
      (inference mode, layer after layer in call order) and, with
      ``compensate``, its affine map keeps BN's with the measured mean.
    **kwargs: options of the target normalizer (e.g. ``buffer_size``).

  Raises:
    ValueError: as above, for a target without batch statistics, and when a
      compensated layer has no ``scale``/``bias``.
  """
  if x is not None and example_input is not None:
    raise ValueError("convert_batch_norm: give the example input as x or example_input, not both.")
  example_input = x if example_input is None else example_input
  compensate = calibration_batches is not None if compensate is None else compensate
  from mabn_jax import registry  # the table of names; imports the linen layers

  target = registry.make_normalizer(name, **kwargs)
  plan = _plan(model, target.centered, example_input, pairs)
  done: List[Converted] = []
  for path, norm_slot, producer in plan:
    norm = norm_slot.get()
    options = {key: getattr(norm, key) for key in _CARRIED if hasattr(norm, key)}
    new_norm = _new_norm(registry.make_normalizer(name, **{**options, **kwargs}), norm, path)
    src = _source(norm)
    _load(new_norm, src, step, compensate, _name(path))
    norm_slot.set(new_norm)
    if producer is not None and target.centered:
      producer.set(_centered_twin(producer.get(), path))
    done.append(Converted(path, norm_slot, src))
  if calibration_batches is not None:
    from mabn_jax import nnx_calibration

    nnx_calibration.calibrate(model, done, calibration_batches, compensate)
  return model


def _new_norm(normalizer: Any, norm: Any, path: Tuple) -> Any:
  from mabn_jax.nnx import registry as nnx_registry

  new_norm: Any = nnx_registry.norm(normalizer, norm.num_features, rngs=nnx.Rngs(0))
  if new_norm is None or discovery.method_of(new_norm) is None:
    raise ValueError(
      f"convert_batch_norm: {normalizer.name!r} (for '{_name(path)}') has no batch "
      "statistics to convert to."
    )
  new_norm.use_running_average = norm.use_running_average
  return new_norm


def _source(norm: Any) -> cm.Source:
  value = lambda v: None if v is None else v[...]
  return cm.source(
    discovery.method_of(norm),
    norm.mean[...],
    norm.var[...],
    value(getattr(norm, "scale", None)),
    value(getattr(norm, "bias", None)),
  )


def template(norm: Any) -> Dict[str, Any]:
  """A normalizer's ``nnx.BatchStat`` values by name."""
  return {key: value[...] for key, value in vars(norm).items() if isinstance(value, nnx.BatchStat)}


def _load(new_norm: Any, src: cm.Source, step, compensate: bool, where: str) -> None:
  """``new_norm``'s statistics (and affine map) from the BN layer ``src``."""
  method = cast(Any, discovery.method_of(new_norm))
  config = method.config  # default step: the last warm-up step, as for linen variables
  warm = max(getattr(method, "buffer_size", 0), getattr(config, "warmup_steps", 0))
  start = warm if step is None else step
  state = cm.converted_state(method, template(new_norm), src, start)
  set_state(new_norm, state)
  set_affine(new_norm, method, state, src, None, compensate, where)


def set_state(norm: Any, state: Dict[str, Any]) -> None:
  for key, value in state.items():
    getattr(norm, key)[...] = value


def set_affine(norm, method, state, src: cm.Source, moments, compensate: bool, where: str) -> None:
  """``norm``'s ``scale``/``bias``: BN's kept (``compensate``) or copied."""
  scale, bias = getattr(norm, "scale", None), getattr(norm, "bias", None)
  if compensate:
    cm.check_affine(f"'{where}'", scale is not None, bias is not None)
    new_scale, new_bias = cm.kept_affine(method, state, src, moments)
  else:
    new_scale, new_bias = src.scale, src.bias
  for param, value in ((scale, new_scale), (bias, new_bias)):
    if param is not None and value is not None:
      param[...] = np.asarray(value).astype(param[...].dtype)


def _centered_twin(conv: Any, norm_path: Tuple) -> Any:
  """A weight-centralized copy of an ``nnx.Conv``/``nnx.Linear`` (its weights kept)."""
  if isinstance(conv, (CenteredConv, CenteredDense)):
    return conv
  shared = dict(
    use_bias=conv.use_bias,
    dtype=conv.dtype,
    param_dtype=conv.param_dtype,
    precision=conv.precision,
    rngs=nnx.Rngs(0),
  )
  if isinstance(conv, nnx.Conv):
    twin = CenteredConv(
      conv.in_features,
      conv.out_features,
      conv.kernel_size,
      conv.strides,
      padding=conv.padding,
      input_dilation=conv.input_dilation,
      kernel_dilation=conv.kernel_dilation,
      feature_group_count=conv.feature_group_count,
      **shared,
    )
  elif isinstance(conv, nnx.Linear):
    twin = CenteredDense(conv.in_features, conv.out_features, **shared)
  else:
    raise ValueError(
      f"convert_batch_norm: {type(conv).__name__} before the converted norm "
      f"'{_name(norm_path)}' is neither nnx.Conv nor nnx.Linear; it cannot be "
      "weight-centralized."
    )
  twin.kernel[...] = conv.kernel[...]
  if conv.bias is not None:
    cast(Any, twin.bias)[...] = conv.bias[...]
  return twin
