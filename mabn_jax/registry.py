"""One way to choose a normalizer: by name and keyword arguments.

A model written once takes a :class:`Normalizer` and runs with every entry::

  norm = mj.make_normalizer("mabn", norm_batch_size=2)
  y = norm.conv_norm(features=64, kernel_size=(3, 3), name="conv1")(x, train=True)
  y = norm.norm(name="bn_final")(y, train=True)

Names (:func:`normalizer_names`; one entry each in ``_ENTRIES``): ``'bn'``,
``'syncbn'`` (BN with ``axis_name``, default ``'batch'``), ``'brn'``,
``'gn'``, ``'ln'``, ``'in'`` (Flax's), ``'cbn'``, ``'cbn_naive'``,
``'mabn'`` (:class:`~mabn_jax.CenteredConv` + :class:`~mabn_jax.MABN`),
``'frozen_bn'``, ``'ws_gn'`` (:class:`~mabn_jax.StandardizedConv` + Flax's
GroupNorm), ``'frn'`` and ``'none'`` (a convolution with bias); the
documentation's normalizers page describes each.

The same normalizer builds Flax NNX modules with
:meth:`Normalizer.nnx_conv_norm`, :meth:`Normalizer.nnx_norm` and
:meth:`Normalizer.nnx_dense_norm` (see :mod:`mabn_jax.nnx.registry`).

Keyword arguments are the target layer's fields (``use_running_average``,
which ``train`` sets, excluded), plus ``centered``: whether the convolution of
:meth:`Normalizer.conv_norm` is weight-centralized (:class:`~mabn_jax.CenteredConv`),
default True for ``'mabn'`` and False otherwise (``'ws_gn'`` takes no
``centered``: its convolution is standardized, which centres it). They are
checked when the normalizer is made; unknown names and keywords raise a ``ValueError`` listing
the valid ones. ``dtype``/``param_dtype``, when given, apply to the
convolution too.

Variable layout of ``conv_norm(..., name=NAME)`` (the fold, precise-BN and
conversion tools rely on it)::

  params:      {NAME: {'conv': {'kernel': (kh, kw, cin, cout)[, 'bias': (cout,)]},
                       'norm': {'scale': (C,), 'bias': (C,)}}}
  batch_stats: {NAME: {'norm': {... the norm layer's state ...}}}

``'none'`` has no ``'norm'`` child and its conv has a bias; CBN has the same
layout (its kernel in ``'conv'``, its scale, bias and state in ``'norm'``).
Stored kernels are raw weights; a centred conv uses ``center_kernel(kernel)``,
a standardized one (``'ws_gn'``) ``standardize_kernel(kernel)``.
``norm(name=NAME)`` puts the norm layer's variables directly under ``NAME``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple, Type, Union

import flax.linen as nn
import jax
from flax import nnx as flax_nnx

from mabn_jax import nnx as nnx_layers
from mabn_jax.layers.batch_norm import BatchNorm
from mabn_jax.layers.batch_renorm import BatchRenorm
from mabn_jax.layers.centered import CenteredConv, CenteredDense
from mabn_jax.layers.cross_iteration import CrossIterationConvNorm
from mabn_jax.layers.filter_response import FilterResponseNorm
from mabn_jax.layers.frozen_batch_norm import FrozenBatchNorm
from mabn_jax.layers.mabn import MABN
from mabn_jax.layers.standardized import StandardizedConv
from mabn_jax.nnx import registry as nnx_registry


class Entry(NamedTuple):
  """A registry entry: the layer classes a name builds and how they are called.

  Attributes:
    linen: the Flax linen class whose fields are the keyword arguments.
    nnx: its Flax NNX twin.
    kind: ``'batch'`` (batch statistics: called with ``use_running_average``),
      ``'sample'`` (per-sample statistics: called with the input alone),
      ``'conv'`` (a convolution and its normalization in one module: CBN) or
      ``'none'`` (no normalization).
    centered: whether ``conv_norm``'s convolution is weight-centralized by
      default.
    fixed: keyword arguments the name sets (not the user).
    standardized: whether ``conv_norm``'s convolution is weight-standardized
      (:class:`~mabn_jax.StandardizedConv`; it then takes no ``centered``).
    spatial: whether the norm needs inputs with spatial axes (no
      ``dense_norm``).
  """

  linen: Any
  nnx: Any
  kind: str
  centered: bool = False
  fixed: Tuple[Tuple[str, Any], ...] = ()
  standardized: bool = False
  spatial: bool = False


_ENTRIES = {
  "bn": Entry(BatchNorm, nnx_layers.BatchNorm, "batch"),
  "syncbn": Entry(BatchNorm, nnx_layers.BatchNorm, "batch"),
  "brn": Entry(BatchRenorm, nnx_layers.BatchRenorm, "batch"),
  "gn": Entry(nn.GroupNorm, flax_nnx.GroupNorm, "sample"),
  "ln": Entry(nn.LayerNorm, flax_nnx.LayerNorm, "sample"),
  "in": Entry(nn.InstanceNorm, flax_nnx.InstanceNorm, "sample"),
  "cbn": Entry(
    CrossIterationConvNorm, nnx_layers.CrossIterationConvNorm, "conv", fixed=(("naive", False),)
  ),
  "cbn_naive": Entry(
    CrossIterationConvNorm, nnx_layers.CrossIterationConvNorm, "conv", fixed=(("naive", True),)
  ),
  "mabn": Entry(MABN, nnx_layers.MABN, "batch", centered=True),
  "frozen_bn": Entry(FrozenBatchNorm, nnx_layers.FrozenBatchNorm, "batch"),
  "ws_gn": Entry(nn.GroupNorm, flax_nnx.GroupNorm, "sample", standardized=True),
  "frn": Entry(FilterResponseNorm, nnx_layers.FilterResponseNorm, "sample", spatial=True),
  "none": Entry(None, None, "none"),
}
_NAMES = tuple(_ENTRIES)
# Fields a Normalizer never takes: set by the call (train) or by the method.
_MODULE_FIELDS = ("parent", "name", "use_running_average")
_CBN_CONV_FIELDS = ("features", "kernel_size", "strides", "padding", "naive", "use_bias")
_CONV_SHARED = ("dtype", "param_dtype")


def normalizer_names() -> Tuple[str, ...]:
  """The valid normalizer names, in a fixed order."""
  return _NAMES


def _target(name: str) -> Type[nn.Module]:
  """The layer class whose fields are ``name``'s keyword arguments."""
  return _ENTRIES[name].linen


def _valid_kwargs(name: str) -> Tuple[str, ...]:
  if _ENTRIES[name].kind == "none":
    return ("centered",)
  excluded = _MODULE_FIELDS + (_CBN_CONV_FIELDS if _ENTRIES[name].kind == "conv" else ())
  fields = {f.name for f in dataclasses.fields(_target(name))} - set(excluded)
  return tuple(sorted(fields | (set() if _ENTRIES[name].standardized else {"centered"})))


def _check_name(name: Any) -> None:
  if name not in _NAMES:
    raise ValueError(f"unknown normalizer {name!r}; valid names: {', '.join(_NAMES)}.")


def _hashable(value: Any) -> Any:
  """Lists (e.g. ``axis_index_groups``) become tuples so a Normalizer hashes."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """A normalizer chosen by name; frozen and hashable (usable as a Flax field).

  Make it with :func:`make_normalizer`. Its modules are called as
  ``module(x, train=...)`` (``use_running_average = not train``).

  Attributes:
    name: one of :func:`normalizer_names`.
    kwargs: sorted ``(key, value)`` pairs, the target layer's fields (see the
      module docstring).
  """

  name: str
  kwargs: Tuple[Tuple[str, Any], ...] = ()

  def __post_init__(self):
    _check_name(self.name)
    kwargs = self.kwargs
    if isinstance(kwargs, Mapping):
      kwargs = kwargs.items()
    kwargs = tuple(sorted((str(k), _hashable(v)) for k, v in kwargs))
    object.__setattr__(self, "kwargs", kwargs)
    valid = _valid_kwargs(self.name)
    if self.entry.standardized and "centered" in dict(kwargs):
      raise ValueError(
        f"normalizer {self.name!r} ({_describe(self.name)}): 'centered' does not "
        "apply: its convolution is weight-standardized, which centres the kernel; "
        f"valid keyword arguments: {', '.join(valid)}."
      )
    unknown = sorted(k for k, _ in kwargs if k not in valid)
    if unknown:
      raise ValueError(
        f"normalizer {self.name!r} ({_describe(self.name)}): unknown keyword "
        f"argument(s) {', '.join(unknown)}; valid ones: {', '.join(valid)}."
      )

  @property
  def entry(self) -> Entry:
    """The registry entry of :attr:`name`."""
    return _ENTRIES[self.name]

  @property
  def options(self) -> dict:
    """The keyword arguments as a dict."""
    return dict(self.kwargs)

  @property
  def centered(self) -> bool:
    """Whether :meth:`conv_norm`'s convolution is weight-centralized."""
    return bool(self.options.get("centered", self.entry.centered))

  @property
  def conv_class(self) -> type:
    """The linen convolution of :meth:`conv_norm`: ``mabn_jax.StandardizedConv``,
    ``mabn_jax.CenteredConv`` when centred, else ``flax.linen.Conv``; for a
    convolution that feeds this normalization without a ``conv_norm``."""
    return _conv_class(self)

  def with_updates(self, **kwargs) -> "Normalizer":
    """The same normalizer with some keyword arguments added or replaced."""
    return make_normalizer(self.name, **{**self.options, **kwargs})

  def conv_norm(
    self,
    features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Union[int, Sequence[int]] = 1,
    padding: Any = "SAME",
    kernel_init: Optional[Callable] = None,
    name: Optional[str] = None,
  ) -> "ConvNorm":
    """A convolution (no bias, but with ``'none'``) followed by this normalization.

    Returns an unbound :class:`ConvNorm` called as ``module(x, train=...)``
    on ``(N, *spatial, cin)`` inputs. An int ``kernel_size`` means the same
    size on every spatial axis.
    """
    return ConvNorm(
      normalizer=self,
      features=features,
      kernel_size=_hashable(kernel_size),
      strides=_hashable(strides),
      padding=_hashable(padding),
      kernel_init=kernel_init,
      name=name,
    )

  def norm(self, name: Optional[str] = None) -> "Norm":
    """The normalization on its own (e.g. after a Dense layer).

    Returns an unbound :class:`Norm` called as ``module(x, train=...)``.
    ``'none'`` gives the identity.

    Raises:
      ValueError: for ``'cbn'``/``'cbn_naive'``, which need the preceding
        convolution (use :meth:`conv_norm`).
    """
    if self.entry.kind == "conv":
      raise ValueError(
        f"normalizer {self.name!r} compensates statistics for the change of "
        "the preceding convolution's kernel, so it has no stand-alone norm; "
        "use conv_norm(...) instead."
      )
    return Norm(normalizer=self, name=name)

  def dense_norm(
    self, features: int, kernel_init: Optional[Callable] = None, name: Optional[str] = None
  ) -> "DenseNorm":
    """A dense layer (``CenteredDense`` when centred) followed by this normalization.

    Variables: ``params[NAME]['dense']`` (``kernel`` ``(cin, features)``, plus
    ``bias`` for ``'none'``) and the norm's under ``'norm'``.

    Raises:
      ValueError: for ``'cbn'``/``'cbn_naive'`` (convolutions only) and
        ``'frn'`` (a dense layer's output has no spatial axis).
    """
    _check_dense(self)
    return DenseNorm(normalizer=self, features=features, kernel_init=kernel_init, name=name)

  def nnx_conv_norm(self, in_features: int, *args, rngs, **kwargs):
    """:meth:`conv_norm` as a Flax NNX module: ``nnx_conv_norm(in_features,
    features, kernel_size, strides=1, padding='SAME', kernel_init=None, *,
    rngs)`` (:func:`mabn_jax.nnx.registry.conv_norm`).

    The same convolution and normalization with the same keyword arguments,
    as ``conv``/``norm`` children holding the linen layout's variables; called
    as ``module(x)``, switched by ``model.train()``/``model.eval()``.
    """
    return nnx_registry.conv_norm(self, in_features, *args, rngs=rngs, **kwargs)

  def nnx_norm(self, num_features: int, *, rngs):
    """:meth:`norm` as a Flax NNX module (``None`` for ``'none'``)."""
    return nnx_registry.norm(self, num_features, rngs=rngs)

  def nnx_dense_norm(
    self, in_features: int, features: int, kernel_init: Optional[Callable] = None, *, rngs
  ):
    """:meth:`dense_norm` as a Flax NNX module (``dense``/``norm`` children)."""
    return nnx_registry.dense_norm(self, in_features, features, kernel_init=kernel_init, rngs=rngs)

  def method(self, **overrides):
    """The functional method of this normalization (its
    :class:`~mabn_jax.functional.interface.Method`, configured by the keyword
    arguments, ``overrides`` and the layer's defaults), or ``None`` for a
    normalization without batch statistics (``'gn'``, ``'ln'``, ``'in'``,
    ``'ws_gn'``, ``'frn'``, ``'none'``)."""
    if self.entry.kind not in ("batch", "conv"):
      return None
    layer = self.entry.linen
    method_class = layer.method_class
    options = {**self._norm_kwargs(), **dict(self.entry.fixed), **overrides}
    values = lambda fields: {
      f.name: _hashable(options.get(f.name, getattr(layer, f.name, f.default)))
      for f in fields
      if f.name != "config"
    }
    config = method_class.config_class(**values(dataclasses.fields(method_class.config_class)))
    return method_class(config=config, **values(dataclasses.fields(method_class)))

  def _norm_kwargs(self) -> dict:
    options = self.options
    options.pop("centered", None)
    return options

  def conv_kwargs(self, kernel_init: Optional[Callable] = None) -> dict:
    """The options the convolution (or dense layer) before the norm shares
    (``dtype``, ``param_dtype``), and ``kernel_init`` if given."""
    options = self.options
    kwargs = {k: options[k] for k in _CONV_SHARED if k in options}
    if kernel_init is not None:
      kwargs["kernel_init"] = kernel_init
    return kwargs


def _describe(name: str) -> str:
  entry = _ENTRIES[name]
  if entry.kind == "none":
    return "no normalization"
  package = "flax.linen" if entry.linen.__module__.startswith("flax.") else "mabn_jax"
  fixed = "".join(f", {key}={value!r}" for key, value in entry.fixed)
  conv = "mabn_jax.StandardizedConv + " if entry.standardized else ""
  return f"{conv}{package}.{entry.linen.__name__}{fixed}"


def _check_dense(normalizer: Normalizer) -> None:
  """Raises for a normalizer that cannot follow a dense layer."""
  if normalizer.entry.kind == "conv":
    raise ValueError(
      f"normalizer {normalizer.name!r} is defined for a preceding convolution only; "
      "use conv_norm(...)."
    )
  if normalizer.entry.spatial:
    raise ValueError(
      f"normalizer {normalizer.name!r} ({_describe(normalizer.name)}) normalizes over "
      "spatial axes, which a dense layer's output (N, features) does not have; use "
      "conv_norm(...)."
    )


def make_normalizer(name: str, **kwargs) -> Normalizer:
  """Returns the :class:`Normalizer` ``name`` with keyword arguments ``kwargs``.

  ``'syncbn'`` gets ``axis_name='batch'`` unless given.

  Raises:
    ValueError: for an unknown name or keyword argument (the message lists the
      valid ones).
  """
  _check_name(name)
  if name == "syncbn":
    kwargs.setdefault("axis_name", "batch")
  return Normalizer(name=name, kwargs=tuple(kwargs.items()))


def _norm_layer(normalizer: Normalizer, name: Optional[str] = None) -> Optional[nn.Module]:
  """The (non-CBN) normalization layer, unbound; ``None`` for ``'none'``."""
  if normalizer.entry.kind == "none":
    return None
  return _target(normalizer.name)(**normalizer._norm_kwargs(), name=name)


def _apply_norm(normalizer: Normalizer, layer: Optional[nn.Module], x: jax.Array, train: bool):
  if layer is None:
    return x
  if normalizer.entry.kind == "batch":
    return layer(x, use_running_average=not train)
  return layer(x)


def _conv_class(normalizer: Normalizer) -> Type[nn.Conv]:
  """``conv_norm``'s convolution: standardized, centred or plain."""
  if normalizer.entry.standardized:
    return StandardizedConv
  return CenteredConv if normalizer.centered else nn.Conv


def _spatial(value: Any, rank: int) -> Any:
  return (value,) * rank if isinstance(value, int) else tuple(value)


class ConvNorm(nn.Module):
  """A convolution followed by a normalization chosen by a :class:`Normalizer`.

  Children: ``'conv'`` (``flax.linen.Conv``, :class:`~mabn_jax.CenteredConv`
  when ``normalizer.centered``, :class:`~mabn_jax.StandardizedConv` for
  ``'ws_gn'``; no bias unless the normalizer is ``'none'``)
  and ``'norm'`` (the normalization layer; absent for ``'none'``). For
  ``'cbn'``/``'cbn_naive'`` the cross-iteration module shares this module's
  scope, so its ``'conv'`` and ``'norm'`` children sit at the same place.

  Attributes:
    normalizer: which normalization and its keyword arguments.
    features: output channels.
    kernel_size: one size per spatial axis (an int: the same on every axis).
    strides: an int or one per spatial axis.
    padding: as ``flax.linen.Conv``.
    kernel_init: the convolution's kernel initializer (``None``: Flax's default).
  """

  normalizer: Normalizer
  features: int
  kernel_size: Union[int, Sequence[int]]
  strides: Union[int, Sequence[int]] = 1
  padding: Any = "SAME"
  kernel_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``(N, *spatial, cin)`` -> ``(N, *spatial_out, features)``."""
    normalizer = self.normalizer
    kernel_size = _spatial(self.kernel_size, x.ndim - 2)
    if normalizer.entry.kind == "conv":
      kwargs = normalizer._norm_kwargs()
      kwargs["centered"] = normalizer.centered
      if self.kernel_init is not None:
        kwargs["kernel_init"] = self.kernel_init
      module = _target(normalizer.name)(
        features=self.features,
        kernel_size=kernel_size,
        strides=self.strides,
        padding=self.padding,
        use_bias=False,
        **dict(normalizer.entry.fixed),
        **kwargs,
      )
      nn.share_scope(self, module)
      return module(x, use_running_average=not train)

    conv_cls = _conv_class(normalizer)
    y = conv_cls(
      features=self.features,
      kernel_size=kernel_size,
      strides=self.strides,
      padding=self.padding,
      use_bias=normalizer.name == "none",
      **normalizer.conv_kwargs(self.kernel_init),
      name="conv",
    )(x)
    return _apply_norm(normalizer, _norm_layer(normalizer, name="norm"), y, train)


class Norm(nn.Module):
  """A normalization chosen by a :class:`Normalizer`, called with ``train``.

  The layer shares this module's scope: its variables sit directly under this
  module's name (as if it were the layer itself). ``'none'`` is the identity.
  """

  normalizer: Normalizer

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layer = _norm_layer(self.normalizer)
    if layer is not None:
      nn.share_scope(self, layer)
    return _apply_norm(self.normalizer, layer, x, train)


class DenseNorm(nn.Module):
  """A dense layer (``'dense'``) followed by a normalization (``'norm'``).

  The dense layer is :class:`~mabn_jax.CenteredDense` when
  ``normalizer.centered`` and has a bias only for ``'none'``.
  """

  normalizer: Normalizer
  features: int
  kernel_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    normalizer = self.normalizer
    dense_cls = CenteredDense if normalizer.centered else nn.Dense
    y = dense_cls(
      features=self.features,
      use_bias=normalizer.name == "none",
      **normalizer.conv_kwargs(self.kernel_init),
      name="dense",
    )(x)
    return _apply_norm(normalizer, _norm_layer(normalizer, name="norm"), y, train)
