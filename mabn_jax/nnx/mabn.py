"""Flax NNX Moving Average Batch Normalization (``docs/normalization.md``, section 2)."""

from __future__ import annotations

from mabn_jax.functional import mabn as F
from mabn_jax.nnx.base import BatchStatisticsNorm


class MABN(BatchStatisticsNorm):
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

  * ``nnx.Param``: ``scale`` ``(C,)`` and ``bias`` ``(C,)`` in
    ``param_dtype`` (``None`` when ``use_scale``/``use_bias`` is False).
  * ``nnx.BatchStat``: ``chi_ema`` ``(C,)`` (starts at 1), ``chi_buffer``
    ``(m, C)``, ``psi_buffer`` ``(m, C)`` (float32, newest row last),
    ``step`` and ``nonfinite_count`` ``()`` float32 counters (steps
    skipped because their statistics were not finite; the state is kept).
  * :class:`~mabn_jax.nnx.BackwardStat`: ``psi_increment`` ``(m, C)``
    float32 zeros, the tap whose cotangent is the step's ``psi_buffer``
    increment.

  Args:
    num_features: ``C``, the size of the feature axis.
    use_running_average: if True, normalize with ``chi_ema`` (inference: an
      affine map that touches no state); ``model.train()``/``model.eval()``
      set it.
    rngs: ``nnx.Rngs`` for the parameter initializers.

  The other keywords are the fields of the linen :class:`mabn_jax.MABN`, with
  the same meanings and defaults (``inspect.signature`` lists them).
  """

  method_class = F.Method
