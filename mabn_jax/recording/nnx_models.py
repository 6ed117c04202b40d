"""Recording the statistics of a Flax NNX model's normalizers.

For the step, the ``__call__`` of each normalizer class in the model
(``flax.nnx.BatchNorm`` and the :mod:`mabn_jax.nnx` normalizers) is wrapped,
as ``nnx.capture`` wraps methods for ``method_outputs``, and restored after;
the wrapper acts only on the modules of the model being recorded. BN-type
calls in training mode go through the probe of
:mod:`mabn_jax.recording.probes`; MABN-type modules are read from their
``nnx.BatchStat`` before and after the step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import jax
from flax import nnx

from mabn_jax import discovery
from mabn_jax.nnx.training import value_and_grad_with_extra
from mabn_jax.recording import probes
from mabn_jax.training import training_step


@dataclasses.dataclass
class _Recorder:
  """The calls seen in one traced step, and the probe values to apply."""

  values: Optional[Dict[str, jax.Array]] = None
  paths: Dict[int, tuple] = dataclasses.field(default_factory=dict)
  calls: Dict[str, Any] = dataclasses.field(default_factory=dict)
  seen: Dict[str, int] = dataclasses.field(default_factory=dict)

  def start(self, model: nnx.Module, values: Optional[Dict[str, jax.Array]]) -> None:
    """Records the modules of ``model`` (the traced copy) from now on."""
    self.values = values
    self.paths = {id(module): tuple(path) for path, module in discovery.nnx_modules(model)}
    self.calls, self.seen = {}, {}


def _recording_call(original: Callable, recorder: _Recorder) -> Callable:
  @functools.wraps(original)
  def __call__(self, x, *args, **kwargs):
    y = original(self, x, *args, **kwargs)
    path = recorder.paths.get(id(self))
    if path is None:
      return y
    flag = kwargs.get("use_running_average", args[0] if args else None)
    if self.use_running_average if flag is None else flag:
      return y
    name = "/".join(map(str, path))
    where = f"{type(self).__name__} '{name}'"
    probes.check_recordable(self, kwargs.get("mask"), where)
    method = discovery.method_of(self)
    call = None if method is None else probes.describe_call(method, x, where, path)
    if call is None:
      return y
    key = probes.call_key(name, recorder.seen)
    recorder.calls[key] = call
    if recorder.values is None or not isinstance(call, probes.ProbedCall):
      return y
    gamma = self.scale[...] if self.scale is not None else None
    return probes.probe(y, x, gamma, recorder.values[key], call)

  return __call__


def _recorded_classes(model: nnx.Module, recorder: _Recorder):
  """Wraps the ``__call__`` of every normalizer class of ``model`` while open."""
  classes = {type(module) for _, module, _ in discovery.nnx_normalizers(model)}
  return discovery.wrapped_calls(classes, lambda cls, original: _recording_call(original, recorder))


def _batch_stats(module: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """:func:`mabn_jax.recording.value_and_grad` for ``fun(model, *args)``."""

  def wrapped(model, *args, **kwargs):
    recorder = _Recorder()

    def run(traced, values, *args, **kwargs):
      recorder.start(traced, values)
      return fun(traced, *args, **kwargs)

    graphdef, state = nnx.split(model)
    describe = lambda state: run(nnx.merge(graphdef, state), None, *args, **kwargs)
    with _recorded_classes(model, recorder), training_step():
      jax.eval_shape(describe, state)
    calls = recorder.calls
    modules = {tuple(path): module for path, module in discovery.nnx_modules(model)}
    old = {
      call.path: _batch_stats(modules[call.path])
      for call in calls.values()
      if isinstance(call, probes.StateCall)
    }
    step = value_and_grad_with_extra(run, has_aux=has_aux)
    with _recorded_classes(model, recorder):
      value, grads, cotangent = step(model, probes.zero_probes(calls), *args, **kwargs)
    state_of = lambda path: (old[path], _batch_stats(modules[path]))
    return (value, grads), probes.collect(calls, cotangent, state_of)

  return wrapped
