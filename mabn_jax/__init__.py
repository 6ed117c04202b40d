"""mabn_jax: batch normalization that works at normalization batches of 1, 2, 4.

Flax linen layers (``MABN``, ``CenteredConv``, ``CenteredDense``, ...), the
training contract (``value_and_grad``), their Flax NNX twins in
``mabn_jax.nnx`` and the pure math in ``mabn_jax.functional``.
"""

from mabn_jax import functional, nnx, recording
from mabn_jax.conversion import convert_batch_norm, migrate_variables
from mabn_jax.fold import fold
from mabn_jax.layers import (
  MABN,
  BatchNorm,
  BatchRenorm,
  CenteredConv,
  CenteredDense,
  CrossIterationConvNorm,
  FrozenBatchNorm,
)
from mabn_jax.loops import (
  accumulate_value_and_grad,
  check_finite,
  dynamic_scale_value_and_grad,
  nonfinite_counts,
)
from mabn_jax.precise_bn import recompute_batch_stats
from mabn_jax.registry import Normalizer, make_normalizer, normalizer_names
from mabn_jax.training import (
  BACKWARD_STATS,
  G_TAP,
  PSI_TAP,
  TAP_TARGETS,
  feed_backward_statistics,
  value_and_grad,
)

__version__ = "0.1.0"

__all__ = [
  "BACKWARD_STATS",
  "G_TAP",
  "PSI_TAP",
  "TAP_TARGETS",
  "BatchNorm",
  "BatchRenorm",
  "CenteredConv",
  "CenteredDense",
  "CrossIterationConvNorm",
  "FrozenBatchNorm",
  "MABN",
  "Normalizer",
  "accumulate_value_and_grad",
  "check_finite",
  "convert_batch_norm",
  "dynamic_scale_value_and_grad",
  "feed_backward_statistics",
  "fold",
  "functional",
  "make_normalizer",
  "migrate_variables",
  "nnx",
  "nonfinite_counts",
  "recompute_batch_stats",
  "recording",
  "normalizer_names",
  "value_and_grad",
]
