"""Moving Average Batch Normalization (MABN): the pure math, no Flax.

Spec: ``docs/normalization.md``, section 2 (Yan et al., ICLR 2020).

MABN normalizes by the root of the second moment only (the preceding layer is
weight-centralized, see :mod:`mabn_jax.functional.centering`) and replaces
both the forward statistic ``chi = mean(x^2)`` and the backward statistic
``Psi = mean(xhat * g)`` with simple moving averages over the last ``m``
normalization groups, including the current one. The backward pass is the
*stabilized* gradient of ``docs/normalization.md`` (section 2), implemented
as a :func:`jax.custom_vjp`; it is deliberately not the derivative of the
forward pass.

State (:class:`MABNState`) is explicit. :func:`normalize_train` returns the new
forward state; the backward statistic of the current step is only known in
the backward pass, so it leaves through the cotangent of ``tap``: a
zero-valued ``(m, C)`` array whose cotangent is the increment of
``psi_buffer`` for this step (``push(psi_buffer, Psi_B) - psi_buffer``). The
training loop adds it to the state (:func:`mabn_jax.value_and_grad` does this
for Flax variable trees).

Usage without Flax::

  state = mabn.init_state(num_features=C)
  def loss(x, tap, state):
    y, new_state = mabn.normalize_train(x, state, tap)
    return jnp.sum(y * gy), new_state
  (l, new_state), (gx, dpsi) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(x, jnp.zeros_like(state.psi_buffer), state)
  new_state = new_state._replace(psi_buffer=new_state.psi_buffer + dpsi)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from mabn_jax.functional import counters, interface
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import check_fields, is_int_at_least, layer_error
from mabn_jax.functional.affine import affine_map

# Re-exported: public names of this module before they moved.
from mabn_jax.functional.backward_stats import backward_statistics as backward_statistics
from mabn_jax.functional.backward_stats import (
  check_tap_varies_like_input as check_tap_varies_like_input,
)
from mabn_jax.functional.backward_stats import (
  stabilized_input_gradient as stabilized_input_gradient,
)
from mabn_jax.functional.backward_stats import tap_increment as tap_increment
from mabn_jax.functional.stabilized import _stabilized_bwd as _stabilized_bwd
from mabn_jax.functional.stabilized import _stabilized_fwd as _stabilized_fwd
from mabn_jax.functional.stabilized import _stabilized_normalize as _stabilized_normalize
from mabn_jax.functional.stabilized import moving_averages as moving_averages


class MABNState(NamedTuple):
  """MABN's running state (all float32).

  Attributes:
    chi_ema: ``(C,)`` EMA of the second moment used at inference; starts at 1.
    chi_buffer: ``(m, C)`` last ``m`` group values of ``chi_B``, newest last.
    psi_buffer: ``(m, C)`` last ``m`` group values of ``Psi_B``, newest last.
    step: ``()`` float32 holding an integer (:mod:`~mabn_jax.functional.counters`),
      number of training steps taken (the next is ``step+1``).
  """

  chi_ema: jax.Array
  chi_buffer: jax.Array
  psi_buffer: jax.Array
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class MABNConfig:
  """Static MABN hyper-parameters (hashable; safe as a jit static argument).

  Attributes:
    axis: feature axis of the input (Flax convention: last).
    momentum: ``alpha`` of the ``chi_ema`` update.
    epsilon: added to the second moment inside the square root.
    warmup_steps: batch statistics are used for steps ``t < warmup_steps``.
    renorm_start: ``r = 1`` for steps ``t <= max(renorm_start, warmup_steps)``.
    r_max: ``r`` is clipped to ``[1 / r_max, r_max]`` afterwards.
    norm_batch_size: samples normalized together (``None``: the whole batch).
    axis_name: mapped axis over which ``chi`` and ``Psi`` are averaged.
    axis_index_groups: device groups for that average.
    average_forward: use the moving average of ``chi`` in the forward pass
      once warmup ends (False: the batch ``chi_B``; an ablation).
    average_backward: use the moving average of ``Psi`` in the backward pass
      once warmup ends (False: the batch ``Psi_B``; an ablation).
    moving_average: ``'sma'`` (the spec: mean of the last ``m`` group values)
      or ``'ema'`` (an ablation: exponential average with decay
      ``1 - 2 / (m + 1)``, the EMA whose centre of mass matches an ``m``-SMA,
      seeded with the first value; the buffers then hold the average after
      each group, newest last).
  """

  axis: int = -1
  momentum: float = 0.98
  epsilon: float = 1e-5
  warmup_steps: int = 100
  renorm_start: int = 1000
  r_max: float = 5.0
  norm_batch_size: Optional[int] = None
  axis_name: Optional[str] = None
  axis_index_groups: Optional[Tuple[Tuple[int, ...], ...]] = None
  average_forward: bool = True
  average_backward: bool = True
  moving_average: str = "sma"

  def validate(self, buffer_size: int, where: Optional[str] = "MABN") -> None:
    """Raises ``ValueError`` naming ``where`` for any out-of-range value."""
    check_fields(
      where,
      [
        ("buffer_size", buffer_size, is_int_at_least(buffer_size, 1), "an integer >= 1"),
        ("momentum", self.momentum, 0.0 <= self.momentum < 1.0, "in [0, 1)"),
        ("epsilon", self.epsilon, self.epsilon > 0.0, "> 0"),
        (
          "warmup_steps",
          self.warmup_steps,
          is_int_at_least(self.warmup_steps, 0),
          "an integer >= 0",
        ),
        (
          "renorm_start",
          self.renorm_start,
          is_int_at_least(self.renorm_start, 0),
          "an integer >= 0",
        ),
        ("r_max", self.r_max, self.r_max >= 1.0, ">= 1"),
        (
          "moving_average",
          self.moving_average,
          self.moving_average in ("sma", "ema"),
          "'sma' or 'ema'",
        ),
      ],
    )


def init_state(num_features: int, buffer_size: int = 16, dtype=jnp.float32) -> MABNState:
  """Initial state: ``chi_ema = 1``, empty (zero) buffers, ``step = 0``."""
  return MABNState(
    chi_ema=jnp.ones((num_features,), dtype),
    chi_buffer=jnp.zeros((buffer_size, num_features), dtype),
    psi_buffer=jnp.zeros((buffer_size, num_features), dtype),
    step=counters.zero(),
  )


def newest_entries(state: MABNState) -> MABNState:
  """What a layer tests for finiteness before committing a training step.

  The new ``chi_ema`` alone, with the buffers cut to no rows: every ``chi_B``
  of the step reaches it (through the moving average or directly, and the
  EMA weighs it by ``1 - momentum > 0``; second moments are non-negative, so
  no Inf cancels), and ``psi_buffer`` comes back unchanged (its update is the
  tap's cotangent, which :func:`mabn_jax.training.add_increment` checks).
  The older buffer rows were computed, and checked, by earlier steps. For a
  state built by committed steps from a finite initial state this is the
  same decision as testing the whole state
  (:func:`~mabn_jax.functional.statistics.commit_if_finite`), in one
  reduction over ``C`` values instead of one per buffer.

  Args:
    state: a :class:`MABNState` returned by :func:`normalize_train`.
  """
  return state._replace(chi_buffer=state.chi_buffer[:0], psi_buffer=state.psi_buffer[:0])


def uses_moving_averages(step: jax.Array, buffer_size: int, warmup_steps: int):
  """True from step ``max(m + 1, warmup)`` on: both passes use the SMAs."""
  return (step > buffer_size) & (step >= warmup_steps)


def renormalizes(step: jax.Array, renorm_start: int, warmup_steps: int):
  """True for steps ``t > max(renorm_start, warmup)``: ``r`` is clipped, not 1."""
  return step > max(renorm_start, warmup_steps)


def inference_scale(chi_ema: jax.Array, epsilon: float) -> jax.Array:
  """``(C,)`` factor of the inference map ``y = x * scale`` (before gamma, beta)."""
  return jax.lax.rsqrt(chi_ema + epsilon)


def normalize_inference(
  x: jax.Array, chi_ema: jax.Array, epsilon: float = 1e-5, axis: int = -1
) -> jax.Array:
  """Inference normalization ``x / sqrt(chi_ema + eps)``; touches no state.

  Args:
    x: ``(N, ..., C)`` (feature axis ``axis``), any float dtype.
    chi_ema: ``(C,)`` float32 running second moment.

  Returns:
    Array of ``x``'s shape in ``x``'s dtype promoted to at least float32.
  """
  axis = st.canonical_axis(axis, x.ndim)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  scale = st.broadcast_channels(inference_scale(chi_ema, epsilon), x, axis)
  return x.astype(dtype) * scale


def normalize_train(
  x: jax.Array,
  state: MABNState,
  tap: Optional[jax.Array] = None,
  config: MABNConfig = MABNConfig(),
  where: Optional[str] = "MABN",
  scale: Optional[jax.Array] = None,
  bias: Optional[jax.Array] = None,
) -> Tuple[jax.Array, MABNState]:
  """One MABN training step: ``r * x / sqrt(chi + eps)`` and the new state.

  Args:
    x: ``(N, ..., C)`` activations (feature axis ``config.axis``), any float
      dtype; ``N`` must be a multiple of ``config.norm_batch_size``.
    state: the current :class:`MABNState`.
    tap: zero ``(m, C)`` array; its cotangent is this step's ``psi_buffer``
      increment. ``None`` is allowed only when no gradient is taken.
    config: static hyper-parameters.
    where: name used in error messages (a Flax layer passes its path).
    scale: optional ``(C,)`` gamma; ``out`` is then multiplied by it.
    bias: optional ``(C,)`` beta; ``out`` then has it added. With ``scale``
      and ``bias`` the affine map is part of the custom VJP (the same values
      and gradients as applying it outside, in fewer passes over ``x``: the
      backward pass recomputes everything from ``x`` and the cotangent, with
      one fused reduction and one elementwise pass).

  Returns:
    ``(out, new_state)``: ``out`` has ``x``'s shape and dtype promoted to at
    least float32 (and to ``scale``'s and ``bias``'s dtypes; without them
    multiply by gamma and add beta outside); ``new_state`` has
    ``chi_ema``, ``chi_buffer`` and ``step`` advanced and ``psi_buffer``
    unchanged (the tap's cotangent carries its update).
  """
  buffer_size = state.chi_buffer.shape[0]
  config.validate(buffer_size, where)
  axis = st.canonical_axis(config.axis, x.ndim, where)
  groups = st.num_groups(x.shape[0], config.norm_batch_size, where)
  if state.chi_buffer.shape[1] != x.shape[axis]:
    raise layer_error(
      where,
      f"the state holds {state.chi_buffer.shape[1]} channels but the "
      f"input has {x.shape[axis]} on axis {config.axis} (shape {x.shape}).",
    )
  if tap is None:
    tap = jnp.zeros_like(state.psi_buffer)
  if where is None:
    return _train_step(x, state, tap, scale, bias, config, axis, groups)
  with interface.named_errors(where):
    return _train_step(x, state, tap, scale, bias, config, axis, groups)


# One jit per (shapes, config): a network's layers of equal shapes share one
# trace of the step (and its custom VJP), instead of tracing every layer's
# few dozen jax.numpy calls again; XLA inlines it, so the compiled program is
# the same. Errors found inside it are raised unnamed and named by the caller.
@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _train_step(x, state, tap, scale, bias, config, axis, groups):
  """:func:`normalize_train` after its checks (``axis`` non-negative,
  ``groups`` the number of normalization groups)."""
  buffer_size = state.chi_buffer.shape[0]
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  chi_batch = st.group_mean(
    jnp.square(x32), groups, axis, config.axis_name, config.axis_index_groups
  )  # (G, C)
  step = counters.read(state.step) + 1
  use_sma = uses_moving_averages(step, buffer_size, config.warmup_steps)
  chi_average, chi_buffer = moving_averages(state.chi_buffer, chi_batch, step == 1, config)
  chi = jnp.where(use_sma & config.average_forward, chi_average, chi_batch)
  inv_std = 1.0 / jnp.sqrt(chi + config.epsilon)
  # r = sigma_B / sigma_ema as one square root, so that no intermediate is
  # shared between inv_std and r (XLA then computes each in one kernel).
  r = jnp.clip(
    jnp.sqrt((chi + config.epsilon) / (state.chi_ema + config.epsilon)),
    1.0 / config.r_max,
    config.r_max,
  )
  r = jnp.where(renormalizes(step, config.renorm_start, config.warmup_steps), r, 1.0)

  stat_dtype = inv_std.dtype
  if scale is not None:
    stat_dtype = jnp.promote_types(stat_dtype, scale.dtype)
  if bias is not None:
    stat_dtype = jnp.promote_types(stat_dtype, bias.dtype)
  channels = x.shape[axis]
  out = _stabilized_normalize(
    x,
    tap,
    inv_std,
    inv_std * r,
    state.psi_buffer,
    use_sma & config.average_backward,
    step == 1,
    jnp.ones((channels,), stat_dtype) if scale is None else scale,
    jnp.zeros((channels,), stat_dtype) if bias is None else bias,
    groups,
    axis,
    config,
  )
  new_state = MABNState(
    chi_ema=st.ema(state.chi_ema, jnp.mean(chi, axis=0), config.momentum),
    chi_buffer=chi_buffer,
    psi_buffer=state.psi_buffer,
    step=step,
  )
  return out, new_state


@dataclasses.dataclass(frozen=True)
class Method(interface.Method):
  """MABN (:class:`MABNConfig`) with SMA buffers of ``buffer_size`` rows.

  Its tap ``psi_increment`` (``(m, C)`` float32 zeros) gets this step's
  ``psi_buffer`` increment as its cotangent.
  """

  config: MABNConfig = MABNConfig()
  buffer_size: int = 16
  config_class = MABNConfig
  state_class = MABNState
  signature_fields = ("chi_ema", "chi_buffer", "psi_buffer")
  tap_targets = {"psi_increment": "psi_buffer"}
  records_from_state = True
  subtracts_mean = False

  def validate(self):
    self.config.validate(self.buffer_size, None)

  def init(self, num_features, *, kernel_shape=None, groups=None):
    del kernel_shape, groups
    return init_state(num_features, self.buffer_size)

  def train(self, x, state, *, scale=None, bias=None, tap=None, conv=None):
    del conv
    self.validate()
    y, new_state = normalize_train(
      x, state, None if tap is None else tap["psi_increment"], self.config, None, scale, bias
    )
    return interface.TrainOutput(y, new_state, newest_entries(new_state))

  def infer(self, x, state, *, scale=None, bias=None):
    axis = self.feature_axis(x.ndim)
    normalized = normalize_inference(x, state.chi_ema, self.config.epsilon, axis)
    return affine_map(normalized, scale, bias, axis)

  def inference_affine(self, state):
    s = (state.chi_ema + self.config.epsilon) ** -0.5
    return s, 0.0 * s

  def from_moments(self, state, mean, second_moment):
    del mean
    return state._replace(chi_ema=second_moment)

  def step_statistics(self, old_state, new_state, groups):
    """``chi_batch``, ``chi_used``, ``psi_batch``, ``psi_used``, ``(G, C)`` each:
    row ``j`` is group ``j``'s batch value (the rows the step pushed) and the
    value it used (the batch value in warmup, else the window mean)."""
    size = old_state["chi_buffer"].shape[0]
    use_sma = uses_moving_averages(new_state["step"], size, self.config.warmup_steps)
    out = {}
    for name in ("chi", "psi"):
      rows = new_state[f"{name}_buffer"][-groups:]
      sma = st.window_means(old_state[f"{name}_buffer"], rows)
      out[f"{name}_batch"] = rows
      out[f"{name}_used"] = jnp.where(use_sma, sma, rows)
    return out

  def from_batch_norm(self, state, mean, var):
    """``chi_ema = var + mean^2`` (``E[x^2]``), every ``chi_buffer`` row equal to
    it, ``psi_buffer`` zero (a BN checkpoint has no estimate of ``Psi``)."""
    chi = var + mean * mean
    return state._replace(
      chi_ema=chi,
      chi_buffer=jnp.broadcast_to(jnp.asarray(chi, state.chi_buffer.dtype), state.chi_buffer.shape),
      psi_buffer=jnp.zeros_like(state.psi_buffer),
    )
