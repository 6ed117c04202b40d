"""Flax linen Batch Renormalization (``docs/normalization.md``, section 3)."""

from __future__ import annotations

from mabn_jax.functional import batch_renorm as F
from mabn_jax.layers.base import BatchStatisticsNorm


class BatchRenorm(BatchStatisticsNorm):
  """Batch Renormalization (Ioffe, 2017) with ``flax.linen.BatchNorm``'s fields.

  Training normalizes each group with its batch statistics and corrects toward
  the running ones, ``gamma * (xhat * r + d) + beta`` with ``r`` and ``d``
  clipped to ``r_max_t``/``d_max_t`` and ``stop_gradient``-ed. The limits
  follow a warmup schedule (see :mod:`mabn_jax.functional.batch_renorm`):
  ``(1, 0)``, i.e. plain BN, for training steps ``t <= warmup_steps``, then a
  linear ramp reaching ``(r_max, d_max)`` at ``t = warmup_steps + ramp_steps``.
  With ``r_max=1, d_max=0`` it is :class:`~mabn_jax.BatchNorm` exactly.
  Inference is BN's, with the running statistics.

  Variables (``C`` = number of features):

  * ``params``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in ``param_dtype``.
  * ``batch_stats``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
    (starts at 1), float32 EMAs of the batch mean and biased variance, as in
    ``flax.linen.BatchNorm``; ``step`` ``()`` float32 counter, training steps taken
    (drives the schedule); ``nonfinite_count`` ``()`` float32 counter, the steps
    skipped because their statistics were not finite (the state, step
    included, is then kept).

  The attributes are those of :class:`mabn_jax.BatchNorm`, and:

  Attributes:
    r_max: final clip of ``r`` to ``[1 / r_max, r_max]`` (default 3).
    d_max: final clip of ``d`` to ``[-d_max, d_max]`` (default 5).
    warmup_steps: training steps of plain BN before the limits start to grow.
    ramp_steps: steps of the linear ramp from ``(1, 0)`` to ``(r_max, d_max)``
      (0: jump to the final limits right after warmup).
  """

  r_max: float = 3.0
  d_max: float = 5.0
  warmup_steps: int = 100
  ramp_steps: int = 1000

  method_class = F.Method
