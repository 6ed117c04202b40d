"""CBN's state and static configuration.

:class:`CBNState` is the running state a training step reads and returns
(fixed-size shift buffers, newest entry last); :class:`CBNConfig` the static
hyper-parameters; :func:`init_state` the initial state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from mabn_jax.functional import counters
from mabn_jax.functional._checks import check_fields, is_int_at_least
from mabn_jax.functional.cross_iteration.derivatives import KERNEL_DERIVATIVES
from mabn_jax.functional.cross_iteration.gradients import BACKWARDS, GRADIENTS, Gradient


class CBNState(NamedTuple):
  """CBN's running state (all float32; ``count`` and ``step`` hold integers).

  ``K`` below is the kernel's shape without its output axis,
  ``(*kernel_size, cin)``; ``P = window - 1`` is the number of past entries.
  The Taylor term of an entry measured with kernel ``W_old`` is
  ``d . (W - W_old) = d . W - d . W_old``; the buffers keep the derivative
  ``d`` and the per-channel number ``stat - d . W_old`` (the *offset*), so no
  past kernel is stored (a ``(P, C)`` offset instead of a ``(P, *K, C)``
  kernel). The naive variant keeps no derivatives: its ``dmu_buffer``,
  ``dnu_buffer``, ``mu_offset`` and ``nu_offset`` have ``0`` rows. Only
  ``backward='averaged'`` keeps backward statistics: otherwise ``g_buffer``
  and ``psi_buffer`` have ``0`` rows.

  Attributes:
    mean: ``(C,)`` EMA of the current batch mean of the conv output
      (conv bias included), for inference; starts at 0 (with
      ``running_stats='pooled'``: of the pooled mean ``mu_bar``).
    var: ``(C,)`` EMA of the current batch's biased variance (``'pooled'``:
      of ``var_bar``); starts at 1.
    mu_buffer: ``(P, C)`` past entries' ``mu`` (conv bias excluded).
    nu_buffer: ``(P, C)`` past entries' ``nu = mean(y^2)`` (bias excluded).
    dmu_buffer: ``(P, *K)`` past ``d mu / d W`` (the mean input patch).
    dnu_buffer: ``(P, *K, C)`` past ``d nu / d W``.
    mu_offset: ``(P, C)`` past ``mu - d mu . W_old``.
    nu_offset: ``(P, C)`` past ``nu - d nu . W_old``.
    count: ``()`` float32 holding an integer
      (:mod:`~mabn_jax.functional.counters`), number of valid past entries (the newest ``count``
      rows of the buffers), at most ``P``.
    step: ``()`` float32 holding an integer, training steps taken (the next
      one is ``step + 1``).
    g_buffer: ``(P, C)`` past entries' backward statistic ``g_B = mean(g)``
      (``g`` the gradient at ``xhat``), written through the tap.
    psi_buffer: ``(P, C)`` past entries' ``Psi_B = mean(g * xhat)``, written
      through the tap.

  With ``group_history`` every buffer has a group axis after its entry axis.
  """

  mean: jax.Array
  var: jax.Array
  mu_buffer: jax.Array
  nu_buffer: jax.Array
  dmu_buffer: jax.Array
  dnu_buffer: jax.Array
  mu_offset: jax.Array
  nu_offset: jax.Array
  # A field named like tuple.count: the state's layout (and checkpoints') keeps it.
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  step: jax.Array
  g_buffer: jax.Array
  psi_buffer: jax.Array


@dataclasses.dataclass(frozen=True)
class CBNConfig:
  """Static CBN hyper-parameters (hashable; safe as a jit static argument).

  Attributes:
    window: ``k``, iterations pooled including the current one (the
      published "buffer 3" setting is ``k = 4``).
    burn_in: steps ``t <= burn_in`` are plain BN and buffer nothing.
    naive: pool the buffered statistics without the Taylor term.
    group_history: with ``G`` normalization groups a step, each group pools
      its own past steps (as if each group were a device with its own CBN
      state, the published multi-GPU setting); the buffers get a group axis.
      Otherwise a step's groups are consecutive iterations of one history.
    momentum: Flax EMA convention ``r <- momentum * r + (1 - momentum) * stat``
      (the published CBN's 0.1 on the new value).
    epsilon: added to the variance inside the square root.
    norm_batch_size: samples normalized together (``None``: the whole batch).
    axis_name: mapped axis over which the statistics and their derivatives
      are averaged.
    axis_index_groups: device groups for that average.
    backward: the gradient, one of :data:`BACKWARDS` (the
      :class:`~mabn_jax.functional.cross_iteration.gradients.Gradient` of
      that name, :attr:`gradient`): ``'exact'`` (the default: the derivative
      of the forward), ``'published'`` (the authors' layer), ``'batch'`` or
      ``'averaged'`` (``'batch'`` with moving-average backward statistics;
      it also keeps ``g_buffer``/``psi_buffer``, fed through taps). The
      forward and the forward state do not depend on it. Only ``'exact'``
      reads the derivative buffers in the backward pass, so XLA keeps them
      alive until then (``BENCHMARKS.md``, "Tried and dropped").
    running_stats: what the inference statistics ``mean``/``var`` average:
      ``'pooled'`` (the default: the pooled ``mu_bar``/``var_bar`` the step
      normalized with, so inference matches training at small
      normalization batches) or ``'batch'`` (the published layer's: each
      step's current-batch mean and biased variance, averaged over its
      groups).
    derivative_stride: ``s``: the derivatives ``d mu / d W`` and
      ``d nu / d W`` of a new entry are taken over the output positions
      whose every spatial index is a multiple of ``s`` (about ``1 / s^d`` of
      them), which divides the cost of the extra backward-weight
      convolution by about ``s^d``. ``1`` (the default) is the exact
      derivative. The entries' moments are always the full ones; only the
      Taylor step ``d . (W - W_old)`` is estimated on the subset
      (``benchmarks/cbn_derivatives.py`` measures the compensation error).
    derivative_dtype: the dtype ``dmu_buffer``/``dnu_buffer`` are stored in
      (a floating dtype; ``None``, the default: the dtype of the state's
      other buffers, float32 in the layers). A new entry's derivatives are
      computed in float32, rounded to it, and its Taylor offsets taken with
      the rounded values, so that the compensation ``nu + dnu . (W - W_old)``
      is exact at ``W = W_old`` and only the Taylor step carries the
      rounding; the inner products ``dnu . W`` are computed in float32.
      ``bfloat16`` halves the buffers. ``benchmarks/cbn_derivatives.py`` measures the
      compensation error.
    kernel_derivatives: how a new entry's ``d nu / d W`` is computed, one of
      :data:`KERNEL_DERIVATIVES`: ``'auto'`` (the default) from the inputs'
      Gram matrix for pointwise kernels with fewer input than output
      channels (:func:`gram_is_cheaper`) and from the backward-weight
      convolution otherwise; ``'convolution'`` always from the
      backward-weight convolution. Both are the same derivative; they differ
      in cost and rounding.
    rematerialize: whether the training step's backward pass keeps only the
      per-group moments (:data:`SAVED_STATISTICS`) and recomputes the
      activation-sized values from ``y`` (a :func:`jax.checkpoint`, the
      default ``True``); ``False`` keeps what autodiff saves instead (the
      same values, more memory held for the backward pass).
  """

  window: int = 4
  burn_in: int = 100
  naive: bool = False
  group_history: bool = False
  backward: str = "exact"
  running_stats: str = "pooled"
  derivative_stride: int = 1
  derivative_dtype: Any = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  norm_batch_size: Optional[int] = None
  axis_name: Optional[str] = None
  axis_index_groups: Optional[Tuple[Tuple[int, ...], ...]] = None
  kernel_derivatives: str = "auto"
  rematerialize: bool = True

  @property
  def gradient(self) -> Gradient:
    """The :class:`~mabn_jax.functional.cross_iteration.gradients.Gradient`
    named by ``backward``."""
    return GRADIENTS[self.backward]

  def validate(self, where: Optional[str] = "CBN") -> None:
    """Raises ``ValueError`` naming ``where`` for any out-of-range value."""
    check_fields(
      where,
      [
        ("window", self.window, is_int_at_least(self.window, 1), "an integer >= 1"),
        ("burn_in", self.burn_in, is_int_at_least(self.burn_in, 0), "an integer >= 0"),
        ("momentum", self.momentum, 0.0 <= self.momentum < 1.0, "in [0, 1)"),
        ("epsilon", self.epsilon, self.epsilon > 0.0, "> 0"),
        ("backward", self.backward, self.backward in BACKWARDS, f"one of {BACKWARDS}"),
        (
          "running_stats",
          self.running_stats,
          self.running_stats in RUNNING_STATS,
          f"one of {RUNNING_STATS}",
        ),
        (
          "derivative_stride",
          self.derivative_stride,
          is_int_at_least(self.derivative_stride, 1),
          "an integer >= 1",
        ),
        (
          "derivative_dtype",
          self.derivative_dtype,
          self.derivative_dtype is None or _is_floating(self.derivative_dtype),
          "None or a floating dtype (e.g. jnp.bfloat16)",
        ),
        (
          "kernel_derivatives",
          self.kernel_derivatives,
          self.kernel_derivatives in KERNEL_DERIVATIVES,
          f"one of {KERNEL_DERIVATIVES}",
        ),
        (
          "rematerialize",
          self.rematerialize,
          isinstance(self.rematerialize, bool),
          "True or False",
        ),
      ],
    )


def _is_floating(dtype: Any) -> bool:
  try:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
  except TypeError:
    return False


RUNNING_STATS = ("batch", "pooled")
"""What :class:`CBNConfig`'s inference statistics average (``running_stats``)."""


def init_state(
  kernel_shape: Sequence[int],
  window: int = 4,
  dtype=jnp.float32,
  naive: bool = False,
  groups: Optional[int] = None,
  averaged: bool = False,
  derivative_dtype: Any = None,
) -> CBNState:
  """Initial state: ``mean = 0``, ``var = 1``, empty buffers, ``step = 0``.

  Args:
    kernel_shape: ``(*kernel_size, cin, cout)``.
    window: ``k``; the buffers hold ``k - 1`` entries.
    naive: no derivative buffers (they get ``0`` rows).
    groups: for ``group_history``, the ``G`` groups of a step: every buffer
      gets a group axis after its entry axis (``(P, G, ...)``).
    averaged: ``backward='averaged'``: keep ``g_buffer``/``psi_buffer``
      (otherwise they get ``0`` rows).
    derivative_dtype: dtype of ``dmu_buffer``/``dnu_buffer``
      (``CBNConfig.derivative_dtype``; default ``dtype``).
  """
  kernel_shape = tuple(kernel_shape)
  derivative_dtype = dtype if derivative_dtype is None else derivative_dtype
  channels, past = kernel_shape[-1], window - 1
  taylor = 0 if naive else past
  backward = past if averaged else 0
  g = () if groups is None else (groups,)
  return CBNState(
    mean=jnp.zeros((channels,), dtype),
    var=jnp.ones((channels,), dtype),
    mu_buffer=jnp.zeros((past,) + g + (channels,), dtype),
    nu_buffer=jnp.zeros((past,) + g + (channels,), dtype),
    dmu_buffer=jnp.zeros((taylor,) + g + kernel_shape[:-1], derivative_dtype),
    dnu_buffer=jnp.zeros((taylor,) + g + kernel_shape, derivative_dtype),
    mu_offset=jnp.zeros((taylor,) + g + (channels,), dtype),
    nu_offset=jnp.zeros((taylor,) + g + (channels,), dtype),
    count=counters.zero(),
    step=counters.zero(),
    g_buffer=jnp.zeros((backward,) + g + (channels,), dtype),
    psi_buffer=jnp.zeros((backward,) + g + (channels,), dtype),
  )


def state_shapes(
  kernel_shape: Sequence[int],
  window: int,
  naive: bool = False,
  groups: Optional[int] = None,
  averaged: bool = False,
) -> dict:
  """``{field: shape}`` of a :class:`CBNState` (arguments of :func:`init_state`)."""
  initial = init_state(kernel_shape, window, naive=naive, groups=groups, averaged=averaged)
  return {k: v.shape for k, v in initial._asdict().items()}


def newest_entries(state: CBNState, config: CBNConfig, groups: int) -> CBNState:
  """``state`` with every buffer cut to the rows a training step writes.

  A step pushes its newest ``min(G, P)`` groups (with ``group_history``: one
  entry holding every group); the older rows were computed, and checked, by
  earlier steps. The layers test only this for finiteness before committing
  a step (:func:`~mabn_jax.functional.statistics.commit_if_finite`): for a
  state built by committed steps from a finite initial state, the same
  decision as testing the whole state, without a reduction over (and so a
  materialized copy of) every ``(P, *K, C)`` derivative buffer.

  Args:
    state: a :class:`CBNState` returned by :func:`normalize_train`.
    config: its static hyper-parameters.
    groups: ``G``, normalization groups in the step's batch.
  """
  past = config.window - 1
  rows = 1 if config.group_history else min(groups, past)
  buffers = (
    "mu_buffer",
    "nu_buffer",
    "dmu_buffer",
    "dnu_buffer",
    "mu_offset",
    "nu_offset",
    "g_buffer",
    "psi_buffer",
  )
  return state._replace(**{name: getattr(state, name)[past - rows :] for name in buffers})


def in_burn_in(step: jax.Array, burn_in: int) -> jax.Array:
  """True for training steps ``t <= burn_in`` (steps counted from 1)."""
  return step <= burn_in
