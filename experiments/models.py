"""Networks written once for every normalizer of the registry.

Every convolution followed by a normalization is ``normalizer.conv_norm(...)``
(so ``'mabn'`` gets weight-centralized convolutions and ``'none'`` a biased
conv without normalization); the classifier is a plain ``Dense``. A ReLU
follows each conv_norm, except with ``'frn'``, whose TLU is the activation
(:func:`activation`); a residual branch's last layer and a projection, which
no activation follows, get FRN without its TLU.

Inputs are NHWC float images; outputs are ``(N, num_classes)`` logits.
``train`` is the only call-time flag.

The CNN family (``cnn2``, ``cnn6``) also takes which convolutions are
normalized (``norm_layers``, :func:`normalized_layers`); the others are the
registry's ``'none'`` conv (a biased conv, no normalization).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import mabn_jax as mj

MODEL_NAMES = (
  "cnn2",
  "cnn6",
  "resnet20",
  "resnet56",
  "resnet18_cifar",
  "resnet18",
  "resnet50",
  "preact_resnet8",
  "preact_resnet20",
)
# Models taking ``norm_layers`` (the others normalize every conv).
PLACEMENT_MODELS = ("cnn2", "cnn6")
# Named placements of the normalization: every conv, the first one, the
# first half (``n // 2``, at least one) and none.
NORM_LAYERS = ("all", "first", "first_half", "none")


def _placement_error(norm_layers: Any) -> ValueError:
  return ValueError(
    f"norm_layers {norm_layers!r}: expected one of {', '.join(map(repr, NORM_LAYERS))} or "
    "conv numbers as in the layer names (1-based: conv1, conv2, ...), e.g. '1,3' or (1, 3)"
  )


def normalized_layers(norm_layers: Any, num_layers: int) -> Tuple[int, ...]:
  """The 0-based indices of the normalized convs among ``num_layers``.

  ``norm_layers`` is a name of :data:`NORM_LAYERS` or explicit conv numbers,
  1-based as in the layer names ``conv1, conv2, ...``: a sequence of ints or
  a comma-separated string (``'1,3'``).

  Raises:
    ValueError: for an unknown name, a malformed list or a conv number
      outside ``1..num_layers``.
  """
  if isinstance(norm_layers, str):
    if norm_layers == "all":
      return tuple(range(num_layers))
    if norm_layers == "first":
      return (0,)
    if norm_layers == "first_half":
      return tuple(range(max(num_layers // 2, 1)))
    if norm_layers == "none":
      return ()
    try:
      numbers = [int(v) for v in norm_layers.split(",") if v.strip()]
    except ValueError:
      raise _placement_error(norm_layers) from None
    if not numbers:
      raise _placement_error(norm_layers)
  elif isinstance(norm_layers, (list, tuple)) and all(
    isinstance(v, int) and not isinstance(v, bool) for v in norm_layers
  ):
    numbers = list(norm_layers)
  else:
    raise _placement_error(norm_layers)
  bad = [v for v in numbers if not 1 <= v <= num_layers]
  if bad:
    raise ValueError(f"norm_layers {norm_layers!r}: conv number(s) {bad} outside 1..{num_layers}")
  return tuple(sorted({v - 1 for v in numbers}))


class CNN6(nn.Module):
  """Six conv+norm+ReLU layers in three pairs, 2x2 max-pool after each pair.

  Attributes:
    normalizer: a ``mabn_jax`` ``Normalizer`` (``mj.make_normalizer``).
    num_classes: logits size.
    widths: channels of the six convolutions.
    norm_layers: which convs ``normalizer`` normalizes (:func:`normalized_layers`);
      the others are ``mj.make_normalizer('none')`` convs (with a bias).
  """

  normalizer: Any
  num_classes: int = 10
  widths: Sequence[int] = (32, 32, 64, 64, 128, 128)
  norm_layers: Any = "all"

  @nn.compact
  def __call__(self, x, train: bool = True):
    normalized = normalized_layers(self.norm_layers, len(self.widths))
    for i, width in enumerate(self.widths):
      normalizer = self.normalizer if i in normalized else mj.make_normalizer("none")
      x = normalizer.conv_norm(
        features=width, kernel_size=(3, 3), strides=(1, 1), padding="SAME", name=f"conv{i + 1}"
      )(x, train=train)
      x = activation(normalizer, x)
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def has_activation(normalizer: Any) -> bool:
  """Whether ``normalizer``'s conv_norm ends with its own activation: FRN's
  TLU (``'frn'``, ``use_tlu`` by default), which then takes the ReLU's place."""
  options = dict(getattr(normalizer, "kwargs", ()))
  return getattr(normalizer, "name", None) == "frn" and options.get("use_tlu", True)


def activation(normalizer: Any, x: jax.Array) -> jax.Array:
  """The activation after ``normalizer``'s conv_norm: a ReLU, or nothing
  where the normalization has its own (:func:`has_activation`)."""
  return x if has_activation(normalizer) else nn.relu(x)


def without_activation(normalizer: Any) -> Any:
  """``normalizer`` for a conv_norm not followed by an activation (a residual
  branch's last layer, a projection): FRN without its TLU."""
  return normalizer.with_updates(use_tlu=False) if has_activation(normalizer) else normalizer


class ResidualBlock(nn.Module):
  """Conv+norm layers with ReLUs between them, added to the (projected) input.

  Basic: 3x3 (strided), 3x3 at ``features``. Bottleneck: 1x1, 3x3 (strided)
  at ``features``, 1x1 at ``4 * features``. A 1x1 conv+norm projection
  (``'proj'``) is used when the shape changes. Layers are ``conv1``,
  ``conv2`` (, ``conv3``).
  """

  normalizer: Any
  features: int
  strides: int = 1
  bottleneck: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    f, s = self.features, self.strides
    # (kernel side, stride, width) of each conv+norm.
    layers = ((1, 1, f), (3, s, f), (1, 1, 4 * f)) if self.bottleneck else ((3, s, f), (3, 1, f))
    y = x
    for i, (k, stride, width) in enumerate(layers):
      if i:
        y = activation(self.normalizer, y)
      last = i == len(layers) - 1  # added to the input before the ReLU: no TLU
      y = (without_activation(self.normalizer) if last else self.normalizer).conv_norm(
        features=width,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding="SAME",
        name=f"conv{i + 1}",
      )(y, train=train)
    out = layers[-1][2]
    if x.shape[-1] != out or s != 1:
      x = without_activation(self.normalizer).conv_norm(
        features=out, kernel_size=(1, 1), strides=(s, s), padding="SAME", name="proj"
      )(x, train=train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with a CIFAR (3x3, stride 1) or ImageNet (7x7/2 + max-pool) stem.

  Attributes:
    normalizer: a ``mabn_jax`` ``Normalizer``.
    stage_sizes: blocks per stage; stage ``i > 0`` starts with stride 2.
    block: ``'basic'`` or ``'bottleneck'``.
    num_filters: width of the first stage (doubled each stage).
    stem: ``'cifar'`` or ``'imagenet'``.
    stem_features: stem width (default ``num_filters``).
  """

  normalizer: Any
  stage_sizes: Tuple[int, ...]
  num_classes: int = 10
  block: str = "basic"
  num_filters: int = 16
  stem: str = "cifar"
  stem_features: int = 0

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNet: unknown block {self.block!r}; expected 'basic' or 'bottleneck'")
    stem_features = self.stem_features or self.num_filters
    if self.stem == "imagenet":
      x = self.normalizer.conv_norm(
        features=stem_features,
        kernel_size=(7, 7),
        strides=(2, 2),
        padding=[(3, 3), (3, 3)],
        name="stem",
      )(x, train=train)
      x = activation(self.normalizer, x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    elif self.stem == "cifar":
      x = self.normalizer.conv_norm(
        features=stem_features, kernel_size=(3, 3), strides=(1, 1), padding="SAME", name="stem"
      )(x, train=train)
      x = activation(self.normalizer, x)
    else:
      raise ValueError(f"ResNet: unknown stem {self.stem!r}; expected 'cifar' or 'imagenet'")
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = ResidualBlock(
          self.normalizer,
          self.num_filters * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          bottleneck=self.block == "bottleneck",
          name=f"stage{i + 1}_block{j + 1}",
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def producer_conv(normalizer, **kwargs) -> nn.Module:
  """A convolution (no bias) that feeds ``normalizer``'s norms without one of
  its own after it: the registry's convolution for the normalizer
  (``Normalizer.conv_class``: weight-centralized for MABN, standardized for
  WS+GN, else ``nn.Conv``)."""
  return normalizer.conv_class(use_bias=False, **normalizer.conv_kwargs(), **kwargs)


class PreActBlock(nn.Module):
  """A pre-activation basic block (He et al., 2016): ``norm, relu, conv3x3
  (strided), norm, relu, conv3x3`` added to the input, or to a 1x1 conv of
  the first activation when the shape changes. Every norm's input is either
  the residual stream (a sum of convolution outputs) or a convolution's
  output; with MABN every convolution is weight-centralized, so both are."""

  normalizer: Any
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    s = self.strides
    a = nn.relu(self.normalizer.norm(name="norm1")(x, train=train))
    shortcut = x
    if x.shape[-1] != self.features or s != 1:
      shortcut = producer_conv(
        self.normalizer, features=self.features, kernel_size=(1, 1), strides=(s, s), name="proj"
      )(a)
    y = producer_conv(
      self.normalizer, features=self.features, kernel_size=(3, 3), strides=(s, s), name="conv1"
    )(a)
    y = nn.relu(self.normalizer.norm(name="norm2")(y, train=train))
    y = producer_conv(self.normalizer, features=self.features, kernel_size=(3, 3), name="conv2")(y)
    return shortcut + y


class PreActResNet(nn.Module):
  """A CIFAR-style pre-activation ResNet: a 3x3 stem convolution (no norm
  after it), :class:`PreActBlock` stages (stage ``i > 0`` starts with stride
  2), then ``norm, relu``, global average pooling and the classifier.
  ``normalizer`` must offer a stand-alone norm (not CBN)."""

  normalizer: Any
  stage_sizes: Tuple[int, ...]
  num_classes: int = 10
  num_filters: int = 16

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = producer_conv(self.normalizer, features=self.num_filters, kernel_size=(3, 3), name="stem")(
      x
    )
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = PreActBlock(
          self.normalizer,
          self.num_filters * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          name=f"stage{i + 1}_block{j + 1}",
        )(x, train=train)
    x = nn.relu(self.normalizer.norm(name="final_norm")(x, train=train))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def build_model(
  name: str, normalizer, num_classes: int, width: int = 0, norm_layers: Any = "all"
) -> nn.Module:
  """A model by name (:data:`MODEL_NAMES`); ``width`` overrides the base width.

  ``norm_layers`` (:func:`normalized_layers`) chooses the normalized convs of
  the :data:`PLACEMENT_MODELS`; the other models take only ``'all'``.
  """
  if isinstance(norm_layers, list):
    norm_layers = tuple(norm_layers)  # a Flax field must hash
  if name == "cnn2":  # two conv+norm layers: tests and smoke runs
    w = width or 8
    widths = (w, 2 * w)
  elif name == "cnn6":
    w = width or 32
    widths = (w, w, 2 * w, 2 * w, 4 * w, 4 * w)
  else:
    widths = None
  if widths is not None:
    normalized_layers(norm_layers, len(widths))  # a bad value fails here, not at init
    return CNN6(normalizer, num_classes, widths=widths, norm_layers=norm_layers)
  if norm_layers != "all" and name in MODEL_NAMES:
    raise ValueError(
      f"norm_layers {norm_layers!r}: model {name!r} normalizes every conv; "
      f"other placements need one of {PLACEMENT_MODELS}"
    )
  if name in ("resnet20", "resnet56"):
    n = {"resnet20": 3, "resnet56": 9}[name]
    return ResNet(normalizer, (n, n, n), num_classes, "basic", width or 16, "cifar")
  if name == "resnet18_cifar":
    return ResNet(normalizer, (2, 2, 2, 2), num_classes, "basic", width or 64, "cifar")
  if name == "resnet18":
    return ResNet(normalizer, (2, 2, 2, 2), num_classes, "basic", width or 64, "imagenet")
  if name in ("preact_resnet8", "preact_resnet20"):
    n = {"preact_resnet8": 1, "preact_resnet20": 3}[name]
    return PreActResNet(normalizer, (n, n, n), num_classes, width or 16)
  if name == "resnet50":
    return ResNet(normalizer, (3, 4, 6, 3), num_classes, "bottleneck", width or 64, "imagenet")
  raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
