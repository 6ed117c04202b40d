"""Converting a BatchNorm checkpoint into the same model with MABN.

A model trained with ``flax.linen.BatchNorm`` (or :class:`mabn_jax.BatchNorm`)
keeps a running ``mean`` and biased ``var`` per channel. MABN (``docs/normalization.md``, section
2) keeps the running second moment instead, so the conversion sets

    chi_ema = var + mean^2          # E[x^2] = Var[x] + E[x]^2

and fills every row of ``chi_buffer`` with it, so the forward SMA starts at the
population value. ``psi_buffer`` (the backward statistic's SMA buffer) starts
at zero: a BN checkpoint carries no estimate of ``Psi``. Parameters (conv
kernels, ``scale``, ``bias``, everything else) are copied unchanged; the MABN
model's :class:`~mabn_jax.CenteredConv` centres the copied kernels, which is
exact when the BN model's conv outputs were zero-mean (kernels already
centred) and otherwise the usual first fine-tuning adjustment.

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
from typing import Any, Dict, Mapping, Optional, Tuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax import discovery, registry
from mabn_jax.functional import batch_norm as bn
from mabn_jax.functional import counters
from mabn_jax.functional import mabn as mabn_math
from mabn_jax.nnx import registry as nnx_registry
from mabn_jax.nnx.centered import CenteredConv, CenteredDense
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
  """One layer's ``'batch_stats'`` for ``method`` from BN's running ``mean``/``var``.

  ``template`` is the layer's state as declared (names, shapes, dtypes);
  :meth:`~mabn_jax.functional.interface.Method.from_batch_norm` fills it,
  then ``step`` (if the state has one) and a zero ``nonfinite_count``.
  """
  state = method.from_batch_norm(
    discovery.stored_state(dict(template)),
    np.asarray(mean, np.float64),
    np.asarray(var, np.float64),
  )
  values = state._asdict()
  if "step" in template:
    values["step"] = step
  if NONFINITE_COUNT in template:
    values[NONFINITE_COUNT] = 0
  return {name: jnp.asarray(values[name], template[name].dtype) for name in template}


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


def _convert_registry(variables: dict, normalizer, step, mabn_kwargs):
  if normalizer.name not in ("bn", "syncbn"):
    raise ValueError(
      "convert_batch_norm: expected a model built with the 'bn' or 'syncbn' "
      f"normalizer, got '{normalizer.name}'."
    )
  kwargs = {
    key: value
    for key, value in dict(normalizer.kwargs).items()
    if key in ("norm_batch_size", "epsilon", "axis_name")
  }
  if normalizer.name == "syncbn" and "axis_name" not in kwargs:
    kwargs["axis_name"] = "batch"
  kwargs.update(mabn_kwargs)
  new_normalizer = registry.make_normalizer("mabn", **kwargs)
  method = cast(mabn_math.Method, new_normalizer.method())
  if step is None:
    step = max(method.buffer_size, method.config.warmup_steps)
  stats = unfreeze(variables["batch_stats"])
  layers = _bn_layers(stats)
  if not layers:
    raise ValueError("convert_batch_norm: no layer with 'mean'/'var' statistics found.")
  out = {k: unfreeze(v) for k, v in variables.items()}
  taps = out.setdefault(BACKWARD_STATS, {})
  for layer in layers:
    node = _get(stats, layer)
    state = converted_state(
      method, _template(method, node["mean"].shape[0]), node["mean"], node["var"], step
    )
    _set(out["batch_stats"], layer, state)
    _set(taps, layer, method.taps(discovery.stored_state(state)))
  return out, new_normalizer


def convert_batch_norm(
  variables: VariableTree,
  normalizer: Any = None,
  *,
  target: Optional[VariableTree] = None,
  step: Optional[int] = None,
  **mabn_kwargs,
):
  """Turns a BatchNorm model's variables into the same model's MABN variables.

  Two ways to name the target model:

  * Registry models (``normalizer`` = the ``'bn'``/``'syncbn'`` normalizer of
    :func:`mabn_jax.make_normalizer` the model was built with): returns
    ``(variables, normalizer)`` where the normalizer is
    ``make_normalizer('mabn', ...)`` with the BN normalizer's
    ``norm_batch_size``, ``epsilon`` and ``axis_name`` and ``mabn_kwargs``
    (e.g. ``buffer_size``, ``warmup_steps``, ``centered``); every
    ``mean``/``var`` state (conv_norm modules and standalone norms) becomes
    MABN state and gets its ``'backward_stats'`` tap.
  * Plain models (``target`` = variables of the MABN twin, e.g. from
    ``twin.init(...)``; only their structure and shapes are used): BN layers
    (``mean``/``var`` state) are matched to MABN layers (``chi_ema`` state)
    in the natural order of their paths (``BatchNorm_2`` before
    ``BatchNorm_10``; trees from ``jax.tree`` ops or checkpoints have sorted
    keys, so creation order is not available). Other parameterized layers
    are matched by equal path, the rest (e.g. ``Conv_i`` and
    ``CenteredConv_i``) in natural path order; names and shapes of their
    arrays must agree (``CenteredConv(use_bias=False)`` where BN had
    ``Conv(use_bias=False)``). Returns the twin's variables.

  * Flax NNX models (``convert_batch_norm(model, name='mabn', pairs=None,
    **kwargs)``): in place, every BN-type normalizer (``flax.nnx.BatchNorm``,
    :class:`mabn_jax.nnx.BatchNorm`) next to a convolution, as
    :func:`mabn_jax.discovery.nnx_conv_norm_pairs` finds them (or the given
    ``pairs`` of attribute paths), becomes the registry normalizer ``name``
    (its NNX twin, with ``kwargs``; ``epsilon``, ``axis_name`` and
    ``norm_batch_size`` default to the BN layer's) holding the BN layer's
    ``scale``/``bias`` and converted statistics; for a weight-centralized
    target (``'mabn'``) the convolution becomes
    :class:`~mabn_jax.nnx.CenteredConv` (``CenteredDense``) with its weights
    kept. Returns the model.

  Each MABN layer gets ``chi_ema = var + mean^2``, ``chi_buffer`` rows equal
  to it, zero ``psi_buffer`` (and tap), ``nonfinite_count = 0`` and ``step``
  (default ``max(buffer_size, warmup_steps)``: moving averages from the first
  step; see the module docstring).

  Args:
    variables: the BN model's variables (``'params'``, ``'batch_stats'``).
    normalizer: registry mode: the BN model's normalizer.
    target: plain mode: the MABN twin's (initial) variables.
    step: the MABN ``step`` to start from.
    **mabn_kwargs: registry mode: MABN normalizer kwargs. Plain mode:
      ``warmup_steps`` (default 100) for the default ``step``.

  Raises:
    ValueError: on structural mismatch (numbers of layers, channel counts,
      leaf shapes), naming the first mismatching paths.
  """
  if isinstance(variables, nnx.Module):
    if normalizer is not None or target is not None:
      raise ValueError(
        "convert_batch_norm: an NNX model is converted in place; give the "
        "target's registry name (name='mabn') instead of a normalizer or target."
      )
    return _convert_nnx(variables, step=step, **mabn_kwargs)
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
    out, new_normalizer = _convert_registry(variables, normalizer, step, mabn_kwargs)
    return (freeze(out) if frozen else out), new_normalizer
  unknown = set(mabn_kwargs) - {"warmup_steps"}
  if unknown:
    raise ValueError(
      f"convert_batch_norm: unexpected arguments {sorted(unknown)} for plain "
      "models (valid: warmup_steps)."
    )
  out = _convert_plain(
    variables,
    unfreeze(cast(VariableTree, target)),
    step,
    mabn_kwargs.get("warmup_steps", _DEFAULT_WARMUP),
  )
  return freeze(out) if frozen else out


def _convert_plain(variables: dict, target: dict, step, warmup_steps):
  src_layers = _bn_layers(variables["batch_stats"])
  dst_layers = _mabn_layers(target.get("batch_stats", {}))
  if len(src_layers) != len(dst_layers):
    raise ValueError(
      f"convert_batch_norm: the BN model has {len(src_layers)} BatchNorm layers "
      f"{_names(src_layers)} but the target has {len(dst_layers)} MABN layers "
      f"{_names(dst_layers)}."
    )
  out = {k: unfreeze(v) for k, v in target.items()}
  for src, dst in zip(src_layers, dst_layers, strict=True):
    _convert_plain_layer(out, variables, target, src, dst, step, warmup_steps)
  out["params"] = _matched_params(
    variables["params"], target["params"], dict(zip(src_layers, dst_layers, strict=True))
  )
  return out


def _names(layers) -> list:
  return ["/".join(layer) for layer in layers]


def _convert_plain_layer(out, variables, target, src, dst, step, warmup_steps) -> None:
  """Sets the target layer ``dst``'s state (and zero taps) from BN layer ``src``."""
  node = _get(variables["batch_stats"], src)
  template = _get(target["batch_stats"], dst)
  method = discovery.default_method(
    cast(type, discovery.method_for_state(template)), warmup_steps=warmup_steps
  )
  channels = _channels(template)
  if node["mean"].shape != (channels,):
    raise ValueError(
      f"convert_batch_norm: BatchNorm '{'/'.join(src)}' has "
      f"{node['mean'].shape[0]} channels but MABN '{'/'.join(dst)}' has {channels}."
    )
  rows = max((value.shape[0] for value in template.values() if np.ndim(value) == 2), default=0)
  layer_step = max(rows, warmup_steps) if step is None else step
  _set(
    out["batch_stats"],
    dst,
    converted_state(method, template, node["mean"], node["var"], layer_step),
  )
  taps = target.get(BACKWARD_STATS, {})
  with contextlib.suppress(KeyError):  # a target without taps (or none for this layer)
    _set(out[BACKWARD_STATS], dst, jax.tree.map(jnp.zeros_like, _get(taps, dst)))


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


_CARRIED = ("epsilon", "axis_name", "norm_batch_size")
"""Options a converted NNX normalizer takes from the BN layer unless given."""


def _convert_nnx(
  model: nnx.Module,
  name: str = "mabn",
  pairs: Any = None,
  step: Optional[int] = None,
  **kwargs: Any,
) -> nnx.Module:
  for pair in discovery.nnx_conv_norm_pairs(model, pairs):
    norm = pair.norm
    method = discovery.method_of(norm)
    if method is None or not isinstance(method, bn.MeanVarMethod):
      raise ValueError(
        f"convert_batch_norm: '{pair.where}' ({type(norm).__name__}) is not a "
        "BatchNorm with running mean/var statistics."
      )
    options = {key: getattr(norm, key) for key in _CARRIED if hasattr(norm, key)}
    normalizer = registry.make_normalizer(name, **{**options, **kwargs})
    new_norm: Any = nnx_registry.norm(normalizer, norm.num_features, rngs=nnx.Rngs(0))
    if new_norm is None or discovery.method_of(new_norm) is None:
      raise ValueError(f"convert_batch_norm: {name!r} has no batch statistics to convert to.")
    _load_converted(new_norm, norm, step)
    new_norm.use_running_average = norm.use_running_average
    pair.replace_norm(new_norm)
    if normalizer.centered:
      pair.replace_conv(_centered_twin(pair.conv))
  return model


def _load_converted(new_norm: Any, norm: Any, step: Optional[int]) -> None:
  """``new_norm``'s parameters and statistics from the BN layer ``norm``."""
  for param in ("scale", "bias"):
    if getattr(new_norm, param, None) is not None and getattr(norm, param, None) is not None:
      getattr(new_norm, param)[...] = getattr(norm, param)[...]
  method = cast(Any, discovery.method_of(new_norm))
  template = {
    key: value[...] for key, value in vars(new_norm).items() if isinstance(value, nnx.BatchStat)
  }
  config = method.config  # default step: the last warm-up step, as for linen variables
  warm = max(getattr(method, "buffer_size", 0), getattr(config, "warmup_steps", 0))
  start = warm if step is None else step
  state = converted_state(method, template, norm.mean[...], norm.var[...], start)
  for key, value in state.items():
    getattr(new_norm, key)[...] = value


def _centered_twin(conv: Any) -> Any:
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
      f"convert_batch_norm: {type(conv).__name__} before a converted norm is "
      "neither nnx.Conv nor nnx.Linear; it cannot be weight-centralized."
    )
  twin.kernel[...] = conv.kernel[...]
  if conv.bias is not None:
    cast(Any, twin.bias)[...] = conv.bias[...]
  return twin


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
