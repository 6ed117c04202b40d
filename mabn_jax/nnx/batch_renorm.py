"""Flax NNX Batch Renormalization (spec, section 3)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mabn_jax.functional import batch_renorm as F
from mabn_jax.nnx import _common as C
from mabn_jax.nnx.batch_norm import BatchStatisticsNorm


class BatchRenorm(BatchStatisticsNorm):
  """Batch Renormalization (Ioffe, 2017) with ``nnx.BatchNorm``'s signature.

  The NNX twin of :class:`mabn_jax.BatchRenorm` (both call
  :mod:`mabn_jax.functional.batch_renorm`): training normalizes each group
  with its batch statistics and corrects toward the running ones,
  ``xhat * r + d`` with ``r``/``d`` clipped to limits that ramp from
  ``(1, 0)`` after ``warmup_steps`` over ``ramp_steps`` to
  ``(r_max, d_max)``. Inference is BN's.

  State (``C = num_features``):
    ``nnx.Param``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` in ``param_dtype``.
    ``nnx.BatchStat``: ``mean`` ``(C,)`` and ``var`` ``(C,)`` float32,
      ``step`` ``()`` int32 (training steps taken, drives the schedule) and
      ``nonfinite_count`` ``()`` int32.

  Args:
    num_features, use_running_average, axis, momentum, epsilon, dtype,
    param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name,
    axis_index_groups, norm_batch_size, rngs: as :class:`~mabn_jax.nnx.BatchNorm`.
    r_max: final clip of ``r`` to ``[1 / r_max, r_max]`` (default 3).
    d_max: final clip of ``d`` to ``[-d_max, d_max]`` (default 5).
    warmup_steps: training steps of plain BN before the limits grow.
    ramp_steps: steps of the linear ramp to the final limits.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: Optional[bool] = False,
      axis: int = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Optional[Any] = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Any = initializers.zeros_init(),
      scale_init: Any = initializers.ones_init(),
      axis_name: Optional[str] = None,
      axis_index_groups: Any = None,
      norm_batch_size: Optional[int] = None,
      r_max: float = 3.0,
      d_max: float = 5.0,
      warmup_steps: int = 100,
      ramp_steps: int = 1000,
      rngs: nnx.Rngs,
  ):
    config = F.BatchRenormConfig(
        axis=axis, momentum=momentum, epsilon=epsilon, norm_batch_size=norm_batch_size,
        axis_name=axis_name, axis_index_groups=C.hashable_groups(axis_index_groups),
        r_max=r_max, d_max=d_max, warmup_steps=warmup_steps, ramp_steps=ramp_steps)
    super().__init__(
        num_features, config, use_running_average=use_running_average, axis=axis,
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
        use_scale=use_scale, bias_init=bias_init, scale_init=scale_init, rngs=rngs)

  def initial_state(self):
    return F.init_state(self.num_features)

  def normalize_train(self, x: jax.Array, state, where: str):
    return F.normalize_train(x, state, self.config, where)
