"""What a training loop adds around :func:`mabn_jax.value_and_grad`.

* :func:`accumulate_value_and_grad`: gradient accumulation over micro-batches;
* :func:`dynamic_scale_value_and_grad`: dynamic loss scaling for float16 with
  Flax's ``flax.training.dynamic_scale.DynamicScale``;
* :func:`nonfinite_counts`, :func:`check_finite`: the host-side readers of
  every normalizer's ``nonfinite_count``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze
from flax.training.dynamic_scale import DynamicScaleResult

from mabn_jax.functional import statistics as st
from mabn_jax.training import NONFINITE_COUNT, VariableTree, differentiate, value_and_grad


def dynamic_scale_value_and_grad(
  fun: Callable[..., Any],
  dynamic_scale: Any,
  has_aux: bool = False,
  axis_name: Optional[str] = None,
):
  """:func:`~mabn_jax.training.value_and_grad` with dynamic loss scaling.

  The float16 counterpart of ``dynamic_scale.value_and_grad(loss_fn)`` for
  models whose normalizers keep statistics. ``dynamic_scale`` is Flax's
  ``flax.training.dynamic_scale.DynamicScale`` (its fields ``scale``,
  ``fin_steps``, ``growth_factor``, ``backoff_factor``, ``growth_interval``,
  ``minimum_scale`` are read, and its ``replace`` makes the next one).

  The loss is multiplied by ``scale`` before differentiation and every
  cotangent divided by it (see :func:`~mabn_jax.training.differentiate`):
  the gradients, the taps' increments and so the backward statistics (MABN's
  ``Psi``) come out unscaled. The step is *finite* when every gradient
  (averaged over ``axis_name`` if given) and every tap increment is finite,
  on every device of ``axis_name``. A non-finite step leaves all state as
  it was: the returned variables are the given ones (``'batch_stats'`` with
  its counters, any other collection), and the caller keeps ``params`` and
  the optimizer state with ``jnp.where(finite, new, old)``. The scale is
  updated as Flax's: halved (``backoff_factor``, not below
  ``minimum_scale``) after a non-finite step, doubled (``growth_factor``)
  after ``growth_interval`` finite steps in a row.

  Args:
    fun: as for :func:`~mabn_jax.training.value_and_grad`.
    dynamic_scale: a ``DynamicScale``; create it with array fields
      (``DynamicScale(scale=jnp.float32(2.0**15), fin_steps=jnp.int32(0))``)
      so that every step has the same input types (Python numbers are
      weakly typed, and a jitted step would compile twice).
    has_aux: whether ``fun`` returns auxiliary data.
    axis_name: the mapped axis (``pmap``, ``shard_map``) over which the
      gradients are averaged and the finite decision is shared.

  Returns:
    A function of ``(variables, *args, **kwargs)`` returning Flax's
    ``DynamicScaleResult(dynamic_scale, finite, aux, grad)``: the next
    ``DynamicScale``, the () bool ``finite``, ``aux = (value, variables)``
    with ``value`` the unscaled loss (or ``(loss, aux)``) and ``variables``
    as :func:`~mabn_jax.training.value_and_grad` returns them (the given
    ones if not finite), and ``grad`` the unscaled float32 (or wider)
    gradient with respect to ``'params'``.
  """

  def wrapped(variables, *args, **kwargs):
    scale = jnp.asarray(dynamic_scale.scale, jnp.float32)
    step = differentiate(
      fun,
      variables,
      args,
      kwargs,
      has_aux=has_aux,
      name="mabn_jax.dynamic_scale_value_and_grad",
      loss_scale=scale,
    )
    grads, finite = averaged_and_finite(step.grads, step.taps_cotangent, axis_name)
    kept = _keep_unless(finite, step.variables, variables)
    next_scale = next_dynamic_scale(dynamic_scale, finite)
    return DynamicScaleResult(next_scale, finite, (step.value, kept), grads)

  return wrapped


def averaged_and_finite(grads: Any, taps_cotangent: Any, axis_name: Optional[str] = None):
  """``(grads, finite)``: the gradients averaged over ``axis_name`` (if
  given) and whether they and the taps' cotangents are finite on every
  device of it (the decision of a loss-scaled step)."""
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  finite = st.all_finite((grads, taps_cotangent))
  if axis_name is not None:
    finite = jax.lax.psum(jnp.where(finite, 0, 1), axis_name) == 0
  return grads, finite


def _keep_unless(finite: jax.Array, new: Any, old: VariableTree) -> Any:
  """``new`` if ``finite``, else ``old``'s values for every collection of
  ``new`` (``old`` lacks none of them but made taps, which ``new`` lacks)."""
  old = unfreeze(old)
  out = {
    name: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), value, old[name])
    if name in old
    else value
    for name, value in unfreeze(new).items()
  }
  return freeze(out) if isinstance(new, FrozenDict) else out


def next_dynamic_scale(dynamic_scale: Any, finite: jax.Array) -> Any:
  """The ``DynamicScale`` after a step: ``scale`` times ``backoff_factor``
  (at least ``minimum_scale``) and ``fin_steps = 0`` if not ``finite``;
  else ``scale`` times ``growth_factor`` (at most float32's maximum) and
  ``fin_steps = 0`` once ``fin_steps`` reached ``growth_interval``, or
  ``fin_steps + 1``. ``scale`` float32, ``fin_steps`` int32."""
  scale = jnp.asarray(dynamic_scale.scale, jnp.float32)
  fin_steps = jnp.asarray(dynamic_scale.fin_steps, jnp.int32)
  grow = finite & (fin_steps == dynamic_scale.growth_interval)
  largest = jnp.finfo(jnp.float32).max
  grown = jnp.where(grow, jnp.minimum(scale * dynamic_scale.growth_factor, largest), scale)
  shrunk = scale * dynamic_scale.backoff_factor
  if dynamic_scale.minimum_scale is not None:
    shrunk = jnp.maximum(shrunk, dynamic_scale.minimum_scale)
  return dynamic_scale.replace(
    scale=jnp.where(finite, grown, shrunk).astype(jnp.float32),
    fin_steps=jnp.where(finite & ~grow, fin_steps + 1, 0).astype(jnp.int32),
  )


def nonfinite_counts(variables: VariableTree) -> dict:
  """``{layer path: number of skipped non-finite steps}`` for every normalizer.

  Reads the ``nonfinite_count`` counters of ``variables['batch_stats']``
  (host-side; call it outside ``jit``). A counter averaged over devices
  (``lax.pmean``, a fraction when some device skipped a step) and one with
  a leading device axis (``pmap``) give their largest value rounded up, so
  any device's skipped step shows.
  """
  stats = traverse_util.flatten_dict(unfreeze(variables).get("batch_stats", {}))
  return {
    "/".join(path[:-1]): math.ceil(float(np.max(np.asarray(value))))
    for path, value in stats.items()
    if path[-1] == NONFINITE_COUNT
  }


def check_finite(variables: VariableTree) -> None:
  """Raises ``FloatingPointError`` naming every layer that skipped a step."""
  bad = {path: n for path, n in nonfinite_counts(variables).items() if n}
  if bad:
    raise FloatingPointError(
      "non-finite batch statistics: these layers kept their previous state "
      f"for the given number of steps: {bad}"
    )


def accumulate_value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """:func:`~mabn_jax.training.value_and_grad` over micro-batches, for gradient accumulation.

  Semantics: each micro-batch is one normalization step. The micro-batches
  run one after another (a ``lax.scan``) with the same ``'params'``; every
  normalizer normalizes each micro-batch with its own batch statistics and
  updates its state once per micro-batch, so after ``A`` micro-batches its
  step counters have advanced by ``A`` and its buffers hold ``A`` more
  entries, exactly as ``A`` training steps without an optimizer update
  would leave them. The gradient and the loss are the means over the
  micro-batches: apply the optimizer once to them. For BN-type layers the
  gradient equals that of one step on the whole batch with
  ``norm_batch_size`` = the micro-batch size (the running statistics then
  differ: ``A`` EMA updates instead of one).

  Args:
    fun: as for :func:`~mabn_jax.training.value_and_grad`, ``fun(variables, *args)``.
    has_aux: whether ``fun`` returns auxiliary data.

  Returns:
    A function ``(variables, *args)`` where every leaf of ``args`` has a
    leading micro-batch axis ``A``, returning ``((loss, variables), grads)``
    (``((loss, aux), variables), grads`` with ``aux`` stacked along ``A`` if
    ``has_aux``): ``loss`` and ``grads`` averaged over the micro-batches,
    ``variables`` after the last one. Keyword arguments are passed to every
    call unchanged. A non-finite micro-batch keeps the normalizer state for
    that micro-batch (see :func:`~mabn_jax.training.value_and_grad`) and makes the mean
    gradient non-finite, so an optimizer that skips non-finite steps skips
    the whole accumulated step.
  """
  step = value_and_grad(fun, has_aux=has_aux)

  def wrapped(variables, *args, **kwargs):
    frozen = isinstance(variables, FrozenDict)
    variables = unfreeze(variables)
    params = variables["params"]

    def body(carry, micro_batch):
      current, grad_sum = carry
      (value, current), grads = step({**current, "params": params}, *micro_batch, **kwargs)
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return (current, grad_sum), value

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (new_variables, grad_sum), values = jax.lax.scan(body, (variables, zeros), args)
    count = jax.tree_util.tree_leaves(args)[0].shape[0]
    grads = jax.tree_util.tree_map(lambda g: g / count, grad_sum)
    if has_aux:
      losses, aux = values
      value = (jnp.mean(losses), aux)
    else:
      value = jnp.mean(jnp.asarray(values))
    if frozen:
      new_variables = freeze(new_variables)
    return (value, new_variables), grads

  return wrapped
