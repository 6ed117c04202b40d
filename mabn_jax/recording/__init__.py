"""Recording the batch statistics of every normalizer during training.

``docs/normalization.md``, sections 1 and 2: training BN depends on four
batch statistics per layer and normalization group, two forward (``mu_B``,
``var_B``) and two backward (``g_B = mean(g)``, ``Psi_B = mean(xhat * g)``,
``g`` the gradient at ``xhat``). MABN replaces them by moving averages: it
normalizes with ``chi`` (the batch ``chi_B`` during warmup, the SMA after)
and uses ``Psi`` (the batch ``Psi_B`` during warmup, the SMA after) in the
backward pass.

:func:`value_and_grad` is :func:`mabn_jax.value_and_grad` (for a linen
model's variables) or :func:`mabn_jax.nnx.value_and_grad` (for an NNX model)
plus these statistics. It does not change training: no variable is added to
the model and the forward and backward values are untouched.

* BN-type layers (``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``,
  :class:`mabn_jax.BatchNorm`, :class:`mabn_jax.BatchRenorm` and their NNX
  twins) in training mode are probed: the statistics are computed in the
  backward pass from the layer input ``x`` and ``g = gamma * g_y``
  (:mod:`mabn_jax.recording.probes`).
* MABN's statistics are read from its state before and after the step: its
  ``chi_buffer``/``psi_buffer`` rows pushed in the step are ``chi_B`` and
  ``Psi_B``; the values used are these (warmup) or their window means.

For Batch Renorm ``g`` is measured at its renormalized activation
``r * xhat + d`` (``gamma * g_y``, without the factor ``r``), and ``xhat``
uses the batch statistics. Cross-iteration BN (a conv+norm module whose
statistics are compensated inside) is not recorded.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from mabn_jax.functional import mabn as mabn_math
from mabn_jax.recording import linen_models, nnx_models
from mabn_jax.recording.probes import BN_STATISTICS, MABN_STATISTICS

__all__ = ["BN_STATISTICS", "MABN_STATISTICS", "mabn_statistics", "value_and_grad"]


def mabn_statistics(old_state: Mapping, new_state: Mapping, groups: int, warmup_steps: int):
  """MABN's batch and used statistics of one step, from its state.

  Args:
    old_state, new_state: the layer's ``'batch_stats'`` before and after the
      step (``chi_buffer``, ``psi_buffer`` ``(m, C)``, ``step``).
    groups: normalization groups ``G`` in the step.
    warmup_steps: the layer's ``warmup_steps``.

  Returns:
    ``{'chi_batch', 'chi_used', 'psi_batch', 'psi_used'}``, ``(G, C)`` float32
    each: row ``j`` is group ``j``'s batch value and the value it used (the
    batch value during warmup, else the SMA of the ``m`` latest groups).
  """
  method = mabn_math.Method(
    mabn_math.MABNConfig(warmup_steps=warmup_steps), buffer_size=old_state["chi_buffer"].shape[0]
  )
  return method.step_statistics(old_state, new_state, groups)


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """The training step's value and gradients, plus every layer's statistics.

  Args:
    fun: as for :func:`mabn_jax.value_and_grad` (``fun(variables, *args)``
      returning ``(loss, mutated)``, or ``(loss, (mutated, aux))``) or, for
      an NNX model, as for :func:`mabn_jax.nnx.value_and_grad`
      (``fun(model, *args)`` returning the loss, or ``(loss, aux)``); the
      model runs in training mode inside it.
    has_aux: whether ``fun`` returns auxiliary data.

  Returns:
    A function of the same arguments returning ``(result, statistics)``:
    ``result`` exactly what :func:`mabn_jax.value_and_grad` returns
    (``((value, variables), grads)``), or for an NNX model (first argument an
    ``nnx.Module``) what :func:`mabn_jax.nnx.value_and_grad` returns
    (``(value, grads)``, the model updated in place); ``statistics`` is
    ``{layer path: {name: (G, C) float32}}`` with names
    :data:`BN_STATISTICS` for BN-type layers and :data:`MABN_STATISTICS` for
    MABN (a BN-type layer called twice in a step gets ``path#1`` for its
    second call; a MABN layer called twice raises, see
    :func:`mabn_jax.training.claim_tap`). Paths are the linen module path or
    the NNX attribute path, joined by ``/``. Pure and jit-able (``nnx.jit``
    for NNX models).
  """
  for_linen = linen_models.value_and_grad(fun, has_aux)
  for_nnx = nnx_models.value_and_grad(fun, has_aux)

  def wrapped(model_or_variables, *args, **kwargs):
    step = for_nnx if isinstance(model_or_variables, nnx.Module) else for_linen
    return step(model_or_variables, *args, **kwargs)

  return wrapped
