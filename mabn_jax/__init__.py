"""mabn_jax: batch normalization that works at normalization batches of 1, 2, 4.

Flax linen layers (``MABN``, ``CenteredConv``, ``CenteredDense``, ...), the
training contract (``value_and_grad``), their Flax NNX twins in
``mabn_jax.nnx`` and the pure math in ``mabn_jax.functional``.
"""

from mabn_jax import functional, nnx, recording
from mabn_jax.conversion import convert_batch_norm, migrate_variables
from mabn_jax.fold import fold, precompute_standardized_kernels
from mabn_jax.layers import (
  MABN,
  BatchNorm,
  BatchRenorm,
  CenteredConv,
  CenteredDense,
  CrossIterationConvNorm,
  FilterResponseNorm,
  FrozenBatchNorm,
  StandardizedConv,
)
from mabn_jax.loops import (
  accumulate_value_and_grad,
  check_finite,
  dynamic_scale_value_and_grad,
  nonfinite_counts,
)
from mabn_jax.precise_bn import recompute_batch_stats
from mabn_jax.registry import Normalizer, make_normalizer, normalizer_names
from mabn_jax.substitution import substitute
from mabn_jax.training import (
  BACKWARD_STATS,
  G_TAP,
  PSI_TAP,
  TAP_TARGETS,
  feed_backward_statistics,
  value_and_grad,
)
from mabn_jax.zero_mean import check_zero_mean_inputs

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
  "FilterResponseNorm",
  "FrozenBatchNorm",
  "MABN",
  "Normalizer",
  "StandardizedConv",
  "accumulate_value_and_grad",
  "check_finite",
  "check_zero_mean_inputs",
  "convert_batch_norm",
  "dynamic_scale_value_and_grad",
  "feed_backward_statistics",
  "fold",
  "functional",
  "make_normalizer",
  "migrate_variables",
  "nnx",
  "nonfinite_counts",
  "precompute_standardized_kernels",
  "recompute_batch_stats",
  "recording",
  "normalizer_names",
  "substitute",
  "value_and_grad",
]
