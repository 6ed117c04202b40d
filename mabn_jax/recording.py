"""Recording the batch statistics of every normalizer during training.

Spec, sections 1 and 6: training BN depends on four batch statistics per
layer and normalization group, two forward (``mu_B``, ``var_B``) and two
backward (``g_B = mean(g)``, ``Psi_B = mean(xhat * g)``, ``g`` the gradient
at ``xhat``). MABN replaces them by moving averages: it normalizes with
``chi`` (the batch ``chi_B`` during warmup, the SMA after) and uses ``Psi``
(the batch ``Psi_B`` during warmup, the SMA after) in the backward pass.

:func:`value_and_grad` is :func:`mabn_jax.value_and_grad` plus these
statistics. It does not change training: no variable is added to the model
(the returned variables have exactly the layout and values of
:func:`mabn_jax.value_and_grad`'s), and the forward and backward values are
untouched:

* BN-type layers (``flax.linen.BatchNorm``, :class:`mabn_jax.BatchNorm`,
  :class:`mabn_jax.BatchRenorm`) are intercepted
  (``flax.linen.intercept_methods``) in training mode and their output ``y``
  goes through an identity with a custom VJP that passes the output gradient
  ``g_y`` through unchanged; its extra zero *probe* argument (one per layer
  call, built for the step and differentiated with the parameters, like
  Flax's ``perturb``) receives as cotangent the four statistics, computed in
  the backward pass from the layer input ``x`` and ``g = gamma * g_y``.
* MABN's statistics are read from its state before and after the step: its
  ``chi_buffer``/``psi_buffer`` rows pushed in the step are ``chi_B`` and
  ``Psi_B``; the values used are these (warmup) or their window means.

For Batch Renorm ``g`` is measured at its renormalized activation
``r * xhat + d`` (``gamma * g_y``, without the factor ``r``), and ``xhat``
uses the batch statistics. Cross-iteration BN (a conv+norm module whose
statistics are compensated inside) is not recorded.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

from mabn_jax import discovery
from mabn_jax.functional import mabn as mabn_math
from mabn_jax.functional import statistics as st
from mabn_jax.training import differentiate

BN_STATISTICS = ("mu", "var", "g", "psi")
"""Names of the four statistics recorded for a BN-type layer (``docs/normalization.md``,
section 1)."""
MABN_STATISTICS = ("chi_batch", "chi_used", "psi_batch", "psi_used")
"""Names recorded for a MABN layer (``docs/normalization.md``, section 2)."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bn_statistics_tap(y, x, gamma, probe, info):
  """Identity on ``y``; the cotangent of ``probe`` is ``(4, G, C)`` statistics."""
  del x, gamma, probe, info
  return y


def _tap_fwd(y, x, gamma, probe, info):
  del probe
  return y, (x, gamma)


def _tap_bwd(info, residuals, g_y):
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


_bn_statistics_tap.defvjp(_tap_fwd, _tap_bwd)


def _layer_key(module: nn.Module, seen: dict) -> str:
  path = "/".join(str(p) for p in module.path)
  count = seen.get(path, 0)
  seen[path] = count + 1
  return path if count == 0 else f"{path}#{count}"


def _interceptor(layers: dict, probes: Optional[Mapping], seen: dict):
  """Flax interceptor: describes (``probes`` None) or taps the normalizers."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
      return next_fun(*args, **kwargs)
    method = discovery.method_of(module)
    if method is None or method.needs_conv:
      return next_fun(*args, **kwargs)
    call_flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if nn.merge_param("use_running_average", module.use_running_average, call_flag):
      return next_fun(*args, **kwargs)
    x, config = args[0], method.config
    where = f"{type(module).__name__} '{'/'.join(module.path)}'"
    if not isinstance(getattr(module, "axis", -1), int) or kwargs.get("mask") is not None:
      raise ValueError(
        f"{where}: the recording tools take one integer feature axis and no mask "
        f"(got axis={getattr(module, 'axis', None)!r}, mask "
        f"{'given' if kwargs.get('mask') is not None else 'None'})."
      )
    axis = st.canonical_axis(config.axis, x.ndim, where)
    groups = st.num_groups(x.shape[0], config.norm_batch_size, where)
    key = _layer_key(module, seen)
    y = next_fun(*args, **kwargs)
    if method.records_from_state:
      layers[key] = ("state", tuple(module.path), groups, method)
      return y
    info = (groups, axis, float(config.epsilon), config.axis_name, config.axis_index_groups)
    layers[key] = ("bn", (4, groups, x.shape[axis]))
    if probes is None:
      return y
    gamma = module.get_variable("params", "scale") if module.use_scale else None
    return _bn_statistics_tap(
      y,
      jax.lax.stop_gradient(x),
      None if gamma is None else jax.lax.stop_gradient(gamma),
      probes[key],
      info,
    )

  return intercept


def _get(tree: Mapping, path):
  for key in path:
    tree = tree[key]
  return tree


def mabn_statistics(old_state: Mapping, new_state: Mapping, groups: int, warmup_steps: int):
  """MABN's batch and used statistics of one step, from its state.

  Args:
    old_state, new_state: the layer's ``'batch_stats'`` before and after the
      step (``chi_buffer``, ``psi_buffer`` ``(m, C)``, ``step``).
    groups: normalization groups ``G`` in the step.
    warmup_steps: the layer's ``warmup_steps``.

  Returns:
    ``{'chi_batch', 'chi_used', 'psi_batch', 'psi_used'}``, ``(G, C)`` float32
    each: row ``j`` is group ``j``'s batch value and the value it used (the
    batch value during warmup, else the SMA of the ``m`` latest groups).
  """
  method = mabn_math.Method(
    mabn_math.MABNConfig(warmup_steps=warmup_steps), buffer_size=old_state["chi_buffer"].shape[0]
  )
  return method.step_statistics(old_state, new_state, groups)


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """:func:`mabn_jax.value_and_grad` that also returns every layer's statistics.

  Args:
    fun: as for :func:`mabn_jax.value_and_grad`: ``fun(variables, *args)``
      returning ``(loss, mutated)`` (or ``(loss, (mutated, aux))``); the model
      must be applied in training mode inside it.
    has_aux: whether ``fun`` returns auxiliary data.

  Returns:
    A function of the same arguments returning ``(((value, variables), grads),
    statistics)``: the first item exactly what :func:`mabn_jax.value_and_grad`
    returns, and ``statistics`` ``{layer path: {name: (G, C) float32}}`` with
    names :data:`BN_STATISTICS` for BN-type layers and
    :data:`MABN_STATISTICS` for MABN (a BN-type layer called twice in a step
    gets ``path#1`` for its second call; a MABN layer called twice raises, see
    :func:`mabn_jax.training.claim_tap`). Pure and jit-able.
  """
  name = "mabn_jax.recording.value_and_grad"

  def wrapped(variables, *args, **kwargs):
    layers = _describe(fun, variables, args, kwargs)
    probes = {
      key: jnp.zeros(desc[1], jnp.float32) for key, desc in layers.items() if desc[0] == "bn"
    }
    context = lambda extra: nn.intercept_methods(_interceptor({}, extra, {}))
    value, new_variables, grads, probe_cotangent = differentiate(
      fun, variables, args, kwargs, has_aux=has_aux, name=name, extra=probes, context=context
    )
    statistics = {}
    for key, desc in layers.items():
      if desc[0] == "bn":
        statistics[key] = dict(zip(BN_STATISTICS, probe_cotangent[key], strict=True))
      else:
        _, path, groups, method = desc
        statistics[key] = method.step_statistics(
          _get(variables["batch_stats"], path), _get(new_variables["batch_stats"], path), groups
        )
    return ((value, new_variables), grads), statistics

  return wrapped


def _describe(fun, variables, args, kwargs) -> dict:
  """The normalizer calls of ``fun``'s step (shapes only, nothing computed)."""
  layers: dict = {}
  variables = unfreeze(variables)
  if "params" not in variables:
    raise ValueError(
      "mabn_jax.recording.value_and_grad: the variables have no 'params' "
      f"collection (found {sorted(variables)})."
    )

  def call(v):
    with nn.intercept_methods(_interceptor(layers, None, {})):
      return fun(v, *args, **kwargs)

  jax.eval_shape(call, variables)
  return layers
