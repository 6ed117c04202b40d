"""Batch normalization with normalization groups: the pure math, no Flax.

Spec: ``docs/normalization.md``, section 1 (and section 2,
"Simulated small normalization batch", for the groups).

The batch of ``N`` samples is split into ``G = N / norm_batch_size`` groups of
consecutive samples; each group is normalized with its own mean and biased
variance. The running ``mean``/``var`` are updated once per step, with Flax's
momentum convention (``momentum * running + (1 - momentum) * stat``), from the
mean over groups of the group statistics. With ``norm_batch_size=None`` (one
group) outputs, gradients (plain autodiff) and state equal
``flax.linen.BatchNorm``'s (``use_fast_variance=True``) to float32 rounding,
with or without ``axis_name``.

Usage without Flax::

  state = batch_norm.init_state(num_features=C)
  out, state = batch_norm.normalize_train(x, state, BatchNormConfig(norm_batch_size=2))
  y = gamma * out + beta
  y_eval = gamma * batch_norm.normalize_inference(x, state.mean, state.var) + beta
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional import interface
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import check_fields, layer_error


class BatchNormState(NamedTuple):
  """Running statistics (float32), the ``'batch_stats'`` of ``flax.linen.BatchNorm``.

  Attributes:
    mean: ``(C,)`` EMA of the batch mean; starts at 0.
    var: ``(C,)`` EMA of the biased batch variance; starts at 1.
  """

  mean: jax.Array
  var: jax.Array


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
  """Static BN hyper-parameters (hashable; safe as a jit static argument).

  Attributes:
    axis: feature axis of the input (Flax convention: last).
    momentum: decay of the running averages (Flax convention, default 0.99).
    epsilon: added to the variance inside the square root.
    norm_batch_size: samples normalized together (``None``: the whole batch).
    axis_name: mapped axis over which the group statistics are averaged
      (SyncBN under ``pmap``/``shard_map``).
    axis_index_groups: device groups for that average.
    use_fast_variance: the variance as ``E[|x|^2] - |E[x]|^2`` in one pass
      (Flax's default) instead of ``E[|x - E[x]|^2]``.
    force_float32_reductions: reduce in at least float32 and keep the
      running statistics in float32 (Flax's default); if False, reduce in
      ``dtype`` (or the input's) and keep them in the layer's ``param_dtype``.
    dtype: the layer's result dtype; as in Flax, also the minimum precision
      of the reductions (``None``: the input's dtype).
  """

  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  norm_batch_size: Optional[int] = None
  axis_name: Optional[str] = None
  axis_index_groups: Optional[Tuple[Tuple[int, ...], ...]] = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  dtype: Any = None

  def validate(self, where: Optional[str] = "BatchNorm") -> None:
    """Raises ``ValueError`` naming ``where`` for any out-of-range value."""
    check_fields(
      where,
      [
        ("momentum", self.momentum, 0.0 <= self.momentum <= 1.0, "in [0, 1]"),
        ("epsilon", self.epsilon, self.epsilon >= 0.0, ">= 0"),
      ],
    )


def init_state(num_features: int, dtype=jnp.float32) -> BatchNormState:
  """Initial state as Flax's: ``mean = 0``, ``var = 1``, each ``(C,)``."""
  return BatchNormState(
    mean=jnp.zeros((num_features,), dtype), var=jnp.ones((num_features,), dtype)
  )


def batch_moments(
  x: jax.Array,
  config: BatchNormConfig = BatchNormConfig(),
  where: Optional[str] = "BatchNorm",
  mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Group means and biased variances of ``x`` (``(G, C)`` each, float32+
  unless ``config.force_float32_reductions`` is False), over the True
  positions of ``mask`` (boolean, broadcastable to ``x``) if given.

  Raises:
    ValueError: if ``x``'s batch is not a multiple of ``norm_batch_size`` or
      ``config.axis`` is not a feature axis of ``x``.
  """
  axis = st.canonical_axis(config.axis, x.ndim, where)
  groups = st.num_groups(x.shape[0], config.norm_batch_size, where)
  return st.group_moments(
    x,
    groups,
    axis,
    config.axis_name,
    config.axis_index_groups,
    mask=mask,
    fast_variance=config.use_fast_variance,
    dtype=config.dtype,
    float32=config.force_float32_reductions,
  )


def standardize(
  x: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float, axis: int
) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` with ``(G, C)`` group statistics.

  Returns:
    Array of ``x``'s shape in the statistics' dtype (float32 or wider).
  """
  x = x.astype(mean.dtype)
  return (x - st.broadcast_groups(mean, x, axis)) * st.broadcast_groups(
    lax.rsqrt(var + epsilon), x, axis
  )


def standardize_affine(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  epsilon: float,
  axis: int,
  scale: Optional[jax.Array] = None,
  bias: Optional[jax.Array] = None,
) -> jax.Array:
  """``scale * standardize(x, ...) + bias``, computed as Flax's BatchNorm does.

  ``(x - mean) * (rsqrt(var + eps) * scale) + bias``: the scale is folded
  into the ``(G, C)`` multiplier, so the training step keeps one full-size
  residual (``x - mean``) for the backward pass instead of two (``x - mean``
  and the standardized ``x`` the scale's gradient needs), and the backward
  pass has one elementwise product less.

  Args:
    x, mean, var, epsilon, axis: as :func:`standardize`.
    scale: ``(C,)`` gamma or ``None``.
    bias: ``(C,)`` beta or ``None``.

  Returns:
    Array of ``x``'s shape in the promotion of ``x``'s dtype, the
    statistics' and ``scale``'s and ``bias``'s (cast it to the layer's result
    dtype outside).
  """
  mul = lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale[None, :]
  x = x.astype(jnp.promote_types(x.dtype, mean.dtype))
  y = (x - st.broadcast_groups(mean, x, axis)) * st.broadcast_groups(mul, x, axis)
  if bias is not None:
    y = y + st.broadcast_channels(bias, x, axis)
  return y


def normalize_inference(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  epsilon: float = 1e-5,
  axis: int = -1,
  where: Optional[str] = "BatchNorm",
) -> jax.Array:
  """Inference normalization with the running ``(C,)`` ``mean`` and ``var``.

  An affine map per channel (foldable into the preceding convolution); touches
  no state. Returns ``x``'s shape in the promotion of ``x``'s dtype with the
  statistics' (float32 for float32 statistics and a float input of at most
  32 bits, as Flax's ``x - mean``).
  """
  axis = st.canonical_axis(axis, x.ndim, where)
  dtype = jnp.promote_types(x.dtype, mean.dtype)
  if not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.promote_types(dtype, jnp.float32)
  x = x.astype(dtype)
  return (x - st.broadcast_channels(mean, x, axis)) * st.broadcast_channels(
    lax.rsqrt(var + epsilon), x, axis
  )


def update_state(
  state: BatchNormState, mean: jax.Array, var: jax.Array, momentum: float
) -> BatchNormState:
  """EMA of the running statistics from ``(G, C)`` group statistics.

  One update per step, from the mean over groups (with one group this is
  exactly Flax's update).
  """
  return BatchNormState(
    mean=st.ema(state.mean, jnp.mean(mean, axis=0), momentum),
    var=st.ema(state.var, jnp.mean(var, axis=0), momentum),
  )


def check_channels(where: Optional[str], state_channels: int, x: jax.Array, axis: int) -> None:
  """Raises if the state's channel count differs from ``x``'s feature axis."""
  if state_channels != x.shape[axis]:
    raise layer_error(
      where,
      f"the state holds {state_channels} channels but the input has "
      f"{x.shape[axis]} on axis {axis} (shape {x.shape}).",
    )


def normalize_train(
  x: jax.Array,
  state: BatchNormState,
  config: BatchNormConfig = BatchNormConfig(),
  where: Optional[str] = "BatchNorm",
) -> Tuple[jax.Array, BatchNormState]:
  """One BN training step: ``(x - mu_B) / sqrt(var_B + eps)`` per group.

  Gradients are plain autodiff (the exact derivative of the forward pass).

  Args:
    x: ``(N, ..., C)`` activations (feature axis ``config.axis``), any float
      dtype; ``N`` must be a multiple of ``config.norm_batch_size``.
    state: the current :class:`BatchNormState`.
    config: static hyper-parameters.
    where: name used in error messages (a Flax layer passes its path).

  Returns:
    ``(out, new_state)``: ``out`` has ``x``'s shape and dtype promoted to at
    least float32 (multiply by gamma and add beta outside).
  """
  config.validate(where)
  axis = st.canonical_axis(config.axis, x.ndim, where)
  check_channels(where, state.mean.shape[0], x, axis)
  mean, var = batch_moments(x, config, where)
  out = standardize(x, mean, var, config.epsilon, axis)
  return out, update_state(state, mean, var, config.momentum)


def running_affine(mean, var, epsilon: float):
  """``(s, t)`` of inference with running ``mean``/``var``: ``x * s + t``."""
  s = (var + epsilon) ** -0.5
  return s, -mean * s


@dataclasses.dataclass(frozen=True)
class MeanVarMethod(interface.Method):
  """What the methods whose running state is BN's ``mean``/``var`` share:
  inference, its affine map, precise BN and the state from BN statistics."""

  supports_mask = True

  def infer(self, x, state, *, scale=None, bias=None):
    axis = self.feature_axis(x.ndim)
    # One group with the running statistics, the affine map folded in as
    # flax.linen.BatchNorm does (the same rounding).
    mean, var = state.mean[None], state.var[None]
    return standardize_affine(x, mean, var, self.config.epsilon, axis, scale, bias)

  def inference_affine(self, state):
    return running_affine(state.mean, state.var, self.config.epsilon)

  def from_moments(self, state, mean, second_moment):
    var = second_moment - mean * mean
    var = var * (var > 0)
    return state._replace(mean=mean, var=var)

  def from_batch_norm(self, state, mean, var):
    return state._replace(mean=mean, var=var)


@dataclasses.dataclass(frozen=True)
class Method(MeanVarMethod):
  """Batch normalization with normalization groups (:class:`BatchNormConfig`)."""

  config: BatchNormConfig = BatchNormConfig()
  config_class = BatchNormConfig
  state_class = BatchNormState
  signature_fields = ("mean", "var")

  def init(self, num_features, *, kernel_shape=None, groups=None):
    del kernel_shape, groups
    return init_state(num_features)

  supports_complex = True

  def train(self, x, state, *, scale=None, bias=None, tap=None, conv=None, mask=None):
    del tap, conv
    self.validate()
    axis = self.feature_axis(x.ndim)
    check_channels(None, state.mean.shape[0], x, axis)
    mean, var = batch_moments(x, self.config, None, mask)
    # The affine map folded into the standardization, as Flax does.
    y = standardize_affine(x, mean, var, self.config.epsilon, axis, scale, bias)
    return interface.TrainOutput(y, update_state(state, mean, var, self.config.momentum))
