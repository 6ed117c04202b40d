"""Whether every mean-free normalizer of a model gets zero-mean inputs.

MABN normalizes with the second moment ``chi = E[x^2]`` and subtracts no
mean (``docs/normalization.md``, section 2): it assumes that each channel of
its input has zero mean, which weight-centralized producers
(:class:`~mabn_jax.CenteredConv`, :class:`~mabn_jax.CenteredDense`,
:class:`~mabn_jax.StandardizedConv` and their NNX twins) give. In a
pre-activation network (norm before conv) a norm reads the residual stream,
a sum of the outputs of every block's last convolution, the stem and the
projections: that sum has zero mean when each of them is centralized.

:func:`check_zero_mean_inputs` traces one call of the model (nothing is
computed and the model is not changed) and follows each such normalizer's
input back through the data flow (:mod:`mabn_jax.dataflow`): through
zero-mean-keeping operations (casts, reshapes, products with values that do
not depend on the input such as dropout masks), and through sums and
channel concatenations of values that are each zero-mean, to the layer
calls that produce them. Every producer must be weight-centralized; the
model input, a bias or other shift, a non-linearity (ReLU), another
normalizer or a plain layer break the premise.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from flax import nnx

from mabn_jax import dataflow, discovery
from mabn_jax.layers.centered import CenteredConv, CenteredDense
from mabn_jax.layers.standardized import StandardizedConv
from mabn_jax.nnx.centered import CenteredConv as NNXCenteredConv
from mabn_jax.nnx.centered import CenteredDense as NNXCenteredDense
from mabn_jax.nnx.standardized import StandardizedConv as NNXStandardizedConv

CENTRALIZED = (
  CenteredConv,
  CenteredDense,
  StandardizedConv,
  NNXCenteredConv,
  NNXCenteredDense,
  NNXStandardizedConv,
)
"""Layers whose output has zero mean per channel (for inputs of a common mean)."""

_SUMS = frozenset({"add", "add_any", "sub", "concatenate"})

ADVICE = (
  "make every layer that writes into it weight-centralized (mj.CenteredConv, "
  "mj.CenteredDense, mj.StandardizedConv, or Normalizer.conv_class of the "
  "registry), including in a pre-activation network the stem, each block's "
  "last convolution and the projections; or use a normalizer that subtracts "
  "the mean (BN, Batch Renorm)"
)


def _is_layer(module: nn.Module) -> bool:
  """A linen layer that computes (Flax's and this library's), not a container
  of other modules, whose output is its children's."""
  where = type(module).__module__
  return (where.startswith("flax.") and not isinstance(module, nn.Sequential)) or where.startswith(
    "mabn_jax.layers"
  )


def _linen_trace(model: nn.Module, variables: Any, x: Any, call_kwargs: dict):
  """As :func:`mabn_jax.dataflow.trace_nnx`, for a linen model's ``apply``."""
  calls: List[dataflow.TracedCall] = []

  def run(variables, x):
    tensors: List[Any] = []
    calls.clear()
    record = dataflow.CallRecorder(calls, tensors)

    def intercept(next_fun, args, kwargs, context):
      if context.method_name != "__call__" or not args:
        return next_fun(*args, **kwargs)
      module = context.module
      return record(tuple(module.path), module, next_fun, args, kwargs, keep=_is_layer(module))

    with nn.intercept_methods(intercept):
      model.apply(variables, x, mutable=True, **call_kwargs)
    return tensors

  closed = jax.make_jaxpr(run)(variables, x)
  inputs = closed.jaxpr.invars[len(jax.tree.leaves(variables)) :]
  return closed.jaxpr, inputs, list(calls)


def _outputs(jaxpr, calls: Sequence[dataflow.TracedCall]) -> Dict[Any, List]:
  """``{variable: [calls whose output it is]}``."""
  outputs: Dict[Any, List] = {}
  for call in calls:
    var = jaxpr.outvars[call.first + call.leaves]
    if dataflow.is_var(var):
      outputs.setdefault(var, []).append(call)
  return outputs


def _cause(jaxpr, inputs, dependent, outputs, var, norm) -> Optional[str]:
  """``None`` if ``var`` is zero-mean by construction, else why not."""
  made_by = dataflow.producers(jaxpr)
  pending, seen = [var], set()
  while pending:
    var = pending.pop()
    if var in seen:
      continue
    seen.add(var)
    calls = [c for c in outputs.get(var, []) if c.module is not norm.module]
    if calls:
      if not any(isinstance(c.module, CENTRALIZED) for c in calls):
        inner = max(calls, key=lambda c: c.depth)
        return f"{dataflow.describe(inner.path, inner.module)}, which is not weight-centralized"
      continue
    if any(var is v for v in inputs):
      return "the model input"
    eqn = made_by.get(var) if dataflow.is_var(var) else None
    if eqn is None or var not in dependent:
      return "a value that is not computed from the input"
    data = [v for v in eqn.invars if dataflow.is_var(v) and v in dependent]
    if eqn.primitive.name in _SUMS and len(data) == len(eqn.invars) > 1:
      pending.extend(data)
      continue
    index, cause = dataflow.zero_mean_step(eqn, dependent)
    if index is None:
      return cause
    pending.append(eqn.invars[index])
  return None


def _mean_free_calls(calls) -> List[dataflow.TracedCall]:
  found = []
  for call in calls:
    method = discovery.method_of(call.module)
    if method is not None and not method.subtracts_mean:
      found.append(call)
  return found


def check_zero_mean_inputs(
  model: Any, x: Any, variables: Any = None, *, strict: bool = True, **call_kwargs: Any
) -> Dict[str, str]:
  """Checks that every normalizer that subtracts no mean (MABN) is fed by
  weight-centralized layers.

  Args:
    model: a Flax NNX model (called as ``model(x)``), or a linen module with
      its ``variables`` (applied as ``model.apply(variables, x,
      **call_kwargs)``, e.g. ``train=True``).
    x: an example input (only shapes and dtypes are used).
    variables: the linen model's variables (``None`` for NNX).
    strict: raise a ``ValueError`` if any input is not zero-mean by
      construction; with ``False``, warn and return the findings.
    **call_kwargs: keyword arguments of the linen ``apply`` call.

  Returns:
    ``{normalizer path: cause}`` for every mean-free normalizer call whose
    input is not a sum of weight-centralized layers' outputs (empty when
    every one is).
  """
  if isinstance(model, nnx.Module):
    jaxpr, inputs, calls = dataflow.trace_nnx(model, x)
  else:
    if variables is None:
      raise ValueError(
        "check_zero_mean_inputs: a linen model needs its variables "
        "(check_zero_mean_inputs(model, x, variables, train=True))."
      )
    jaxpr, inputs, calls = _linen_trace(model, variables, x, call_kwargs)
  dependent = dataflow.dependents(jaxpr, inputs)
  outputs = _outputs(jaxpr, calls)
  findings: Dict[str, str] = {}
  for norm in _mean_free_calls(calls):
    var = jaxpr.outvars[norm.first]
    cause = _cause(jaxpr, inputs, dependent, outputs, var, norm)
    if cause is not None:
      findings["/".join(map(str, norm.path))] = cause
  if findings:
    report = "; ".join(f"'{path}' is fed by {cause}" for path, cause in findings.items())
    message = (
      f"check_zero_mean_inputs: MABN assumes zero-mean inputs, but {report}. To fix: {ADVICE}."
    )
    if strict:
      raise ValueError(message)
    warnings.warn(message, stacklevel=2)
  return findings


__all__: Tuple[str, ...] = ("ADVICE", "CENTRALIZED", "check_zero_mean_inputs")
