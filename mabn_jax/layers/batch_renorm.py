"""Flax linen Batch Renormalization (spec, section 3)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from mabn_jax.functional import batch_renorm as F
from mabn_jax.layers._common import (
    BatchStatisticsNorm,
    affine,
    commit_state,
    read_state,
    state_variables,
)


class BatchRenorm(BatchStatisticsNorm):
  """Batch Renormalization (Ioffe, 2017) with ``flax.linen.BatchNorm``'s fields.

  Training normalizes each group with its batch statistics and corrects toward
  the running ones, ``gamma * (xhat * r + d) + beta`` with ``r`` and ``d``
  clipped to ``r_max_t``/``d_max_t`` and ``stop_gradient``-ed. The limits
  follow a warmup schedule (see :mod:`mabn_jax.functional.batch_renorm`):
  ``(1, 0)``, i.e. plain BN, for training steps ``t <= warmup_steps``, then a
  linear ramp reaching ``(r_max, d_max)`` at ``t = warmup_steps + ramp_steps``.
  With ``r_max=1, d_max=0`` it is :class:`~mabn_jax.BatchNorm` exactly.
  Inference is BN's, with the running statistics.

  Variables (``C`` = number of features):
    ``params``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in ``param_dtype``.
    ``batch_stats``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
      (starts at 1), float32 EMAs of the batch mean and biased variance, as in
      ``flax.linen.BatchNorm``; ``step`` ``()`` int32, training steps taken
      (drives the schedule); ``nonfinite_count`` ``()`` int32, the steps
      skipped because their statistics were not finite (the state, step
      included, is then kept).

  Attributes:
    use_running_average: if True, normalize with the stored statistics
      (inference: an affine map that touches no state).
    axis: the feature axis.
    momentum: decay of the moving averages (Flax convention).
    epsilon: added to the variances inside the square roots.
    dtype: result dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: as ``flax.linen.BatchNorm``.
    axis_name: mapped axis over which the statistics are averaged.
    axis_index_groups: device groups for that average.
    r_max: final clip of ``r`` to ``[1 / r_max, r_max]`` (default 3).
    d_max: final clip of ``d`` to ``[-d_max, d_max]`` (default 5).
    warmup_steps: training steps of plain BN before the limits start to grow.
    ramp_steps: steps of the linear ramp from ``(1, 0)`` to ``(r_max, d_max)``
      (0: jump to the final limits right after warmup).
    norm_batch_size: samples normalized together; ``None`` is the whole
      per-device batch. The batch must be a multiple of it.
  """

  r_max: float = 3.0
  d_max: float = 5.0
  warmup_steps: int = 100
  ramp_steps: int = 1000

  def config(self) -> F.BatchRenormConfig:
    return self.make_config(F.BatchRenormConfig)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None):
    """Normalizes ``x`` of shape ``(N, ..., C)``; returns the same shape."""
    where, use_running_average, axis, features = self.resolve_call(
        x, use_running_average)
    config = self.config()
    config.validate(where)

    stats = state_variables(self, where, dict(
        mean=(jnp.zeros, (features,)), var=(jnp.ones, (features,)),
        step=(jnp.zeros, (), jnp.int32)))
    state = read_state(stats, F.init_state(features))

    if use_running_average:
      normalized = F.normalize_inference(x, state.mean, state.var, self.epsilon, axis, where)
      return affine(self, x, normalized, axis, features)

    self.sow_input(x, axis, config, where)
    normalized, new_state = F.normalize_train(x, state, config, where)
    commit_state(self, stats, new_state)
    return affine(self, x, normalized, axis, features)
