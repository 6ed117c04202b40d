"""An encoder-decoder (small U-Net) written once for every registry normalizer.

Every convolution followed by a normalization is ``normalizer.conv_norm(...)``
as in :mod:`experiments.models`, so ``'mabn'`` gets its weight-centralized
convolutions, ``'cbn'``/``'cbn_naive'`` their cross-iteration conv+norm and
``'none'`` biased convolutions without normalization. Only the 1x1
classifier is a plain biased ``Conv``.

Inputs are NHWC float images whose side is a multiple of ``2**(len(widths)-1)``;
outputs are ``(N, H, W, num_classes)`` per-pixel logits.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import mabn_jax as mj
from experiments import models

# Normalizers whose statistics depend on the batch: they get norm_batch_size.
BATCH_NORMALIZERS = ("bn", "syncbn", "brn", "cbn", "cbn_naive", "mabn")


class DoubleConv(nn.Module):
  """Two 3x3 conv+norm+ReLU layers (``conv1``, ``conv2``) at ``features`` channels."""

  normalizer: Any
  features: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    """``(N, H, W, C)`` -> ``(N, H, W, features)``."""
    for i in range(2):
      x = self.normalizer.conv_norm(
        features=self.features, kernel_size=(3, 3), padding="SAME", name=f"conv{i + 1}"
      )(x, train=train)
      x = models.activation(self.normalizer, x)
    return x


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling: ``(N, H, W, C)`` -> ``(N, 2H, 2W, C)``."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
  """U-Net: ``len(widths) - 1`` down and as many up stages with skip connections.

  Encoder stage ``i`` (``down{i}``) is a :class:`DoubleConv` at ``widths[i]``
  followed by a 2x2 max-pool (none after the last, ``bottleneck``); decoder
  stage ``i`` (``up{i}``) upsamples 2x (nearest), concatenates the encoder
  feature of the same resolution and applies a :class:`DoubleConv`; ``head``
  is a biased 1x1 conv to ``num_classes``. With the default 4 widths: 3 down
  stages, 3 up stages.

  Attributes:
    normalizer: a ``mabn_jax`` ``Normalizer`` (:func:`segmentation_normalizer`).
    num_classes: logits per pixel.
    widths: channels per resolution, finest first.
  """

  normalizer: Any
  num_classes: int
  widths: Sequence[int] = (16, 32, 64, 128)

  @nn.compact
  def __call__(self, x, train: bool = True):
    """``(N, H, W, C)`` float -> ``(N, H, W, num_classes)`` float32 logits."""
    factor = 2 ** (len(self.widths) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
        f"UNet with {len(self.widths)} widths needs H and W divisible by "
        f"{factor}, got {x.shape[1:3]}"
      )
    skips = []
    for i, width in enumerate(self.widths[:-1]):
      x = DoubleConv(self.normalizer, width, name=f"down{i + 1}")(x, train=train)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = DoubleConv(self.normalizer, self.widths[-1], name="bottleneck")(x, train=train)
    for i, (width, skip) in enumerate(zip(self.widths[-2::-1], skips[::-1], strict=True)):
      x = jnp.concatenate([upsample2x(x), skip], axis=-1)
      x = DoubleConv(self.normalizer, width, name=f"up{i + 1}")(x, train=train)
    return nn.Conv(self.num_classes, (1, 1), name="head")(x).astype(jnp.float32)


def group_count(widths: Sequence[int], groups: int) -> int:
  """The largest group count ``<= groups`` dividing every width (GroupNorm)."""
  g = math.gcd(*[int(w) for w in widths])
  return max(d for d in range(1, min(groups, g) + 1) if g % d == 0)


def segmentation_normalizer(
  norm: str,
  norm_batch_size: Optional[int] = None,
  widths: Sequence[int] = (16, 32, 64, 128),
  gn_groups: int = 8,
  norm_kwargs: Optional[Dict[str, Any]] = None,
):
  """The registry normalizer ``norm`` for :class:`UNet` under one ``jit``.

  ``norm_batch_size`` (batch normalizers only, as in
  :meth:`experiments.loop.config.Config.normalizer_kwargs`) splits each batch into
  groups normalized separately; ``gn`` gets :func:`group_count` groups;
  ``syncbn`` gets ``axis_name=None`` (one program over the batch: its
  statistics are global already). ``norm_kwargs`` are passed through.
  """
  kw = dict(norm_kwargs or {})
  if norm in BATCH_NORMALIZERS and norm_batch_size:
    kw.setdefault("norm_batch_size", norm_batch_size)
  if norm in ("gn", "ws_gn"):
    kw.setdefault("num_groups", group_count(widths, gn_groups))
  if norm == "syncbn":
    kw.setdefault("axis_name", None)
  return mj.make_normalizer(norm, **kw)
