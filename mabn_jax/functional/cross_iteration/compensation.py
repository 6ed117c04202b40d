"""Taylor compensation of buffered CBN entries to the current kernel.

An entry measured with kernel ``W_old`` is stored as its derivatives ``d``
and its offsets ``stat - d . W_old`` (:func:`stored_entries`); its value at
the current kernel ``W`` is ``offset + d . W`` (:func:`compensate`), the
first-order Taylor expansion ``stat + d . (W - W_old)``
(``docs/normalization.md``, section 4, "Cross-Iteration Batch Normalization
(CBN)").
"""

from __future__ import annotations

import functools
import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp
from jax import lax


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
  mu: jax.Array,
  nu: jax.Array,
  dmu: jax.Array,
  dnu: jax.Array,
  kernel: jax.Array,
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


def compensate(mu_offset, nu_offset, dmu, dnu, kernel, differentiable: bool = False) -> Tuple:
  """First-order Taylor compensation of entries to ``kernel``.

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
  mu_dot, nu_dot = _dot_kernel(
    lax.stop_gradient(dmu), lax.stop_gradient(dnu), kernel, differentiable
  )
  return lax.stop_gradient(mu_offset) + mu_dot, lax.stop_gradient(nu_offset) + nu_dot


def _dot_kernel(dmu, dnu, kernel, differentiable: bool = False):
  """Per-entry, per-channel ``(dmu . W, dnu . W)``, each ``(*E, C)``.

  ``dmu`` is ``(*E, *K)`` and ``dnu`` ``(*E, *K, C)`` for entry axes ``E``,
  in any floating dtype (``CBNConfig.derivative_dtype``): the products are
  taken in at least float32, never with a rounded kernel. The kernel is a
  constant unless ``differentiable``.
  """
  channels = kernel.shape[-1]
  lead = dnu.shape[: dnu.ndim - kernel.ndim]
  if not differentiable:
    kernel = lax.stop_gradient(kernel)
  dtype = jnp.promote_types(jnp.promote_types(dnu.dtype, kernel.dtype), jnp.float32)
  w = kernel.astype(dtype).reshape(-1, channels)
  mu_dot = jnp.einsum("pk,kc->pc", dmu.reshape(math.prod(lead), -1).astype(dtype), w)
  nu_dot = channel_inner(dnu.reshape(math.prod(lead), -1, channels), w)
  return mu_dot.reshape(lead + (channels,)), nu_dot.reshape(lead + (channels,))


# out[e, c] = sum_k d[e, k, c] * w[k, c] for d (E, K, C), w (K, C): one inner
# product per entry and channel, written as XLA's CPU backend runs it fastest
# (BENCHMARKS.md, "Tried and dropped"): the elementwise
# product summed by a matrix-vector product with ones per entry, E the batch
# axis of both operands, so that no operand is relaid out. As an einsum with
# C as batch axis XLA copies the whole array into a (C, E, K) layout; as a
# sum over K it strides through it. The backward pass is elementwise: w's
# cotangent is one sum over the E entries (autodiff's transpose of the
# matrix-vector product is slower). A narrower d (a bfloat16 buffer) is
# widened to w's dtype inside the products' fusions.
@jax.custom_vjp
def channel_inner(d, w):
  """``sum_k d[e, k, c] * w[k, c]``: ``d`` ``(E, K, C)``, ``w`` ``(K, C)`` ->
  ``(E, C)`` in ``w``'s dtype (the compensation's inner products)."""
  if d.shape[0] == 0:
    return jnp.zeros((0, d.shape[2]), w.dtype)
  return jnp.einsum("ek,ekc->ec", jnp.ones(d.shape[:2], w.dtype), d.astype(w.dtype) * w[None])


def _channel_inner_fwd(d, w):
  return channel_inner(d, w), (d, w)


def _channel_inner_bwd(res, ct):
  d, w = res
  grad_w = functools.reduce(
    jnp.add, [d[e].astype(w.dtype) * ct[e][None] for e in range(d.shape[0])], jnp.zeros_like(w)
  )
  return (ct[:, None, :] * w[None]).astype(d.dtype), grad_w


channel_inner.defvjp(_channel_inner_fwd, _channel_inner_bwd)
