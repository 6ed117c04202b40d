"""Flax linen Moving Average Batch Normalization.

The math: ``docs/normalization.md``, section 2.
"""

from __future__ import annotations

from mabn_jax.functional import mabn as F
from mabn_jax.layers.base import BatchStatisticsNorm


class MABN(BatchStatisticsNorm):
  """Moving Average Batch Normalization (Yan et al., ICLR 2020).

  A drop-in replacement for ``flax.linen.BatchNorm`` at small normalization
  batches; put it after a :class:`~mabn_jax.CenteredConv` (or
  :class:`~mabn_jax.CenteredDense`), since it does not subtract a mean.
  Train with :func:`mabn_jax.value_and_grad`, which feeds the backward
  statistic into the state. Call each layer once per training step: a
  second training-mode call of the same layer in one step of
  :func:`mabn_jax.value_and_grad` raises a ``ValueError`` at trace time (see
  :func:`mabn_jax.training.claim_tap`; use one layer instance per call).

  Variables (``C`` = number of features, ``m`` = ``buffer_size``):

  * ``params``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in ``param_dtype``.
  * ``batch_stats``: ``chi_ema`` ``(C,)``, ``chi_buffer`` ``(m, C)``,
    ``psi_buffer`` ``(m, C)`` (float32, newest row last) and ``step``
    ``()`` float32 counter; ``nonfinite_count`` ``()`` float32 counter, the steps skipped
    because their statistics were not finite (the state is then kept).
  * ``backward_stats``: ``psi_increment`` ``(m, C)`` float32 zeros, the tap
    whose cotangent is the step's ``psi_buffer`` increment
    (:data:`mabn_jax.TAP_TARGETS`). Variables saved when the tap was named
    ``psi_buffer`` raise an error; convert them with
    :func:`mabn_jax.migrate_variables`.

  The attributes are those of :class:`mabn_jax.BatchNorm`, with ``momentum``
  the decay of ``chi_ema`` (alpha = 0.98), ``epsilon`` added to the second
  moment and ``axis_name`` the mapped axis over which ``chi`` and ``Psi`` are
  averaged, and:

  Attributes:
    buffer_size: ``m``, the number of normalization groups in each SMA;
      with ``G`` groups a step it spans ``m / G`` steps (see
      ``experiments/results/mabn_validation_cifar_cpu`` for how it was
      chosen).
    warmup_steps: batch statistics are used while ``t < warmup_steps``.
    renorm_start: ``r = 1`` until step ``max(renorm_start, warmup_steps)``.
    r_max: renormalization clip.
    average_forward, average_backward, moving_average: ablations of the
      moving averages (see :class:`mabn_jax.functional.mabn.MABNConfig`);
      the defaults are the published method.
  """

  momentum: float = 0.98
  buffer_size: int = 16
  warmup_steps: int = 100
  renorm_start: int = 1000
  r_max: float = 5.0
  average_forward: bool = True
  average_backward: bool = True
  moving_average: str = "sma"

  method_class = F.Method
