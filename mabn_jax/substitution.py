"""Running a linen model whose source hard-codes ``nn.BatchNorm``/``nn.Conv`` with MABN.

Third-party models (Flax's examples, model zoos) write ``nn.BatchNorm`` and
``nn.Conv`` in their source. :class:`substitute` runs them with another
registry normalizer without editing that source: inside the context (a
``flax.linen.intercept_methods`` interceptor), every call of a
``flax.linen.BatchNorm`` runs the normalizer ``name`` instead, and (for a
weight-centralized target such as ``'mabn'``) every selected ``nn.Conv``
runs as :class:`~mabn_jax.CenteredConv`. The replacements share the
replaced module's scope, so their variables sit at the same paths
(``BatchNorm_0`` holds MABN's ``scale``, ``bias`` and statistics; ``Conv_0``
keeps its ``kernel``)::

  swap = mj.substitute("mabn", norm_batch_size=2)
  with swap:
    template = model.init(key, x, train=False)      # MABN variables
  variables = mj.convert_batch_norm(bn_variables, target=template)
  with swap:
    logits = model.apply(variables, x, train=False)
  step = jax.jit(mj.value_and_grad(swap.wrap(loss_fn)))   # fine-tuning

Only exact ``flax.linen.BatchNorm``/``flax.linen.Conv`` instances are replaced
(not subclasses, not the replacements themselves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, List, Optional

import flax.linen as nn

from mabn_jax import registry
from mabn_jax.layers.centered import CenteredConv

_NOT_CARRIED = ("parent", "name", "momentum")
"""``nn.BatchNorm`` fields a replacement never takes (``momentum``: its own meaning)."""


def conv_without_bias(conv: nn.Conv) -> bool:
  """The default selection of convolutions to centre: those without a bias
  (the convention for a convolution followed by a normalization)."""
  return not conv.use_bias


class substitute:
  """A context manager that runs ``nn.BatchNorm`` as the normalizer ``name``.

  Args:
    name: a registry name (:func:`mabn_jax.normalizer_names`) of a
      normalizer with batch or per-sample statistics (not ``'cbn'``,
      ``'none'``).
    centre: which ``nn.Conv`` instances become
      :class:`~mabn_jax.CenteredConv` when the normalizer is centred
      (``'mabn'``, or ``centered=True``): a predicate on the module, default
      :func:`conv_without_bias`.
    **kwargs: the normalizer's options (e.g. ``norm_batch_size``,
      ``buffer_size``). ``nn.BatchNorm``'s own fields that the target also
      has (``epsilon``, ``axis``, ``dtype``, ``param_dtype``, ``use_bias``,
      ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
      ``axis_index_groups``, ``use_running_average``) are carried over
      unless given here.

  Re-entrant; :meth:`wrap` returns a function that runs inside the context.
  """

  def __init__(self, name: str = "mabn", *, centre: Optional[Callable] = None, **kwargs: Any):
    self.normalizer = registry.make_normalizer(name, **kwargs)
    if self.normalizer.entry.kind not in ("batch", "sample"):
      raise ValueError(
        f"substitute: {name!r} cannot replace flax.linen.BatchNorm on its own "
        "(it needs the convolution, or is no normalization)."
      )
    self.centre = conv_without_bias if centre is None else centre
    self._stack: List[contextlib.ExitStack] = []

  def __enter__(self) -> "substitute":
    stack = contextlib.ExitStack()
    stack.enter_context(nn.intercept_methods(self._intercept))
    self._stack.append(stack)
    return self

  def __exit__(self, *exc: Any) -> None:
    self._stack.pop().close()

  def wrap(self, fn: Callable) -> Callable:
    """``fn`` run inside this context (e.g. ``model.apply``, a loss function)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
      with self:
        return fn(*args, **kwargs)

    return wrapped

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
      if type(module) is nn.BatchNorm:
        return self._norm(module, args, kwargs)
      if type(module) is nn.Conv and self.normalizer.centered and self.centre(module):
        return _centred(module)(*args, **kwargs)
    return next_fun(*args, **kwargs)

  def _norm(self, module: nn.BatchNorm, args, kwargs):
    where = f"substitute: flax.linen.BatchNorm '{'/'.join(module.path)}'"
    if kwargs.get("mask") is not None:
      raise ValueError(f"{where}: a mask is not supported by the replacement.")
    layer_class = self.normalizer.entry.linen
    fields = {f.name for f in dataclasses.fields(layer_class)} - set(_NOT_CARRIED)
    options = self.normalizer.options
    options.pop("centered", None)
    carried = {
      f.name: getattr(module, f.name)
      for f in dataclasses.fields(nn.BatchNorm)
      if f.name in fields and f.name not in options
    }
    layer = layer_class(**carried, **options)
    nn.share_scope(module, layer)
    x = args[0]
    if self.normalizer.entry.kind == "sample":
      return layer(x)
    flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return layer(x, use_running_average=flag)


def _centred(conv: nn.Conv) -> CenteredConv:
  """A :class:`~mabn_jax.CenteredConv` with ``conv``'s fields in its scope."""
  default = {f.name: f.default for f in dataclasses.fields(nn.Conv)}["conv_general_dilated"]
  if conv.conv_general_dilated is not default or conv.conv_general_dilated_cls is not None:
    raise ValueError(
      f"substitute: flax.linen.Conv '{'/'.join(conv.path)}' has its own convolution "
      "function, which CenteredConv would replace; exclude it with centre=."
    )
  skip = ("parent", "name", "conv_general_dilated")
  fields = {
    f.name: getattr(conv, f.name) for f in dataclasses.fields(nn.Conv) if f.name not in skip
  }
  layer = CenteredConv(**fields)
  nn.share_scope(conv, layer)
  return layer
