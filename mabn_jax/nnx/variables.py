"""NNX Variable types of the package: the backward-statistics tap.

``BackwardStat`` is the NNX side of the linen ``'backward_stats'``
collection (:data:`mabn_jax.BACKWARD_STATS`): it is registered under that
name, so ``nnx.bridge.ToNNX`` of a linen MABN holds its tap as a
``BackwardStat`` too, and ``mabn_jax.nnx.value_and_grad`` treats native and
bridged layers alike.
"""

from __future__ import annotations

from flax import nnx
from flax.nnx import variablelib

from mabn_jax.training import BACKWARD_STATS


class BackwardStat(nnx.Variable):
  """A zero-valued tap: its cotangent is the step's increment of a statistic.

  MABN's ``psi_increment`` ``(m, C)`` float32 is one; which ``nnx.BatchStat``
  of the same module it updates is given by :data:`mabn_jax.TAP_TARGETS`
  (``psi_increment`` -> ``psi_buffer``). Its value stays zero.
  """


class BatchMoments(nnx.Variable):
  """The input moments a normalizer sows in training mode while a caller
  captures this type (``nnx.capture(fn, BatchMoments)``, as
  :func:`mabn_jax.recompute_batch_stats` does): ``mean`` and
  ``second_moment``, float32 ``(C,)``, one tuple entry per call."""


def _register() -> None:
  registered = variablelib.VariableTypeCache.get(BACKWARD_STATS)
  if registered is None:
    nnx.register_variable_name(BACKWARD_STATS, BackwardStat)


_register()


def is_tap(path, value) -> bool:
  """NNX filter: a tap Variable (``BackwardStat``, or whatever type holds the
  linen ``'backward_stats'`` collection through ``nnx.bridge``)."""
  del path
  if not isinstance(value, nnx.Variable):
    return False
  return isinstance(value, BackwardStat) or variablelib.VariableTypeCache.get(
    BACKWARD_STATS
  ) is type(value)
