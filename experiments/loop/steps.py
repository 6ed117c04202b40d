"""The training and evaluation steps of every task, made from its objective.

A task's objective is ``(loss_fn, eval_fn)``:

* ``loss_fn(variables, batch, mutable) -> (loss, (mutated, metrics))``: the
  scalar training loss of a batch in training mode, the collections in
  ``mutable`` as ``model.apply`` returns them, and a dict of float32 scalars
  to log beside the loss (e.g. the batch's accuracy);
* ``eval_fn(variables, batch) -> counts``: a dict of arrays in inference
  mode, summed over the batches of a split (e.g. correct predictions, a
  confusion matrix).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import optax

import mabn_jax as mj
from experiments import diagnostics

Objective = Tuple[Callable, Callable]


def step_functions(objective: Objective, tx, axis: Optional[str] = None, diagnose: bool = False):
  """``(train_step, eval_step)`` of one program, not yet mapped or compiled.

  ``train_step(variables, opt_state, batch) -> (variables, opt_state,
  metrics)``: :func:`mabn_jax.value_and_grad` (statistics, MABN's backward
  ones included, update), then ``tx``; ``metrics`` holds ``'loss'`` and the
  objective's metrics. ``eval_step(variables, batch) -> counts``.

  ``axis`` is the mapped axis (``pmap``/``shard_map``) over which gradients
  and metrics are averaged and evaluation counts summed; ``None`` for one
  program over the whole global batch (``jit``), whose loss, gradients and
  counts are already those of the whole batch. With ``diagnose`` the
  metrics also hold ``'diag'``, the per-layer
  :func:`experiments.diagnostics.layer_diagnostics` of the step.
  """
  loss_fn, eval_fn = objective
  mutable = ["batch_stats"] + ([diagnostics.MOMENTS] if diagnose else [])
  mean = (lambda t: jax.lax.pmean(t, axis)) if axis else (lambda t: t)
  total = (lambda t: jax.lax.psum(t, axis)) if axis else (lambda t: t)
  grad_fn = mj.value_and_grad(lambda v, batch: loss_fn(v, batch, mutable), has_aux=True)

  def train_step(variables, opt_state, batch):
    ((loss, metrics), new_vars), grads = grad_fn(variables, batch)
    moments = new_vars.pop(diagnostics.MOMENTS, None)
    grads = mean(grads)
    updates, opt_state = tx.update(grads, opt_state, new_vars["params"])
    new_vars = {**new_vars, "params": optax.apply_updates(new_vars["params"], updates)}
    metrics = {"loss": loss, **metrics}
    if diagnose:
      metrics["diag"] = diagnostics.layer_diagnostics(variables["params"], grads, moments)
    return new_vars, opt_state, mean(metrics)

  def eval_step(variables, batch):
    return total(eval_fn(variables, batch))

  return train_step, eval_step
