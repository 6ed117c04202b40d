"""Flax NNX frozen batch normalization."""

from __future__ import annotations

from mabn_jax.functional import frozen_batch_norm as F
from mabn_jax.nnx.base import BatchStatisticsNorm


class FrozenBatchNorm(BatchStatisticsNorm):
  """The NNX twin of :class:`mabn_jax.FrozenBatchNorm`: ``nnx.BatchNorm``'s
  signature and state, normalizing with the running statistics in training
  too, with ``scale``/``bias`` frozen. It never updates its statistics, so
  it keeps no ``nonfinite_count`` unless ``count_nonfinite=True``."""

  method_class = F.Method
  option_defaults = {"count_nonfinite": False}
