"""The NNX training contract: ``nnx.value_and_grad`` plus backward statistics.

:func:`value_and_grad` differentiates the loss with respect to the model's
``nnx.Param`` *and* its taps (:class:`~mabn_jax.nnx.BackwardStat`, e.g.
MABN's ``psi_increment``) in one backward pass, returns the parameter
gradients exactly as ``nnx.value_and_grad`` does (an ``nnx.State`` for
``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)``), and adds
each tap's cotangent to the ``nnx.BatchStat`` it updates
(:data:`mabn_jax.TAP_TARGETS`: ``psi_increment`` -> ``psi_buffer`` of the same
module). The forward statistics are written by the layers themselves, as
``nnx.BatchNorm`` does. Bridged linen layers (``nnx.bridge.ToNNX``) hold
their taps in the same Variable type and are fed the same way.

Works eagerly and under ``nnx.jit`` in both graph mode (the default) and
tree mode (``nnx.jit(step, graph=False)``): the differentiation itself always
runs in graph mode (it needs ``nnx.DiffState``), on the module the jitted
function receives.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from mabn_jax.nnx.variables import is_tap
from mabn_jax.training import add_increment, stat_path, training_step

DIFFERENTIATED = nnx.Any(nnx.Param, is_tap)
"""What :func:`value_and_grad` differentiates: parameters and taps."""


def feed_backward_statistics(model: nnx.Module, tap_grads: nnx.State) -> None:
  """Adds each tap cotangent in ``tap_grads`` to the statistic it updates.

  Args:
    model: the module (or graph of modules) the gradients were taken of.
    tap_grads: ``nnx.State`` of tap cotangents, paths as in ``model``; the tap
      at ``.../psi_increment`` updates the ``nnx.BatchStat`` at
      ``.../psi_buffer``. A non-finite cotangent leaves the statistic as it
      was (:func:`mabn_jax.training.add_increment`).
  """
  stats = dict(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))
  for path, cotangent in nnx.to_flat_state(tap_grads):
    target = stat_path(tuple(path))
    if target not in stats:
      raise ValueError(
        f"mabn_jax.nnx: the tap {'/'.join(map(str, path))} has no nnx.BatchStat "
        f"{'/'.join(map(str, target))} to update."
      )
    stats[target][...] = add_increment(stats[target][...], cotangent[...])


def value_and_grad(fun: Callable[..., Any], *, has_aux: bool = False):
  """``nnx.value_and_grad`` of ``fun(model, *args)`` that also feeds backward statistics.

  Args:
    fun: ``fun(model, *args, **kwargs)`` returning the scalar loss, or
      ``(loss, aux)`` if ``has_aux``; it runs the model in training mode.
      Like ``nnx.value_and_grad``, updates of the model's state inside it
      (``nnx.BatchStat``) are kept.
    has_aux: whether ``fun`` returns auxiliary data.

  Returns:
    A function of the same arguments returning ``(loss, grads)`` (or
    ``((loss, aux), grads)``), as ``nnx.value_and_grad(fun)``: ``grads`` is the
    ``nnx.State`` of the gradients of the model's ``nnx.Param`` (the taps'
    cotangents are not in it). On return the model's statistics include this
    step's backward statistics. A second training call of one MABN layer in
    ``fun`` raises a ``ValueError`` at trace time, as does a training step
    through a MABN layer in inference mode (use ``nnx.value_and_grad`` to
    fine-tune with frozen statistics).
  """
  step = value_and_grad_with_extra(
    lambda model, extra, *args, **kwargs: fun(model, *args, **kwargs), has_aux=has_aux
  )

  def wrapped(model, *args, **kwargs):
    value, grads, _ = step(model, None, *args, **kwargs)
    return value, grads

  return wrapped


def value_and_grad_with_extra(fun: Callable[..., Any], *, has_aux: bool = False):
  """:func:`value_and_grad` of ``fun(model, extra, *args)`` that also
  differentiates ``extra`` (a tree of arrays, e.g. the recorder's probes).

  Returns:
    A function of ``(model, extra, *args, **kwargs)`` returning ``(value,
    grads, extra_cotangent)``, ``value`` and ``grads`` as :func:`value_and_grad`'s.
  """
  grad_fn = nnx.value_and_grad(
    fun,
    argnums=(nnx.DiffState(0, DIFFERENTIATED), 1),
    has_aux=has_aux,
    graph=True,
    graph_updates=True,
  )

  def wrapped(model, extra, *args, **kwargs):
    with training_step():
      value, (grads, extra_cotangent) = grad_fn(model, extra, *args, **kwargs)
    param_grads, tap_grads = nnx.split_state(grads, nnx.Param, is_tap)
    feed_backward_statistics(model, tap_grads)
    return value, param_grads, extra_cotangent

  return wrapped
