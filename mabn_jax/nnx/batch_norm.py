"""Flax NNX batch normalization with normalization groups (spec, section 1)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mabn_jax.functional import batch_norm as F
from mabn_jax.functional import statistics as st
from mabn_jax.functional.affine import result_dtype
from mabn_jax.nnx import _common as C


class BatchStatisticsNorm(nnx.Module):
  """What the BN-type NNX modules share: affine params, ``nnx.BatchStat``
  state of the functional state's fields, and the call (inference with the
  running statistics, or a training step of :meth:`normalize_train`).
  Subclasses set the functional ``config`` and the two hooks."""

  def __init__(self, num_features: int, config, *, use_running_average, axis,
               epsilon, dtype, param_dtype, use_bias, use_scale, bias_init,
               scale_init, rngs: nnx.Rngs):
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.config = config
    config.validate(C.describe(self, num_features))
    C.make_affine(self, num_features, use_scale=use_scale, use_bias=use_bias,
                  scale_init=scale_init, bias_init=bias_init,
                  param_dtype=param_dtype, rngs=rngs)
    C.make_state(self, self.initial_state())

  def initial_state(self):
    """The functional state a new layer starts from."""
    raise NotImplementedError

  def normalize_train(self, x: jax.Array, state, where: str):
    """``(normalized, new_state)`` of one training step."""
    raise NotImplementedError

  def train_output(self, x: jax.Array, state, where: str, axis: int):
    """``(output, new_state)`` of one training step, the affine map applied."""
    normalized, new_state = self.normalize_train(x, state, where)
    return C.affine(self, x, normalized, axis), new_state

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C)`` (any float dtype); returns its shape."""
    where = C.describe(self, self.num_features)
    use_running_average = C.resolve_mode(where, self.use_running_average, use_running_average)
    axis = st.canonical_axis(self.axis, x.ndim, where)
    C.check_features(where, self.num_features, x, axis)
    state = C.read_state(self, self.initial_state(), where)
    if use_running_average:
      normalized = F.normalize_inference(x, state.mean, state.var, self.epsilon, axis, where)
      return C.affine(self, x, normalized, axis)
    C.require_bound_axis(where, self.config.axis_name)
    y, new_state = self.train_output(x, state, where, axis)
    C.commit_state(self, new_state)
    return y


class BatchNorm(BatchStatisticsNorm):
  """Batch normalization, ``nnx.BatchNorm`` plus ``norm_batch_size``.

  The NNX twin of :class:`mabn_jax.BatchNorm` (both call
  :mod:`mabn_jax.functional.batch_norm`): with ``norm_batch_size=None`` it
  equals ``nnx.BatchNorm``; with ``norm_batch_size=b`` each group of ``b``
  consecutive samples is normalized with its own statistics and the running
  statistics are updated once per step from the mean over groups.

  State (``C = num_features``):
    ``nnx.Param``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` in ``param_dtype``
      (``None`` when disabled).
    ``nnx.BatchStat``: ``mean`` ``(C,)`` (starts at 0) and ``var`` ``(C,)``
      (starts at 1), float32; ``nonfinite_count`` ``()`` int32 (steps
      skipped because their statistics were not finite).

  Args:
    num_features: ``C``.
    use_running_average: if True, normalize with the stored statistics
      (``model.train()``/``model.eval()`` set it).
    axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
    bias_init, scale_init, axis_name, axis_index_groups: as ``nnx.BatchNorm``.
    norm_batch_size: samples normalized together (``None``: the whole batch).
    rngs: ``nnx.Rngs`` for the parameter initializers.
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
      rngs: nnx.Rngs,
  ):
    config = F.BatchNormConfig(
        axis=axis, momentum=momentum, epsilon=epsilon, norm_batch_size=norm_batch_size,
        axis_name=axis_name, axis_index_groups=C.hashable_groups(axis_index_groups))
    super().__init__(
        num_features, config, use_running_average=use_running_average, axis=axis,
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
        use_scale=use_scale, bias_init=bias_init, scale_init=scale_init, rngs=rngs)

  def initial_state(self):
    return F.init_state(self.num_features)

  def normalize_train(self, x: jax.Array, state, where: str):
    mean, var = F.batch_moments(x, self.config, where)
    normalized = F.standardize(x, mean, var, self.epsilon, st.canonical_axis(self.axis, x.ndim))
    return normalized, F.update_state(state, mean, var, self.config.momentum)

  def train_output(self, x: jax.Array, state, where: str, axis: int):
    # The affine map folded into the standardization, as the linen layer and
    # Flax do (F.standardize_affine).
    mean, var = F.batch_moments(x, self.config, where)
    scale, bias = C.affine_params(self)
    y = F.standardize_affine(x, mean, var, self.epsilon, axis, scale, bias)
    return (jnp.asarray(y, result_dtype(x, scale, bias, dtype=self.dtype)),
            F.update_state(state, mean, var, self.config.momentum))
