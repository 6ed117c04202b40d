"""In-memory splits and datasets (:class:`Split`, :class:`Dataset`), held-out
validation, and the built-in sources (scikit-learn digits, synthetic)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class Split:
  """An in-memory split: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int32."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray):
    return self.images[indices], self.labels[indices]

  @property
  def image_shape(self):
    return tuple(self.images.shape[1:])

  def subset(self, n: Optional[int], seed: int = 0) -> "Split":
    """The first ``n`` examples of a fixed class-mixing permutation."""
    if n is None or n >= len(self):
      return self
    order = np.random.default_rng(seed).permutation(len(self))[:n]
    order.sort()
    return Split(self.images[order], self.labels[order])


class IndexedSplit:
  """The examples ``indices`` of another split (``len``, ``get``, ``image_shape``)."""

  def __init__(self, base: Any, indices: np.ndarray):
    self.base = base
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def get(self, indices: np.ndarray):
    return self.base.get(self.indices[np.asarray(indices)])

  @property
  def image_shape(self):
    return tuple(self.base.image_shape)


def hold_out(
  n_examples: int, val_size: int, train_size: Optional[int] = None, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
  """``(train, val)`` sorted index arrays of a fixed permutation of ``n_examples``.

  ``val`` is the *last* ``val_size`` entries of the permutation and ``train``
  the first ``train_size`` (default: all the others), so the two never
  overlap, do not depend on the run's seed, and a training subset is the
  same with and without a validation split (:meth:`Split.subset` takes the
  first entries of the same permutation).

  Raises:
    ValueError: if ``train_size + val_size`` exceeds ``n_examples``.
  """
  train_size = n_examples - val_size if train_size is None else train_size
  if val_size < 0 or train_size < 1 or train_size + val_size > n_examples:
    raise ValueError(
      f"cannot hold out {val_size} validation examples and keep {train_size} "
      f"training examples of a split of {n_examples}"
    )
  order = np.random.default_rng(seed).permutation(n_examples)
  val = np.sort(order[n_examples - val_size :]) if val_size else np.zeros(0, np.int64)
  return np.sort(order[:train_size]), val


@dataclasses.dataclass
class Dataset:
  """Train and test splits plus what the pipeline needs to know about them.

  ``mean`` and ``std`` are per channel on the 0..1 scale (measured on the
  training split); ``flip`` says whether horizontal flips are label-preserving.
  """

  name: str
  train: Any  # Split or TfdsImageSplit: len(), get(indices), image_shape
  test: Any
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  flip: bool = True
  pad: int = 4
  val: Any = None  # held out from the training images (``val_split``), or None

  @property
  def image_shape(self):
    return tuple(self.train.image_shape)


def channel_stats(images: np.ndarray, chunk: int = 4096):
  """Per-channel mean and std (0..1 scale, float64 accumulation)."""
  c = images.shape[-1]
  total = np.zeros(c)
  total_sq = np.zeros(c)
  count = 0
  for i in range(0, len(images), chunk):
    x = images[i : i + chunk].reshape(-1, c).astype(np.float64) / 255.0
    total += x.sum(0)
    total_sq += (x * x).sum(0)
    count += x.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32)


def _make_dataset(name, train, test, num_classes, flip=True, pad=4) -> Dataset:
  mean, std = channel_stats(train.images)
  return Dataset(name, train, test, num_classes, mean, std, flip=flip, pad=pad)


# --------------------------------------------------------------------------
# digits and synthetic data (no files).


def load_digits(test_fraction: float = 0.2, upsample: int = 2, name: str = "digits") -> Dataset:
  """scikit-learn digits as ``(8*upsample)^2 x 1`` uint8 images, fixed split
  (the same images in train and test for every ``upsample``)."""
  from sklearn.datasets import load_digits as sk_digits

  d = sk_digits()
  images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  images = images.repeat(upsample, axis=1).repeat(upsample, axis=2)[..., None]
  labels = d.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
  return _make_dataset(
    name,
    Split(images[train], labels[train]),
    Split(images[test], labels[test]),
    10,
    flip=False,
    pad=2,
  )


def synthetic(
  n_train: int = 64,
  n_test: int = 32,
  image_size: int = 8,
  channels: int = 3,
  num_classes: int = 4,
  seed: int = 0,
) -> Dataset:
  """Learnable random images: class ``k`` brightens channel ``k % C``."""
  rng = np.random.default_rng(seed)

  def make(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    x = rng.normal(100, 30, (n, image_size, image_size, channels))
    x[np.arange(n), :, :, labels % channels] += 60.0 * (1 + labels // channels)[:, None, None]
    return Split(np.clip(x, 0, 255).astype(np.uint8), labels)

  return _make_dataset("synthetic", make(n_train), make(n_test), num_classes, pad=2)


# --------------------------------------------------------------------------
# The offline CIFAR-10 JPEG tarball.
