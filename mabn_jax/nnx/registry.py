"""Normalizers by name for Flax NNX: the NNX side of :mod:`mabn_jax.registry`.

A network written once against a :class:`mabn_jax.Normalizer` builds in both
APIs: linen through ``normalizer.conv_norm(...)``, NNX through
``normalizer.nnx_conv_norm(in_features, ...)`` (or the functions here), with
the same keyword arguments and the same variable layout::

  conv_norm(...):  conv  (kernel (kh, kw, cin, cout)[, bias (cout,)])
                   norm  (the norm layer's Param and BatchStat state)
  dense_norm(...): dense, norm
  norm(...):       the norm layer itself

``'none'`` has no ``norm`` and its conv (dense) has a bias; ``'cbn'`` and
``'cbn_naive'`` are a :class:`~mabn_jax.nnx.CrossIterationConvNorm` (whose
``conv`` and ``norm`` sit at the same place). The NNX modules are switched by
``model.train()``/``model.eval()`` and called as ``module(x)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence, Union

from flax import nnx

from mabn_jax.nnx.centered import CenteredConv, CenteredDense
from mabn_jax.nnx.standardized import StandardizedConv


def _norm_kwargs(normalizer) -> dict:
  options = normalizer.options
  options.pop("centered", None)
  target = normalizer.entry.nnx
  accepted = set(inspect.signature(target.__init__).parameters) - {"self", "rngs"}
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ValueError(
      f"normalizer {normalizer.name!r}: keyword argument(s) {', '.join(unknown)} "
      f"have no counterpart in {target.__module__}.{target.__name__} (Flax NNX); "
      f"it accepts {', '.join(sorted(accepted))}."
    )
  return options


def norm(normalizer, num_features: int, *, rngs: nnx.Rngs) -> Optional[nnx.Module]:
  """The normalization layer on its own (``None`` for ``'none'``: the identity).

  Raises:
    ValueError: for ``'cbn'``/``'cbn_naive'`` (they need the convolution).
  """
  if normalizer.entry.kind == "conv":
    raise ValueError(
      f"normalizer {normalizer.name!r} compensates statistics for the change of "
      "the preceding convolution's kernel, so it has no stand-alone norm; use "
      "conv_norm(...) instead."
    )
  if normalizer.entry.kind == "none":
    return None
  return normalizer.entry.nnx(num_features, **_norm_kwargs(normalizer), rngs=rngs)


def _optional(layer: Optional[nnx.Module]):
  """A child module, or ``None`` kept as data (as ``nnx.BatchNorm``'s ``scale``)."""
  return nnx.data(None) if layer is None else layer


def _conv_class(normalizer) -> type:
  """``conv_norm``'s convolution: standardized, centred or plain."""
  if normalizer.entry.standardized:
    return StandardizedConv
  return CenteredConv if normalizer.centered else nnx.Conv


class ConvNorm(nnx.Module):
  """A convolution (``conv``) followed by a normalization (``norm``), by name.

  ``conv`` is ``nnx.Conv``, :class:`~mabn_jax.nnx.CenteredConv` when the
  normalizer is centred, or :class:`~mabn_jax.nnx.StandardizedConv` for
  ``'ws_gn'``; it has a bias only for ``'none'``, which has no
  ``norm``. Called as ``module(x)`` on ``(N, *spatial, in_features)``.
  """

  def __init__(
    self,
    normalizer,
    in_features: int,
    features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Any = 1,
    *,
    padding: Any = "SAME",
    kernel_init: Optional[Callable] = None,
    rngs: nnx.Rngs,
  ):
    conv_cls = _conv_class(normalizer)
    options = dict(use_bias=normalizer.name == "none", **normalizer.conv_kwargs(kernel_init))
    self.conv = conv_cls(
      in_features, features, kernel_size, strides, padding=padding, rngs=rngs, **options
    )
    self.norm = _optional(norm(normalizer, features, rngs=rngs))

  def __call__(self, x):
    y = self.conv(x)
    return y if self.norm is None else self.norm(y)


class DenseNorm(nnx.Module):
  """A linear layer (``dense``; centred when the normalizer is) followed by a
  normalization (``norm``); a bias only for ``'none'``."""

  def __init__(self, normalizer, in_features: int, features: int, *, kernel_init=None, rngs):
    if normalizer.entry.kind == "conv" or normalizer.entry.spatial:
      raise ValueError(
        f"normalizer {normalizer.name!r} is defined for a preceding convolution "
        "only (a dense layer's output has no spatial axis); use conv_norm(...)."
      )
    dense_cls = CenteredDense if normalizer.centered else nnx.Linear
    options = dict(use_bias=normalizer.name == "none", **normalizer.conv_kwargs(kernel_init))
    self.dense = dense_cls(in_features, features, rngs=rngs, **options)
    self.norm = _optional(norm(normalizer, features, rngs=rngs))

  def __call__(self, x):
    y = self.dense(x)
    return y if self.norm is None else self.norm(y)


def conv_norm(
  normalizer,
  in_features: int,
  features: int,
  kernel_size,
  strides=1,
  *,
  padding: Any = "SAME",
  kernel_init: Optional[Callable] = None,
  rngs: nnx.Rngs,
) -> nnx.Module:
  """A convolution followed by ``normalizer``'s normalization, as an NNX module.

  Arguments as :class:`ConvNorm`'s (``kernel_size`` an int or one size per
  spatial axis, ``strides`` an int or one per axis).

  An int ``kernel_size`` means a square kernel of 2-D convolutions (give a
  tuple for other ranks). ``'cbn'``/``'cbn_naive'`` give a
  :class:`~mabn_jax.nnx.CrossIterationConvNorm`; with ``group_history`` build
  that module directly (it needs ``num_groups``).
  """
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size, kernel_size)
  if normalizer.entry.kind == "conv":
    kwargs = _norm_kwargs(normalizer)
    kwargs["centered"] = normalizer.centered
    if kernel_init is not None:
      kwargs["kernel_init"] = kernel_init
    kwargs.update(normalizer.entry.fixed, padding=padding, use_bias=False, rngs=rngs)
    return normalizer.entry.nnx(in_features, features, kernel_size, strides, **kwargs)
  options = dict(padding=padding, kernel_init=kernel_init, rngs=rngs)
  return ConvNorm(normalizer, in_features, features, kernel_size, strides, **options)


def dense_norm(
  normalizer,
  in_features: int,
  features: int,
  *,
  kernel_init: Optional[Callable] = None,
  rngs: nnx.Rngs,
) -> DenseNorm:
  """A linear layer followed by ``normalizer``'s normalization (NNX)."""
  return DenseNorm(normalizer, in_features, features, kernel_init=kernel_init, rngs=rngs)
