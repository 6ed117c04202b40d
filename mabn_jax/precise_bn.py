"""Precise BN: recompute population statistics exactly (spec, section 1).

After training, the running statistics of BN-type layers are exponential
moving averages: they lag behind the final weights and, at small
normalization batches, are biased. :func:`recompute_batch_stats` replaces them
with exact averages over a given set of batches: the frozen network is run in
training-statistics mode (each layer normalizes as it does in training), every
normalizer sows the per-channel mean and second moment ``E[x^2]`` of its input
(:func:`mabn_jax.layers.base.sow_moments`, collection ``'batch_moments'``),
and these per-batch moments are averaged exactly over all batches, weighted by
the number of samples per batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax.functional import statistics as st
from mabn_jax.layers.base import sow_moments
from mabn_jax.training import BATCH_MOMENTS

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
    apply_fn: Callable[..., Any], variables: Mapping, batch: Any, **call_kwargs
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
    _, mutated = apply_fn(
        variables, batch, mutable=["batch_stats", BATCH_MOMENTS], **call_kwargs
    )
  sown = traverse_util.flatten_dict(unfreeze(mutated.get(BATCH_MOMENTS, {})))
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


def recompute_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping,
    batches: Iterable[Any],
    *,
    jit: bool = True,
    strict: bool = True,
    **call_kwargs,
):
  """Replaces the running statistics by exact averages over ``batches``.

  The network is run, frozen (parameters and state as given; state updates
  of the passes are discarded), in training-statistics mode over every
  batch, one jitted forward pass per batch. Each batch-statistics layer's
  per-batch input mean ``mu_B`` and second moment ``E[x^2]`` (over the whole
  device batch; with ``norm_batch_size`` the mean of its group moments) are
  averaged exactly over the batches, weighted by their sizes, and written to
  ``'batch_stats'``:

  * BN (``flax.linen.BatchNorm``, :class:`mabn_jax.BatchNorm`), Batch Renorm
    and CBN (state ``mean``/``var``): ``mean = E[mu_B]`` and
    ``var = E[x^2] - mean^2`` (clipped at 0).
  * MABN (state ``chi_ema``): ``chi_ema = E[x^2]``.

  All layers are measured in one pass per batch, which is exact for the given
  batches: every layer sees the input it sees in training mode. For BN the
  training forward does not depend on the running statistics at all; for
  Batch Renorm (``r``, ``d``) and MABN (its SMA buffers, ``r``) it depends on
  their state, which is used as given (frozen), not as recomputed. MABN's
  buffers and ``step``, and ``params``, are never modified.

  Args:
    apply_fn: ``model.apply``, called as
      ``apply_fn(variables, batch, mutable=[...], **call_kwargs)``.
    variables: the trained model's variables (``'params'``, ``'batch_stats'``
      and any others, passed through unchanged).
    batches: iterable of model inputs (arrays or trees of arrays with a
      leading batch axis), e.g. ``(images for images, _ in dataset)``.
    jit: compile the forward pass (one compilation per distinct batch shape).
    strict: raise if a layer with ``mean``/``var`` or ``chi_ema`` state
      reported no moments (e.g. it is only used at inference), instead of
      leaving its statistics unchanged.
    **call_kwargs: arguments of the model call selecting training statistics,
      e.g. ``train=True`` for registry models or ``use_running_average=False``.
      Models whose normalizers use ``axis_name`` must be applied under the
      corresponding ``pmap``; build them without ``axis_name`` here.

  Returns:
    New variables of the same container type with ``'batch_stats'`` replaced.

  Raises:
    ValueError: no batches, no normalizer reported moments, or (``strict``) a
      normalizer reported none, or an unknown state layout.
  """
  frozen = isinstance(variables, FrozenDict)
  variables = unfreeze(variables)
  if "batch_stats" not in variables:
    raise ValueError(
        "recompute_batch_stats: the variables have no 'batch_stats' collection "
        f"(found {sorted(variables)})."
    )

  def moments_of(v, batch):
    return collect_moments(apply_fn, v, batch, **call_kwargs)

  moments_fn = jax.jit(moments_of) if jit else moments_of
  sums: dict = {}
  total = 0
  for batch in batches:
    n = _batch_size(batch)
    moments = jax.device_get(moments_fn(variables, batch))
    for layer, values in moments.items():
      acc = sums.setdefault(layer, {name: 0.0 for name in MOMENT_NAMES})
      for name in MOMENT_NAMES:
        acc[name] = acc[name] + n * np.asarray(values[name], np.float64)
    total += n
  if total == 0:
    raise ValueError("recompute_batch_stats: `batches` yielded no batch.")
  if not sums:
    raise ValueError(
        "recompute_batch_stats: no normalizer reported batch moments; pass the "
        "call arguments that select training statistics (e.g. train=True or "
        "use_running_average=False)."
    )

  stats = traverse_util.flatten_dict(variables["batch_stats"])
  layers = {path[:-1] for path in stats}
  normalizers = {
      layer for layer in layers
      if (layer + ("chi_ema",)) in stats
      or ((layer + ("mean",)) in stats and (layer + ("var",)) in stats)
  }
  if strict:
    missing = sorted("/".join(map(str, layer)) for layer in normalizers - set(sums))
    if missing:
      raise ValueError(
          "recompute_batch_stats: these normalizers reported no batch moments "
          f"in training mode: {missing}; pass strict=False to keep their "
          "statistics unchanged."
      )
  for layer, acc in sums.items():
    mean = acc["mean"] / total
    second = acc["second_moment"] / total
    where = "/".join(map(str, layer))
    if layer + ("chi_ema",) in stats:
      key = layer + ("chi_ema",)
      stats[key] = jnp.asarray(second, stats[key].dtype)
    elif layer + ("mean",) in stats and layer + ("var",) in stats:
      stats[layer + ("mean",)] = jnp.asarray(mean, stats[layer + ("mean",)].dtype)
      stats[layer + ("var",)] = jnp.asarray(
          np.maximum(second - mean * mean, 0.0), stats[layer + ("var",)].dtype
      )
    else:
      raise ValueError(
          f"recompute_batch_stats: layer '{where}' reported batch moments but "
          "its 'batch_stats' has neither 'mean'/'var' nor 'chi_ema' (found "
          f"{sorted(p[-1] for p in stats if p[:-1] == layer)})."
      )
  variables["batch_stats"] = traverse_util.unflatten_dict(stats)
  return freeze(variables) if frozen else variables
