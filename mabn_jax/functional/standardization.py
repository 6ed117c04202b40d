"""Weight standardization of kernels (``docs/normalization.md``, section 5 (a)).

The convolution before a per-sample normalization (GroupNorm: the ``'ws_gn'``
registry entry) uses the kernel ``(W - mean(W)) / (std(W) + eps)``, the mean
and the (population) standard deviation taken per output channel over every
other kernel axis (HWIO conv kernels: H, W and I), ``eps = 1e-5``: the
weight standardization of Qiao et al. (2019) as big_vision's ``StdConv``
(``big_vision/models/bit.py``) computes it. The centring is
:func:`~mabn_jax.functional.centering.center_kernel`'s.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mabn_jax.functional._checks import layer_error
from mabn_jax.functional.centering import center_kernel

DEFAULT_EPSILON = 1e-5
"""big_vision's ``StdConv`` constant, added to the standard deviation."""


@functools.partial(jax.jit, static_argnames=("epsilon",))
def standardize_kernel(kernel: jax.Array, epsilon: float = DEFAULT_EPSILON) -> jax.Array:
  """Returns ``(kernel - mean) / (std + epsilon)`` over all axes but the last.

  Args:
    kernel: ``(..., out_features)`` array, e.g. HWIO ``(kh, kw, cin, cout)``.
    epsilon: added to the standard deviation (not the variance).

  Returns:
    Array of ``kernel``'s shape and dtype; every output slice has mean zero
    and standard deviation ``std / (std + epsilon)`` (about one). The
    moments are computed in at least float32. A slice of equal weights
    (``std == 0``) becomes zeros, with a finite gradient.
  """
  compute = jnp.promote_types(kernel.dtype, jnp.float32)
  centred = center_kernel(kernel.astype(compute))
  var = jnp.mean(jnp.square(centred), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
  positive = var > 0
  # sqrt's derivative is infinite at 0: take it only where var > 0.
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return (centred / (std + epsilon)).astype(kernel.dtype)


def check_kernel_shape(shape: Sequence[int], where: Optional[str] = None) -> None:
  """Raises unless every output channel has at least two weights to standardize.

  A kernel with one weight per output (a 1x1 convolution of one input
  channel) standardizes to zeros: the layer would output zeros whatever its
  weights.
  """
  fan_in = math.prod(shape[:-1])
  if fan_in < 2:
    raise layer_error(
      where,
      f"the kernel of shape {tuple(shape)} has {fan_in} weight per output channel; "
      "weight standardization needs at least 2 (with one, every standardized "
      "kernel is zero). Use a plain convolution for this layer.",
    )
