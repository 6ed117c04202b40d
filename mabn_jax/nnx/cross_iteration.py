"""Flax NNX Cross-Iteration Batch Normalization (``docs/normalization.md``, section 4)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from mabn_jax.functional import cross_iteration as F
from mabn_jax.functional._checks import require_bound_axis
from mabn_jax.functional.centering import center_kernel
from mabn_jax.functional.cross_iteration import Method as CBN
from mabn_jax.functional.interface import ConvContext, named_errors, with_mask
from mabn_jax.nnx.base import (
  RunningAverageView,
  describe,
  hashable_groups,
  make_affine,
  make_state,
  normalize,
  resolve_mode,
)
from mabn_jax.nnx.centered import CenteredConv


class CrossIterationConvNorm(RunningAverageView, nnx.Module):
  """A convolution followed by Cross-Iteration BN (Yao et al., CVPR 2021), for NNX.

  The NNX twin of :class:`mabn_jax.CrossIterationConvNorm` (both call
  :mod:`mabn_jax.functional.cross_iteration`). CBN compensates buffered
  statistics for the change of the convolution's kernel, so the convolution
  and the normalization are one module: training normalizes ``y = conv(x)``
  with statistics pooled over the last ``window`` iterations; inference is
  the convolution followed by the affine map of the running ``mean``/``var``.

  State (``K = (*kernel_size, in_features)``, ``C = out_features``,
  ``P = window - 1``), as the linen layer's variables:

  * ``conv`` (``nnx.Conv``, or :class:`~mabn_jax.nnx.CenteredConv` when
    ``centered``): ``nnx.Param`` ``kernel`` ``(*K, C)`` and, with
    ``use_bias``, ``bias`` ``(C,)``.
  * ``norm``: ``nnx.Param`` ``scale``/``bias`` ``(C,)``; ``nnx.BatchStat``
    ``mean``/``var`` ``(C,)``, ``mu_buffer``/``nu_buffer`` ``(P, C)`` and,
    unless ``naive``, ``dmu_buffer`` ``(P, *K)``, ``dnu_buffer``
    ``(P, *K, C)``, ``mu_offset``/``nu_offset`` ``(P, C)`` (float32, the
    derivative buffers in ``derivative_dtype``; newest last; with
    ``group_history`` a group axis follows ``P``), ``count``,
    ``step`` and ``nonfinite_count`` ``()`` float32 counters; with
    ``backward='averaged'`` also ``g_buffer``/``psi_buffer`` ``(P, C)`` and
    the :class:`~mabn_jax.nnx.BackwardStat` taps ``g_increment``/
    ``psi_increment`` of their shapes (train with
    :func:`mabn_jax.nnx.value_and_grad`, one call per training step).
    Empty buffers (window 1, the naive variant's derivatives) are not state.

  Args:
    in_features, out_features, kernel_size, strides: as ``nnx.Conv``.
    padding: ``'SAME'``, ``'VALID'``, an int or ``(low, high)`` pairs.
    use_bias: whether the convolution has a bias.
    centered: weight-centralized kernel.
    options: ``window``, ``burn_in``, ``naive``, ``group_history``,
      ``backward``, ``running_stats``, ``derivative_stride``,
      ``derivative_dtype``, ``kernel_derivatives``, ``rematerialize``,
      ``momentum``, ``epsilon``, ``norm_batch_size``, ``axis_name``,
      ``axis_index_groups``: as the linen layer (the same
      :class:`~mabn_jax.functional.cross_iteration.CBNConfig`).
    num_groups: with ``group_history``, the number ``G`` of normalization
      groups in a training batch (``batch // norm_batch_size``); the linen
      layer reads it from the initialization batch.
    use_running_average: if True, normalize with the running statistics.
    dtype, param_dtype: computation and parameter dtypes.
    use_scale, use_norm_bias, scale_init, bias_init: the normalization's
      affine map.
    kernel_init, conv_bias_init: the convolution's initializers.
    rngs: ``nnx.Rngs`` for the parameter initializers.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Union[int, Sequence[int]] = 1,
    *,
    padding: Any = "SAME",
    use_bias: bool = False,
    centered: bool = False,
    window: int = 4,
    burn_in: int = 100,
    naive: bool = False,
    group_history: bool = False,
    num_groups: Optional[int] = None,
    backward: str = F.CBNConfig.backward,
    running_stats: str = F.CBNConfig.running_stats,
    derivative_stride: int = F.CBNConfig.derivative_stride,
    derivative_dtype: Any = F.CBNConfig.derivative_dtype,
    kernel_derivatives: str = F.CBNConfig.kernel_derivatives,
    rematerialize: bool = F.CBNConfig.rematerialize,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    norm_batch_size: Optional[int] = None,
    axis_name: Optional[str] = None,
    axis_index_groups: Any = None,
    use_running_average: Optional[bool] = False,
    dtype: Optional[Any] = None,
    param_dtype: Any = jnp.float32,
    use_scale: bool = True,
    use_norm_bias: bool = True,
    scale_init: Any = initializers.ones_init(),
    bias_init: Any = initializers.zeros_init(),
    kernel_init: Any = default_kernel_init,
    conv_bias_init: Any = initializers.zeros_init(),
    rngs: nnx.Rngs,
  ):
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    self.num_features = out_features
    where = describe(self, out_features)
    self.config = F.CBNConfig(
      window=window,
      burn_in=burn_in,
      naive=naive,
      group_history=group_history,
      backward=backward,
      running_stats=running_stats,
      derivative_stride=derivative_stride,
      derivative_dtype=derivative_dtype,
      kernel_derivatives=kernel_derivatives,
      rematerialize=rematerialize,
      momentum=momentum,
      epsilon=epsilon,
      norm_batch_size=norm_batch_size,
      axis_name=axis_name,
      axis_index_groups=hashable_groups(axis_index_groups),
    )
    self.config.validate(where)
    if group_history and num_groups is None:
      raise ValueError(
        f"{where}: group_history keeps one history per normalization group, so "
        "num_groups (training batch // norm_batch_size) must be given."
      )
    self.spec = F.ConvSpec.make(len(kernel_size), strides, padding, where=where)
    self.use_running_average = use_running_average
    self.centered = centered
    conv_cls = CenteredConv if centered else nnx.Conv
    self.conv = conv_cls(
      in_features,
      out_features,
      kernel_size,
      self.spec.strides,
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=kernel_init,
      bias_init=conv_bias_init,
      rngs=rngs,
    )
    self.norm = _CrossIterationNorm(
      kernel_size + (in_features, out_features),
      self.config,
      num_groups if group_history else None,
      use_scale=use_scale,
      use_bias=use_norm_bias,
      scale_init=scale_init,
      bias_init=bias_init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(
    self,
    x: jax.Array,
    use_running_average: Optional[bool] = None,
    *,
    mask: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Convolves and normalizes ``x`` ``(N, *spatial, in_features)``; returns
    ``(N, *spatial_out, out_features)``. ``mask`` must be ``None`` (CBN's
    statistics and their kernel derivatives are not masked)."""
    where = describe(self, self.num_features)
    use_running_average = resolve_mode(where, self.use_running_average, use_running_average)
    with named_errors(where):
      with_mask(CBN(self.config), mask)
    rank = len(self.conv.kernel_size)
    if x.ndim != rank + 2:
      raise ValueError(
        f"{where}: expected an input of rank {rank + 2} (batch, {rank} spatial "
        f"axes, channels) for kernel_size {self.conv.kernel_size}, got shape "
        f"{tuple(x.shape)}."
      )
    if not use_running_average:
      require_bound_axis(where, self.config.axis_name)
    y = self.conv(x)
    kernel = self.conv.kernel[...]
    if self.centered:
      kernel = center_kernel(kernel, after=x)
    bias = self.conv.bias[...] if self.conv.bias is not None else None
    return self.norm(y, x, kernel, bias, self.spec, use_running_average, where)


class _CrossIterationNorm(nnx.Module):
  """The normalization half of :class:`CrossIterationConvNorm` (its ``norm``):
  the ``nnx.BatchStat`` state of the functional :class:`~mabn_jax.functional.
  cross_iteration.CBNState`, the taps and the affine ``scale``/``bias``."""

  method_class = CBN

  def __init__(
    self,
    kernel_shape,
    config: F.CBNConfig,
    history_groups: Optional[int],
    *,
    use_scale,
    use_bias,
    scale_init,
    bias_init,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.kernel_shape = tuple(kernel_shape)
    self.num_features = self.kernel_shape[-1]
    self.config = config
    self.history_groups = history_groups
    self.use_running_average = None
    self.dtype = dtype
    self.use_scale, self.use_bias = use_scale, use_bias
    self.scale_init, self.bias_init, self.param_dtype = scale_init, bias_init, param_dtype
    method = self._functional()
    make_affine(self, self.num_features, rngs)
    make_state(self, method, self._initial_state(method))

  def functional(self) -> CBN:
    """The functional method this module runs, with its configuration."""
    return self._functional()

  def _functional(self) -> CBN:
    return CBN(self.config)

  def _initial_state(self, method: CBN) -> F.CBNState:
    return method.init(
      self.num_features, kernel_shape=self.kernel_shape, groups=self.history_groups
    )

  def __call__(self, y, x, kernel, bias, spec: F.ConvSpec, use_running_average: bool, where: str):
    return normalize(
      self, y, use_running_average, conv=ConvContext(x, kernel, spec, bias), where=where
    )
