"""Which layer produces each normalizer's input, from a Flax NNX model's data flow.

Converting a BatchNorm to MABN centres the convolution (or linear layer) that
feeds it (``docs/normalization.md``, section 2 (a)). Which layer that is
follows from one traced call of the model on an example input
(:func:`nnx_norm_producers`): every module call is recorded, the call is
traced to a jaxpr (``jax.make_jaxpr``, nothing is computed and the model is
not changed), and from each normalizer's input the jaxpr is followed
backwards through operations that keep a zero per-channel mean zero, up to
the output of a layer call:

* casts, copies, negation, reshapes that keep the channel (last) axis;
* a product or quotient with a value that does not depend on the input
  (constants, dropout's random mask), and ``select`` between such a value and
  the data (dropout);
* calls of jitted or custom-derivative functions made of these.

Anything else is reported, naming the normalizer and the cause: the model's
input itself, an operation on two values computed from the input (a
residual ``add``), a shift or non-linearity (``add`` of a bias, ``max`` of a
ReLU), another normalizer, or a layer without a weight-centralized twin.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import jax
from flax import nnx
from jax.extend import core

from mabn_jax import discovery

_BARRIER = "optimization_barrier"
_UNARY = frozenset({"convert_element_type", "copy", "copy_p", "neg", "reduce_precision", _BARRIER})
_SHAPE = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim"})
_SCALING = frozenset({"mul", "div"})
_CENTRED_TWINS = (nnx.Conv, nnx.Linear)
"""Layers with a weight-centralized twin (``CenteredConv``, ``CenteredDense``)."""


class Producer(NamedTuple):
  """The layer whose output (through ``ops``) is a normalizer's input.

  Attributes:
    norm_path: the normalizer's attribute path in the model.
    path: the producing layer's attribute path (an ``nnx.Conv`` or
      ``nnx.Linear``).
    ops: the primitives between the two, from the layer to the normalizer.
  """

  norm_path: Tuple
  path: Tuple
  ops: Tuple[str, ...]


class TracedCall(NamedTuple):
  path: Tuple
  module: Any
  depth: int
  first: int  # index of the call's first input among the traced outputs
  leaves: int  # number of its input leaves


def describe(path: Tuple, module: Any) -> str:
  return f"'{'/'.join(map(str, path))}' ({type(module).__name__})"


def _barrier(leaf: Any) -> Any:
  return jax.lax.optimization_barrier(leaf) if isinstance(leaf, jax.Array) else leaf


class CallRecorder:
  """Records layer calls as :class:`TracedCall` entries of ``calls``, their
  input leaves and output appended to ``tensors``; ``depth`` counts the
  calls in progress (a call nested in another is deeper).

  A recorded call receives its input through an identity
  ``optimization_barrier``, so in the traced jaxpr the layer's own
  operations consume the barrier's output and any other consumer of the
  value shows as a second consumer of the barrier's input.
  """

  def __init__(self, calls: List, tensors: List):
    self.calls, self.tensors, self.depth = calls, tensors, 0

  def __call__(self, path: Tuple, module: Any, run, args, kwargs, keep: bool = True):
    """``run(*args, **kwargs)`` one level deeper, recorded when ``keep``."""
    if keep and args:
      args = (jax.tree.map(_barrier, args[0]), *args[1:])
    self.depth += 1
    try:
      out = run(*args, **kwargs)
    finally:
      self.depth -= 1
    if keep:
      leaves = jax.tree.leaves(args[:1])
      self.calls.append(TracedCall(path, module, self.depth, len(self.tensors), len(leaves)))
      self.tensors.extend(leaves)
      self.tensors.append(out)
    return out


@contextlib.contextmanager
def recorded_calls(modules: Dict[int, Tuple], calls: List, tensors: List) -> Iterator[None]:
  """Records every call of a module in ``modules`` (``{id: (path, module)}``)
  with a :class:`CallRecorder`, by wrapping its class's ``__call__`` for the
  duration (restored on exit)."""
  record = CallRecorder(calls, tensors)

  def wrap(cls, original):
    def __call__(self, *args, **kwargs):
      if type(self) is not cls or id(self) not in modules:
        return original(self, *args, **kwargs)
      run = lambda *a, **k: original(self, *a, **k)
      return record(modules[id(self)][0], self, run, args, kwargs)

    return __call__

  with discovery.wrapped_calls({type(module) for _, module in modules.values()}, wrap):
    yield


def trace_nnx(model: nnx.Module, example_input: Any):
  """The jaxpr of one call of a copy of ``model`` and its recorded layer
  calls: the jaxpr's outputs are, per call, its input leaves then its output."""
  graphdef, state = nnx.split(model)
  calls: List[TracedCall] = []

  def run(state, x):
    copy = nnx.merge(graphdef, state)
    modules = {
      id(module): (tuple(path), module)
      for path, module in discovery.nnx_modules(copy)
      if path and _known_layer(module)
    }
    tensors: List[Any] = []
    calls.clear()
    with recorded_calls(modules, calls, tensors):
      copy(x)
    return tensors

  closed = jax.make_jaxpr(run)(state, example_input)
  inputs = closed.jaxpr.invars[len(jax.tree.leaves(state)) :]
  return closed.jaxpr, inputs, list(calls)


def dependents(jaxpr, inputs: Sequence) -> Set:
  """The variables of ``jaxpr`` computed from ``inputs``."""
  dependent = set(inputs)
  for eqn in jaxpr.eqns:
    if any(is_var(v) and v in dependent for v in eqn.invars):
      dependent.update(eqn.outvars)
  return dependent


def is_var(value: Any) -> bool:
  return not isinstance(value, core.Literal)


def _inner(eqn) -> Optional[Any]:
  """The jaxpr of a call primitive (jit, custom_jvp/vjp, remat), else None."""
  for value in eqn.params.values():
    jaxpr = getattr(value, "jaxpr", value)
    if isinstance(jaxpr, core.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
      return jaxpr
  return None


def zero_mean_step(eqn, dependent: Set) -> Tuple[Optional[int], str]:
  """``(index of the data operand it keeps zero-mean, '')`` if ``eqn`` keeps
  a zero per-channel mean of its one input computed from the model input,
  else ``(None, cause)``."""
  name = eqn.primitive.name
  data = [i for i, v in enumerate(eqn.invars) if is_var(v) and v in dependent]
  if len(data) != 1:
    return None, f"`{name}` of {len(data)} values computed from the input (e.g. a residual add)"
  index = data[0]
  if name in _UNARY or (name in _SCALING and not (name == "div" and index == 1)):
    return index, ""
  if name in _SHAPE:
    source, result = eqn.invars[index].aval.shape, eqn.outvars[0].aval.shape
    if source and result and source[-1] == result[-1]:
      return index, ""
    return None, f"`{name}` from {source} to {result} moves the channel (last) axis"
  if name == "select_n" and index > 0:
    return index, ""
  inner = _inner(eqn)
  if inner is not None and len(eqn.outvars) == 1:
    source = inner.invars[index]
    cause = _through(inner, inner.outvars[0], source, dependents(inner, [source]))
    return (index, "") if cause is None else (None, cause)
  return None, f"`{name}` does not keep a zero mean (a shift or non-linearity)"


def producers(jaxpr) -> Dict[Any, Any]:
  return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def _through(jaxpr, out, source, dependent: Set) -> Optional[str]:
  """None if ``out`` is ``source`` through zero-mean-keeping steps, else why not."""
  made_by = producers(jaxpr)
  while out is not source:
    eqn = made_by.get(out)
    if eqn is None:
      return "a value that is not computed from the input"
    index, cause = zero_mean_step(eqn, dependent)
    if index is None:
      return cause
    out = eqn.invars[index]
  return None


def _consumers(jaxpr) -> Dict[Any, int]:
  counts: Dict[Any, int] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if is_var(v):
        counts[v] = counts.get(v, 0) + 1
  return counts


class _Graph(NamedTuple):
  jaxpr: Any
  inputs: Sequence
  dependent: Set
  made_by: Dict
  consumers: Dict
  outputs: Dict  # var -> the innermost call whose output it is


def _graph(jaxpr, inputs, calls: List[TracedCall]) -> _Graph:
  outputs: Dict[Any, TracedCall] = {}
  for call in calls:
    var = jaxpr.outvars[call.first + call.leaves]
    if is_var(var) and (var not in outputs or call.depth > outputs[var].depth):
      outputs[var] = call
  return _Graph(
    jaxpr, inputs, dependents(jaxpr, inputs), producers(jaxpr), _consumers(jaxpr), outputs
  )


def _producer_of(graph: _Graph, norm: TracedCall, centred: Tuple[type, ...]) -> Producer:
  """Follows the normalizer call ``norm``'s input back to its producing layer."""
  where = f"convert_batch_norm: normalizer {describe(norm.path, norm.module)}"
  if norm.leaves != 1:
    raise ValueError(f"{where}: called with {norm.leaves} input arrays; expected one.")
  var, ops = graph.jaxpr.outvars[norm.first], []
  while True:
    call = graph.outputs.get(var)
    if call is not None and call.module is not norm.module:
      return _layer(where, call, centred, norm.path, ops)
    if any(var is v for v in graph.inputs):
      raise ValueError(f"{where} is fed directly by the model input: no layer to centre.")
    eqn = graph.made_by.get(var) if is_var(var) else None
    if eqn is None or var not in graph.dependent:
      raise ValueError(f"{where} is fed by a value that is not computed from the input.")
    index, cause = zero_mean_step(eqn, graph.dependent)
    if index is None:
      raise ValueError(f"{where} is fed by {cause}; its producer cannot be weight-centralized.")
    var, name = eqn.invars[index], eqn.primitive.name
    if graph.consumers.get(var, 0) > 1:
      what = "its input" if name == _BARRIER else f"the value before `{name}`"
      raise ValueError(
        f"{where}: {what} also feeds other computations; centring or folding "
        "its producer would change them."
      )
    if name != _BARRIER:
      ops.append(name)


def _layer(where: str, call: TracedCall, centred, norm_path, ops) -> Producer:
  module = call.module
  if isinstance(module, centred):
    return Producer(norm_path, call.path, tuple(reversed(ops)))
  if discovery.method_of(module) is not None or _is_norm(module):
    cause = "another normalizer"
  else:
    cause = f"a {type(module).__name__}, which has no weight-centralized twin"
  raise ValueError(f"{where} is fed by {describe(call.path, module)}, {cause}.")


def _is_norm(module: Any) -> bool:
  return isinstance(module, (nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm, nnx.BatchNorm))


def _known_layer(module: Any) -> bool:
  """Modules whose output ends the walk: layers with parameters of their own
  (containers are walked through)."""
  return (
    isinstance(module, _CENTRED_TWINS + (nnx.ConvTranspose, nnx.LinearGeneral, nnx.Einsum))
    or _is_norm(module)
    or discovery.method_of(module) is not None
    or isinstance(module, nnx.Embed)
  )


def nnx_norm_producers(
  model: nnx.Module, example_input: Any, norm_paths: Sequence[Tuple]
) -> Dict[Tuple, Producer]:
  """``{norm path: Producer}``: the layer feeding each normalizer in ``norm_paths``.

  Args:
    model: the NNX model; it is not called or changed (a copy is traced).
    example_input: one input of ``model(example_input)`` (an array or a tree
      of arrays; only shapes and dtypes are used).
    norm_paths: attribute paths of the normalizers (as ``nnx.iter_modules``).

  Raises:
    ValueError: naming the normalizer and the cause when its input is not a
      ``nnx.Conv``/``nnx.Linear`` output through zero-mean-keeping steps, when
      it is never called, or called with different producers.
  """
  jaxpr, inputs, calls = trace_nnx(model, example_input)
  graph = _graph(jaxpr, inputs, calls)
  found: Dict[Tuple, Producer] = {}
  for path in map(tuple, norm_paths):
    own = [call for call in calls if call.path == path]
    if not own:
      raise ValueError(
        f"convert_batch_norm: normalizer '{'/'.join(map(str, path))}' is not called "
        "by the model on the example input; its producer is unknown."
      )
    producers = {_producer_of(graph, call, _CENTRED_TWINS) for call in own}
    if len({p.path for p in producers}) > 1:
      raise ValueError(
        f"convert_batch_norm: normalizer '{'/'.join(map(str, path))}' is called on "
        f"outputs of different layers {sorted('/'.join(map(str, p.path)) for p in producers)}."
      )
    found[path] = producers.pop()
  return found
