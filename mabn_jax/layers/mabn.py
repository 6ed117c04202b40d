"""Flax linen wrapper of Moving Average Batch Normalization (spec, section 2)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from mabn_jax.functional import mabn as F
from mabn_jax.functional.affine import result_dtype
from mabn_jax.layers._common import (
    BatchStatisticsNorm,
    affine,
    affine_params,
    check_state_shape,
    commit_state,
    read_state,
    state_variables,
)
from mabn_jax.training import (
    BACKWARD_STATS,
    LEGACY_TAP_NAMES,
    PSI_TAP,
    claim_tap,
    inference_guard,
    legacy_tap_message,
)


class MABN(BatchStatisticsNorm):
  """Moving Average Batch Normalization (Yan et al., ICLR 2020).

  A drop-in replacement for ``flax.linen.BatchNorm`` at small normalization
  batches; put it after a :class:`~mabn_jax.CenteredConv` (or
  :class:`~mabn_jax.CenteredDense`), since it does not subtract a mean.
  Train with :func:`mabn_jax.value_and_grad`, which feeds the backward
  statistic into the state. Call each layer once per training step: a
  second training-mode call of the same layer in one step of
  :func:`mabn_jax.value_and_grad` raises a ``ValueError`` at trace time (see
  :func:`mabn_jax.training.claim_tap`; use one layer instance per call).

  Variables (``C`` = number of features, ``m`` = ``buffer_size``):
    ``params``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in ``param_dtype``.
    ``batch_stats``: ``chi_ema`` ``(C,)``, ``chi_buffer`` ``(m, C)``,
      ``psi_buffer`` ``(m, C)`` (float32, newest row last) and ``step``
      ``()`` int32; ``nonfinite_count`` ``()`` int32, the steps skipped
      because their statistics were not finite (the state is then kept).
    ``backward_stats``: ``psi_increment`` ``(m, C)`` float32 zeros, the tap
      whose cotangent is the step's ``psi_buffer`` increment
      (:data:`mabn_jax.TAP_TARGETS`). Variables saved when the tap was named
      ``psi_buffer`` raise an error; convert them with
      :func:`mabn_jax.migrate_variables`.

  Attributes:
    use_running_average: if True, normalize with ``chi_ema`` (inference: an
      affine map that touches no state).
    axis: the feature axis.
    momentum: decay of the ``chi_ema`` moving average (alpha = 0.98).
    epsilon: added to the second moment inside the square root.
    dtype: result dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: as ``flax.linen.BatchNorm``.
    axis_name: mapped axis over which ``chi`` and ``Psi`` are averaged, so
      every device normalizes with the same statistics (SyncBN-style MABN).
    axis_index_groups: device groups for that average.
    buffer_size: ``m``, the number of normalization groups in each SMA;
      with ``G`` groups a step it spans ``m / G`` steps (at ``G = 16``
      the default is one step; 64 groups, 4 steps, did better at
      normalization batch 2 on CIFAR-10, and 64 steps at ``G = 1``
      diverged: ``experiments/results/mabn_validation_cifar_cpu``).
    warmup_steps: batch statistics are used while ``t < warmup_steps``.
    renorm_start: ``r = 1`` until step ``max(renorm_start, warmup_steps)``.
    r_max: renormalization clip.
    average_forward, average_backward, moving_average: ablations of the
      moving averages (see :class:`mabn_jax.functional.mabn.MABNConfig`);
      the defaults are the published method.
    norm_batch_size: samples normalized together; ``None`` is the whole
      per-device batch. The batch must be a multiple of it.
  """

  momentum: float = 0.98
  buffer_size: int = 16
  warmup_steps: int = 100
  renorm_start: int = 1000
  r_max: float = 5.0
  average_forward: bool = True
  average_backward: bool = True
  moving_average: str = "sma"

  def config(self) -> F.MABNConfig:
    return self.make_config(F.MABNConfig)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None):
    """Normalizes ``x`` of shape ``(N, ..., C)``; returns the same shape."""
    where, use_running_average, axis, features = self.resolve_call(
        x, use_running_average)
    config = self.config()
    config.validate(self.buffer_size, where)
    m = self.buffer_size

    stats = state_variables(self, where, dict(
        chi_ema=(jnp.ones, (features,)),
        chi_buffer=(jnp.zeros, (m, features)),
        psi_buffer=(jnp.zeros, (m, features)),
        step=(jnp.zeros, (), jnp.int32),
    ))
    state = read_state(stats, F.init_state(features, m))

    for old in LEGACY_TAP_NAMES:
      if self.has_variable(BACKWARD_STATS, old):
        raise ValueError(legacy_tap_message(where, f"{BACKWARD_STATS}/{old}"))
    if self.has_variable(BACKWARD_STATS, PSI_TAP) or self.is_mutable_collection(
        BACKWARD_STATS
    ):
      tap = self.variable(
          BACKWARD_STATS, PSI_TAP, jnp.zeros, (m, features), jnp.float32
      ).value
      check_state_shape(where, f"{BACKWARD_STATS}/{PSI_TAP}", tap, (m, features))
    else:
      tap = None  # Forward-only use; differentiating then raises a clear error.

    if use_running_average:
      normalized = F.normalize_inference(x, state.chi_ema, self.epsilon, axis)
      if tap is not None:
        normalized = inference_guard(normalized, tap, where)
      return affine(self, x, normalized, axis, features)

    claim_tap(tap, where)
    self.sow_input(x, axis, config, where)
    scale, bias = affine_params(self, features)
    # The affine map is part of MABN's custom VJP (fewer passes over x).
    y, new_state = F.normalize_train(x, state, tap, config, where, scale, bias)
    # psi_buffer comes back unchanged: its new value is this step's tap
    # cotangent, which mj.value_and_grad adds.
    commit_state(self, stats, new_state, checked=F.newest_entries(new_state))
    return jnp.asarray(y, result_dtype(x, scale, bias, dtype=self.dtype))
