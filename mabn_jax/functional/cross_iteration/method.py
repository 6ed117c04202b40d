"""Cross-Iteration BN as a :class:`~mabn_jax.functional.interface.Method`: the
functional interface the layers and the tools use."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mabn_jax.functional import batch_norm as bn
from mabn_jax.functional import interface
from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import layer_error
from mabn_jax.functional.affine import affine_map
from mabn_jax.functional.cross_iteration import inference, step
from mabn_jax.functional.cross_iteration import state as S


@dataclasses.dataclass(frozen=True)
class Method(bn.MeanVarMethod):
  """CBN (:class:`CBNConfig`) of the convolution given as ``conv``.

  Its input is the convolution's output, bias included; the feature axis is
  the last. With ``backward='averaged'`` its taps ``g_increment`` and
  ``psi_increment`` get the step's ``g_buffer``/``psi_buffer`` increments.
  """

  config: S.CBNConfig = S.CBNConfig()
  config_class = S.CBNConfig
  state_class = S.CBNState
  signature_fields = ("mean", "var", "count", "step")
  tap_targets = {"g_increment": "g_buffer", "psi_increment": "psi_buffer"}
  needs_conv = True

  def mismatch_cause(self):
    if self.config.group_history:
      return (
        "number of channels, or batch size (group_history keeps one history per "
        f"group of {self.config.norm_batch_size})"
      )
    return "number of channels"

  def feature_axis(self, ndim):
    return ndim - 1

  def init(self, num_features, *, kernel_shape=None, groups=None):
    if kernel_shape is None or kernel_shape[-1] != num_features:
      raise layer_error(
        None,
        f"CBN's state needs the kernel shape of its convolution "
        f"with {num_features} outputs, got {kernel_shape}.",
      )
    config = self.config
    return S.init_state(
      kernel_shape,
      config.window,
      naive=config.naive,
      groups=groups if config.group_history else None,
      averaged=config.gradient.averages_backward_statistics,
      derivative_dtype=config.derivative_dtype,
    )

  def init_for(self, x, conv=None):
    if conv is None:
      raise layer_error(None, "CBN normalizes a convolution's output and needs it (conv=).")
    groups = None
    if self.config.group_history:  # one history per group: the batch sets the layout
      groups = st.num_groups(x.shape[0], self.config.norm_batch_size, None)
    return self.init(x.shape[-1], kernel_shape=tuple(conv.kernel.shape), groups=groups)

  def train(self, x, state, *, scale=None, bias=None, tap=None, conv=None):
    if conv is None:
      raise layer_error(None, "CBN normalizes a convolution's output and needs it (conv=).")
    # The step takes the conv output without its bias (it only shifts the
    # running mean, passed separately).
    y32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if conv.bias is not None:
      y32 = y32 - conv.bias.astype(y32.dtype)
    taps = None if tap is None else (tap["g_increment"], tap["psi_increment"])
    normalized, new_state = step.normalize_train(
      y32, conv.x, conv.kernel, state, conv.spec, self.config, conv.bias, None, tap=taps
    )
    groups = st.num_groups(x.shape[0], self.config.norm_batch_size, None)
    y = affine_map(normalized, scale, bias, x.ndim - 1)
    return interface.TrainOutput(y, new_state, S.newest_entries(new_state, self.config, groups))

  def infer(self, x, state, *, scale=None, bias=None):
    normalized = inference.normalize_inference(x, state.mean, state.var, self.config.epsilon)
    return affine_map(normalized, scale, bias, x.ndim - 1)
