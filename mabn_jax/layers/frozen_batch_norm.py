"""Flax linen frozen batch normalization."""

from __future__ import annotations

from mabn_jax.functional import frozen_batch_norm as F
from mabn_jax.layers.base import BatchStatisticsNorm


class FrozenBatchNorm(BatchStatisticsNorm):
  """BatchNorm with its statistics and affine map held fixed, in training too.

  Normalizes with the running ``mean``/``var`` in both modes; ``scale`` and
  ``bias`` get no gradient and no statistic changes. Same fields and
  variables as :class:`mabn_jax.BatchNorm`, so its variables are a BN
  checkpoint's (``flax.linen.BatchNorm``'s load as they are).
  """

  count_nonfinite: bool = False

  method_class = F.Method
