"""MABN's moving averages and its stabilized normalization (a custom VJP).

The forward map is ``x * (r * gamma / sqrt(chi + eps)) + beta``; its backward
pass uses the moving average of the backward statistic ``Psi`` instead of the
batch's (``docs/normalization.md``, section 2 (b, c)), and hands this step's
``Psi`` out through the cotangent of a zero tap. :mod:`mabn_jax.functional.mabn`
builds the training step on it.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import UnnamedLayerError
from mabn_jax.functional.backward_stats import (
  check_tap_varies_like_input,
  tap_increment,
  varying_axes,
)


def moving_averages(
  buffer: jax.Array, rows: jax.Array, first_step: jax.Array, config: Any
) -> Tuple[jax.Array, jax.Array]:
  """``(averages, new_buffer)``: what each group of this step sees, and the buffer.

  Args:
    buffer: ``(m, C)`` past values (SMA) or past averages (EMA), newest last.
    rows: ``(G, C)`` this step's group values, in order.
    first_step: scalar bool, True on step 1 (seeds the EMA).
    config: the MABN config; ``config.moving_average`` selects SMA
      (``docs/normalization.md``, 2 (b)) or EMA.
  """
  if config.moving_average == "sma":
    return st.window_means(buffer, rows), st.push(buffer, rows)
  size = buffer.shape[0]
  last = jnp.where(first_step, rows[0], buffer[-1])
  averages = st.ema_means(last, rows, 1.0 - 2.0 / (size + 1.0))
  return averages, st.push(buffer, averages)


# The stabilized normalization and the affine map: forward
#   y     = x * (rate * gamma) + beta,      rate = inv_std * r,
# backward (``docs/normalization.md``, 2 (b, c)), ct the cotangent of y:
#   g     = r * gamma * ct              (gradient at xhat = x * inv_std)
#   Psi_B = mean(xhat * g)              (per group, averaged over axis_name)
#   g_x   = (g - xhat * Psi) * inv_std  with Psi the SMA (or Psi_B in warmup)
#   g_gamma = sum(ct * xhat * r),  g_beta = sum(ct).
# With s = sum(x * ct) per group, Psi_B = s * rate * gamma / count and
# g_gamma = sum_groups(s * rate): one fused reduction pass over
# (x, ct) gives s and sum(ct), and one elementwise pass gives
#   g_x   = ct * (rate * gamma) - x * (Psi * inv_std^2).
# No full-size residual other than x is kept, and xhat is never formed.
# inv_std, rate, psi_buffer and the flags get no gradient.
# Errors raised here are UnnamedLayerErrors (the trace is shared by layers);
# normalize_train names the layer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _stabilized_normalize(
  x, tap, inv_std, rate, psi_buffer, use_average, first_step, scale, bias, groups, axis, config
):
  del tap, psi_buffer, use_average, first_step, config
  dtype = jnp.promote_types(jnp.promote_types(inv_std.dtype, scale.dtype), bias.dtype)
  mul = rate.astype(dtype) * scale.astype(dtype)[None, :]
  return x.astype(dtype) * st.broadcast_groups(mul, x, axis) + st.broadcast_channels(
    bias.astype(dtype), x, axis
  )


def _stabilized_fwd(
  x, tap, inv_std, rate, psi_buffer, use_average, first_step, scale, bias, groups, axis, config
):
  if (x.perturbed or scale.perturbed or bias.perturbed) and not tap.perturbed:
    raise UnnamedLayerError(
      "the MABN backward statistic is not being fed: the gradient "
      "is taken with respect to the input or the affine parameters but not the "
      "'backward_stats' tap, "
      "so psi_buffer would go stale. Either the gradient is not taken with the "
      "library's training contract, or the variables given to the model lack "
      "the 'backward_stats' collection (pass the variables fun receives). "
      "Compute gradients with "
      "mabn_jax.value_and_grad(loss_fn)(variables, ...) (Flax NNX: "
      "mabn_jax.nnx.value_and_grad(loss_fn)(model, ...); or differentiate "
      "the tap and add its cotangent to psi_buffer) instead of "
      "jax.grad/jax.value_and_grad (nnx.grad) on the params alone."
    )
  check_tap_varies_like_input(x.value, tap.value, config)
  res = tuple(p.value for p in (x, inv_std, rate, psi_buffer, use_average, first_step, scale, bias))
  out = _stabilized_normalize(res[0], tap.value, *res[1:], groups, axis, config)
  return out, res


def _sum_to_type_of(grad: jax.Array, param: jax.Array) -> jax.Array:
  """``grad`` summed over the mesh axes along which it varies but ``param``
  does not (under ``jax.shard_map``, replicated ``scale``/``bias`` with a
  split input: what autodiff's transpose of the implicit broadcast does), in
  ``param``'s dtype."""
  axes = tuple(sorted(varying_axes(grad) - varying_axes(param), key=str))
  if axes:
    grad = jax.lax.psum(grad, axes)
  return grad.astype(param.dtype)


def _stabilized_bwd(groups, axis, config, res, ct):
  x, inv_std, rate, psi_buffer, use_average, first_step, scale, bias = res
  if isinstance(ct, SymbolicZero):
    aval: Any = ct.aval
    ct = jnp.zeros(aval.shape, aval.dtype)
  dtype = inv_std.dtype
  x32, ct32 = x.astype(dtype), ct.astype(dtype)
  gamma = scale.astype(dtype)[None, :]
  count = x.size // (groups * x.shape[axis])  # elements per group and channel
  # The one reduction pass over (x, ct): per group sum(x * ct) (local; the
  # statistic is averaged over axis_name below) and sum(ct).
  reduced = st._grouped_reduction_axes(x.ndim, axis)
  x_ct = jnp.sum(st.split_groups(x32 * ct32, groups), axis=reduced)  # (G, C)
  ct_sum = jnp.sum(st.split_groups(ct32, groups), axis=reduced)  # (G, C)
  # psi_batch = mean(xhat * g) = mean(x * ct) * inv_std * r * gamma.
  psi_batch = (x_ct / count) * (rate * gamma)
  if config.axis_name is not None:
    psi_batch = jax.lax.pmean(
      psi_batch, config.axis_name, axis_index_groups=config.axis_index_groups
    )
  psi_average, new_psi_buffer = moving_averages(psi_buffer, psi_batch, first_step, config)
  psi = jnp.where(use_average, psi_average, psi_batch)
  grad_x = ct32 * st.broadcast_groups(rate * gamma, x, axis) - x32 * st.broadcast_groups(
    psi * jnp.square(inv_std), x, axis
  )
  grad_scale = _sum_to_type_of(jnp.sum(x_ct * rate, axis=0), scale)
  grad_bias = _sum_to_type_of(jnp.sum(ct_sum, axis=0), bias)
  if groups <= psi_buffer.shape[0]:
    # Every group's Psi_B (or an average it reaches) is pushed into the
    # buffer, so a non-finite one makes the increment non-finite by itself.
    increment = new_psi_buffer - psi_buffer
  else:
    increment = tap_increment(new_psi_buffer, psi_buffer, psi_batch)
  return (grad_x.astype(x.dtype), increment, None, None, None, None, None, grad_scale, grad_bias)


_stabilized_normalize.defvjp(_stabilized_fwd, _stabilized_bwd, symbolic_zeros=True)
