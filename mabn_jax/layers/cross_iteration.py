"""Flax linen Cross-Iteration Batch Normalization.

The math: ``docs/normalization.md``, section 4.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from mabn_jax.functional import cross_iteration as F
from mabn_jax.functional._checks import require_bound_axis
from mabn_jax.functional.centering import center_kernel
from mabn_jax.functional.cross_iteration import Method as CBN
from mabn_jax.functional.interface import ConvContext
from mabn_jax.layers.base import functional_config, layer_path, normalize
from mabn_jax.layers.centered import CenteredConv


class CrossIterationConvNorm(nn.Module):
  """A convolution followed by Cross-Iteration BN (Yao et al., CVPR 2021).

  CBN needs the preceding convolution's kernel (it compensates buffered
  statistics for the kernel's change, spec section 4), so the convolution
  and the normalization are one module. Training (``use_running_average``
  False) normalizes ``y = conv(x)`` with statistics pooled over the last
  ``window`` iterations; inference is ``conv`` followed by the affine map of
  the running ``mean``/``var`` (foldable into the conv, like BN).

  Variables (``K = (*kernel_size, cin)``, ``C = features``,
  ``P = window - 1``):

  * ``params``: ``conv``: ``kernel`` ``(*K, C)`` (the raw weight; the conv
    uses ``center_kernel(kernel)`` when ``centered``) and, if ``use_bias``,
    ``bias`` ``(C,)``; ``norm``: ``scale`` ``(C,)`` and ``bias`` ``(C,)``
    (per ``use_scale``/``use_norm_bias``), all in ``param_dtype``.
  * ``batch_stats``: ``norm``: ``mean`` ``(C,)`` and ``var`` ``(C,)`` (running
    statistics of the conv output, bias included, as in
    ``flax.linen.BatchNorm``), ``mu_buffer``/``nu_buffer`` ``(P, C)``,
    and unless ``naive`` ``dmu_buffer`` ``(P, *K)``, ``dnu_buffer``
    ``(P, *K, C)`` and ``mu_offset``/``nu_offset`` ``(P, C)`` (float32,
    the derivative buffers in ``derivative_dtype``; newest entry last;
    derivatives of the effective, centred if ``centered``, kernel; see
    :class:`~mabn_jax.functional.cross_iteration.CBNState`), ``count``
    ``()`` (valid entries), ``step`` ``()`` and
    ``nonfinite_count`` ``()``, float32 counters (steps skipped because their
    statistics were not finite; the state is then kept). With
    ``backward='averaged'`` also ``g_buffer``/``psi_buffer`` ``(P, C)``
    (the backward statistics ``mean(g)`` and ``mean(g * xhat)`` of the
    past entries). With ``group_history`` the buffers have a group axis
    after ``P``. With ``window = 1`` there are no buffers.
  * ``backward_stats`` (``backward='averaged'`` only): ``norm``:
    ``g_increment`` and ``psi_increment``, float32 zeros shaped like
    ``g_buffer``/``psi_buffer``, the taps whose cotangents are the step's
    increments of those buffers (:data:`mabn_jax.TAP_TARGETS`). Train with
    :func:`mabn_jax.value_and_grad`, and call the layer once per training
    step (a second training call in one step raises).

  Attributes:
    features: output channels ``C``.
    kernel_size: as ``flax.linen.Conv`` (a tuple, one size per spatial axis).
    strides: int or one per spatial axis.
    padding: ``'SAME'``, ``'VALID'``, an int or ``(low, high)`` pairs.
    use_bias: whether the convolution has a bias (it does not change the
      training output, which subtracts the mean; it shifts ``mean``).
    centered: weight-centralized kernel (:class:`~mabn_jax.CenteredConv`).
    window: ``k``, iterations pooled including the current one (4 = the
      published "buffer 3" setting).
    burn_in: training steps ``t <= burn_in`` (counted from 1) are plain BN
      with the biased variance and buffer nothing. Default 100, the same
      order as MABN's warm-up; the paper burns in for several epochs, so
      set it to a few epochs' worth of steps for real training.
    naive: pool buffered statistics without the Taylor compensation.
    group_history: with ``norm_batch_size`` smaller than the batch, each of
      the ``G`` groups pools its own past steps (the published setting of one
      small batch per device); the buffers then get a group axis
      (``(P, G, ...)``), so the layer must be initialized with the training
      batch size. Default: a step's groups are consecutive iterations.
    backward: the gradient (the forward is the same): ``'exact'`` (the
      default: the derivative of the compensated forward; the Taylor terms
      carry gradient to the kernel, and a step's earlier groups to ``x`` and
      the kernel), ``'published'`` (the authors' layer: only the current
      batch's moments carry gradient, a ``1/window`` share) or ``'batch'``
      (BN's backward with the pooled moments: the current batch's backward
      statistics at full weight) or ``'averaged'`` (``'batch'`` with the
      backward statistics averaged over the window, as MABN does; not the
      derivative of the forward; needs :func:`mabn_jax.value_and_grad`). See
      :mod:`mabn_jax.functional.cross_iteration`.
    running_stats: what ``mean``/``var`` average for inference: ``'pooled'``
      (the default: the pooled statistics each step normalized with) or
      ``'batch'`` (the published layer: the current batch's statistics).
      The published CBN is ``backward='published', running_stats='batch'``.
    derivative_stride: take the new entries' kernel derivatives over every
      ``s``-th output position per spatial axis only (about ``1 / s^d`` of
      the extra backward-weight convolution's cost; the moments stay the
      full ones). ``1`` (the default): the exact derivatives.
    derivative_dtype: dtype of the ``dmu_buffer``/``dnu_buffer`` variables
      (``None``, the default: float32); ``jnp.bfloat16`` halves them (the
      new entries' derivatives are rounded to it; the Taylor offsets and
      inner products stay float32; see ``CBNConfig.derivative_dtype``).
    kernel_derivatives: how a new entry's ``d nu / d W`` is taken:
      ``'auto'`` (the default: from the inputs' Gram matrix where that is
      cheaper, else the backward-weight convolution) or ``'convolution'``
      (always the convolution); the same derivative either way.
    rematerialize: whether the backward pass recomputes the activation-sized
      values from ``y`` (a ``jax.checkpoint``, the default) instead of keeping
      what autodiff saves.
    momentum: running-statistics EMA, Flax's convention (0.9 = the
      published CBN's 0.1 on the new value).
    epsilon: added to the variance inside the square root.
    norm_batch_size: samples normalized together (``None``: the whole
      per-device batch); the groups of a step act as consecutive iterations.
    axis_name, axis_index_groups: mapped axis (and device groups) over which
      statistics and their derivatives are averaged (synchronized CBN).
    use_running_average: if True, normalize with the running statistics.
    dtype: computation/result dtype (default: inferred as in Flax).
    param_dtype: dtype of all parameters.
    use_scale, use_norm_bias: the normalization's affine ``scale``/``bias``.
    scale_init, bias_init: their initializers.
    kernel_init, conv_bias_init: the convolution's initializers
      (``flax.linen.Conv``'s defaults).
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: Any = "SAME"
  use_bias: bool = False
  centered: bool = False
  window: int = 4
  burn_in: int = 100
  naive: bool = False
  group_history: bool = False
  backward: str = F.CBNConfig.backward
  running_stats: str = F.CBNConfig.running_stats
  derivative_stride: int = F.CBNConfig.derivative_stride
  derivative_dtype: Any = F.CBNConfig.derivative_dtype
  kernel_derivatives: str = F.CBNConfig.kernel_derivatives
  rematerialize: bool = F.CBNConfig.rematerialize
  momentum: float = 0.9
  epsilon: float = 1e-5
  norm_batch_size: Optional[int] = None
  axis_name: Optional[str] = None
  axis_index_groups: Any = None
  use_running_average: Optional[bool] = None
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  use_norm_bias: bool = True
  scale_init: Any = initializers.ones
  bias_init: Any = initializers.zeros
  kernel_init: Any = nn.linear.default_kernel_init
  conv_bias_init: Any = initializers.zeros

  method_class: ClassVar[type] = CBN

  @nn.nowrap
  def config(self) -> F.CBNConfig:
    return functional_config(self, F.CBNConfig)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None):
    """Convolves and normalizes ``x`` ``(N, *spatial, cin)``; returns ``(N, *spatial_out, C)``."""
    where = layer_path(self)
    use_running_average = nn.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    if not use_running_average and not self.is_initializing():
      require_bound_axis(where, self.axis_name)
    kernel_size = (
      (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    )
    rank = len(kernel_size)
    if x.ndim != rank + 2:
      raise ValueError(
        f"{where}: expected an input of rank {rank + 2} (batch, {rank} spatial "
        f"axes, channels) for kernel_size {kernel_size}, got shape {tuple(x.shape)}."
      )
    config = self.config()
    config.validate(where)
    spec = F.ConvSpec.make(rank, self.strides, self.padding, where=where)

    conv_cls = CenteredConv if self.centered else nn.Conv
    conv = conv_cls(
      features=self.features,
      kernel_size=kernel_size,
      strides=spec.strides,
      padding=self.padding,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=self.kernel_init,
      bias_init=self.conv_bias_init,
      name="conv",
    )
    y = conv(x)
    conv_params = conv.variables["params"]
    kernel = conv_params["kernel"]
    if self.centered:
      kernel = center_kernel(kernel, after=x)
    bias = conv_params.get("bias") if self.use_bias else None

    norm = _CrossIterationNorm(
      config=config,
      use_scale=self.use_scale,
      use_bias=self.use_norm_bias,
      scale_init=self.scale_init,
      bias_init=self.bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="norm",
    )
    return norm(y, x, kernel, bias, spec, use_running_average, where)


class _CrossIterationNorm(nn.Module):
  """The normalization half of :class:`CrossIterationConvNorm` (its ``'norm'`` child).

  Holds the ``batch_stats`` state, the taps and the affine ``scale``/``bias``;
  called with the conv output, its input, its effective kernel, the conv
  bias (or None), the conv spec, the mode and the parent's path for errors.
  """

  config: F.CBNConfig
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Any = initializers.ones
  bias_init: Any = initializers.zeros
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  use_running_average: Optional[bool] = None

  method_class: ClassVar[type] = CBN

  @nn.nowrap
  def functional(self) -> CBN:
    return CBN(self.config)

  @nn.compact
  def __call__(self, y, x, kernel, bias, spec: F.ConvSpec, use_running_average: bool, where: str):
    # ``where`` is the parent's layer_path: errors name the layer users wrote.
    return normalize(
      self, y, use_running_average, conv=ConvContext(x, kernel, spec, bias), where=where
    )
