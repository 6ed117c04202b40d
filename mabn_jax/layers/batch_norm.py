"""Flax linen batch normalization with normalization groups.

The math: ``docs/normalization.md``, section 1.
"""

from __future__ import annotations

from mabn_jax.functional import batch_norm as F
from mabn_jax.layers.base import BatchStatisticsNorm


class BatchNorm(BatchStatisticsNorm):
  """Batch normalization, ``flax.linen.BatchNorm`` plus ``norm_batch_size``.

  With ``norm_batch_size=None`` it equals ``flax.linen.BatchNorm`` (outputs,
  gradients and the ``mean``/``var`` statistics, to float32 rounding), with or
  without ``axis_name``; with ``axis_name`` under ``pmap``/``shard_map`` it is
  SyncBN. With ``norm_batch_size=b`` each group of ``b`` consecutive samples
  (per device, or across devices with ``axis_name``) is normalized with its
  own statistics, and the running statistics are updated once per step from
  the mean over groups.

  Variables (``C`` = number of features):

  * ``params``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in ``param_dtype``.
  * ``batch_stats``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
    (starts at 1), float32, the EMA of the batch mean and biased variance
    (``flax.linen.BatchNorm``'s variables); with ``count_nonfinite=True``
    also ``nonfinite_count`` ``()`` float32, the steps skipped because their
    statistics were not finite (the state is kept either way).

  Attributes:
    use_running_average: if True, normalize with the stored statistics
      (inference: an affine map that touches no state).
    axis: the feature axis.
    momentum: decay of the moving averages (Flax convention).
    epsilon: added to the variance inside the square root.
    dtype: result dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: as ``flax.linen.BatchNorm``.
    axis_name: mapped axis over which the statistics are averaged (SyncBN).
    axis_index_groups: device groups for that average.
    norm_batch_size: samples normalized together; ``None`` is the whole
      per-device batch (or the whole mapped batch with ``axis_name``). The
      batch must be a multiple of it.
    use_fast_variance, force_float32_reductions: as ``flax.linen.BatchNorm``;
      ``__call__`` takes its ``mask=`` too, complex inputs, rank-1 inputs and
      a tuple ``axis``.
    count_nonfinite: keep ``nonfinite_count`` (default False).
  """

  count_nonfinite: bool = False

  method_class = F.Method
