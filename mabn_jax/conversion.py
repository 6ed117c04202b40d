"""Converting a BatchNorm checkpoint into a model with MABN (or another normalizer).

A model trained with ``flax.linen.BatchNorm`` (or :class:`mabn_jax.BatchNorm`)
keeps a running ``mean`` and biased ``var`` per channel. MABN (``docs/normalization.md``, section
2) keeps the running second moment instead, so the conversion sets

    chi_ema = var + mean^2          # E[x^2] = Var[x] + E[x]^2

and fills every row of ``chi_buffer`` with it, so the forward SMA starts at the
population value. ``psi_buffer`` (the backward statistic's SMA buffer) starts
at zero: a BN checkpoint carries no estimate of ``Psi``. Parameters (conv
kernels, everything else) are copied; the MABN model's
:class:`~mabn_jax.CenteredConv` centres the copied kernels. With
``calibration_batches`` each converted layer's input is measured on data and
its ``scale``/``bias`` set so that its inference map is BN's (MABN subtracts
no mean: BN's mean subtraction moves into the bias; ``compensate``,
:mod:`mabn_jax.conversion_math`, :mod:`mabn_jax.calibration`). What
the conversion changes in a trained network is measured in
``benchmarks/conversion_agreement.py`` (``docs/normalization.md``).

``step`` (documented choice): by default it is set to
``max(buffer_size, warmup_steps)``, the last warmup step, so MABN normalizes
with its moving averages from the first fine-tuning step instead of
re-entering warmup, where it would use the noisy small-batch statistics the
conversion is meant to avoid. Renormalization (``r != 1``) then starts after
``max(renorm_start, warmup_steps)`` steps counted from 0, as in training from
scratch. Pass ``step=0`` to go through warmup again.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax import calibration, discovery, nnx_conversion, registry
from mabn_jax import conversion_math as cm
from mabn_jax.functional import batch_norm as bn
from mabn_jax.functional import counters
from mabn_jax.functional import mabn as mabn_math
from mabn_jax.training import BACKWARD_STATS, LEGACY_TAP_NAMES, NONFINITE_COUNT, VariableTree

_DEFAULT_WARMUP = mabn_math.MABNConfig.warmup_steps


def _natural(path) -> tuple:
  """Sort key of a path: ``Conv_10`` after ``Conv_2`` (Flax's auto names)."""
  return tuple(
    tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(part))) for part in path
  )


def _layers(stats: VariableTree, source: bool) -> list:
  """Paths of the layers whose state is BN's running ``mean``/``var``
  (``source``) or another method's (the target), in natural path order."""
  flat = traverse_util.flatten_dict(unfreeze(stats))
  names: dict = {}
  for path in flat:
    names.setdefault(path[:-1], []).append(path[-1])
  layers = []
  for layer, fields in names.items():
    method_class = discovery.method_for_state(fields)
    if method_class is not None and issubclass(method_class, bn.MeanVarMethod) == source:
      layers.append(layer)
  return sorted(layers, key=_natural)


def _bn_layers(stats: VariableTree) -> list:
  return _layers(stats, source=True)


def _mabn_layers(stats: VariableTree) -> list:
  return _layers(stats, source=False)


def converted_state(method, template: Mapping, mean: jax.Array, var: jax.Array, step: int) -> dict:
  """One layer's ``'batch_stats'`` for ``method`` from BN's running ``mean``/``var``
  (:func:`mabn_jax.conversion_math.converted_state`)."""
  return cm.converted_state(method, template, cm.source(None, mean, var), step)


def _template(method, channels: int) -> dict:
  initial = method.init(channels)
  template = {name: value for name, value in initial._asdict().items() if value.size}
  template[NONFINITE_COUNT] = counters.zero()
  return template


def mabn_state_from_batch_norm(
  mean: jax.Array, var: jax.Array, buffer_size: int, step: int
) -> dict:
  """MABN ``'batch_stats'`` of one layer from BN's running ``mean``/``var``.

  Returns ``{'chi_ema': (C,), 'chi_buffer': (m, C), 'psi_buffer': (m, C),
  'step': (), 'nonfinite_count': ()}``, all float32 (the counters hold
  integers, see :mod:`~mabn_jax.functional.counters`).
  """
  method = mabn_math.Method(buffer_size=buffer_size)
  return converted_state(method, _template(method, np.shape(mean)[0]), mean, var, step)


def _set(tree: dict, path, value) -> None:
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def _get(tree: Mapping, path):
  for key in path:
    tree = tree[key]
  return tree


def _source(method, variables: Mapping, layer) -> cm.Source:
  """The BN layer at ``layer``: its statistics and ``scale``/``bias`` (if any)."""
  stats = _get(variables["batch_stats"], layer)
  try:
    params = _get(variables["params"], layer)
  except KeyError:
    params = {}
  return cm.source(method, stats["mean"], stats["var"], params.get("scale"), params.get("bias"))


def _compensate(out: dict, layer, method, state, src: cm.Source) -> None:
  """Sets the converted layer's ``scale``/``bias`` to keep BN's inference map."""
  try:
    params: Dict[str, Any] = cast(dict, _get(out["params"], layer))
  except KeyError:
    params = {}
  cm.check_affine(f"'{'/'.join(layer)}'", "scale" in params, "bias" in params)
  scale, bias = cm.kept_affine(method, state, src)
  params["scale"] = jnp.asarray(scale, params["scale"].dtype)
  params["bias"] = jnp.asarray(bias, params["bias"].dtype)


def _convert_registry(variables: dict, normalizer, step, compensate, kwargs):
  if normalizer.name not in ("bn", "syncbn"):
    raise ValueError(
      "convert_batch_norm: expected a model built with the 'bn' or 'syncbn' "
      f"normalizer, got '{normalizer.name}'."
    )
  name = kwargs.pop("name", "mabn")
  carried = {
    key: value
    for key, value in dict(normalizer.kwargs).items()
    if key in ("norm_batch_size", "epsilon", "axis_name")
  }
  if normalizer.name == "syncbn" and "axis_name" not in carried:
    carried["axis_name"] = "batch"
  new_normalizer = _target_normalizer(name, carried, kwargs)
  method = cast(Any, new_normalizer.method())
  if step is None:
    step = max(getattr(method, "buffer_size", 0), getattr(method.config, "warmup_steps", 0))
  stats = unfreeze(variables["batch_stats"])
  layers = _bn_layers(stats)
  if not layers:
    raise ValueError("convert_batch_norm: no layer with 'mean'/'var' statistics found.")
  out = jax.tree.map(lambda a: a, {k: unfreeze(v) for k, v in variables.items()})
  taps = out.setdefault(BACKWARD_STATS, {})
  sources = {}
  for layer in layers:
    src = sources[layer] = _source(normalizer.method(), variables, layer)
    state = cm.converted_state(method, _template(method, src.mean.shape[0]), src, step)
    _set(out["batch_stats"], layer, state)
    layer_taps = method.taps(discovery.stored_state(state))
    if layer_taps:
      _set(taps, layer, layer_taps)
    if compensate:
      _compensate(out, layer, method, state, src)
  if not taps:
    del out[BACKWARD_STATS]
  return out, new_normalizer, {layer: (method, src) for layer, src in sources.items()}


def _target_normalizer(name: str, carried: dict, kwargs: dict):
  """The registry normalizer ``name`` a BN model converts to: ``kwargs`` and
  the BN options ``carried`` that it takes."""
  registry.make_normalizer(name)  # an unknown name raises, listing the valid ones
  valid = registry._valid_kwargs(name)
  normalizer = registry.make_normalizer(
    name, **{**{k: v for k, v in carried.items() if k in valid}, **kwargs}
  )
  if normalizer.method() is None or normalizer.entry.kind == "conv":
    raise ValueError(
      f"convert_batch_norm: {name!r} is not a batch-statistics normalizer of the "
      "BN layers' layout (use 'mabn', 'bn', 'brn' or 'frozen_bn')."
    )
  return normalizer


def convert_batch_norm(
  variables: VariableTree,
  normalizer: Any = None,
  *,
  target: Optional[VariableTree] = None,
  step: Optional[int] = None,
  compensate: Optional[bool] = None,
  calibration_batches: Optional[Iterable[Any]] = None,
  apply_fn: Optional[Callable[..., Any]] = None,
  call_kwargs: Optional[Mapping[str, Any]] = None,
  **mabn_kwargs,
):
  """Turns a BatchNorm model's variables into a model's MABN variables (or,
  with ``name``, another registry normalizer's).

  Three ways to name the target model:

  * Registry models (``normalizer`` = the ``'bn'``/``'syncbn'`` normalizer of
    :func:`mabn_jax.make_normalizer` the model was built with): returns
    ``(variables, normalizer)`` where the normalizer is
    ``make_normalizer('mabn', ...)`` with the BN normalizer's
    ``norm_batch_size``, ``epsilon`` and ``axis_name`` and ``mabn_kwargs``
    (e.g. ``buffer_size``, ``warmup_steps``, ``centered``); every
    ``mean``/``var`` state (conv_norm modules and standalone norms) becomes
    MABN state and gets its ``'backward_stats'`` tap. ``name='frozen_bn'``
    (or ``'brn'``, ``'bn'``) converts to that registry normalizer instead,
    with the BN options it takes (frozen BN keeps ``mean``/``var`` as they
    are).
  * Plain models (``target`` = variables of the MABN twin, e.g. from
    ``twin.init(...)`` or from ``init`` under :func:`mabn_jax.substitute`;
    only their structure and shapes are used): BN layers (``mean``/``var``
    state) are matched to MABN layers (``chi_ema`` state) in the natural
    order of their paths (``BatchNorm_2`` before ``BatchNorm_10``; trees
    from ``jax.tree`` ops or checkpoints have sorted keys, so creation order
    is not available). Other parameterized layers are matched by equal path,
    the rest (e.g. ``Conv_i`` and ``CenteredConv_i``) in natural path order;
    names and shapes of their arrays must agree. Returns the twin's variables.
  * Flax NNX models (``convert_batch_norm(model, name='mabn', x=example,
    **kwargs)``): converted in place, see
    :func:`mabn_jax.nnx.convert_batch_norm` (same arguments). Returns the model.

  Each MABN layer gets ``chi_ema = var + mean^2``, ``chi_buffer`` rows equal
  to it, zero ``psi_buffer`` (and tap), ``nonfinite_count = 0`` and ``step``
  (default ``max(buffer_size, warmup_steps)``: moving averages from the first
  step; see the module docstring). ``calibration_batches`` (recommended)
  then measure each layer's input and, with compensation, set its
  ``scale``/``bias`` so that its inference map is BN's on the measured input
  (:mod:`mabn_jax.conversion_math`). What remains is the centred-away kernel
  mean's data-dependent contribution (``benchmarks/conversion_agreement.py``
  measures it: 97% top-1 agreement with the BN model on the 6-conv digits
  network, 86% on a small ResNet, where centring the BN model's kernels alone
  gives 86% too).

  Args:
    variables: the BN model's variables (``'params'``, ``'batch_stats'``).
    normalizer: registry mode: the BN model's normalizer.
    target: plain mode: the MABN twin's (initial) variables.
    step: the MABN ``step`` to start from.
    compensate: keep BN's inference map in ``scale``/``bias`` (else copy
      them). Default: with ``calibration_batches`` only; without data it is
      exact only for producing kernels with zero mean per output channel
      (BN's mean then moves into the bias), and on trained networks whose
      kernels are not centred it moves the output further than copying.
    calibration_batches: model inputs; each converted layer's statistics
      (and kept map) are set from its input's moments over them, in inference
      mode, one layer after another in call order (:mod:`mabn_jax.calibration`).
    apply_fn: with ``calibration_batches``: plain mode, the converted
      model's apply function (``twin.apply``); registry mode, a function of
      the new normalizer returning it (``lambda norm: Net(norm).apply``).
    call_kwargs: keyword arguments of ``apply_fn`` selecting inference, e.g.
      ``{'train': False}``.
    **mabn_kwargs: registry mode: MABN normalizer kwargs. Plain mode:
      ``warmup_steps`` (default 100) for the default ``step`` and
      ``epsilon`` (both models', default 1e-5) for the compensation.

  Raises:
    ValueError: on structural mismatch (numbers of layers, channel counts,
      leaf shapes), naming the first mismatching paths.
  """
  calibration = (calibration_batches, apply_fn, dict(call_kwargs or {}))
  compensate = calibration_batches is not None if compensate is None else compensate
  if isinstance(variables, nnx.Module):
    if normalizer is not None or target is not None or apply_fn is not None:
      raise ValueError(
        "convert_batch_norm: an NNX model is converted in place; give the "
        "target's registry name (name='mabn') instead of a normalizer, target or apply_fn."
      )
    return nnx_conversion.convert_batch_norm(
      variables,
      step=step,
      compensate=compensate,
      calibration_batches=calibration_batches,
      **mabn_kwargs,
    )
  if calibration_batches is not None and apply_fn is None:
    raise ValueError(
      "convert_batch_norm: calibration_batches need apply_fn (the converted model's)."
    )
  frozen = isinstance(variables, FrozenDict)
  variables = unfreeze(variables)
  if "params" not in variables or "batch_stats" not in variables:
    raise ValueError(
      "convert_batch_norm: expected 'params' and 'batch_stats' collections, "
      f"found {sorted(variables)}."
    )
  if (normalizer is None) == (target is None):
    raise ValueError(
      "convert_batch_norm: give exactly one of `normalizer` (registry models) "
      "or `target` (the MABN twin's variables, for plain models)."
    )
  if normalizer is not None:
    out, new_normalizer, layers = _convert_registry(
      variables, normalizer, step, compensate, mabn_kwargs
    )
    out = _calibrated(out, layers, compensate, *calibration, new_normalizer)
    return (freeze(out) if frozen else out), new_normalizer
  unknown = set(mabn_kwargs) - {"warmup_steps", "epsilon"}
  if unknown:
    raise ValueError(
      f"convert_batch_norm: unexpected arguments {sorted(unknown)} for plain "
      "models (valid: warmup_steps, epsilon)."
    )
  out, layers = _convert_plain(
    variables, unfreeze(cast(VariableTree, target)), step, compensate, mabn_kwargs
  )
  out = _calibrated(out, layers, compensate, *calibration, None)
  return freeze(out) if frozen else out


def _calibrated(out, layers, compensate, batches, apply_fn, call_kwargs, new_normalizer):
  if batches is None:
    return out
  if new_normalizer is not None:
    apply_fn = cast(Callable, apply_fn)(new_normalizer)
  return calibration.calibrate(
    cast(Callable, apply_fn), out, layers, batches, call_kwargs, compensate
  )


def _convert_plain(variables: dict, target: dict, step, compensate, options):
  src_layers = _bn_layers(variables["batch_stats"])
  dst_layers = _mabn_layers(target.get("batch_stats", {}))
  if len(src_layers) != len(dst_layers):
    raise ValueError(
      f"convert_batch_norm: the BN model has {len(src_layers)} BatchNorm layers "
      f"{_names(src_layers)} but the target has {len(dst_layers)} MABN layers "
      f"{_names(dst_layers)}."
    )
  out = {k: unfreeze(v) for k, v in target.items()}
  out["params"] = _matched_params(
    variables["params"], target["params"], dict(zip(src_layers, dst_layers, strict=True))
  )
  layers = {}
  for src, dst in zip(src_layers, dst_layers, strict=True):
    method, source = layers[dst] = _convert_plain_layer(
      out, variables, target, src, dst, step, options
    )
    if compensate:
      _compensate(out, dst, method, _get(out["batch_stats"], dst), source)
  return out, layers


def _names(layers) -> list:
  return ["/".join(layer) for layer in layers]


def _convert_plain_layer(out, variables, target, src, dst, step, options):
  """Sets the target layer ``dst``'s state (and zero taps) from BN layer ``src``;
  returns ``(method, source)``."""
  warmup_steps = options.get("warmup_steps", _DEFAULT_WARMUP)
  epsilon = options.get("epsilon", bn.BatchNormConfig.epsilon)
  source = _source(discovery.default_method(bn.Method, epsilon=epsilon), variables, src)
  template = _get(target["batch_stats"], dst)
  method = discovery.default_method(
    cast(type, discovery.method_for_state(template)), warmup_steps=warmup_steps, epsilon=epsilon
  )
  channels = _channels(template)
  if source.mean.shape != (channels,):
    raise ValueError(
      f"convert_batch_norm: BatchNorm '{'/'.join(src)}' has "
      f"{source.mean.shape[0]} channels but MABN '{'/'.join(dst)}' has {channels}."
    )
  rows = max((value.shape[0] for value in template.values() if np.ndim(value) == 2), default=0)
  layer_step = max(rows, warmup_steps) if step is None else step
  _set(out["batch_stats"], dst, cm.converted_state(method, template, source, layer_step))
  taps = target.get(BACKWARD_STATS, {})
  with contextlib.suppress(KeyError):  # a target without taps (or none for this layer)
    _set(out[BACKWARD_STATS], dst, jax.tree.map(jnp.zeros_like, _get(taps, dst)))
  return method, source


def _channels(template: Mapping) -> int:
  return max(value.shape[-1] for value in template.values() if np.ndim(value) >= 1)


def _matched_params(src_params: VariableTree, dst_params: VariableTree, layer_map: dict) -> dict:
  """The BN model's parameters under the target's paths: norm layers as
  matched, other layers by equal path, then in natural path order."""
  src: Dict[Tuple, Any] = traverse_util.flatten_dict(src_params)
  dst: Dict[Tuple, Any] = traverse_util.flatten_dict(dst_params)
  src_rest = sorted({p[:-1] for p in src} - set(layer_map), key=_natural)
  dst_rest = sorted({p[:-1] for p in dst} - set(layer_map.values()), key=_natural)
  same = [layer for layer in src_rest if layer in dst_rest]
  layer_map = {**layer_map, **{layer: layer for layer in same}}
  src_rest = [layer for layer in src_rest if layer not in same]
  dst_rest = [layer for layer in dst_rest if layer not in same]
  if len(src_rest) != len(dst_rest):
    raise ValueError(
      f"convert_batch_norm: after matching equal paths, the BN model has "
      f"{len(src_rest)} other parameterized layers {_names(src_rest)} but the "
      f"target has {len(dst_rest)} {_names(dst_rest)}."
    )
  layer_map.update(zip(src_rest, dst_rest, strict=True))
  new_params = {}
  for s_path, value in src.items():
    d_path = layer_map[s_path[:-1]] + s_path[-1:]
    if d_path not in dst or dst[d_path].shape != value.shape:
      raise ValueError(
        f"convert_batch_norm: parameter '{'/'.join(s_path)}' {value.shape} has no "
        f"counterpart '{'/'.join(d_path)}' of that shape in the target "
        f"({dst[d_path].shape if d_path in dst else 'missing'}); the models "
        "differ structurally (layers are matched by path, else in natural "
        "order of their paths)."
      )
    new_params[d_path] = jnp.asarray(value, dst[d_path].dtype)
  missing = sorted("/".join(p) for p in set(dst) - set(new_params))
  if missing:
    raise ValueError(
      f"convert_batch_norm: target parameters {missing} have no counterpart in the BN model."
    )
  return traverse_util.unflatten_dict(new_params)


def migrate_variables(variables: VariableTree):
  """Variables saved by an older version of the library, in the current layout.

  * Renames every ``'backward_stats'`` tap of the old layout (``psi_buffer``,
    which shared the name of the ``'batch_stats'`` variable it updates) to
    its current name (``psi_increment``, see
    :data:`~mabn_jax.training.LEGACY_TAP_NAMES`); values are unchanged (taps
    are zeros).
  * Converts the int32 counters of the normalizers' ``'batch_stats'``
    (``step``, ``count``, ``nonfinite_count``) to float32
    (:mod:`mabn_jax.functional.counters`), so that the first training step
    sees the dtypes every later step has (the layers read int32 counters
    too, and write them back as float32).

  Every other variable is returned as is; variables already in the current
  layout come back unchanged, so the call is safe on any variables. A
  ``FrozenDict`` stays frozen. Restore an old checkpoint without a target,
  then migrate::

    variables = mj.migrate_variables(ocp.StandardCheckpointer().restore(path))
  """
  frozen = isinstance(variables, FrozenDict)
  out = {k: v for k, v in unfreeze(variables).items()}
  if BACKWARD_STATS in out:
    out[BACKWARD_STATS] = _renamed_taps(out[BACKWARD_STATS])
  if "batch_stats" in out:
    out["batch_stats"] = _float_counters(out["batch_stats"])
  return freeze(out) if frozen else out


def _renamed_taps(taps: VariableTree) -> dict:
  renamed = {}
  for path, value in traverse_util.flatten_dict(unfreeze(taps)).items():
    new_path = path[:-1] + (LEGACY_TAP_NAMES.get(path[-1], path[-1]),)
    if new_path in renamed:
      raise ValueError(
        f"migrate_variables: '{'/'.join(path)}' and another tap both map to '{'/'.join(new_path)}'."
      )
    renamed[new_path] = value
  return traverse_util.unflatten_dict(renamed)


def _float_counters(stats: VariableTree) -> dict:
  """``stats`` with the integer variables of every normalizer's layer
  (:func:`~mabn_jax.discovery.method_for_state`) as float32 counters."""
  flat: Dict[Tuple, Any] = traverse_util.flatten_dict(unfreeze(stats))
  names: Dict[Tuple, set] = {}
  for path in flat:
    names.setdefault(path[:-1], set()).add(path[-1])
  for path, value in flat.items():
    integer = np.issubdtype(np.asarray(value).dtype, np.integer)
    if integer and discovery.method_for_state(names[path[:-1]]) is not None:
      flat[path] = counters.as_counter(value)
  return traverse_util.unflatten_dict(flat)
