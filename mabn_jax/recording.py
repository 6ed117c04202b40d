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

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax.functional import mabn as mabn_math
from mabn_jax.functional import statistics as st
from mabn_jax.layers.mabn import MABN
from mabn_jax.training import BACKWARD_STATS, feed_backward_statistics, training_step

BN_STATISTICS = ("mu", "var", "g", "psi")
"""Names of the four statistics recorded for a BN-type layer (spec, section 1)."""
MABN_STATISTICS = ("chi_batch", "chi_used", "psi_batch", "psi_used")
"""Names recorded for a MABN layer (spec, section 2)."""


def _bn_types() -> tuple:
  from mabn_jax import layers

  return tuple(
      cls for cls in (
          nn.BatchNorm,
          getattr(layers, "BatchNorm", None),
          getattr(layers, "BatchRenorm", None),
      ) if cls is not None
  )


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
  bn_types = _bn_types()

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
      return next_fun(*args, **kwargs)
    is_mabn = isinstance(module, MABN)
    if not (is_mabn or isinstance(module, bn_types)):
      return next_fun(*args, **kwargs)
    call_flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if nn.merge_param("use_running_average", module.use_running_average, call_flag):
      return next_fun(*args, **kwargs)
    x = args[0]
    where = f"{type(module).__name__} '{'/'.join(module.path)}'"
    axis = st.canonical_axis(module.axis, x.ndim, where)
    groups = st.num_groups(x.shape[0], getattr(module, "norm_batch_size", None), where)
    key = _layer_key(module, seen)
    y = next_fun(*args, **kwargs)
    if is_mabn:
      layers[key] = ("mabn", tuple(module.path), groups, module.warmup_steps)
      return y
    channels = x.shape[axis]
    index_groups = module.axis_index_groups
    if index_groups is not None:
      index_groups = tuple(tuple(g) for g in index_groups)
    info = (groups, axis, float(module.epsilon), module.axis_name, index_groups)
    layers[key] = ("bn", (4, groups, channels))
    if probes is None:
      return y
    gamma = module.get_variable("params", "scale") if module.use_scale else None
    return _bn_statistics_tap(
        y, jax.lax.stop_gradient(x),
        None if gamma is None else jax.lax.stop_gradient(gamma), probes[key], info,
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
  m = old_state["chi_buffer"].shape[0]
  use_sma = mabn_math.uses_moving_averages(new_state["step"], m, warmup_steps)
  out = {}
  for name in ("chi", "psi"):
    rows = new_state[f"{name}_buffer"][-groups:]
    sma = st.window_means(old_state[f"{name}_buffer"], rows)
    out[f"{name}_batch"] = rows
    out[f"{name}_used"] = jnp.where(use_sma, sma, rows)
  return out


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

  def wrapped(variables, *args, **kwargs):
    frozen = isinstance(variables, FrozenDict)
    variables = unfreeze(variables)
    if "params" not in variables:
      raise ValueError(
          "mabn_jax.recording.value_and_grad: the variables have no 'params' "
          f"collection (found {sorted(variables)})."
      )
    taps = variables.get(BACKWARD_STATS, {})

    def call(params, tap_values, probes, layers):
      inner = (
          {**variables, "params": params, BACKWARD_STATS: tap_values}
          if taps else {**variables, "params": params}
      )
      with nn.intercept_methods(_interceptor(layers, probes, {})):
        out = fun(inner, *args, **kwargs)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "mabn_jax.recording.value_and_grad: fun must return (loss, mutated)"
            + (" with mutated = (mutated_collections, aux)" if has_aux else "")
            + f", got {type(out).__name__}."
        )
      return out

    # Describe the normalizer calls (shapes only, nothing is computed).
    layers: dict = {}
    jax.eval_shape(lambda p, t: call(p, t, None, layers), variables["params"], taps)
    probes = {
        key: jnp.zeros(desc[1], jnp.float32)
        for key, desc in layers.items() if desc[0] == "bn"
    }

    def loss_of(differentiable):
      params, tap_values, probe_values = differentiable
      return call(params, tap_values, probe_values, {})

    with training_step():
      (loss, rest), (grads, taps_cotangent, probe_cotangent) = jax.value_and_grad(
          loss_of, has_aux=True
      )((variables["params"], taps, probes))
    mutated, aux = rest if has_aux else (rest, None)
    new_variables = {**variables, **unfreeze(mutated)}
    if taps:
      if "batch_stats" not in mutated:
        raise ValueError(
            "mabn_jax.recording.value_and_grad: the model has backward-statistics "
            "taps but fun did not return a mutated 'batch_stats' collection."
        )
      new_variables["batch_stats"] = feed_backward_statistics(
          new_variables["batch_stats"], taps_cotangent
      )

    statistics = {}
    for key, desc in layers.items():
      if desc[0] == "bn":
        statistics[key] = dict(zip(BN_STATISTICS, probe_cotangent[key]))
      else:
        _, path, groups, warmup_steps = desc
        statistics[key] = mabn_statistics(
            _get(variables["batch_stats"], path),
            _get(new_variables["batch_stats"], path),
            groups, warmup_steps,
        )
    if frozen:
      new_variables = freeze(new_variables)
    value = (loss, aux) if has_aux else loss
    return ((value, new_variables), grads), statistics

  return wrapped
