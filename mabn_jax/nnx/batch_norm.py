"""Flax NNX batch normalization with normalization groups (``docs/normalization.md``, section 1)."""

from __future__ import annotations

from mabn_jax.functional import batch_norm as F
from mabn_jax.nnx.base import BatchStatisticsNorm


class BatchNorm(BatchStatisticsNorm):
  """Batch normalization, ``nnx.BatchNorm`` plus ``norm_batch_size``.

  The NNX twin of :class:`mabn_jax.BatchNorm` (both call
  :mod:`mabn_jax.functional.batch_norm`): with ``norm_batch_size=None`` it
  equals ``nnx.BatchNorm``; with ``norm_batch_size=b`` each group of ``b``
  consecutive samples is normalized with its own statistics and the running
  statistics are updated once per step from the mean over groups.

  State (``C = num_features``):
    ``nnx.Param``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` in ``param_dtype``
      (``None`` when disabled).
    ``nnx.BatchStat``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
      (starts at 1), float32; ``nonfinite_count`` ``()`` float32 counter (steps
      skipped because their statistics were not finite).

  Args:
    num_features: ``C``.
    use_running_average: if True, normalize with the stored statistics
      (``model.train()``/``model.eval()`` set it).
    axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
    bias_init, scale_init, axis_name, axis_index_groups: as ``nnx.BatchNorm``.
    norm_batch_size: samples normalized together (``None``: the whole batch).
    rngs: ``nnx.Rngs`` for the parameter initializers.
  """

  method_class = F.Method
