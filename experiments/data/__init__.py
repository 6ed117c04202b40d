"""Datasets and the numpy input pipeline.

Sources (``load_dataset(name, ...)``):

* ``digits``: scikit-learn's 8x8 digits, upsampled to 16x16x1, and
  ``digits8``: the same images at their native 8x8 (the main job's data):
  the tiny built-in sets (no download, no files).
* ``cifar10_jpeg``: the offline CIFAR-10 JPEG tarball (train/<class>/NNNN.jpg,
  test/<class>/NNNN.jpg). Read in archive order, decoded once with Pillow and
  cached as ``.npy`` under ``cache_dir``. When tensorflow-datasets is
  installed and ``use_tfds`` is set, the same arrays go through the
  :class:`Cifar10Jpeg` tfds builder (array_record files under ``data_dir``).
* ``cifar10``, ``cifar100``, ``imagenette``, ``imagenet2012``: the standard
  tfds datasets read from ``data_dir`` as ``tfds build`` prepares them
  (tensorflow-datasets required; TFRecord-prepared data additionally needs
  tensorflow, array_record-prepared data does not).

Images are ``uint8`` ``(N, H, W, C)``, labels ``int32`` ``(N,)``; examples are
always put in a canonical order (split, class, file name) so every source of
the same data trains identically.

The pipeline (:class:`Loader`) is numpy-only: per-epoch permutation from
``(seed, epoch)``, per-host shards, random crop with zero padding and
horizontal flip from ``(seed, epoch, step)`` (so a resumed run sees the same
batches), per-channel normalization, and a background prefetch thread.

The modules: :mod:`~experiments.data.splits` (splits, datasets, digits,
synthetic), :mod:`~experiments.data.cifar10_jpeg`, :mod:`~experiments.data.tfds`,
:mod:`~experiments.data.load` (:func:`load_dataset`) and
:mod:`~experiments.data.loader` (the pipeline); their names are importable
from ``experiments.data``.
"""

from experiments.data.cifar10_jpeg import (
  CIFAR10_CLASSES,
  CIFAR10_TARBALL_CANDIDATES,
  _builder_class,
  _file_key,
  _parse_member,
  _split_from_source,
  cifar10_jpeg_builder,
  decode_jpeg_tarball,
  default_cache_dir,
  default_cifar10_tarball,
  iterate_jpeg_tarball,
  load_cifar10_jpeg_arrays,
  load_cifar10_jpeg_tfds,
)
from experiments.data.load import (
  DATASET_NAMES,
  load_dataset,
  load_source,
  training_subset,
  with_validation,
)
from experiments.data.loader import Loader, normalize, prefetch, random_crop_flip
from experiments.data.splits import (
  Dataset,
  IndexedSplit,
  Split,
  _make_dataset,
  channel_stats,
  hold_out,
  load_digits,
  synthetic,
)
from experiments.data.tfds import (
  TFDS_NAMES,
  TfdsImageSplit,
  _load_tfds_split,
  load_tfds,
  tfds_available,
)

__all__ = [
  "Split",
  "IndexedSplit",
  "hold_out",
  "Dataset",
  "channel_stats",
  "_make_dataset",
  "load_digits",
  "synthetic",
  "CIFAR10_CLASSES",
  "CIFAR10_TARBALL_CANDIDATES",
  "default_cifar10_tarball",
  "_parse_member",
  "iterate_jpeg_tarball",
  "decode_jpeg_tarball",
  "_file_key",
  "default_cache_dir",
  "load_cifar10_jpeg_arrays",
  "_builder_class",
  "cifar10_jpeg_builder",
  "_split_from_source",
  "load_cifar10_jpeg_tfds",
  "TFDS_NAMES",
  "tfds_available",
  "_load_tfds_split",
  "TfdsImageSplit",
  "load_tfds",
  "DATASET_NAMES",
  "load_dataset",
  "load_source",
  "with_validation",
  "training_subset",
  "random_crop_flip",
  "normalize",
  "Loader",
  "prefetch",
]
