"""Flax NNX Batch Renormalization (``docs/normalization.md``, section 3)."""

from __future__ import annotations

from mabn_jax.functional import batch_renorm as F
from mabn_jax.nnx.base import BatchStatisticsNorm


class BatchRenorm(BatchStatisticsNorm):
  """Batch Renormalization (Ioffe, 2017) with ``nnx.BatchNorm``'s signature.

  The NNX twin of :class:`mabn_jax.BatchRenorm` (both call
  :mod:`mabn_jax.functional.batch_renorm`): training normalizes each group
  with its batch statistics and corrects toward the running ones,
  ``xhat * r + d`` with ``r``/``d`` clipped to limits that ramp from
  ``(1, 0)`` after ``warmup_steps`` over ``ramp_steps`` to
  ``(r_max, d_max)``. Inference is BN's.

  State (``C = num_features``):

  * ``nnx.Param``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` in ``param_dtype``.
  * ``nnx.BatchStat``: ``mean`` ``(C,)`` and ``var`` ``(C,)`` float32,
    ``step`` ``()`` float32 counter (training steps taken, drives the schedule) and
    ``nonfinite_count`` ``()`` float32 counter.

  Args:
    options: ``num_features``, ``use_running_average``, ``axis``,
      ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``,
      ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
      ``axis_index_groups``, ``norm_batch_size``, ``rngs``: as
      :class:`~mabn_jax.nnx.BatchNorm`.
    r_max: final clip of ``r`` to ``[1 / r_max, r_max]`` (default 3).
    d_max: final clip of ``d`` to ``[-d_max, d_max]`` (default 5).
    warmup_steps: training steps of plain BN before the limits grow.
    ramp_steps: steps of the linear ramp to the final limits.
  """

  method_class = F.Method
