"""Recording the statistics of a Flax linen model's normalizers.

BN-type calls (``flax.linen.BatchNorm``, :class:`mabn_jax.BatchNorm`,
:class:`mabn_jax.BatchRenorm`) are intercepted
(``flax.linen.intercept_methods``) in training mode and their output goes
through the probe of :mod:`mabn_jax.recording.probes`; MABN-type calls are
described and read from ``'batch_stats'`` before and after the step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
from flax.core import unfreeze

from mabn_jax import discovery
from mabn_jax.recording import probes
from mabn_jax.training import differentiate

NAME = "mabn_jax.recording.value_and_grad"


def _interceptor(calls: dict, values: Optional[Mapping], seen: dict):
  """Flax interceptor: describes the normalizer calls into ``calls``, and
  with probe ``values`` (``None`` while describing) probes them."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
      return next_fun(*args, **kwargs)
    method = discovery.method_of(module)
    if method is None:
      return next_fun(*args, **kwargs)
    call_flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if nn.merge_param("use_running_average", module.use_running_average, call_flag):
      return next_fun(*args, **kwargs)
    x, path = args[0], tuple(module.path)
    where = f"{type(module).__name__} '{'/'.join(path)}'"
    probes.check_recordable(module, kwargs.get("mask"), where)
    call = probes.describe_call(method, x, where, path)
    y = next_fun(*args, **kwargs)
    if call is None:
      return y
    key = probes.call_key("/".join(path), seen)
    calls[key] = call
    if values is None or not isinstance(call, probes.ProbedCall):
      return y
    gamma = module.get_variable("params", "scale") if module.use_scale else None
    return probes.probe(y, x, gamma, values[key], call)

  return intercept


def _get(tree: Mapping, path):
  for key in path:
    tree = tree[key]
  return tree


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """:func:`mabn_jax.recording.value_and_grad` for ``fun(variables, *args)``."""

  def wrapped(variables, *args, **kwargs):
    calls = _describe(fun, variables, args, kwargs)
    context = lambda values: nn.intercept_methods(_interceptor({}, values, {}))
    value, new_variables, grads, probe_cotangent, _ = differentiate(
      fun,
      variables,
      args,
      kwargs,
      has_aux=has_aux,
      name=NAME,
      extra=probes.zero_probes(calls),
      context=context,
    )
    state_of = lambda path: (
      _get(variables["batch_stats"], path),
      _get(new_variables["batch_stats"], path),
    )
    statistics = probes.collect(calls, probe_cotangent, state_of)
    return ((value, new_variables), grads), statistics

  return wrapped


def _describe(fun, variables, args, kwargs) -> dict:
  """The normalizer calls of ``fun``'s step (shapes only, nothing computed)."""
  calls: dict = {}
  variables = unfreeze(variables)
  if "params" not in variables:
    raise ValueError(
      f"{NAME}: the variables have no 'params' collection (found {sorted(variables)})."
    )

  def call(v):
    with nn.intercept_methods(_interceptor(calls, None, {})):
      return fun(v, *args, **kwargs)

  jax.eval_shape(call, variables)
  return calls
