"""Flax NNX Moving Average Batch Normalization (spec, section 2)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mabn_jax.functional import mabn as F
from mabn_jax.functional.affine import result_dtype
from mabn_jax.functional import statistics as st
from mabn_jax.nnx import _common as C
from mabn_jax.nnx.variables import BackwardStat
from mabn_jax.training import PSI_TAP, claim_tap, inference_guard


class MABN(nnx.Module):
  """Moving Average Batch Normalization (Yan et al., ICLR 2020), for Flax NNX.

  The NNX twin of :class:`mabn_jax.MABN` (same math: both call
  :mod:`mabn_jax.functional.mabn`), with ``nnx.BatchNorm``'s signature. Put
  it after a :class:`~mabn_jax.nnx.CenteredConv` (or
  :class:`~mabn_jax.nnx.CenteredDense`); it does not subtract a mean. Train
  with :func:`mabn_jax.nnx.value_and_grad`, which feeds the backward
  statistic into ``psi_buffer``; plain ``nnx.grad`` through a training-mode
  layer raises an error saying so. Call each layer once per training step
  (a second training call in one step raises).

  State (``C = num_features``, ``m = buffer_size``):
    ``nnx.Param``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in
      ``param_dtype`` (``None`` when ``use_scale``/``use_bias`` is False).
    ``nnx.BatchStat``: ``chi_ema`` ``(C,)`` (starts at 1), ``chi_buffer``
      ``(m, C)``, ``psi_buffer`` ``(m, C)`` (float32, newest row last),
      ``step`` ``()`` int32 and ``nonfinite_count`` ``()`` int32 (steps
      skipped because their statistics were not finite; the state is kept).
    :class:`~mabn_jax.nnx.BackwardStat`: ``psi_increment`` ``(m, C)``
      float32 zeros, the tap whose cotangent is the step's ``psi_buffer``
      increment.

  Args:
    num_features: ``C``, the size of the feature axis.
    use_running_average: if True, normalize with ``chi_ema`` (inference: an
      affine map that touches no state); ``model.train()``/``model.eval()``
      set it.
    axis: the feature axis.
    momentum: decay of the ``chi_ema`` moving average (alpha = 0.98).
    epsilon: added to the second moment inside the square root.
    dtype: result dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: as ``nnx.BatchNorm``.
    axis_name: mapped axis over which ``chi`` and ``Psi`` are averaged.
    axis_index_groups: device groups for that average.
    buffer_size: ``m``, the number of normalization groups in each SMA;
      with ``G`` groups a step it spans ``m / G`` steps (at ``G = 16``
      the default is one step; 64 groups, 4 steps, did better at
      normalization batch 2 on CIFAR-10, and 64 steps at ``G = 1``
      diverged: ``experiments/results/mabn_validation_cifar_cpu``).
    warmup_steps: batch statistics are used while ``t < warmup_steps``.
    renorm_start: ``r = 1`` until step ``max(renorm_start, warmup_steps)``.
    r_max: renormalization clip.
    average_forward, average_backward, moving_average: ablations (see
      :class:`mabn_jax.functional.mabn.MABNConfig`).
    norm_batch_size: samples normalized together; ``None`` is the whole
      per-device batch, which must be a multiple of it.
    rngs: ``nnx.Rngs`` for the parameter initializers.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: Optional[bool] = False,
      axis: int = -1,
      momentum: float = 0.98,
      epsilon: float = 1e-5,
      dtype: Optional[Any] = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Any = initializers.zeros_init(),
      scale_init: Any = initializers.ones_init(),
      axis_name: Optional[str] = None,
      axis_index_groups: Any = None,
      buffer_size: int = 16,
      warmup_steps: int = 100,
      renorm_start: int = 1000,
      r_max: float = 5.0,
      average_forward: bool = True,
      average_backward: bool = True,
      moving_average: str = "sma",
      norm_batch_size: Optional[int] = None,
      rngs: nnx.Rngs,
  ):
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.buffer_size = buffer_size
    self.config = F.MABNConfig(
        axis=axis, momentum=momentum, epsilon=epsilon, warmup_steps=warmup_steps,
        renorm_start=renorm_start, r_max=r_max, norm_batch_size=norm_batch_size,
        axis_name=axis_name, axis_index_groups=C.hashable_groups(axis_index_groups),
        average_forward=average_forward, average_backward=average_backward,
        moving_average=moving_average)
    self.config.validate(buffer_size, C.describe(self, num_features))
    C.make_affine(self, num_features, use_scale=use_scale, use_bias=use_bias,
                  scale_init=scale_init, bias_init=bias_init,
                  param_dtype=param_dtype, rngs=rngs)
    initial = F.init_state(num_features, buffer_size)
    C.make_state(self, initial)
    setattr(self, PSI_TAP, BackwardStat(jnp.zeros_like(initial.psi_buffer)))

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C)`` (any float dtype); returns its shape.

    Training (``use_running_average`` False) advances ``chi_ema``,
    ``chi_buffer`` and ``step``; ``psi_buffer`` is advanced by
    :func:`mabn_jax.nnx.value_and_grad` from the tap's cotangent.
    """
    where = C.describe(self, self.num_features)
    use_running_average = C.resolve_mode(where, self.use_running_average, use_running_average)
    axis = st.canonical_axis(self.axis, x.ndim, where)
    C.check_features(where, self.num_features, x, axis)
    state = C.read_state(self, F.init_state(self.num_features, self.buffer_size), where)
    tap = getattr(self, PSI_TAP).get_value()
    C.check_state_shape(where, PSI_TAP, tap, state.psi_buffer.shape)

    if use_running_average:
      normalized = F.normalize_inference(x, state.chi_ema, self.epsilon, axis)
      return C.affine(self, x, inference_guard(normalized, tap, where), axis)

    C.require_bound_axis(where, self.config.axis_name)
    claim_tap(tap, where)
    scale, bias = C.affine_params(self)
    # The affine map is part of MABN's custom VJP, as in the linen layer.
    y, new_state = F.normalize_train(x, state, tap, self.config, where, scale, bias)
    # psi_buffer comes back unchanged: its new value is this step's tap
    # cotangent, which mabn_jax.nnx.value_and_grad adds.
    C.commit_state(self, new_state, checked=F.newest_entries(new_state))
    return jnp.asarray(y, result_dtype(x, scale, bias, dtype=self.dtype))
