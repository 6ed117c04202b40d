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

  * ``nnx.Param``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` in ``param_dtype``
    (``None`` when disabled).
  * ``nnx.BatchStat``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
    (starts at 1), float32 (``param_dtype`` with
    ``force_float32_reductions=False``), as ``nnx.BatchNorm``; with
    ``count_nonfinite=True`` also ``nonfinite_count`` ``()`` float32 (steps
    skipped because their statistics were not finite; a non-finite step
    is skipped either way).

  Args:
    num_features: ``C``.
    use_running_average: if True, normalize with the stored statistics
      (``model.train()``/``model.eval()`` set it).
    options: ``axis``, ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``,
      ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
      ``axis_index_groups``, ``use_fast_variance``, ``promote_dtype``,
      ``bias_metadata``, ``scale_metadata``: as ``nnx.BatchNorm`` (a tuple
      ``axis`` too: ``num_features`` is then the product of its sizes), but
      ``promote_dtype`` defaults to ``None`` (no promotion: the dtype rule of
      the linen :class:`mabn_jax.BatchNorm`, which this module equals bit for
      bit); pass ``flax.nnx.nn.dtypes.promote_dtype`` for ``nnx.BatchNorm``'s.
    force_float32_reductions: as ``flax.linen.BatchNorm``'s.
    norm_batch_size: samples normalized together (``None``: the whole batch).
    count_nonfinite: keep the ``nonfinite_count`` statistic (default False,
      so that the state is ``nnx.BatchNorm``'s, all float).
    rngs: ``nnx.Rngs`` for the parameter initializers.
  """

  method_class = F.Method
  option_defaults = {"count_nonfinite": False}
