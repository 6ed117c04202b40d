"""Loading a dataset by name (:func:`load_dataset`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from experiments.data.cifar10_jpeg import (
  CIFAR10_CLASSES,
  default_cache_dir,
  default_cifar10_tarball,
  load_cifar10_jpeg_arrays,
  load_cifar10_jpeg_tfds,
)
from experiments.data.splits import (
  Dataset,
  IndexedSplit,
  Split,
  _make_dataset,
  hold_out,
  load_digits,
  synthetic,
)
from experiments.data.tfds import TFDS_NAMES, load_tfds

DATASET_NAMES = ("digits", "digits8", "cifar10_jpeg", "synthetic") + TFDS_NAMES


def load_dataset(
  name: str,
  data_dir: Optional[str] = None,
  cache_dir: Optional[str] = None,
  train_subset: Optional[int] = None,
  tarball: Optional[str] = None,
  use_tfds: bool = False,
  image_size: int = 224,
  val_split: int = 0,
) -> Dataset:
  """Loads a dataset by name (see the module docstring).

  Args:
    name: one of :data:`DATASET_NAMES`.
    data_dir: tfds data directory (standard names; the tfds builder).
    cache_dir: where decoded arrays are cached (default
      ``$MABN_EXPERIMENTS_CACHE`` or ``~/.cache/mabn_jax_experiments``).
    train_subset: keep this many training examples (a fixed random subset).
    tarball: the CIFAR-10 JPEG tarball (default ``../shared/data/cifar10``).
    use_tfds: read ``cifar10_jpeg`` through the tfds builder.
    image_size: ImageNet-style datasets: the side images are resized to.
    val_split: hold out this many training images as ``Dataset.val`` (see
      :func:`hold_out`: disjoint from the training images, the same for every
      seed; with ``train_subset`` the subset is unchanged).
  """
  ds = load_source(name, data_dir, cache_dir, tarball, use_tfds, image_size)
  if val_split:
    return with_validation(ds, val_split, train_subset)
  if train_subset is not None:
    return training_subset(ds, train_subset, name)
  return ds


def load_source(
  name: str,
  data_dir: Optional[str],
  cache_dir: Optional[str],
  tarball: Optional[str],
  use_tfds: bool,
  image_size: int,
) -> Dataset:
  """The whole dataset ``name`` (see :func:`load_dataset` for the arguments)."""
  if name == "digits":
    return load_digits()
  if name == "digits8":
    return load_digits(upsample=1, name=name)
  if name == "synthetic":
    return synthetic()
  if name == "cifar10_jpeg":
    tarball = tarball or default_cifar10_tarball()
    if not os.path.exists(tarball):
      raise ValueError(f"CIFAR-10 tarball not found at {tarball!r}; pass --tarball.")
    if use_tfds:
      splits = load_cifar10_jpeg_tfds(
        tarball, data_dir or os.path.join(cache_dir or default_cache_dir(), "tfds"), cache_dir
      )
    else:
      splits = load_cifar10_jpeg_arrays(tarball, cache_dir)
    return _make_dataset(name, splits["train"], splits["test"], len(CIFAR10_CLASSES))
  if name in TFDS_NAMES:
    return load_tfds(name, data_dir, image_size)
  raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def with_validation(ds: Dataset, val_split: int, train_subset: Optional[int]) -> Dataset:
  """``ds`` with ``val_split`` training images held out as ``val`` (see :func:`hold_out`)."""
  train_idx, val_idx = hold_out(
    len(ds.train),
    val_split,
    min(train_subset, len(ds.train) - val_split) if train_subset is not None else None,
  )
  train_split = (
    Split(*ds.train.get(train_idx))
    if isinstance(ds.train, Split)
    else IndexedSplit(ds.train, train_idx)
  )
  val = (
    Split(*ds.train.get(val_idx))
    if isinstance(ds.train, Split)
    else IndexedSplit(ds.train, val_idx)
  )
  stats = (
    _make_dataset(ds.name, train_split, ds.test, ds.num_classes, ds.flip, ds.pad)
    if isinstance(train_split, Split)
    else ds
  )
  return dataclasses.replace(stats, val=val)


def training_subset(ds: Dataset, train_subset: int, name: str) -> Dataset:
  """``ds`` (dataset ``name``) with a fixed random subset of ``train_subset`` training images."""
  if not isinstance(ds.train, Split):
    raise ValueError(f"train_subset is only supported for in-memory datasets, not {name!r}")
  return _make_dataset(
    ds.name, ds.train.subset(train_subset), ds.test, ds.num_classes, ds.flip, ds.pad
  )
