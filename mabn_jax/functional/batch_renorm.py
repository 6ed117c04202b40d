"""Batch Renormalization (BRN): the pure math, no Flax.

Spec: ``docs/normalization.md``, section 3 (Ioffe, 2017).

Each normalization group is normalized with its batch statistics and then
corrected toward the running ones::

  sigma = sqrt(var + eps)
  r = stop_gradient(clip(sigma_B / sigma_run, 1 / r_max_t, r_max_t))
  d = stop_gradient(clip((mu_B - mu_run) / sigma_run, -d_max_t, d_max_t))
  out = xhat * r + d

where ``mu_run``/``var_run`` are the running statistics *before* this step's
update. Gradients flow through ``mu_B`` and ``sigma_B`` as in BN. The running
``mean``/``var`` are updated exactly as in :mod:`.batch_norm` (Flax's EMA of
the mean and biased variance, once per step from the mean over groups), so
with ``r_max = 1``, ``d_max = 0`` BRN is BN, bit for bit.

Warmup schedule (``t`` = the step being taken, 1 for the first training step):
the limits are ``(r_max_t, d_max_t) = (1, 0)`` (plain BN) for
``t <= warmup_steps``, then grow linearly, reaching ``(r_max, d_max)`` at
``t = warmup_steps + ramp_steps`` and staying there::

  f = clip((t - warmup_steps) / ramp_steps, 0, 1)   # ramp_steps = 0: a jump
  r_max_t = 1 + (r_max - 1) * f
  d_max_t = d_max * f
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax.functional import batch_norm as bn
from mabn_jax.functional import counters, interface
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import check_fields, is_int_at_least
from mabn_jax.functional.affine import affine_map

normalize_inference = bn.normalize_inference
"""Inference is BN's: ``(x - mean) / sqrt(var + eps)`` with the running statistics."""


class BatchRenormState(NamedTuple):
  """BRN's running state.

  Attributes:
    mean: ``(C,)`` float32 EMA of the batch mean; starts at 0.
    var: ``(C,)`` float32 EMA of the biased batch variance; starts at 1.
    step: ``()`` float32 holding an integer (:mod:`~mabn_jax.functional.counters`),
      training steps taken (the next is ``step + 1``).
  """

  mean: jax.Array
  var: jax.Array
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class BatchRenormConfig(bn.BatchNormConfig):
  """Static BRN hyper-parameters (hashable; safe as a jit static argument).

  The fields of :class:`~mabn_jax.functional.batch_norm.BatchNormConfig`
  (``axis``, ``momentum``, ``epsilon``, ``norm_batch_size``, ``axis_name``,
  ``axis_index_groups``: the batch statistics are BN's) and:

  Attributes:
    r_max: final clip of ``r`` to ``[1 / r_max, r_max]`` (>= 1).
    d_max: final clip of ``d`` to ``[-d_max, d_max]`` (>= 0).
    warmup_steps: steps ``t <= warmup_steps`` use ``(r_max, d_max) = (1, 0)``.
    ramp_steps: length of the linear ramp to the final limits after warmup.
  """

  r_max: float = 3.0
  d_max: float = 5.0
  warmup_steps: int = 100
  ramp_steps: int = 1000

  def validate(self, where: Optional[str] = "BatchRenorm") -> None:
    """Raises ``ValueError`` naming ``where`` for any out-of-range value."""
    super().validate(where)
    check_fields(
      where,
      [
        ("r_max", self.r_max, self.r_max >= 1.0, ">= 1"),
        ("d_max", self.d_max, self.d_max >= 0.0, ">= 0"),
        (
          "warmup_steps",
          self.warmup_steps,
          is_int_at_least(self.warmup_steps, 0),
          "an integer >= 0",
        ),
        ("ramp_steps", self.ramp_steps, is_int_at_least(self.ramp_steps, 0), "an integer >= 0"),
      ],
    )


def init_state(num_features: int, dtype=jnp.float32) -> BatchRenormState:
  """Initial state: ``mean = 0``, ``var = 1`` (``(C,)`` each), ``step = 0``."""
  stats = bn.init_state(num_features, dtype)
  return BatchRenormState(stats.mean, stats.var, counters.zero())


def renorm_limits(step: jax.Array, config: BatchRenormConfig) -> Tuple[jax.Array, jax.Array]:
  """``(r_max_t, d_max_t)`` float32 scalars at step ``t = step`` (1-based).

  See the module docstring for the schedule.
  """
  t = jnp.asarray(step, jnp.float32)
  if config.ramp_steps > 0:
    fraction = jnp.clip((t - config.warmup_steps) / config.ramp_steps, 0.0, 1.0)
  else:
    fraction = jnp.where(t > config.warmup_steps, 1.0, 0.0)
  r_max = 1.0 + (config.r_max - 1.0) * fraction
  d_max = config.d_max * fraction
  return r_max, d_max


def renorm_correction(
  mean: jax.Array,
  var: jax.Array,
  running_mean: jax.Array,
  running_var: jax.Array,
  r_max: jax.Array,
  d_max: jax.Array,
  epsilon: float,
) -> Tuple[jax.Array, jax.Array]:
  """``(r, d)``, ``(G, C)`` each, from ``(G, C)`` batch and ``(C,)`` running stats.

  Both are ``stop_gradient``-ed (``docs/normalization.md``, section 3).
  """
  sigma_run = jnp.sqrt(running_var + epsilon)
  r = jnp.clip(jnp.sqrt(var + epsilon) / sigma_run, 1.0 / r_max, r_max)
  d = jnp.clip((mean - running_mean) / sigma_run, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def normalize_train(
  x: jax.Array,
  state: BatchRenormState,
  config: BatchRenormConfig = BatchRenormConfig(),
  where: Optional[str] = "BatchRenorm",
  mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, BatchRenormState]:
  """One BRN training step: ``xhat * r + d`` per group, and the new state.

  Arguments and output as :func:`mabn_jax.functional.batch_norm.normalize_train`
  (a :class:`BatchRenormState` and :class:`BatchRenormConfig`); ``new_state``
  has the running statistics updated and ``step`` advanced by one. ``mask``
  (boolean, broadcastable to ``x``) restricts the batch statistics to its
  True positions.
  """

  config.validate(where)
  axis = st.canonical_axis(config.axis, x.ndim, where)
  bn.check_channels(where, state.mean.shape[0], x, axis)
  mean, var = bn.batch_moments(x, config, where, mask)
  step = counters.read(state.step) + 1
  r_max, d_max = renorm_limits(step, config)
  r, d = renorm_correction(mean, var, state.mean, state.var, r_max, d_max, config.epsilon)
  xhat = bn.standardize(x, mean, var, config.epsilon, axis)
  out = xhat * st.broadcast_groups(r, xhat, axis) + st.broadcast_groups(d, xhat, axis)
  stats = bn.update_state(bn.BatchNormState(state.mean, state.var), mean, var, config.momentum)
  return out, BatchRenormState(stats.mean, stats.var, step)


@dataclasses.dataclass(frozen=True)
class Method(bn.MeanVarMethod):
  """Batch Renormalization (:class:`BatchRenormConfig`); inference is BN's."""

  config: BatchRenormConfig = BatchRenormConfig()
  config_class = BatchRenormConfig
  state_class = BatchRenormState
  signature_fields = ("mean", "var", "step")

  def init(self, num_features, *, kernel_shape=None, groups=None):
    del kernel_shape, groups
    return init_state(num_features)

  def train(self, x, state, *, scale=None, bias=None, tap=None, conv=None, mask=None):
    del tap, conv
    normalized, new_state = normalize_train(x, state, self.config, None, mask)
    axis = self.feature_axis(x.ndim)
    return interface.TrainOutput(affine_map(normalized, scale, bias, axis), new_state)
