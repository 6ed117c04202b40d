"""Pure normalization math, no Flax: usable from Haiku, Equinox, NNX or plain JAX.

Modules:
  affine: the affine map ``gamma * normalized + beta`` after normalization.
  batch_norm: batch normalization with normalization groups (Flax-exact).
  batch_renorm: Batch Renormalization with a warmup schedule of its limits.
  statistics: per-channel group moments and moving-average buffers.
  centering: weight centralization of kernels.
  standardization: weight standardization of kernels (before GroupNorm).
  filter_response: filter response normalization with a thresholded linear unit.
  counters: the state's integer counters, stored as float32.
  backward_stats: the backward statistics MABN and CBN share.
  cross_iteration: Cross-Iteration BN (Taylor-compensated pooled statistics).
  frozen_batch_norm: BN with its statistics and affine map held fixed.
  interface: the one interface every batch-statistics normalizer implements.
  mabn: Moving Average Batch Normalization and its stabilized custom VJP.
"""

from mabn_jax.functional import (
  affine,
  backward_stats,
  batch_norm,
  batch_renorm,
  centering,
  counters,
  cross_iteration,
  filter_response,
  frozen_batch_norm,
  interface,
  mabn,
  standardization,
  statistics,
)
from mabn_jax.functional.centering import center_kernel

__all__ = [
  "affine",
  "backward_stats",
  "batch_norm",
  "batch_renorm",
  "centering",
  "counters",
  "cross_iteration",
  "filter_response",
  "frozen_batch_norm",
  "interface",
  "mabn",
  "standardization",
  "statistics",
  "center_kernel",
]
