"""Dynamic loss scaling for NNX models (:func:`dynamic_scale_value_and_grad`)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.training.dynamic_scale import DynamicScaleResult

from mabn_jax.loops import averaged_and_finite, next_dynamic_scale
from mabn_jax.nnx.training import DIFFERENTIATED, feed_backward_statistics
from mabn_jax.nnx.variables import is_tap
from mabn_jax.training import stat_path, training_step, unscaled_cotangent


def _flat(model: nnx.Module, kind) -> Dict[Tuple, Any]:
  return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, kind))}


def _tap_targets(model: nnx.Module) -> Dict[Tuple, Any]:
  """``{path: nnx.BatchStat}`` of the statistics the model's taps update."""
  stats = _flat(model, nnx.BatchStat)
  targets = (stat_path(path) for path in _flat(model, is_tap))
  return {path: stats[path] for path in targets if path in stats}


def dynamic_scale_value_and_grad(
  fun: Callable[..., Any],
  dynamic_scale: Any,
  *,
  has_aux: bool = False,
  axis_name: Optional[str] = None,
):
  """:func:`mabn_jax.nnx.value_and_grad` with dynamic loss scaling.

  The NNX counterpart of :func:`mabn_jax.dynamic_scale_value_and_grad`, with
  Flax's ``flax.training.dynamic_scale.DynamicScale``. The loss is multiplied
  by ``scale`` before differentiation, and so are the statistics the taps
  update (``psi_buffer``) while the model runs, because the backward pass
  mixes them with this step's cotangents; every cotangent is then divided
  by ``scale`` and those statistics restored, so gradients, increments and
  backward statistics come out unscaled (bit for bit for a power of two
  while nothing overflows). The step is *finite* when every gradient
  (averaged over ``axis_name`` if given) and every tap cotangent is finite,
  on every device of ``axis_name``. A non-finite step leaves every
  ``nnx.BatchStat`` of the model as it was; the caller skips the update
  (``if finite``, or ``jnp.where`` on the parameters under ``jit``). The scale
  is updated as Flax's (:func:`mabn_jax.loops.next_dynamic_scale`).

  Args:
    fun: ``fun(model, *args, **kwargs)`` returning the scalar loss, or
      ``(loss, aux)`` if ``has_aux``; it runs the model in training mode.
    dynamic_scale: a ``DynamicScale`` with array fields
      (``DynamicScale(scale=jnp.float32(2.0**15), fin_steps=jnp.int32(0))``).
    has_aux: whether ``fun`` returns auxiliary data.
    axis_name: the mapped axis over which gradients are averaged and the
      finite decision is shared.

  Returns:
    A function of ``(model, *args, **kwargs)`` returning Flax's
    ``DynamicScaleResult(dynamic_scale, finite, aux, grad)``: the next
    ``DynamicScale``, the () bool ``finite``, ``aux`` the unscaled loss (or
    ``(loss, aux)``) and ``grad`` the ``nnx.State`` of the unscaled float32
    (or wider) gradients of the model's ``nnx.Param``.
  """

  def scaled(model, scale, *args, **kwargs):
    out = fun(model, *args, **kwargs)
    return scale * (out[0] if has_aux else out), out

  grad_fn = nnx.value_and_grad(
    scaled, argnums=nnx.DiffState(0, DIFFERENTIATED), has_aux=True, graph=True, graph_updates=True
  )

  def wrapped(model, *args, **kwargs):
    scale = jnp.asarray(dynamic_scale.scale, jnp.float32)
    before = {path: var[...] for path, var in _flat(model, nnx.BatchStat).items()}
    targets = _tap_targets(model)
    for path, var in targets.items():
      var[...] = jnp.asarray(before[path] * scale, var[...].dtype)
    with training_step():
      (_, value), grads = grad_fn(model, scale, *args, **kwargs)
    for path, var in targets.items():
      var[...] = before[path]  # the forward passes do not change them
    grads = jax.tree.map(lambda c: unscaled_cotangent(c, scale), grads)
    param_grads, tap_grads = nnx.split_state(grads, nnx.Param, is_tap)
    param_grads, finite = averaged_and_finite(param_grads, tap_grads, axis_name)
    feed_backward_statistics(model, tap_grads)
    for path, var in _flat(model, nnx.BatchStat).items():
      if path in before:
        var[...] = jnp.where(finite, var[...], before[path])
    return DynamicScaleResult(next_dynamic_scale(dynamic_scale, finite), finite, value, param_grads)

  return wrapped
