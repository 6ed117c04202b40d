"""Cross-Iteration Batch Normalization (CBN): the pure math, no Flax.

CBN (Yao et al., CVPR 2021) normalizes the output ``y = conv(x, W)`` of a
convolution with statistics pooled over the last ``k`` iterations, each
buffered one carried to the current kernel by a first-order Taylor
expansion. The method, the gradients this library offers and how the
buffers work are described in ``docs/normalization.md``, section 4,
"Cross-Iteration Batch Normalization (CBN)".

Modules (every name below is importable from this package):

* :mod:`.geometry`: :class:`ConvSpec`, :func:`conv`;
* :mod:`.derivatives`: :func:`moment_derivatives` (``d mu / d W``, ``d nu / d W``);
* :mod:`.compensation`: :func:`compensate`, :func:`channel_inner`, :func:`stored_entries`,
  :func:`taylor_offsets`;
* :mod:`.window`: :func:`batch_moments`, :func:`pooled_moments` and the
  windows each group pools;
* :mod:`.gradients`: the gradients (``CBNConfig.backward``), :data:`BACKWARDS`;
* :mod:`.averaged`: the custom VJP of ``backward='averaged'``;
* :mod:`.state`: :class:`CBNState`, :class:`CBNConfig`, :func:`init_state`;
* :mod:`.step`: the training step :func:`normalize_train`;
* :mod:`.inference`: :func:`normalize_inference`.

Usage without Flax (the kernel is HWIO-like ``(*kernel_size, cin, cout)``)::

  spec = cross_iteration.ConvSpec.make(kernel.ndim - 2, strides=1, padding="SAME")
  state = cross_iteration.init_state(kernel.shape, window=4)
  def loss(kernel, x, state):
    y = cross_iteration.conv(x, kernel, spec)
    xhat, new_state = cross_iteration.normalize_train(y, x, kernel, state, spec)
    return jnp.sum(xhat * gy), new_state
  (l, new_state), gw = jax.value_and_grad(loss, has_aux=True)(kernel, x, state)

``backward='averaged'`` also differentiates two taps and adds their
cotangents to the state (``docs/normalization.md``, section 4).
"""

# Private names, importable from here as from the single module this package
# replaced (tests and benchmarks reach some of them).
from mabn_jax.functional.cross_iteration.averaged import _averaged_bwd as _averaged_bwd
from mabn_jax.functional.cross_iteration.averaged import _averaged_fwd as _averaged_fwd
from mabn_jax.functional.cross_iteration.averaged import _averaged_normalize as _averaged_normalize
from mabn_jax.functional.cross_iteration.averaged import _centred_scaled as _centred_scaled
from mabn_jax.functional.cross_iteration.compensation import (
  _channel_inner_bwd as _channel_inner_bwd,
)
from mabn_jax.functional.cross_iteration.compensation import (
  _channel_inner_fwd as _channel_inner_fwd,
)
from mabn_jax.functional.cross_iteration.compensation import _dot_kernel as _dot_kernel
from mabn_jax.functional.cross_iteration.compensation import (
  channel_inner,
  compensate,
  stored_entries,
  taylor_offsets,
)
from mabn_jax.functional.cross_iteration.derivatives import (
  KERNEL_DERIVATIVES,
  gram_is_cheaper,
  moment_derivatives,
)
from mabn_jax.functional.cross_iteration.derivatives import _dnu_from_gram as _dnu_from_gram
from mabn_jax.functional.cross_iteration.geometry import ConvSpec, Padding, conv
from mabn_jax.functional.cross_iteration.geometry import _explicit_pads as _explicit_pads
from mabn_jax.functional.cross_iteration.geometry import _position_subset as _position_subset
from mabn_jax.functional.cross_iteration.gradients import BACKWARDS, GRADIENTS, Gradient
from mabn_jax.functional.cross_iteration.inference import inference_scale_shift, normalize_inference
from mabn_jax.functional.cross_iteration.method import Method
from mabn_jax.functional.cross_iteration.state import (
  RUNNING_STATS,
  CBNConfig,
  CBNState,
  in_burn_in,
  init_state,
  newest_entries,
  state_shapes,
)
from mabn_jax.functional.cross_iteration.state import _is_floating as _is_floating
from mabn_jax.functional.cross_iteration.step import _CHECKPOINTED_STEP as _CHECKPOINTED_STEP
from mabn_jax.functional.cross_iteration.step import SAVED_STATISTICS, normalize_train
from mabn_jax.functional.cross_iteration.step import _checked_tap as _checked_tap
from mabn_jax.functional.cross_iteration.step import _train_step as _train_step
from mabn_jax.functional.cross_iteration.step import _train_step_body as _train_step_body
from mabn_jax.functional.cross_iteration.step import _window_moments as _window_moments
from mabn_jax.functional.cross_iteration.step import _with_new_entries as _with_new_entries
from mabn_jax.functional.cross_iteration.step import _with_running_stats as _with_running_stats
from mabn_jax.functional.cross_iteration.window import _average_windows as _average_windows
from mabn_jax.functional.cross_iteration.window import (
  batch_moments,
  history_entries,
  pooled_moments,
  pooled_moments_per_group,
  window_entries,
  window_mean,
)

__all__ = [
  "BACKWARDS",
  "GRADIENTS",
  "KERNEL_DERIVATIVES",
  "RUNNING_STATS",
  "SAVED_STATISTICS",
  "CBNConfig",
  "CBNState",
  "ConvSpec",
  "Gradient",
  "Method",
  "Padding",
  "batch_moments",
  "channel_inner",
  "compensate",
  "conv",
  "gram_is_cheaper",
  "history_entries",
  "in_burn_in",
  "inference_scale_shift",
  "init_state",
  "moment_derivatives",
  "newest_entries",
  "normalize_inference",
  "normalize_train",
  "pooled_moments",
  "pooled_moments_per_group",
  "state_shapes",
  "stored_entries",
  "taylor_offsets",
  "window_entries",
  "window_mean",
]
