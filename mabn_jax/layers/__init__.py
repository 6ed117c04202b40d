"""Flax linen layers: thin wrappers over :mod:`mabn_jax.functional`."""

from mabn_jax.layers.batch_norm import BatchNorm
from mabn_jax.layers.batch_renorm import BatchRenorm
from mabn_jax.layers.centered import CenteredConv, CenteredDense
from mabn_jax.layers.cross_iteration import CrossIterationConvNorm
from mabn_jax.layers.frozen_batch_norm import FrozenBatchNorm
from mabn_jax.layers.mabn import MABN

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "CenteredConv",
  "CenteredDense",
  "CrossIterationConvNorm",
  "FrozenBatchNorm",
  "MABN",
]
