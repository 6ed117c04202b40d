"""The probe of a BN-type layer and the description of a normalizer call.

A BN-type layer's output ``y`` goes through :func:`statistics_probe`, an
identity with a custom VJP that passes the output gradient ``g_y`` through
unchanged; its extra zero *probe* argument (one per layer call, built for the
step and differentiated with the parameters, like Flax's ``perturb``)
receives as cotangent the four statistics ``(mu, var, g, psi)``, ``(4, G, C)``
float32, computed in the backward pass from the layer input ``x`` and
``g = gamma * g_y``. MABN-type layers (``records_from_state``) are described
instead, their statistics read from their state before and after the step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from mabn_jax.functional import interface
from mabn_jax.functional import statistics as st

BN_STATISTICS = ("mu", "var", "g", "psi")
"""Names of the four statistics recorded for a BN-type layer (``docs/normalization.md``,
section 1)."""
MABN_STATISTICS = ("chi_batch", "chi_used", "psi_batch", "psi_used")
"""Names recorded for a MABN layer (``docs/normalization.md``, section 2)."""


class ProbedCall(NamedTuple):
  """A BN-type layer call: its probe's shape ``(4, G, C)`` and the static
  ``info`` of :func:`statistics_probe`."""

  shape: Tuple[int, int, int]
  info: Tuple


class StateCall(NamedTuple):
  """A layer call whose statistics come from its state: where the state is
  (a linen path or an NNX module path), its groups ``G`` and its method."""

  path: Tuple
  groups: int
  method: interface.Method


def check_recordable(module: Any, mask: Any, where: str) -> None:
  """Raises for a layer the probes cannot measure: several feature axes or a mask."""
  if not isinstance(getattr(module, "axis", -1), int) or mask is not None:
    raise ValueError(
      f"{where}: the recording tools take one integer feature axis and no mask "
      f"(got axis={getattr(module, 'axis', None)!r}, mask "
      f"{'given' if mask is not None else 'None'})."
    )


def describe_call(method: interface.Method, x: jax.Array, where: str, path: Tuple) -> Any:
  """What the recorder needs of one training call of a normalizer with
  ``method`` on input ``x``: a :class:`ProbedCall`, a :class:`StateCall`,
  or ``None`` for a layer it does not record (cross-iteration BN)."""
  if method.needs_conv:
    return None
  config = method.config
  groups = st.num_groups(x.shape[0], config.norm_batch_size, where)
  if method.records_from_state:
    return StateCall(path, groups, method)
  axis = st.canonical_axis(config.axis, x.ndim, where)
  info = (groups, axis, float(config.epsilon), config.axis_name, config.axis_index_groups)
  return ProbedCall((4, groups, x.shape[axis]), info)


def probe(y: jax.Array, x: jax.Array, gamma: Optional[jax.Array], value, call: ProbedCall):
  """``y`` through :func:`statistics_probe`, with ``x`` and ``gamma`` held
  fixed (the probe changes no gradient but its own)."""
  gamma = None if gamma is None else jax.lax.stop_gradient(gamma)
  return statistics_probe(y, jax.lax.stop_gradient(x), gamma, value, call.info)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def statistics_probe(y, x, gamma, probe_value, info):
  """Identity on ``y``; the cotangent of ``probe_value`` is the ``(4, G, C)``
  statistics of the layer input ``x`` and gradient ``gamma * g_y``."""
  del x, gamma, probe_value, info
  return y


def _probe_fwd(y, x, gamma, probe_value, info):
  del probe_value
  return y, (x, gamma)


def _probe_bwd(info, residuals, g_y):
  groups, axis, epsilon, axis_name, axis_index_groups = info
  x, gamma = residuals
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  mean = lambda v: st.group_mean(v, groups, axis, axis_name, axis_index_groups)
  mu = mean(x)
  centred = x - st.broadcast_groups(mu, x, axis)
  var = mean(jnp.square(centred))
  xhat = centred / st.broadcast_groups(jnp.sqrt(var + epsilon), x, axis)
  g = g_y.astype(dtype)
  if gamma is not None:
    g = g * st.broadcast_channels(gamma.astype(dtype), x, axis)
  stats = jnp.stack([mu, var, mean(g), mean(xhat * g)]).astype(jnp.float32)
  zeros = lambda a: None if a is None else jnp.zeros_like(a)
  return g_y, zeros(residuals[0]), zeros(gamma), stats


statistics_probe.defvjp(_probe_fwd, _probe_bwd)


def zero_probes(calls: dict) -> dict:
  """``{key: zeros (4, G, C) float32}`` for every :class:`ProbedCall`."""
  return {
    key: jnp.zeros(call.shape, jnp.float32)
    for key, call in calls.items()
    if isinstance(call, ProbedCall)
  }


def collect(calls: dict, probe_cotangent: dict, state_of) -> dict:
  """``{key: {name: (G, C)}}``: the probes' cotangents split into
  :data:`BN_STATISTICS`, and for each :class:`StateCall` its method's
  ``step_statistics`` from ``state_of(path) -> (old, new)``."""
  statistics = {}
  for key, call in calls.items():
    if isinstance(call, ProbedCall):
      statistics[key] = dict(zip(BN_STATISTICS, probe_cotangent[key], strict=True))
    else:
      old, new = state_of(call.path)
      statistics[key] = call.method.step_statistics(old, new, call.groups)
  return statistics


def call_key(path: str, seen: dict) -> str:
  """``path``, or ``path#k`` for the ``k``-th repeated call in one step."""
  count = seen.get(path, 0)
  seen[path] = count + 1
  return path if count == 0 else f"{path}#{count}"
