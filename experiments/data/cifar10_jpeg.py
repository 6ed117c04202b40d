"""The offline CIFAR-10 JPEG tarball: reading, decoding, the ``.npy`` cache and the
tfds builder over the same arrays."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Optional, Sequence

import numpy as np

from experiments.data.splits import Split

CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
# The offline copy: $MABN_CIFAR10_TARBALL, else ../shared/data/cifar10 next to the
# repository (or shared/ inside it).
CIFAR10_TARBALL_CANDIDATES = tuple(
  filter(
    None,
    (
      os.environ.get("MABN_CIFAR10_TARBALL"),
      os.path.join(_REPO, "..", "shared", "data", "cifar10", "cifar10-jpeg.tar.gz"),
      os.path.join(_REPO, "shared", "data", "cifar10", "cifar10-jpeg.tar.gz"),
    ),
  )
)


def default_cifar10_tarball() -> str:
  for path in CIFAR10_TARBALL_CANDIDATES:
    if os.path.exists(path):
      return os.path.normpath(path)
  return os.path.normpath(CIFAR10_TARBALL_CANDIDATES[0])


def _parse_member(name: str, class_names: Sequence[str]):
  """``(split, label, file)`` for ``[prefix/]split/class/file.jpg``, else None."""
  parts = name.split("/")
  if len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
    return None
  split, cls, fname = parts[-3], parts[-2], parts[-1]
  if split not in ("train", "test") or cls not in class_names:
    return None
  return split, class_names.index(cls), fname


def iterate_jpeg_tarball(path: str, class_names: Sequence[str] = CIFAR10_CLASSES):
  """Yields ``(split, label, file name, uint8 HxWx3 image)`` in archive order.

  Iterating over the ``tarfile`` object streams the gzip once; random access
  into a ``.tar.gz`` would re-decompress from the start for every member.
  """
  from PIL import Image

  with tarfile.open(path, "r:*") as archive:
    for member in archive:
      if not member.isfile():
        continue
      parsed = _parse_member(member.name, class_names)
      if parsed is None:
        continue
      data = archive.extractfile(member).read()
      with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
      yield parsed[0], parsed[1], parsed[2], pixels


def decode_jpeg_tarball(path: str, class_names: Sequence[str] = CIFAR10_CLASSES):
  """Decodes the whole tarball: ``{split: Split}`` in canonical order."""
  items = {"train": [], "test": []}
  for split, label, fname, pixels in iterate_jpeg_tarball(path, class_names):
    items[split].append((label, fname, pixels))
  out = {}
  for split, rows in items.items():
    rows.sort(key=lambda r: (r[0], r[1]))
    images = np.stack([r[2] for r in rows]) if rows else np.zeros((0, 32, 32, 3), np.uint8)
    out[split] = Split(images, np.asarray([r[0] for r in rows], np.int32))
  return out


def _file_key(path: str) -> str:
  st = os.stat(path)
  key = f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}"
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
  return os.environ.get(
    "MABN_EXPERIMENTS_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "mabn_jax_experiments"),
  )


def load_cifar10_jpeg_arrays(tarball: str, cache_dir: Optional[str] = None):
  """``{split: Split}`` from the tarball, cached as ``.npy`` after one decode."""
  cache = os.path.join(cache_dir or default_cache_dir(), f"cifar10_jpeg_{_file_key(tarball)}")
  files = {
    s: (os.path.join(cache, f"{s}_images.npy"), os.path.join(cache, f"{s}_labels.npy"))
    for s in ("train", "test")
  }
  if all(os.path.exists(p) for pair in files.values() for p in pair):
    return {s: Split(np.load(i), np.load(l)) for s, (i, l) in files.items()}
  splits = decode_jpeg_tarball(tarball)
  os.makedirs(cache, exist_ok=True)
  for s, (i, l) in files.items():
    for target, array in ((i, splits[s].images), (l, splits[s].labels)):
      tmp = target + f".tmp{os.getpid()}.npy"
      np.save(tmp, array)
      os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
  return splits


# --------------------------------------------------------------------------
# tensorflow-datasets: the builder for the tarball and the standard names.


_BUILDER_CLASS = []


def _builder_class():
  """The :class:`Cifar10Jpeg` tfds builder class (defined once, on first use)."""
  if _BUILDER_CLASS:
    return _BUILDER_CLASS[0]
  import tensorflow_datasets as tfds

  class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """CIFAR-10 from the offline JPEG tarball (32x32x3 uint8, 10 classes).

    Examples are stored as array_record with ``uint8`` tensor features, so
    preparing and reading them needs no tensorflow. ``index`` is the
    example's canonical position (class, file name) in its split: the
    array_record files are written in hashed-key order.
    """

    name = "cifar10_jpeg"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Decoded from cifar10-jpeg.tar.gz."}

    def __init__(self, *, tarball: str, cache_dir: Optional[str] = None, **kwargs):
      self.tarball = tarball
      self.decode_cache_dir = cache_dir
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description="CIFAR-10 (Krizhevsky, 2009) decoded from JPEG files.",
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CIFAR10_CLASSES)),
            "index": tfds.features.Scalar(dtype=np.int64),
          }
        ),
        supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      splits = load_cifar10_jpeg_arrays(self.tarball, self.decode_cache_dir)
      return {s: self._generate_examples(splits[s]) for s in ("train", "test")}

    def _generate_examples(self, split):
      for i in range(len(split)):
        yield i, {"image": split.images[i], "label": int(split.labels[i]), "index": i}

  _BUILDER_CLASS.append(Cifar10Jpeg)
  return Cifar10Jpeg


def cifar10_jpeg_builder(tarball: str, data_dir: str, cache_dir: Optional[str] = None):
  """A ``Cifar10Jpeg`` tfds builder (requires tensorflow-datasets, not tensorflow)."""
  return _builder_class()(
    tarball=tarball, cache_dir=cache_dir, data_dir=data_dir, file_format="array_record"
  )


def _split_from_source(source, chunk: int = 1024) -> Split:
  """Reads a whole tfds data source (random-access) into a Split."""
  n = len(source)
  images, labels, index = [], [], []
  for start in range(0, n, chunk):
    ids = list(range(start, min(n, start + chunk)))
    rows = source.__getitems__(ids) if hasattr(source, "__getitems__") else [source[i] for i in ids]
    for r in rows:
      images.append(np.asarray(r["image"], np.uint8))
      labels.append(int(r["label"]))
      index.append(int(r["index"]) if "index" in r else len(index))
  order = np.argsort(np.asarray(index), kind="stable")
  return Split(np.stack(images)[order], np.asarray(labels, np.int32)[order])


def load_cifar10_jpeg_tfds(tarball: str, data_dir: str, cache_dir: Optional[str] = None):
  """``{split: Split}`` through the tfds builder (prepared once under data_dir)."""
  builder = cifar10_jpeg_builder(tarball, data_dir, cache_dir)
  builder.download_and_prepare()
  sources = builder.as_data_source()
  return {s: _split_from_source(sources[s]) for s in ("train", "test")}
