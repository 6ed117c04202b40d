"""Weight centralization (``docs/normalization.md``, section 2 (a)).

MABN drops the mean from its statistics; the layer before it keeps its output
near zero-mean by using the kernel ``W - mean(W)``, the mean taken per output
channel over every other kernel axis (HWIO conv kernels: H, W and I; Dense
kernels ``(in, out)``: in).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax


# Jitted so that a network's convolutions of equal shapes share one trace of it.
@jax.jit
def center_kernel(kernel: jax.Array, after: Optional[jax.Array] = None) -> jax.Array:
  """Returns ``kernel`` minus its mean over all axes but the last (outputs).

  Args:
    kernel: ``(..., out_features)`` array, e.g. HWIO ``(kh, kw, cin, cout)``.
    after: optional array (the layer's input). The result does not depend on
      its value, but is computed after it: see :func:`_after`.

  Returns:
    Array of the same shape and dtype whose every output slice sums to zero.
  """
  mean = jnp.mean(kernel, axis=tuple(range(kernel.ndim - 1)), keepdims=True)
  if after is not None:
    mean = _after(mean, after)
  return kernel - mean


def _after(value: jax.Array, anchor: jax.Array) -> jax.Array:
  """``value`` unchanged, but data-dependent on ``anchor``.

  A function of the parameters alone may be scheduled anywhere; XLA's CPU
  scheduler computes every layer's centred kernel at the start of the step,
  so all of them are live through the whole forward pass (more peak memory
  than BN). Tying the kernel's
  (small) mean to the layer's input moves each centring to its layer.
  ``optimization_barrier`` does not constrain the CPU scheduler, hence the
  select: ``x < x`` is false for every float, NaN included, so the value and
  its gradient are exactly those of ``value``.
  An ``anchor`` sharded over explicit mesh axes (``jax.sharding.AxisType.Explicit``,
  the default of ``jax.make_mesh``) cannot be sliced to one element without
  communication; ``value`` is then returned as is.
  """
  if _explicitly_sharded(anchor):
    return value
  first = lax.stop_gradient(anchor.reshape(-1)[0])
  return jnp.where(first < first, jnp.zeros_like(value), value)


def _explicitly_sharded(x: jax.Array) -> bool:
  """Whether ``x``'s type is sharded along an explicit mesh axis."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(axis is not None for axis in spec)


def centered_conv_general_dilated(
  lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any
) -> jax.Array:
  """``lax.conv_general_dilated`` with the kernel ``rhs`` centred per output.

  Same arguments as ``lax.conv_general_dilated``; ``rhs`` must have its
  output-feature axis last (HWIO, Flax's layout). The centring is computed
  when the convolution runs (``center_kernel(rhs, after=lhs)``).
  """
  return lax.conv_general_dilated(lhs, center_kernel(rhs, after=lhs), *args, **kwargs)
