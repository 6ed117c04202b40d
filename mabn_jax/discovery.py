"""Finding the batch-statistics normalizers of a model, for the tools.

The tools (:mod:`~mabn_jax.fold`, :mod:`~mabn_jax.precise_bn`,
:mod:`~mabn_jax.conversion`, :mod:`~mabn_jax.recording`) act on every layer
whose functional :class:`~mabn_jax.functional.interface.Method` they can
find, and call its hooks; they know no normalizer by name:

* a Flax NNX model: every module with a ``functional()`` method (the
  :mod:`mabn_jax.nnx` normalizers) and every ``flax.nnx.BatchNorm``, by type
  (:func:`nnx_normalizers`);
* a Flax linen model and an input: every call of a :mod:`mabn_jax` layer or
  ``flax.linen.BatchNorm``, by type (:func:`linen_normalizers`);
* variables alone (a checkpoint): every layer whose ``'batch_stats'`` hold
  the identifying state fields of a method (:func:`method_for_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import unfreeze

from mabn_jax.functional import batch_norm as bn
from mabn_jax.functional import interface


def flax_batch_norm_method(module: Any) -> bn.Method:
  """The functional method of a ``flax.linen.BatchNorm`` or ``flax.nnx.BatchNorm``."""
  if not isinstance(module.axis, int):
    raise ValueError(
      f"{type(module).__name__}: feature axes {module.axis}; the tools support a "
      "single integer axis."
    )
  groups = module.axis_index_groups
  return bn.Method(
    bn.BatchNormConfig(
      axis=module.axis,
      momentum=module.momentum,
      epsilon=module.epsilon,
      axis_name=module.axis_name,
      axis_index_groups=None if groups is None else tuple(tuple(g) for g in groups),
    )
  )


def method_of(module: Any) -> Optional[interface.Method]:
  """The functional method of a normalizer module (linen or NNX), else ``None``."""
  if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):
    return flax_batch_norm_method(module)
  functional = getattr(module, "functional", None)
  if callable(functional) and hasattr(module, "method_class"):
    return cast(interface.Method, functional())
  return None


def nnx_modules(model: nnx.Module):
  """``(path, module)`` for every module of an NNX model, the model included."""
  iterate = getattr(nnx, "iter_modules", None)
  return iterate(model) if iterate is not None else model.iter_modules()


_iter_modules = nnx_modules


@contextlib.contextmanager
def wrapped_calls(classes: Iterable[type], wrap: Callable[[type, Callable], Callable]):
  """While open, every class in ``classes`` has ``wrap(cls, original)`` as
  its ``__call__`` (``original`` the ``__call__`` it had); each class's own
  attribute is restored on exit. As ``nnx.capture`` wraps methods for
  ``method_outputs``, for the tools that watch the calls of an NNX model's
  layers during one traced step; the wrapper should act only on the modules
  it was given and call ``original`` for any other instance."""
  classes = set(classes)
  own = {cls: cls.__dict__.get("__call__") for cls in classes}
  originals = {cls: cls.__call__ for cls in classes}
  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(cls, original)
    yield
  finally:
    for cls, method in own.items():
      if method is None:
        delattr(cls, "__call__")
      else:
        cls.__call__ = method


def nnx_normalizers(model: nnx.Module) -> List[Tuple[Tuple, nnx.Module, interface.Method]]:
  """``[(path, module, method)]`` of the normalizers of an NNX model, in
  graph order (a module reached twice is listed once)."""
  found = []
  for path, module in _iter_modules(model):
    method = method_of(module)
    if method is not None:
      found.append((tuple(path), module, method))
  return found


class ConvNormPair(NamedTuple):
  """A convolution (or linear layer) and the normalizer after it, in an NNX
  model, with where each is held (``parent.attribute``)."""

  conv_parent: Any
  conv_attribute: str
  norm_parent: Any
  norm_attribute: str
  where: str

  @property
  def conv(self) -> Any:
    return getattr(self.conv_parent, self.conv_attribute)

  @property
  def norm(self) -> Any:
    return getattr(self.norm_parent, self.norm_attribute)

  def replace_conv(self, module: Any) -> None:
    setattr(self.conv_parent, self.conv_attribute, module)

  def replace_norm(self, module: Any) -> None:
    setattr(self.norm_parent, self.norm_attribute, module)


def _path(path: Any) -> Tuple:
  return tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)


def _at(model: Any, path: Tuple) -> Any:
  node = model
  for key in path:
    node = node[int(key)] if isinstance(node, (list, tuple)) else getattr(node, key)
  return node


def nnx_conv_norm_pairs(model: nnx.Module, pairs: Any = None) -> List[ConvNormPair]:
  """The (convolution, normalizer) pairs of an NNX model.

  With ``pairs`` (``[(conv_path, norm_path)]``, attribute paths such as
  ``'block/conv'``, list items by index) those; otherwise every module's
  child ``norm`` that is a normalizer (:func:`method_of`) next to a child
  ``conv`` (or ``dense``), as in the registry's NNX modules.
  """
  if pairs is not None:
    found = []
    for conv_path, norm_path in pairs:
      conv_path, norm_path = _path(conv_path), _path(norm_path)
      found.append(
        ConvNormPair(
          _at(model, conv_path[:-1]),
          str(conv_path[-1]),
          _at(model, norm_path[:-1]),
          str(norm_path[-1]),
          "/".join(map(str, norm_path)),
        )
      )
    return found
  found = []
  for path, module in list(_iter_modules(model)):
    children = vars(module)
    conv_attribute = "conv" if "conv" in children else "dense"
    norm = children.get("norm")
    if (
      children.get(conv_attribute) is not None
      and norm is not None
      and (method_of(norm) is not None)
    ):
      where = "/".join(map(str, tuple(path) + ("norm",)))
      found.append(ConvNormPair(module, conv_attribute, module, "norm", where))
  return found


def linen_normalizers(
  apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any
) -> Dict[Tuple, interface.Method]:
  """``{layer path: method}`` of the normalizers a linen model calls.

  Traces ``apply_fn(variables, *args, **kwargs)`` once (``jax.eval_shape``:
  nothing is computed) and records every call of a normalizer module; where
  a call runs another normalizer in its scope (:func:`mabn_jax.substitute`),
  the one that runs (the innermost) is the layer's.
  """
  found: Dict[Tuple, interface.Method] = {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    if context.method_name == "__call__":
      method = method_of(context.module)
      if method is not None:  # the innermost call first (a replacement, mj.substitute)
        found.setdefault(tuple(context.module.path), method)
    return out

  def run(v, *a):
    with nn.intercept_methods(record):
      return apply_fn(v, *a, **kwargs)

  jax.eval_shape(run, variables, *args)
  return found


def method_for_state(names: Iterable[str]) -> Optional[type]:
  """The method class whose identifying state fields (``signature_fields``)
  are all in ``names`` (a layer's ``'batch_stats'`` names), preferring the
  one with the most; ``None`` if none matches."""
  names = set(names)
  best = None
  for method_class in interface.method_classes():
    fields = set(method_class.signature_fields)
    if fields and fields <= names and (best is None or len(fields) > len(best.signature_fields)):
      best = method_class
  return best


def stored_state(stored: Dict[str, Any]) -> Any:
  """A layer's stored ``'batch_stats'`` as a state the hooks take (fields by
  attribute, ``_replace``, ``_asdict``)."""
  return _Stored(stored)


class _Stored(dict):
  """A layer's stored ``'batch_stats'`` seen as a state: fields by attribute,
  ``_replace`` and ``_asdict`` as a ``NamedTuple``'s."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError as error:
      raise AttributeError(name) from error

  def _replace(self, **values: Any) -> "_Stored":
    return _Stored({**self, **values})

  def _asdict(self) -> dict:
    return dict(self)


def default_method(method_class: type, **config: Any) -> interface.Method:
  """``method_class`` with its config's defaults and ``config`` overrides."""
  fields = {f.name for f in dataclasses.fields(method_class.config_class)}
  return method_class(
    config=method_class.config_class(**{k: v for k, v in config.items() if k in fields})
  )


def zero_taps(batch_stats: Any) -> Dict[str, Any]:
  """The ``'backward_stats'`` collection a model's ``batch_stats`` imply: for
  every layer whose stored state is a method's with taps
  (:func:`method_for_state`), float32 zeros shaped like each tap's target
  (nested dicts, the layers' paths)."""
  flat: Dict[Tuple, Any] = traverse_util.flatten_dict(unfreeze(batch_stats))
  layers: Dict[Tuple, Dict[str, Any]] = {}
  for path, value in flat.items():
    layers.setdefault(path[:-1], {})[path[-1]] = value
  taps: Dict[Tuple, Any] = {}
  for layer, stored in layers.items():
    method_class = method_for_state(stored)
    for tap, target in getattr(method_class, "tap_targets", {}).items():
      if target in stored and np.size(stored[target]):
        taps[layer + (tap,)] = jnp.zeros(np.shape(stored[target]), jnp.float32)
  return traverse_util.unflatten_dict(taps)
