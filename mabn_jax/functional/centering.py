"""Weight centralization (spec, section 2 (a)).

MABN drops the mean from its statistics; the layer before it keeps its output
near zero-mean by using the kernel ``W - mean(W)``, the mean taken per output
channel over every other kernel axis (HWIO conv kernels: H, W and I; Dense
kernels ``(in, out)``: in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def center_kernel(kernel: jax.Array) -> jax.Array:
  """Returns ``kernel`` minus its mean over all axes but the last (outputs).

  Args:
    kernel: ``(..., out_features)`` array, e.g. HWIO ``(kh, kw, cin, cout)``.

  Returns:
    Array of the same shape and dtype whose every output slice sums to zero.
  """
  axes = tuple(range(kernel.ndim - 1))
  return kernel - jnp.mean(kernel, axis=axes, keepdims=True)
