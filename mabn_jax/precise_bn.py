"""Precise BN: recompute population statistics exactly (``docs/normalization.md``, section 1).

After training, the running statistics of BN-type layers are exponential
moving averages: they lag behind the final weights and, at small
normalization batches, are biased. :func:`recompute_batch_stats` replaces them
with exact averages over a given set of batches: the frozen network is run in
training-statistics mode (each layer normalizes as it does in training), every
normalizer sows the per-channel mean and second moment ``E[x^2]`` of its input
(linen: collection ``'batch_moments'``; NNX: :class:`mabn_jax.nnx.BatchMoments`
captured with ``nnx.capture``), these per-batch moments are averaged exactly
over all batches, weighted by the number of samples per batch, and each layer's
functional method sets its statistics from them
(:meth:`~mabn_jax.functional.interface.Method.from_moments`).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax import discovery
from mabn_jax.functional import statistics as st
from mabn_jax.layers.base import sow_moments
from mabn_jax.nnx.variables import BatchMoments
from mabn_jax.training import BATCH_MOMENTS, VariableTree

MOMENT_NAMES = ("mean", "second_moment")


def _flax_batch_norm_interceptor(next_fun, args, kwargs, context):
  """Sows the input moments of ``flax.linen.BatchNorm`` (which has no hook)."""
  module = context.module
  if (
    type(module) is nn.BatchNorm  # subclasses may call sow_moments themselves
    and context.method_name == "__call__"
    and not module.is_initializing()
  ):
    call_flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    use_running_average = nn.merge_param(
      "use_running_average", module.use_running_average, call_flag
    )
    if not use_running_average:
      x = args[0]
      if not isinstance(module.axis, int):
        raise ValueError(
          f"recompute_batch_stats: flax.linen.BatchNorm '{'/'.join(module.path)}' "
          f"has feature axes {module.axis}; only a single integer axis is supported."
        )
      axis = st.canonical_axis(module.axis, x.ndim, f"BatchNorm '{'/'.join(module.path)}'")
      sow_moments(module, x, 1, axis, module.axis_name, module.axis_index_groups)
  return next_fun(*args, **kwargs)


def collect_moments(
  apply_fn: Callable[..., Any], variables: VariableTree, batch: Any, **call_kwargs
) -> dict:
  """Per-layer input moments of one training-mode forward pass.

  Args:
    apply_fn: ``model.apply`` (or any function with its signature).
    variables: the model's variables; nothing is written back.
    batch: the model input (first positional argument of ``apply_fn``).
    **call_kwargs: further arguments of the call that select training
      statistics, e.g. ``train=True`` or ``use_running_average=False``.

  Returns:
    ``{layer path tuple: {'mean': (C,), 'second_moment': (C,)}}`` float32,
    averaged over the calls of the layer in the pass. Pure and jit-able.
  """
  with nn.intercept_methods(_flax_batch_norm_interceptor):
    _, mutated = apply_fn(variables, batch, mutable=["batch_stats", BATCH_MOMENTS], **call_kwargs)
  sown: Dict[Tuple, Any] = traverse_util.flatten_dict(unfreeze(mutated.get(BATCH_MOMENTS, {})))
  moments = {}
  for path, values in sown.items():
    layer, name = path[:-1], path[-1]
    moments.setdefault(layer, {})[name] = jnp.mean(jnp.stack(values), axis=0)
  return moments


def _batch_size(batch) -> int:
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves or np.ndim(leaves[0]) == 0:
    raise ValueError(
      "recompute_batch_stats: each batch must be an array (or a tree of "
      "arrays) with a leading batch axis."
    )
  return int(np.shape(leaves[0])[0])


def _averaged(moments_fn: Callable[[Any], dict], batches: Iterable[Any]) -> dict:
  """``{layer: (E[x], E[x^2])}`` float64, each batch's moments weighted by its size."""
  sums: dict = {}
  total = 0
  for batch in batches:
    n = _batch_size(batch)
    for layer, values in jax.device_get(moments_fn(batch)).items():
      acc = sums.setdefault(layer, [0.0, 0.0])
      for i, name in enumerate(MOMENT_NAMES):
        acc[i] = acc[i] + n * np.asarray(values[name], np.float64)
    total += n
  if total == 0:
    raise ValueError("recompute_batch_stats: `batches` yielded no batch.")
  if not sums:
    raise ValueError(
      "recompute_batch_stats: no normalizer reported batch moments; pass the "
      "call arguments that select training statistics (e.g. train=True or "
      "use_running_average=False)."
    )
  return {layer: (acc[0] / total, acc[1] / total) for layer, acc in sums.items()}


def _set_from_moments(method, stored: Mapping, moments: Tuple) -> dict:
  """A layer's stored statistics set by ``method.from_moments``, each in its dtype."""
  state = discovery.stored_state({k: np.asarray(v, np.float64) for k, v in stored.items()})
  new = method.from_moments(state, *moments)._asdict()
  # A layer with several feature axes stores (C,) statistics in their shape.
  return {
    name: jnp.asarray(new[name], value.dtype).reshape(np.shape(value)) if name in new else value
    for name, value in stored.items()
  }


def _check_reported(layers: Iterable[Tuple], reported: Iterable[Tuple]) -> None:
  missing = sorted("/".join(map(str, layer)) for layer in set(layers) - set(reported))
  if missing:
    raise ValueError(
      "recompute_batch_stats: these normalizers reported no batch moments "
      f"in training mode: {missing}; pass strict=False to keep their "
      "statistics unchanged."
    )


def recompute_batch_stats(
  apply_fn: Any,
  variables: Any,
  batches: Any = None,
  *,
  jit: bool = True,
  strict: bool = True,
  **call_kwargs,
):
  """Replaces the running statistics by exact averages over ``batches``.

  The network is run, frozen (parameters and state as given; state updates
  of the passes are discarded), in training-statistics mode over every
  batch, one (jitted) forward pass per batch. Each normalizer's per-batch
  input mean ``mu_B`` and second moment ``E[x^2]`` (over the whole device
  batch; with ``norm_batch_size`` the mean of its group moments) are
  averaged exactly over the batches, weighted by their sizes, and its
  method sets its statistics from them: for BN (``flax.linen.BatchNorm``,
  ``flax.nnx.BatchNorm`` in linen form, :class:`mabn_jax.BatchNorm`), Batch
  Renorm and CBN ``mean = E[mu_B]`` and ``var = E[x^2] - mean^2`` (clipped
  at 0); for MABN ``chi_ema = E[x^2]``. Every layer sees the input it sees
  in training mode; Batch Renorm's and MABN's training forward depends on
  their state, which is used as given. MABN's buffers and ``step``, and the
  parameters, are never modified.

  Two forms:

  * linen: ``recompute_batch_stats(model.apply, variables, batches,
    **call_kwargs)`` returns new variables (same container type) with
    ``'batch_stats'`` replaced; ``call_kwargs`` select training statistics,
    e.g. ``train=True`` or ``use_running_average=False``.
  * NNX: ``recompute_batch_stats(model, batches, **call_kwargs)`` sets the
    statistics of every :mod:`mabn_jax.nnx` normalizer of ``model`` in place
    and returns it; the passes run on a copy switched to training mode
    (``model.train()``), called as ``copy(batch, **call_kwargs)``.

  Args:
    apply_fn: ``model.apply`` (linen), or the NNX model.
    variables: linen: the trained model's variables; NNX: the batches.
    batches: linen: iterable of model inputs (arrays or trees of arrays with
      a leading batch axis).
    jit: compile the forward pass (one compilation per distinct batch shape).
    strict: raise if a normalizer with statistics reported no moments (e.g.
      it is only used at inference), instead of leaving them unchanged.
    **call_kwargs: further arguments of the model call. Models whose
      normalizers use ``axis_name`` must be applied under the corresponding
      ``pmap``; build them without ``axis_name`` here.

  Raises:
    ValueError: no batches, no normalizer reported moments, or (``strict``) a
      normalizer reported none.
  """
  if isinstance(apply_fn, nnx.Module):
    if batches is not None:
      raise TypeError(
        "recompute_batch_stats(model, batches, ...): an NNX model takes "
        "the batches as its second argument."
      )
    return _recompute_nnx(apply_fn, variables, jit=jit, strict=strict, **call_kwargs)
  return _recompute_linen(apply_fn, variables, batches, jit=jit, strict=strict, **call_kwargs)


def _recompute_linen(apply_fn, variables, batches, *, jit, strict, **call_kwargs):
  frozen = isinstance(variables, FrozenDict)
  variables = unfreeze(variables)
  if "batch_stats" not in variables:
    raise ValueError(
      "recompute_batch_stats: the variables have no 'batch_stats' collection "
      f"(found {sorted(variables)})."
    )
  batches = iter(batches)
  first = next(batches, None)
  if first is None:
    raise ValueError("recompute_batch_stats: `batches` yielded no batch.")
  methods = discovery.linen_normalizers(
    apply_fn, variables, first, mutable=["batch_stats", BATCH_MOMENTS], **call_kwargs
  )
  moments_fn = lambda v, batch: collect_moments(apply_fn, v, batch, **call_kwargs)
  moments_fn = functools.partial(jax.jit(moments_fn) if jit else moments_fn, variables)
  moments = _averaged(moments_fn, itertools.chain([first], batches))
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  layers = {}
  for path, value in stats.items():
    layers.setdefault(path[:-1], {})[path[-1]] = value
  if strict:
    _check_reported(
      [layer for layer, names in layers.items() if discovery.method_for_state(names) is not None],
      moments,
    )
  for layer, values in moments.items():
    method = methods.get(layer) or discovery.default_method(
      cast(type, discovery.method_for_state(layers[layer]))
    )
    for name, value in _set_from_moments(method, layers[layer], values).items():
      stats[layer + (name,)] = value
  variables["batch_stats"] = traverse_util.unflatten_dict(stats)
  return freeze(variables) if frozen else variables


def _nnx_moments(model: nnx.Module, **call_kwargs) -> Tuple[Callable[[Any, Any], dict], Any]:
  """``(moments, state)``: ``moments(state, batch) -> {path: {name: (C,)}}`` of
  a training-mode copy of ``model`` whose state is ``state``."""
  copy = nnx.clone(model)
  copy.train()
  graphdef, state = nnx.split(copy)

  def moments(state, batch):
    forward = nnx.capture(lambda m, b: m(b, **call_kwargs), BatchMoments)
    _, captured = forward(nnx.merge(graphdef, state), batch)
    out: Dict[Tuple, dict] = {}
    for path, value in nnx.to_flat_state(captured):
      values = value.get_value() if isinstance(value, nnx.Variable) else value
      out.setdefault(tuple(path[:-1]), {})[path[-1]] = jnp.mean(jnp.stack(values), axis=0)
    return out

  return moments, state


def _recompute_nnx(model: nnx.Module, batches, *, jit, strict, **call_kwargs):
  norms = {path: (module, method) for path, module, method in discovery.nnx_normalizers(model)}
  moments_fn, state = _nnx_moments(model, **call_kwargs)
  moments_fn = functools.partial(jax.jit(moments_fn) if jit else moments_fn, state)
  moments = _averaged(moments_fn, batches)
  if strict:
    _check_reported(norms, moments)
  for path, values in moments.items():
    module, method = norms[path]
    stored = {
      name: variable[...]
      for name, variable in vars(module).items()
      if isinstance(variable, nnx.BatchStat)
    }
    for name, value in _set_from_moments(method, stored, values).items():
      getattr(module, name)[...] = value
  return model
