"""Cross-Iteration Batch Normalization (CBN): the pure math, no Flax.

Spec: ``shared/spec/normalization.md``, section 4 (Yao et al., CVPR 2021).

CBN normalizes the output ``y = conv(x, W)`` of a convolution with statistics
pooled over the last ``k`` iterations (``k = window``, the current one
included). Each buffered statistic ``mu``, ``nu = mean(y^2)`` was measured
with an older kernel ``W_old``; it is carried to the current kernel ``W`` by a
first-order Taylor expansion::

    mu(W) ~ mu + dmu . (W - W_old)        nu(W) ~ nu + dnu . (W - W_old)

Entries whose compensated values are inconsistent (``nu < mu^2``) are
dropped, the rest are averaged, and ``var = max(nu_bar - mu_bar^2, 0)``.
In the published layer only the current batch's ``mu``, ``nu`` carry
gradient; ``CBNConfig.backward`` offers two gradients that agree with the
forward and one with averaged backward statistics (below).

The derivatives are cheap (spec, section 4): ``d mu_c / d W[..., c]`` is the
mean input patch, the same ``(*kernel_size, cin)`` vector for every output
channel (the Jacobian is zero across channels), and ``d nu / d W`` is the
kernel gradient of the convolution for the cotangent ``2 y / M``. Both are
one backward-weight convolution each (:func:`jax.linear_transpose` of the
convolution in its kernel); nothing differentiates the network twice.

Buffers are fixed-size shift arrays (newest entry last) with a count of valid
entries; the buffer holds ``P = k - 1`` past entries. With a normalization
batch smaller than the device batch (``norm_batch_size``), the ``G`` groups
of a step are treated as consecutive iterations, as in spec section 2
("Simulated small normalization batch"): group ``j`` pools the ``P`` most
recent entries before it (groups of earlier steps, then groups ``0..j-1`` of
this step, which share the current kernel and so need no compensation).
The same-step entries are constants like every buffered entry, so with
``G >= window`` most of a group's window carries no gradient; at
normalization batch 2 this trains far worse than BN on the CIFAR-10 CPU
preset (``experiments/results/cbn_diagnosis_cifar_cpu``). With
``group_history`` each group instead keeps its own history of past steps
(buffers ``(P, G, ...)``), as if each group ran on its own device: the
published setting of one small batch per GPU.

The gradient (``CBNConfig.backward``). The forward is the same for every
choice; they differ in what the backward pass treats as constant:

* ``'published'`` (the authors' layer, spec section 4): only the current
  group's ``mu``, ``nu`` carry gradient, so the gradient through the pooled
  moments is ``1/n`` of BN's for a window of ``n`` entries. The compensated
  forward is nearly invariant to scaling a channel's kernel (every entry is
  carried to the current kernel), but this gradient is not: it has a
  component along the kernel that the loss does not feel.
* ``'exact'``: the derivative of the forward as computed. The Taylor term
  ``d . W`` of every compensated entry is linear in the current kernel, so
  its kernel gradient is the buffered derivative contracted with the pooled
  moments' cotangent (no extra convolution); entries of earlier groups of the
  same step (simulated small batch) carry their gradient to ``x`` and ``W``.
  Buffered offsets (earlier steps' data) stay constants.
* ``'batch'``: BN's backward with the pooled moments, i.e. the pooled
  moments differentiated as if they were the current group's own
  (``mu_bar = mu + stop_gradient(mu_bar - mu)``, same for ``nu``), in the
  spirit of MABN's backward statistics: the current batch's backward
  statistics at full weight instead of their ``1/n`` share.
* ``'averaged'``: ``'batch'``'s backward with its two backward statistics,
  ``g_B = mean(g)`` and ``Psi_B = mean(g * xhat)`` (``g`` the gradient at
  ``xhat``), replaced by their simple averages over the same window the
  forward pools, as MABN does with ``Psi`` (spec section 2 (b))::

      g_x = (g - g_avg - xhat * Psi_avg) / sqrt(var_bar + eps)

  ``g_avg`` (``Psi_avg``) averages this group's ``g_B`` (``Psi_B``) and the
  buffered values of the filled window entries: the entries the forward
  pools, whether or not their compensated moments were consistent (the
  consistency test concerns the Taylor-compensated forward moments; the
  backward statistics are not compensated). With a simulated small batch
  the earlier groups of the step are window entries too (as in the
  forward); with ``group_history`` each group averages its own history. In
  burn-in it is BN's backward. Like MABN's, this backward is not the
  derivative of the forward. It is a :func:`jax.custom_vjp` whose statistics
  of the step leave through two taps (``(g_tap, psi_tap)``, zeros shaped
  like ``g_buffer``/``psi_buffer``): their cotangents are the step's buffer
  increments, which :func:`mabn_jax.value_and_grad` (NNX:
  :func:`mabn_jax.nnx.value_and_grad`) adds to the state. The buffers are
  pushed exactly when and where ``mu_buffer`` is, so entry ``i`` of every
  buffer comes from one iteration.

During burn-in (steps ``t <= burn_in``, counted from 1) the layer is plain BN
with the biased variance and nothing is buffered; afterwards the window grows
from 1 to ``k`` entries.

Usage without Flax (``conv_spec`` describes the convolution, the kernel is
HWIO-like ``(*kernel_size, cin, cout)``)::

  spec = cross_iteration.ConvSpec.make(kernel.ndim - 2, strides=1, padding="SAME")
  state = cross_iteration.init_state(kernel.shape, window=4)
  def loss(kernel, x, state):
    y = cross_iteration.conv(x, kernel, spec)
    xhat, new_state = cross_iteration.normalize_train(y, x, kernel, state, spec)
    return jnp.sum(xhat * gy), new_state

With ``backward='averaged'`` the state is made with ``init_state(...,
averaged=True)`` and the taps are differentiated with the loss; their
cotangents are added to the buffers::

  config = cross_iteration.CBNConfig(backward="averaged")
  state = cross_iteration.init_state(kernel.shape, window=4, averaged=True)
  def loss(kernel, x, taps, state):
    y = cross_iteration.conv(x, kernel, spec)
    xhat, new_state = cross_iteration.normalize_train(
        y, x, kernel, state, spec, config, tap=taps)
    return jnp.sum(xhat * gy), new_state
  taps = (jnp.zeros_like(state.g_buffer), jnp.zeros_like(state.psi_buffer))
  (l, new_state), (gw, (dg, dpsi)) = jax.value_and_grad(
      loss, argnums=(0, 2), has_aux=True)(kernel, x, taps, state)
  new_state = new_state._replace(g_buffer=new_state.g_buffer + dg,
                                 psi_buffer=new_state.psi_buffer + dpsi)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from mabn_jax.functional import mabn as ma
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import (
    UnnamedLayerError, check_fields, is_int_at_least)


class CBNState(NamedTuple):
  """CBN's running state (float32 but ``count`` and ``step``).

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
    count: ``()`` int32, number of valid past entries (the newest ``count``
      rows of the buffers), at most ``P``.
    step: ``()`` int32, training steps taken (the next one is ``step + 1``).
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
  count: jax.Array
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
    backward: the gradient, one of :data:`BACKWARDS` (see the module
      docstring): ``'exact'`` (the default: the derivative of the forward),
      ``'published'`` (the authors' layer), ``'batch'`` or ``'averaged'``
      (``'batch'`` with moving-average backward statistics; it also keeps
      ``g_buffer``/``psi_buffer``, fed through taps). The forward and the
      forward state do not depend on it. The default was chosen on a
      validation split (``experiments/results/cbn_brn_investigation_cifar_cpu``).
      Only ``'exact'`` reads the derivative buffers in the backward pass;
      XLA's CPU backend then keeps a copy of them alive until then (found
      in its buffer assignment): on ResNet-50 ``'batch'`` took 1.22x
      ``flax.linen.BatchNorm``'s step against 1.38x (``BENCHMARKS.md``).
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
      ``bfloat16`` halves the buffers (XLA's total memory of a ResNet-18
      CBN step: 2.02x -> 1.66x flax BN's; the step time drops only where
      the buffers dominate, ResNet-50: 1.53x -> 1.38x; ``BENCHMARKS.md``).
      ``benchmarks/cbn_derivatives.py`` measures the compensation error.
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

  def validate(self, where: str = "CBN") -> None:
    """Raises ``ValueError`` naming ``where`` for any out-of-range value."""
    check_fields(where, [
        ("window", self.window, is_int_at_least(self.window, 1), "an integer >= 1"),
        ("burn_in", self.burn_in, is_int_at_least(self.burn_in, 0), "an integer >= 0"),
        ("momentum", self.momentum, 0.0 <= self.momentum < 1.0, "in [0, 1)"),
        ("epsilon", self.epsilon, self.epsilon > 0.0, "> 0"),
        ("backward", self.backward, self.backward in BACKWARDS, f"one of {BACKWARDS}"),
        ("running_stats", self.running_stats, self.running_stats in RUNNING_STATS,
         f"one of {RUNNING_STATS}"),
        ("derivative_stride", self.derivative_stride,
         is_int_at_least(self.derivative_stride, 1), "an integer >= 1"),
        ("derivative_dtype", self.derivative_dtype,
         self.derivative_dtype is None or _is_floating(self.derivative_dtype),
         "None or a floating dtype (e.g. jnp.bfloat16)"),
    ])


def _is_floating(dtype: Any) -> bool:
  try:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
  except TypeError:
    return False


BACKWARDS = ("published", "exact", "batch", "averaged")
"""The gradients :class:`CBNConfig` offers (``backward``)."""
RUNNING_STATS = ("batch", "pooled")
"""What :class:`CBNConfig`'s inference statistics average (``running_stats``)."""


Padding = Union[str, Tuple[Tuple[int, int], ...]]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A convolution ``y = conv(x, W)`` in Flax's layout (hashable).

  ``x`` is ``(N, *spatial, cin)``, ``W`` is ``(*kernel_size, cin, cout)``,
  ``y`` is ``(N, *spatial_out, cout)``; no bias, no feature groups.

  Attributes:
    strides: one stride per spatial axis.
    padding: ``'SAME'``, ``'VALID'`` or one ``(low, high)`` pair per axis.
    kernel_dilation: one dilation per spatial axis.
  """

  strides: Tuple[int, ...]
  padding: Padding
  kernel_dilation: Tuple[int, ...]

  @classmethod
  def make(
      cls,
      rank: int,
      strides: Union[int, Sequence[int]] = 1,
      padding: Union[str, int, Sequence] = "SAME",
      kernel_dilation: Union[int, Sequence[int]] = 1,
      where: str = "CBN",
  ) -> "ConvSpec":
    """Canonicalizes Flax-style conv arguments for ``rank`` spatial axes.

    Raises:
      ValueError: for padding modes other than ``'SAME'``, ``'VALID'``,
        integers and ``(low, high)`` pairs, or wrong lengths.
    """

    def per_axis(name, value):
      value = (value,) * rank if isinstance(value, int) else tuple(value)
      if len(value) != rank or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(
            f"{where}: {name} must be a positive integer or {rank} of them, "
            f"got {value!r}."
        )
      return value

    if isinstance(padding, str):
      pad = padding.upper()
      if pad not in ("SAME", "VALID"):
        raise ValueError(
            f"{where}: padding must be 'SAME', 'VALID', an integer or {rank} "
            f"(low, high) pairs, got {padding!r} (other modes are not supported)."
        )
    elif isinstance(padding, int):
      pad = ((padding, padding),) * rank
    else:
      pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
      if len(pad) != rank or not all(len(p) == 2 for p in pad):
        raise ValueError(
            f"{where}: padding must be 'SAME', 'VALID', an integer or {rank} "
            f"(low, high) pairs, got {padding!r}."
        )
    return cls(per_axis("strides", strides), pad, per_axis("kernel_dilation", kernel_dilation))


def conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """``conv(x, kernel)`` as ``flax.linen.Conv`` computes it (no bias).

  Args:
    x: ``(N, *spatial, cin)``.
    kernel: ``(*kernel_size, cin, cout)``.
    spec: strides, padding and dilation.

  Returns:
    ``(N, *spatial_out, cout)`` in the promoted dtype of ``x`` and ``kernel``.
  """
  ndim = x.ndim
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  return lax.conv_general_dilated(
      x.astype(dtype),
      kernel.astype(dtype),
      window_strides=spec.strides,
      padding=spec.padding,
      rhs_dilation=spec.kernel_dilation,
      dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, lhs),
  )


def init_state(
    kernel_shape: Sequence[int], window: int = 4, dtype=jnp.float32,
    naive: bool = False, groups: Optional[int] = None, averaged: bool = False,
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
      count=jnp.zeros((), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      g_buffer=jnp.zeros((backward,) + g + (channels,), dtype),
      psi_buffer=jnp.zeros((backward,) + g + (channels,), dtype),
  )


def state_shapes(
    kernel_shape: Sequence[int], window: int, naive: bool = False,
    groups: Optional[int] = None, averaged: bool = False,
) -> dict:
  """``{field: shape}`` of a :class:`CBNState` (arguments of :func:`init_state`)."""
  initial = init_state(kernel_shape, window, naive=naive, groups=groups, averaged=averaged)
  return {k: v.shape for k, v in initial._asdict().items()}


def batch_moments(
    y: jax.Array,
    groups: int,
    axis_name: Optional[str] = None,
    axis_index_groups=None,
) -> Tuple[jax.Array, jax.Array]:
  """Per-group ``mu = mean(y)`` and ``nu = mean(y^2)``, each ``(G, C)``."""
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  y = y.astype(dtype)
  axis = y.ndim - 1
  mu = st.group_mean(y, groups, axis, axis_name, axis_index_groups)
  nu = st.group_mean(jnp.square(y), groups, axis, axis_name, axis_index_groups)
  return mu, nu


def moment_derivatives(
    x: jax.Array,
    y: jax.Array,
    kernel: jax.Array,
    spec: ConvSpec,
    groups: int,
    axis_name: Optional[str] = None,
    axis_index_groups=None,
    stride: int = 1,
) -> Tuple[jax.Array, jax.Array]:
  """Per-group ``d mu / d W`` and ``d nu / d W`` of ``y = conv(x, W)``.

  Both are backward-weight convolutions (spec, section 4): the kernel
  cotangent of ``conv(x_g, .)`` for the output cotangent ``1 / M`` (one
  output channel: ``d mu_c / d W[..., c]`` is the same mean input patch for
  every ``c``) and for ``2 y / M``. ``M`` is the number of elements per
  channel in a group. Where it is cheaper (:func:`gram_is_cheaper`),
  ``d nu / d W`` is the same derivative taken from the inputs' Gram matrix.
  No gradient flows through the results.

  Args:
    x: ``(N, *spatial, cin)`` conv input.
    y: ``(N, *spatial_out, C)``, ``conv(x, kernel)`` without bias.
    kernel: ``(*K, C)`` kernel with ``K = (*kernel_size, cin)``.
    spec: the convolution.
    groups: ``G``, normalization groups in the batch.
    stride: ``s`` (``CBNConfig.derivative_stride``): the derivatives of the
      moments over the output positions whose spatial indices are all
      multiples of ``s`` only (a strided convolution over the same ``x``);
      ``1`` is every position.

  Returns:
    ``(dmu, dnu)`` of shapes ``(G, *K)`` and ``(G, *K, C)``, float32 (or
    wider), averaged over ``axis_name`` if given.
  """
  dtype = jax.dtypes.canonicalize_dtype(
      jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32))
  x = lax.stop_gradient(x).astype(dtype)
  y = lax.stop_gradient(y).astype(dtype)
  if stride > 1:
    spec = _position_subset(spec, x.shape[1:-1], kernel.shape[:-2], y.shape[1:-1], stride)
    y = y[(slice(None),) + (slice(None, None, stride),) * (y.ndim - 2)]
  elements = (y.shape[0] // groups) * math.prod(y.shape[1:-1])
  kshape = tuple(kernel.shape)

  def kernel_cotangent(xg, ct, out_features):
    transpose = jax.linear_transpose(
        functools.partial(conv, xg, spec=spec),
        jax.ShapeDtypeStruct(kshape[:-1] + (out_features,), dtype),
    )
    return transpose(ct)[0]

  xg = st.split_groups(x, groups)
  ones = jnp.full(st.split_groups(y, groups).shape[:-1] + (1,), 1.0 / elements, dtype)
  dmu = jax.vmap(lambda a, c: kernel_cotangent(a, c, 1))(xg, ones)[..., 0]
  if gram_is_cheaper(kshape):
    dnu = _dnu_from_gram(x, lax.stop_gradient(kernel).astype(dtype), spec, groups, elements)
  else:
    ct = st.split_groups(2.0 * y / elements, groups)
    dnu = jax.vmap(lambda a, c: kernel_cotangent(a, c, kshape[-1]))(xg, ct)
  if axis_name is not None:
    dmu, dnu = lax.pmean((dmu, dnu), axis_name, axis_index_groups=axis_index_groups)
  return dmu, dnu


def gram_is_cheaper(kernel_shape: Sequence[int]) -> bool:
  """Whether :func:`moment_derivatives` takes ``d nu / d W`` from the inputs'
  Gram matrix: for pointwise (``1 x ... x 1``) kernels with fewer input than
  output channels, where it costs ``N cin^2`` multiply-adds instead of the
  backward-weight convolution's ``N cin C``."""
  *window, cin, cout = kernel_shape
  return math.prod(window) == 1 and cin < cout


def _dnu_from_gram(x, kernel, spec, groups, elements):
  """``d nu / d W = 2 S W`` for a pointwise conv, ``S`` the per-group mean of
  ``p p^T`` over the input ``p`` each output position reads (zero in the
  padding): the same derivative as the backward-weight convolution
  ``2 mean(p y^T)``, since ``y = W^T p``.

  Args:
    x: ``(N, *spatial, cin)``; kernel: ``(1, ..., 1, cin, C)``, both in the
      derivatives' dtype; ``elements``: ``M``, output positions per group.

  Returns:
    ``(G, 1, ..., 1, cin, C)``.
  """
  rank = x.ndim - 2
  pads = _explicit_pads(spec, x.shape[1:-1], (1,) * rank)
  zero = jnp.zeros((), x.dtype)
  # The input under each output position: x padded (or cropped) as the conv
  # pads it, then every stride-th position.
  padded = lax.pad(x, zero, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
  inputs = lax.slice(padded, (0,) * x.ndim, padded.shape, (1,) + tuple(spec.strides) + (1,))
  inputs = st.split_groups(inputs, groups).reshape(groups, -1, x.shape[-1])
  gram = jnp.einsum("gpi,gpj->gij", inputs, inputs) / elements
  w = kernel.reshape(kernel.shape[-2:])
  return (2.0 * jnp.einsum("gij,jc->gic", gram, w)).reshape((groups,) + kernel.shape)


def _explicit_pads(spec, in_spatial, kernel_spatial):
  """``spec``'s padding as one ``(low, high)`` pair per spatial axis."""
  if not isinstance(spec.padding, str):
    return spec.padding
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, spec.kernel_dilation)]
  return lax.padtype_to_pads(in_spatial, dilated, spec.strides, spec.padding)


def _position_subset(spec, in_spatial, kernel_spatial, out_spatial, stride):
  """The :class:`ConvSpec` whose outputs are ``conv(x, W, spec)`` at the
  positions ``(stride * i, ...)``: ``stride`` times the strides, the same low
  padding, and a high padding (negative: a crop) that ends at the last of
  those positions."""
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, spec.kernel_dilation)]
  pads = _explicit_pads(spec, in_spatial, kernel_spatial)
  strides = tuple(stride * s for s in spec.strides)
  padding = tuple(
      (low, (-(-out // stride) - 1) * step + window - size - low)
      for (low, _), out, step, window, size in zip(pads, out_spatial, strides, dilated,
                                                   in_spatial))
  return ConvSpec(strides, padding, spec.kernel_dilation)


def taylor_offsets(
    mu: jax.Array, nu: jax.Array, dmu: jax.Array, dnu: jax.Array, kernel: jax.Array
) -> Tuple[jax.Array, jax.Array]:
  """``(mu - dmu . W, nu - dnu . W)`` per channel: the offsets of new entries.

  Args:
    mu, nu: ``(P, C)`` statistics measured with ``kernel``.
    dmu: ``(P, *K)``; dnu: ``(P, *K, C)``; kernel: ``(*K, C)``.

  Returns:
    Two ``(P, C)`` arrays (see :class:`CBNState`).
  """
  mu_dot, nu_dot = _dot_kernel(dmu, dnu, kernel)
  return mu - mu_dot, nu - nu_dot


def stored_entries(
    mu: jax.Array, nu: jax.Array, dmu: jax.Array, dnu: jax.Array, kernel: jax.Array,
    derivative_dtype: Any = jnp.float32,
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """New entries as the buffers hold them: ``(dmu, dnu, mu_offset, nu_offset)``.

  The derivatives are rounded to ``derivative_dtype``
  (``CBNConfig.derivative_dtype``) *before* the offsets are taken with them,
  so that :func:`compensate` returns the measured ``(mu, nu)`` exactly at the
  kernel they were measured with; a narrower dtype rounds only the Taylor
  step ``d . (W - W_old)``.

  Args:
    mu, nu: ``(P, C)`` statistics measured with ``kernel``.
    dmu: ``(P, *K)``; dnu: ``(P, *K, C)``, from :func:`moment_derivatives`.
    kernel: ``(*K, C)``.
    derivative_dtype: the buffers' dtype.

  Returns:
    ``dmu``, ``dnu`` in ``derivative_dtype`` and the ``(P, C)`` offsets of
    :func:`taylor_offsets`.
  """
  dmu, dnu = dmu.astype(derivative_dtype), dnu.astype(derivative_dtype)
  return (dmu, dnu) + taylor_offsets(mu, nu, dmu, dnu, kernel)


def compensate(
    mu_offset: jax.Array,
    nu_offset: jax.Array,
    dmu: jax.Array,
    dnu: jax.Array,
    kernel: jax.Array,
    differentiable: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """First-order Taylor compensation of entries to ``kernel`` (spec, section 4).

  ``mu + dmu . (W - W_old) = (mu - dmu . W_old) + dmu . W``, and the same for
  ``nu``: the offsets of :func:`taylor_offsets` plus the derivatives' inner
  products with the current kernel.

  Args:
    mu_offset, nu_offset: ``(P, C)`` buffered offsets.
    dmu: ``(P, *K)``; dnu: ``(P, *K, C)``.
    kernel: ``(*K, C)`` the current kernel.
    differentiable: whether the result carries the gradient of the Taylor
      term to ``kernel`` (``backward='exact'``); otherwise the kernel is a
      constant. Offsets and derivatives are constants either way.

  Returns:
    The compensated ``(mu, nu)``, each ``(P, C)``.
  """
  mu_dot, nu_dot = _dot_kernel(lax.stop_gradient(dmu), lax.stop_gradient(dnu), kernel,
                               differentiable)
  return lax.stop_gradient(mu_offset) + mu_dot, lax.stop_gradient(nu_offset) + nu_dot


def _dot_kernel(dmu, dnu, kernel, differentiable: bool = False):
  """Per-entry, per-channel ``(dmu . W, dnu . W)``, each ``(*E, C)``.

  ``dmu`` is ``(*E, *K)`` and ``dnu`` ``(*E, *K, C)`` for entry axes ``E``,
  in any floating dtype (``CBNConfig.derivative_dtype``): the products are
  taken in at least float32, never with a rounded kernel. The kernel is a
  constant unless ``differentiable``.
  """
  channels = kernel.shape[-1]
  lead = dnu.shape[:dnu.ndim - kernel.ndim]
  if not differentiable:
    kernel = lax.stop_gradient(kernel)
  dtype = jnp.promote_types(jnp.promote_types(dnu.dtype, kernel.dtype), jnp.float32)
  w = kernel.astype(dtype).reshape(-1, channels)
  mu_dot = jnp.einsum("pk,kc->pc", dmu.reshape(math.prod(lead), -1).astype(dtype), w)
  nu_dot = _channel_inner(dnu.reshape(math.prod(lead), -1, channels), w)
  return mu_dot.reshape(lead + (channels,)), nu_dot.reshape(lead + (channels,))


# out[e, c] = sum_k d[e, k, c] * w[k, c] for d (E, K, C), w (K, C): one inner
# product per entry and channel, written as XLA's CPU backend runs it fastest
# (BENCHMARKS.md, "CBN's compensation without copies"): the elementwise
# product summed by a matrix-vector product with ones per entry, E the batch
# axis of both operands, so that no operand is relaid out (8-12 ms for
# ResNet-18's largest buffer, (3, 4608, 512)). As an einsum with C as batch
# axis XLA copies the whole array into a (C, E, K) layout (30-40 ms); as a
# sum over K it strides through it (60 ms). The backward pass is
# elementwise: w's cotangent is one sum over the E entries (1 ms; autodiff's
# transpose of the matrix-vector product takes 60 ms). A narrower d (a
# bfloat16 buffer) is widened to w's dtype inside the products' fusions.
@jax.custom_vjp
def _channel_inner(d, w):
  if d.shape[0] == 0:
    return jnp.zeros((0, d.shape[2]), w.dtype)
  return jnp.einsum("ek,ekc->ec", jnp.ones(d.shape[:2], w.dtype), d.astype(w.dtype) * w[None])


def _channel_inner_fwd(d, w):
  return _channel_inner(d, w), (d, w)


def _channel_inner_bwd(res, ct):
  d, w = res
  grad_w = functools.reduce(
      jnp.add, [d[e].astype(w.dtype) * ct[e][None] for e in range(d.shape[0])],
      jnp.zeros_like(w))
  return (ct[:, None, :] * w[None]).astype(d.dtype), grad_w


_channel_inner.defvjp(_channel_inner_fwd, _channel_inner_bwd)


def pooled_moments(
    mu: jax.Array,
    nu: jax.Array,
    past_mu: jax.Array,
    past_nu: jax.Array,
    past_filled: jax.Array,
    same_step_gradient: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """Averages of the current and the valid past entries, per group.

  Group ``j`` pools its own ``(mu[j], nu[j])`` (always kept) and the ``P``
  entries of the sequence ``past ++ current`` that precede it,
  ``seq[j], ..., seq[j + P - 1]``, keeping those that are filled and
  consistent (``nu >= mu^2``).

  Args:
    mu, nu: ``(G, C)`` current group statistics.
    past_mu, past_nu: ``(P, C)`` (compensated) past entries, newest last;
      whatever gradient they carry is kept.
    past_filled: ``(P,)`` bool, which past entries hold real values.
    same_step_gradient: whether the earlier groups of this step carry their
      gradient into later groups' windows (``backward='exact'``); otherwise
      a group's own entry is its only term with gradient from this step.

  Returns:
    ``(mu_bar, nu_bar)``, each ``(G, C)``.
  """
  same_mu, same_nu = (mu, nu) if same_step_gradient else (
      lax.stop_gradient(mu), lax.stop_gradient(nu))
  (win_mu, win_nu), filled = window_entries((past_mu, past_nu), (same_mu, same_nu),
                                            past_filled)
  return _average_windows(mu, nu, win_mu, win_nu, filled)


def window_entries(past, current, past_filled):
  """The ``P`` window entries each group of a step pools with its own.

  Group ``j``'s entries are ``seq[j], ..., seq[j + P - 1]`` of the sequence
  ``past ++ current`` (the past entries, then the earlier groups of this
  step), for each statistic in the tuples ``past`` and ``current``.

  Args:
    past: tuple of ``(P, C)`` past entries, newest last.
    current: tuple of ``(G, C)`` this step's group values, in order.
    past_filled: ``(P,)`` bool, which past entries hold real values.

  Returns:
    ``(windows, filled)``: a tuple of ``(G, P, C)`` arrays and the ``(G, P)``
    bool mask of the entries that hold real values.
  """
  groups, size = current[0].shape[0], past[0].shape[0]

  def windows_of(sequence):  # (P + G, ...) -> (G, P, ...), by static slices
    return jnp.stack([sequence[j:j + size] for j in range(groups)])

  windows = tuple(windows_of(jnp.concatenate([p, c.astype(p.dtype)], axis=0))
                  for p, c in zip(past, current))
  filled = windows_of(jnp.concatenate([past_filled, jnp.ones((groups,), bool)]))
  return windows, filled


def history_entries(past, past_filled, groups: int):
  """:func:`window_entries` with a history per group (``group_history``).

  Args:
    past: tuple of ``(P, G, C)`` each group's past entries, newest last.
    past_filled: ``(P,)`` bool, which past steps hold real values.
    groups: ``G``.

  Returns:
    ``(windows, filled)``: ``(G, P, C)`` arrays and the ``(G, P)`` mask.
  """
  windows = tuple(jnp.swapaxes(p, 0, 1) for p in past)
  return windows, jnp.broadcast_to(past_filled, (groups, past_filled.shape[0]))


def window_mean(value: jax.Array, window: jax.Array, keep: jax.Array) -> jax.Array:
  """Per group, the mean of ``value`` ``(G, C)`` and the entries of ``window``
  ``(G, P, C)`` selected by ``keep`` (``(G, P)`` or ``(G, P, C)``, bool)."""
  keep = keep if keep.ndim == window.ndim else keep[..., None]
  keep = keep.astype(value.dtype)
  return (value + jnp.sum(keep * window, axis=1)) / (1.0 + jnp.sum(keep, axis=1))


def _average_windows(mu, nu, win_mu, win_nu, filled):
  """Per group, the mean of ``(mu, nu)`` and its window entries ``(G, P, C)``
  that are ``filled`` ``(G, P)`` and consistent (``nu >= mu^2``)."""
  keep = filled[..., None] & (lax.stop_gradient(win_nu) >= jnp.square(lax.stop_gradient(win_mu)))
  return window_mean(mu, win_mu, keep), window_mean(nu, win_nu, keep)


def pooled_moments_per_group(
    mu: jax.Array,
    nu: jax.Array,
    past_mu: jax.Array,
    past_nu: jax.Array,
    past_filled: jax.Array,
) -> Tuple[jax.Array, jax.Array]:
  """:func:`pooled_moments` with a history per group (``group_history``).

  Args:
    mu, nu: ``(G, C)`` current group statistics (with gradient).
    past_mu, past_nu: ``(P, G, C)`` each group's (compensated) past steps.
    past_filled: ``(P,)`` bool, which past steps hold real values.

  Returns:
    ``(mu_bar, nu_bar)``, each ``(G, C)``: group ``j`` averages its own
    entry and its filled, consistent (``nu >= mu^2``) past entries.
  """
  (win_mu, win_nu), filled = history_entries((past_mu, past_nu), past_filled, mu.shape[0])
  return _average_windows(mu, nu, win_mu, win_nu, filled)


def in_burn_in(step: jax.Array, burn_in: int) -> jax.Array:
  """True for training steps ``t <= burn_in`` (steps counted from 1)."""
  return step <= burn_in


def normalize_train(
    y: jax.Array,
    x: jax.Array,
    kernel: jax.Array,
    state: CBNState,
    spec: ConvSpec,
    config: CBNConfig = CBNConfig(),
    bias: Optional[jax.Array] = None,
    where: str = "CBN",
    tap: Optional[Tuple[jax.Array, jax.Array]] = None,
) -> Tuple[jax.Array, CBNState]:
  """One CBN training step: ``(y - mu_bar) / sqrt(var_bar + eps)`` and the new state.

  Args:
    y: ``(N, *spatial_out, C)`` conv output *without* the conv bias; it
      carries the gradient (to ``x`` and the kernel through the caller's
      convolution). ``N`` must be a multiple of ``config.norm_batch_size``.
    x: ``(N, *spatial, cin)`` the conv input (for the derivatives only).
    kernel: ``(*K, C)`` the effective kernel with ``y = conv(x, kernel)``:
      the compensation target (differentiated through the Taylor terms with
      ``backward='exact'``, a constant otherwise) and the kernel the new
      entries' offsets are taken with (a constant).
    state: the current :class:`CBNState` (buffer ``P`` = ``config.window - 1``).
    spec: the convolution.
    config: static hyper-parameters.
    bias: optional ``(C,)`` conv bias; only shifts the running ``mean`` (the
      normalized output does not depend on it).
    where: name used in error messages.
    tap: ``backward='averaged'`` only: ``(g_tap, psi_tap)``, zeros shaped
      like ``state.g_buffer``/``state.psi_buffer``; their cotangents are this
      step's increments of those buffers (the returned state leaves them
      unchanged). ``None`` is allowed only when no gradient is taken.

  Returns:
    ``(xhat, new_state)``: ``xhat`` has ``y``'s shape, dtype promoted to at
    least float32 (apply gamma and beta outside).
  """
  config.validate(where)
  groups = st.num_groups(y.shape[0], config.norm_batch_size, where)
  tap = _checked_tap(y, x, kernel, state, config, groups, tap, where)
  try:
    return _train_step(y, x, kernel, state, bias, tap, spec, config, groups)
  except UnnamedLayerError as error:
    raise error.named(where) from None


SAVED_STATISTICS = ("cbn_batch_moments", "cbn_pooled_moments")
"""Names (``jax.ad_checkpoint.checkpoint_name``) of the per-group moments the
training step keeps for its backward pass; everything else it recomputes."""


def _train_step_body(y, x, kernel, state, bias, tap, spec, config, groups):
  """:func:`normalize_train` after its checks (``tap`` as ``_checked_tap`` returns it)."""
  past = config.window - 1
  averaged = config.backward == "averaged"
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  y32 = y.astype(dtype)

  mu, nu = checkpoint_name(
      batch_moments(y32, groups, config.axis_name, config.axis_index_groups),
      SAVED_STATISTICS[0])
  step = state.step + 1
  burning = in_burn_in(step, config.burn_in)
  past_filled = jnp.arange(past) >= past - state.count
  mu_bar, nu_bar = checkpoint_name(
      _window_moments(mu, nu, kernel, state, config, past_filled, burning), SAVED_STATISTICS[1])
  var_bar = jnp.maximum(nu_bar - jnp.square(mu_bar), 0.0)

  inv_std = lax.rsqrt(var_bar + config.epsilon)
  if averaged and past > 0:
    xhat = _averaged_normalize(
        y32, tap[0], tap[1], lax.stop_gradient(mu_bar), lax.stop_gradient(inv_std),
        state.g_buffer, state.psi_buffer, past_filled, burning, groups, config)
  else:
    # With window 1 'averaged' is BN's backward: what 'batch' differentiates.
    xhat = _centred_scaled(y32, mu_bar, inv_std)

  mu_c, nu_c = lax.stop_gradient(mu), lax.stop_gradient(nu)
  new_state = _with_running_stats(state, mu_c, nu_c, mu_bar, var_bar, bias, config, step)
  if past > 0:
    new_state = _with_new_entries(new_state, state, x, y32, mu_c, nu_c, kernel, spec, config,
                                  groups, burning)
  return xhat, new_state


# One jit per (shapes, config), as MABN's (functional.mabn._train_step): a
# network's layers of equal shapes share one trace of the step. Its backward
# pass keeps only the (G, C) moments and recomputes the activation-sized
# values (y - mu_bar, xhat, ...) from y, which the caller's convolution keeps
# anyway: without the checkpoint XLA kept two more activation-sized arrays
# per layer (BENCHMARKS.md, "CBN's step keeps its moments, not its
# activations").
@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _train_step(y, x, kernel, state, bias, tap, spec, config, groups):
  """:func:`_train_step_body`, keeping only :data:`SAVED_STATISTICS` for the backward pass."""
  return _CHECKPOINTED_STEP(y, x, kernel, state, bias, tap, spec, config, groups)


_CHECKPOINTED_STEP = jax.checkpoint(
    _train_step_body, static_argnums=(6, 7, 8),
    policy=jax.checkpoint_policies.save_only_these_names(*SAVED_STATISTICS))


def _checked_tap(y, x, kernel, state, config, groups, tap, where):
  """Raises a ValueError naming ``where`` for a state, tap or kernel that does
  not fit; returns the tap (zeros when ``'averaged'`` is called without one)."""
  past = config.window - 1
  history_groups = groups if config.group_history else None
  averaged = config.backward == "averaged"
  expected = state_shapes(kernel.shape, config.window, config.naive, history_groups,
                          averaged)
  for name, shape in expected.items():
    actual = tuple(getattr(state, name).shape)
    if actual != tuple(shape):
      raise ValueError(
          f"{where}: state '{name}' has shape {actual} but the kernel "
          f"{tuple(kernel.shape)}, window {config.window}, naive={config.naive}"
          + (f", backward={config.backward!r}" if name in ("g_buffer", "psi_buffer") else "")
          + (f" and {groups} groups with their own history" if history_groups else "")
          + f" imply {tuple(shape)}"
          + (" (make it with init_state(..., averaged=True))"
             if averaged and name in ("g_buffer", "psi_buffer") else "")
          + "."
      )
  if past > 0 and not config.naive and config.derivative_dtype is not None:
    expected_dtype = jnp.dtype(config.derivative_dtype)
    for name in ("dmu_buffer", "dnu_buffer"):
      actual = getattr(state, name).dtype
      if actual != expected_dtype:
        raise ValueError(
            f"{where}: state '{name}' has dtype {actual} but derivative_dtype is "
            f"{expected_dtype.name} (make it with init_state(..., "
            f"derivative_dtype={expected_dtype.name!r})).")
  if tap is not None and not averaged:
    raise ValueError(
        f"{where}: a backward-statistics tap was given but backward="
        f"{config.backward!r} keeps no backward statistics (only 'averaged' does).")
  if averaged and past > 0:
    if tap is None:
      tap = (jnp.zeros_like(state.g_buffer), jnp.zeros_like(state.psi_buffer))
    for name, value, buffer in zip(("g_tap", "psi_tap"), tap,
                                   (state.g_buffer, state.psi_buffer)):
      if tuple(value.shape) != tuple(buffer.shape):
        raise ValueError(
            f"{where}: {name} has shape {tuple(value.shape)} but the buffer it "
            f"updates has {tuple(buffer.shape)}.")
  if y.shape[-1] != kernel.shape[-1] or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(
        f"{where}: kernel {tuple(kernel.shape)} does not match the conv input "
        f"{tuple(x.shape)} and output {tuple(y.shape)}."
    )
  return tap


def _window_moments(mu, nu, kernel, state, config, past_filled, burning):
  """``(mu_bar, nu_bar)``, ``(G, C)``: the group moments pooled with the
  compensated buffered ones (plain BN's during burn-in), differentiable as
  ``config.backward`` says (module docstring)."""
  past = config.window - 1
  dtype = mu.dtype
  exact = config.backward == "exact"
  if past > 0:
    if config.naive:
      past_mu, past_nu = state.mu_buffer, state.nu_buffer
    else:
      past_mu, past_nu = compensate(
          state.mu_offset, state.nu_offset, state.dmu_buffer, state.dnu_buffer, kernel,
          differentiable=exact,
      )
    past_mu, past_nu = past_mu.astype(dtype), past_nu.astype(dtype)
    if config.group_history:
      mu_win, nu_win = pooled_moments_per_group(mu, nu, past_mu, past_nu, past_filled)
    else:
      mu_win, nu_win = pooled_moments(mu, nu, past_mu, past_nu, past_filled, exact)
    if config.backward == "batch":
      mu_win = mu + lax.stop_gradient(mu_win - mu)
      nu_win = nu + lax.stop_gradient(nu_win - nu)
    mu_bar = jnp.where(burning, mu, mu_win)
    nu_bar = jnp.where(burning, nu, nu_win)
  else:
    mu_bar, nu_bar = mu, nu
  return mu_bar, nu_bar


def _with_running_stats(state, mu_c, nu_c, mu_bar, var_bar, bias, config, step):
  """``state`` with the running ``mean``/``var`` EMAs updated (from the pooled
  statistics or the group's own, ``config.running_stats``) and ``step``."""
  dtype = mu_c.dtype
  var_c = jnp.maximum(nu_c - jnp.square(mu_c), 0.0)
  if config.running_stats == "pooled":
    # The statistics this step normalized with (spec section 4 uses the batch's).
    run_mu, run_var = lax.stop_gradient(mu_bar), lax.stop_gradient(var_bar)
  else:
    run_mu, run_var = mu_c, var_c
  batch_mean = jnp.mean(run_mu, axis=0)
  if bias is not None:
    batch_mean = batch_mean + lax.stop_gradient(bias).astype(dtype)
  new_state = state._replace(
      mean=st.ema(state.mean, batch_mean, config.momentum),
      var=st.ema(state.var, jnp.mean(run_var, axis=0), config.momentum),
      step=step,
  )
  return new_state


def _with_new_entries(new_state, state, x, y32, mu_c, nu_c, kernel, spec, config, groups,
                      burning):
  """``new_state`` with this step's entries pushed into the window buffers
  (moments, and for the compensated layer their derivatives and Taylor
  offsets); the buffers are kept as they were during burn-in."""
  past = config.window - 1
  if config.group_history:
    # One new entry per step, holding every group's statistics.
    newest, entries, added = groups, lambda a: a[None], 1
  else:
    # Only the newest min(G, P) groups stay in the buffers: derivatives of
    # the others would be pushed out at once, so they are never computed.
    newest, entries, added = min(groups, past), lambda a: a, groups
  push = lambda name, rows: st.push_unless(getattr(state, name), entries(rows), burning)
  pushed = dict(
      mu_buffer=push("mu_buffer", mu_c[-newest:]),
      nu_buffer=push("nu_buffer", nu_c[-newest:]),
      count=jnp.where(burning, state.count,
                      jnp.minimum(state.count + added, past).astype(jnp.int32)),
  )
  if not config.naive:
    rows = newest * (y32.shape[0] // groups)
    dmu, dnu = moment_derivatives(
        x[-rows:], y32[-rows:], kernel, spec, newest, config.axis_name,
        config.axis_index_groups, config.derivative_stride,
    )
    dmu, dnu, mu_offset, nu_offset = stored_entries(
        mu_c[-newest:], nu_c[-newest:], dmu, dnu, kernel, state.dnu_buffer.dtype)
    pushed.update(
        dmu_buffer=push("dmu_buffer", dmu),
        dnu_buffer=push("dnu_buffer", dnu),
        mu_offset=push("mu_offset", mu_offset),
        nu_offset=push("nu_offset", nu_offset),
    )
  return new_state._replace(**pushed)


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
  buffers = ("mu_buffer", "nu_buffer", "dmu_buffer", "dnu_buffer", "mu_offset",
             "nu_offset", "g_buffer", "psi_buffer")
  return state._replace(**{name: getattr(state, name)[past - rows:] for name in buffers})


def _centred_scaled(y, mu_bar, inv_std):
  """``(y - mu_bar) * inv_std`` with ``(G, C)`` group statistics."""
  axis = y.ndim - 1
  return (y - st.broadcast_groups(mu_bar, y, axis)) * st.broadcast_groups(inv_std, y, axis)


# backward='averaged' (module docstring): forward (y - mu_bar) * inv_std with
# the pooled statistics (constants); backward, with g the gradient at xhat,
#   g_B, Psi_B = mean(g), mean(g * xhat)     (per group, over axis_name)
#   g_y = (g - g_avg - xhat * Psi_avg) * inv_std
# with g_avg, Psi_avg the means over the group's filled window entries and
# itself (g_B, Psi_B in burn-in). The taps' cotangents are the increments of
# g_buffer/psi_buffer, pushed as the forward pushes mu_buffer.
# Errors raised here are UnnamedLayerErrors (the trace is shared by layers);
# normalize_train names the layer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _averaged_normalize(y, g_tap, psi_tap, mu_bar, inv_std, g_buffer, psi_buffer,
                        past_filled, burning, groups, config):
  del g_tap, psi_tap, g_buffer, psi_buffer, past_filled, burning, groups, config
  return _centred_scaled(y, mu_bar, inv_std)


def _averaged_fwd(y, g_tap, psi_tap, mu_bar, inv_std, g_buffer, psi_buffer, past_filled,
                  burning, groups, config):
  if y.perturbed and not (g_tap.perturbed and psi_tap.perturbed):
    raise UnnamedLayerError(
        "the CBN backward statistics (backward='averaged') are not being "
        "fed: the gradient is taken with respect to the input or the kernel but not "
        "the 'backward_stats' taps (g_increment, psi_increment), so g_buffer and "
        "psi_buffer would go stale. Compute gradients with "
        "mabn_jax.value_and_grad(loss_fn)(variables, ...) (Flax NNX: "
        "mabn_jax.nnx.value_and_grad(loss_fn)(model, ...); or differentiate the "
        "taps and add their cotangents to the buffers) instead of "
        "jax.grad/jax.value_and_grad (nnx.grad) on the params alone.")
  for tap in (g_tap, psi_tap):
    ma.check_tap_varies_like_input(y.value, tap.value, config, normalizer="cbn")
  res = tuple(p.value for p in (y, mu_bar, inv_std, g_buffer, psi_buffer, past_filled,
                                burning))
  return _centred_scaled(res[0], res[1], res[2]), res


def _averaged_bwd(groups, config, res, ct):
  y, mu_bar, inv_std, g_buffer, psi_buffer, past_filled, burning = res
  if isinstance(ct, SymbolicZero):
    ct = jnp.zeros(ct.aval.shape, ct.aval.dtype)
  axis = y.ndim - 1
  xhat = _centred_scaled(y, mu_bar, inv_std)
  g = ct.astype(xhat.dtype)
  g_batch, psi_batch = ma.backward_statistics(
      xhat, g, groups, axis, config.axis_name, config.axis_index_groups, with_mean=True)
  past = (g_buffer.astype(g.dtype), psi_buffer.astype(g.dtype))
  if config.group_history:
    windows, filled = history_entries(past, past_filled, groups)
    new_rows = lambda a: a[None]  # one entry per step, every group's value
  else:
    windows, filled = window_entries(past, (g_batch, psi_batch), past_filled)
    newest = min(groups, g_buffer.shape[0])
    new_rows = lambda a: a[-newest:]
  g_mean = jnp.where(burning, g_batch, window_mean(g_batch, windows[0], filled))
  psi = jnp.where(burning, psi_batch, window_mean(psi_batch, windows[1], filled))
  grad_y = ma.stabilized_input_gradient(g, xhat, inv_std, psi, axis, g_mean=g_mean)
  increments = tuple(
      ma.tap_increment(st.push_unless(buffer, new_rows(batch), burning), buffer,
                       g_batch, psi_batch)
      for buffer, batch in ((g_buffer, g_batch), (psi_buffer, psi_batch)))
  return (grad_y.astype(y.dtype),) + increments + (None,) * 6


_averaged_normalize.defvjp(_averaged_fwd, _averaged_bwd, symbolic_zeros=True)


def inference_scale_shift(
    mean: jax.Array, var: jax.Array, epsilon: float = 1e-5
) -> Tuple[jax.Array, jax.Array]:
  """``(scale, shift)`` ``(C,)`` of the inference map ``y * scale + shift``."""
  scale = lax.rsqrt(var + epsilon)
  return scale, -mean * scale


def normalize_inference(
    y: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float = 1e-5
) -> jax.Array:
  """``(y - mean) / sqrt(var + eps)`` with the running statistics.

  Args:
    y: ``(N, ..., C)`` conv output *including* its bias.
    mean, var: ``(C,)`` float32 running statistics.

  Returns:
    Array of ``y``'s shape in its dtype promoted to at least float32.
  """
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  scale, shift = inference_scale_shift(mean, var, epsilon)
  return y.astype(dtype) * scale + shift
