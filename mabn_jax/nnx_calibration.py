"""Calibrating converted NNX normalizers on a few batches (``calibration_batches``).

After :func:`mabn_jax.nnx_conversion.convert_batch_norm` each converted
normalizer's input ``z'`` differs from the BN layer's ``z`` (its producer is
now centred, and the layers before it changed). Calibration measures the
moments ``E[z']``, ``E[z'^2]`` of each converted layer's input in inference
mode, averaged over the batches (weighted by batch size), and sets its state
from them (:func:`mabn_jax.conversion_math.converted_state`) and, with
compensation, its ``scale``/``bias`` (:func:`~mabn_jax.conversion_math.kept_affine`).
Layers are calibrated one after another in call order, one pass over the
batches each, so each is measured with the layers before it already
calibrated: ``L`` passes for ``L`` converted layers.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple, cast

import jax
from flax import nnx

from mabn_jax import conversion_math as cm
from mabn_jax import dataflow, discovery
from mabn_jax.calibration import averaged_moments
from mabn_jax.functional import statistics as st
from mabn_jax.nnx_conversion import Converted, set_affine, set_state, template


def _moments_fn(model: nnx.Module, paths: List[Tuple]):
  """A jitted ``(state, batch) -> ([path per call], {path: (E[z'], E[z'^2])})``
  of the converted layers' inputs in one inference call of a copy of ``model``."""
  graphdef, _ = nnx.split(model)
  order: List[Tuple] = []

  @jax.jit
  def moments(state, batch):
    copy = nnx.merge(graphdef, state)
    found = {tuple(path): module for path, module in discovery.nnx_modules(copy)}
    modules = {id(found[path]): (path, found[path]) for path in paths}
    calls: List[Any] = []
    tensors: List[Any] = []
    with dataflow.recorded_calls(modules, calls, tensors):
      copy(batch)
    order[:] = [call.path for call in calls]
    out: Dict[Tuple, Any] = {}
    for call in calls:
      z = tensors[call.first]
      method = cast(Any, discovery.method_of(call.module))
      out.setdefault(call.path, []).append(st.input_moments(z, 1, method.feature_axis(z.ndim)))
    return {path: jax.tree.map(lambda *a: sum(a) / len(a), *values) for path, values in out.items()}

  return moments, order


def _modes(model: nnx.Module) -> List[Tuple[Any, str, Any]]:
  """The mode flags of every module (restored after calibration)."""
  saved = []
  for _, module in discovery.nnx_modules(model):
    for flag in ("use_running_average", "deterministic"):
      if flag in vars(module):
        saved.append((module, flag, getattr(module, flag)))
  return saved


def calibrate(
  model: nnx.Module, converted: List[Converted], batches: Iterable[Any], compensate: bool
) -> None:
  """Sets each converted layer's state (and affine map) from its measured
  input moments, in call order (see the module docstring)."""
  batches = list(batches)
  if not batches:
    raise ValueError("convert_batch_norm: calibration_batches yielded no batch.")
  saved = _modes(model)
  model.eval()
  try:
    by_path = {c.path: c for c in converted}
    paths = [tuple(path) for path, _ in discovery.nnx_modules(model) if tuple(path) in by_path]
    moments, order = _moments_fn(model, paths)
    averaged_moments(moments, nnx.state(model), batches[:1])  # traces: fixes the call order
    for path in dict.fromkeys(order):
      measured = averaged_moments(moments, nnx.state(model), batches)[path]
      item = by_path[path]
      norm = item.slot.get()
      method = discovery.method_of(norm)
      step = int(norm.step[...]) if hasattr(norm, "step") else 0
      state = cm.converted_state(method, template(norm), item.source, step, measured)
      set_state(norm, state)
      set_affine(norm, method, state, item.source, measured, compensate, "/".join(map(str, path)))
  finally:
    for module, flag, value in saved:
      setattr(module, flag, value)
