"""Flax linen batch normalization with normalization groups (spec, section 1)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from mabn_jax.functional import batch_norm as F
from mabn_jax.functional.affine import result_dtype
from mabn_jax.layers._common import (
    BatchStatisticsNorm,
    affine,
    affine_params,
    commit_state,
    read_state,
    state_variables,
)


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
    ``params``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in ``param_dtype``.
    ``batch_stats``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
      (starts at 1), float32, the EMA of the batch mean and biased variance;
      ``nonfinite_count`` ``()`` int32, the steps skipped because their
      statistics were not finite (the state is then kept).

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
  """

  def config(self) -> F.BatchNormConfig:
    return self.make_config(F.BatchNormConfig)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None):
    """Normalizes ``x`` of shape ``(N, ..., C)``; returns the same shape."""
    where, use_running_average, axis, features = self.resolve_call(
        x, use_running_average)
    config = self.config()
    config.validate(where)

    stats = state_variables(self, where, dict(
        mean=(jnp.zeros, (features,)), var=(jnp.ones, (features,))))
    state = read_state(stats, F.init_state(features))

    if use_running_average:
      normalized = F.normalize_inference(x, state.mean, state.var, self.epsilon, axis, where)
      return affine(self, x, normalized, axis, features)

    self.sow_input(x, axis, config, where)
    mean, var = F.batch_moments(x, config, where)
    commit_state(self, stats, F.update_state(state, mean, var, self.momentum))
    scale, bias = affine_params(self, features)
    # The affine map is folded into the standardization as Flax does (one
    # full-size residual instead of two; see F.standardize_affine).
    y = F.standardize_affine(x, mean, var, self.epsilon, axis, scale, bias)
    return jnp.asarray(y, result_dtype(x, scale, bias, dtype=self.dtype))
