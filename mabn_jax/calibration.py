"""Calibrating converted linen normalizers on a few batches (``calibration_batches``).

The linen side of :mod:`mabn_jax.nnx_calibration`: each converted layer's
input moments ``E[z']``, ``E[z'^2]`` are measured in inference mode (an
interceptor sows them for every normalizer call into the collection
:data:`CALIBRATION_MOMENTS`), averaged over the batches weighted by batch
size, and the layer's ``'batch_stats'`` (and, with compensation, its
``scale``/``bias``) are set from them; layers one after another in call
order, one pass over the batches each.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from mabn_jax import conversion_math as cm
from mabn_jax import discovery
from mabn_jax.functional import statistics as st

CALIBRATION_MOMENTS = "calibration_moments"
"""The collection the calibration interceptor sows ``(E[z'], E[z'^2])`` into."""


def _moments_fn(apply_fn: Callable, call_kwargs: Mapping, order: List[Tuple]):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and not module.is_initializing():
      method = discovery.method_of(module)
      if method is not None and args:
        z = args[0]
        order.append(tuple(module.path))
        moments = st.input_moments(z, 1, method.feature_axis(z.ndim))
        module.sow(CALIBRATION_MOMENTS, "moments", moments)
    return next_fun(*args, **kwargs)

  @jax.jit
  def moments(variables, batch):
    with nn.intercept_methods(intercept):
      _, mutated = apply_fn(variables, batch, mutable=[CALIBRATION_MOMENTS], **call_kwargs)
    sown: Dict[Tuple, Any] = traverse_util.flatten_dict(
      unfreeze(mutated.get(CALIBRATION_MOMENTS, {}))
    )
    return {
      path[:-1]: jax.tree.map(lambda *a: sum(a) / len(a), *values) for path, values in sown.items()
    }

  return moments


def averaged_moments(moments, variables, batches) -> Dict[Tuple, Tuple[np.ndarray, np.ndarray]]:
  """``{path: (mean, second moment)}`` averaged over ``batches`` (float64),
  each batch weighted by its size; ``moments(variables, batch)`` gives one
  batch's ``{path: (mean, second moment)}``."""
  sums: Dict[Tuple, List[Any]] = {}
  total = 0
  for batch in batches:
    n = int(np.shape(jax.tree.leaves(batch)[0])[0])
    for path, values in jax.device_get(moments(variables, batch)).items():
      acc = sums.setdefault(path, [0.0, 0.0])
      for i in range(2):
        acc[i] = acc[i] + n * np.asarray(values[i], np.float64)
    total += n
  return {path: (acc[0] / total, acc[1] / total) for path, acc in sums.items()}


def calibrate(
  apply_fn: Callable,
  variables: dict,
  layers: Mapping[Tuple, Tuple[Any, cm.Source]],
  batches: Any,
  call_kwargs: Mapping,
  compensate: bool,
) -> dict:
  """``variables`` with every layer in ``layers`` (``{path: (method, source)}``)
  calibrated (see the module docstring); ``call_kwargs`` must select
  inference (e.g. ``train=False``)."""
  batches = list(batches)
  if not batches:
    raise ValueError("convert_batch_norm: calibration_batches yielded no batch.")
  order: List[Tuple] = []
  moments = _moments_fn(apply_fn, call_kwargs, order)
  averaged_moments(moments, variables, batches[:1])  # traces: fixes the call order
  missing = sorted("/".join(path) for path in set(layers) - set(order))
  if missing:
    raise ValueError(
      f"convert_batch_norm: converted layers {missing} were not called by apply_fn "
      "on the calibration batches."
    )
  for path in dict.fromkeys(p for p in order if p in layers):
    measured = averaged_moments(moments, variables, batches)[path]
    method, src = layers[path]
    variables = _with_layer(variables, path, method, src, measured, compensate)
  return variables


def _node(tree: dict, path: Tuple) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def _with_layer(variables: dict, path, method, src: cm.Source, measured, compensate) -> dict:
  out = jax.tree.map(lambda a: a, unfreeze(variables))
  stats = _node(out["batch_stats"], path)
  step = int(stats["step"]) if "step" in stats else 0
  state = cm.converted_state(method, stats, src, step, measured)
  stats.update(state)
  if compensate:
    params = _node(out["params"], path)
    scale, bias = cm.kept_affine(method, state, src, measured)
    params["scale"] = jnp.asarray(scale, params["scale"].dtype)
    params["bias"] = jnp.asarray(bias, params["bias"].dtype)
  return out
