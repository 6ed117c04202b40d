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
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import queue
import tarfile
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

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
_REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
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


TFDS_NAMES = ("cifar10", "cifar100", "imagenette", "imagenet2012")
DATASET_NAMES = ("digits", "digits8", "cifar10_jpeg", "synthetic") + TFDS_NAMES


def tfds_available() -> bool:
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    return False
  return True


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


def _load_tfds_split(builder, split: str) -> Split:
  import tensorflow_datasets as tfds

  if str(getattr(builder.info, "file_format", "")).lower().endswith("array_record"):
    return _split_from_source(builder.as_data_source(split=split))
  # TFRecord-prepared data: tf.data decodes it (needs tensorflow).
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  return Split(np.asarray(arrays[0], np.uint8), np.asarray(arrays[1], np.int32))


class TfdsImageSplit:
  """Random access to a large tfds split (ImageNet-sized): decode on demand.

  Each image is resized so its shorter side is ``resize`` and centre-cropped
  to ``resize x resize`` (uint8); the loader's crop/flip then apply.
  """

  def __init__(self, source, resize: int):
    self.source = source
    self.resize = resize

  def __len__(self):
    return len(self.source)

  def _prepare(self, image) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.asarray(image, np.uint8))
    w, h = img.size
    s = self.resize / min(w, h)
    img = img.resize(
      (max(self.resize, round(w * s)), max(self.resize, round(h * s))), Image.BILINEAR
    )
    w, h = img.size
    left, top = (w - self.resize) // 2, (h - self.resize) // 2
    img = img.crop((left, top, left + self.resize, top + self.resize))
    return np.asarray(img.convert("RGB"), np.uint8)

  @property
  def image_shape(self):
    return (self.resize, self.resize, 3)

  def get(self, indices):
    rows = [self.source[int(i)] for i in indices]
    return (
      np.stack([self._prepare(r["image"]) for r in rows]),
      np.asarray([int(r["label"]) for r in rows], np.int32),
    )


def load_tfds(name: str, data_dir: Optional[str], image_size: int = 224) -> Dataset:
  """A standard tfds dataset as prepared under ``data_dir``."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ValueError(
      f"dataset '{name}' is read through tensorflow-datasets, which is not "
      "installed: pip install 'mabn_jax[experiments]'"
    ) from e
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise ValueError(
      f"tfds dataset '{name}' is not prepared under data_dir={data_dir!r}; "
      f"prepare it with `tfds build {name} --data_dir=...` (ImageNet needs "
      "its manual download) or choose --dataset digits / cifar10_jpeg."
    )
  num_classes = builder.info.features["label"].num_classes
  if name in ("cifar10", "cifar100"):
    return _make_dataset(
      name, _load_tfds_split(builder, "train"), _load_tfds_split(builder, "test"), num_classes
    )
  test_split = "validation"
  train = TfdsImageSplit(builder.as_data_source(split="train"), image_size)
  test = TfdsImageSplit(builder.as_data_source(split=test_split), image_size)
  mean = np.asarray([0.485, 0.456, 0.406], np.float32)  # standard ImageNet values
  std = np.asarray([0.229, 0.224, 0.225], np.float32)
  return Dataset(name, train, test, num_classes, mean, std, flip=True, pad=image_size // 8)


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
  if name == "digits":
    ds = load_digits()
  elif name == "digits8":
    ds = load_digits(upsample=1, name=name)
  elif name == "synthetic":
    ds = synthetic()
  elif name == "cifar10_jpeg":
    tarball = tarball or default_cifar10_tarball()
    if not os.path.exists(tarball):
      raise ValueError(f"CIFAR-10 tarball not found at {tarball!r}; pass --tarball.")
    if use_tfds:
      splits = load_cifar10_jpeg_tfds(
        tarball, data_dir or os.path.join(cache_dir or default_cache_dir(), "tfds"), cache_dir
      )
    else:
      splits = load_cifar10_jpeg_arrays(tarball, cache_dir)
    ds = _make_dataset(name, splits["train"], splits["test"], len(CIFAR10_CLASSES))
  elif name in TFDS_NAMES:
    ds = load_tfds(name, data_dir, image_size)
  else:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
  if val_split:
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
  if train_subset is not None:
    if not isinstance(ds.train, Split):
      raise ValueError(f"train_subset is only supported for in-memory datasets, not {name!r}")
    ds = _make_dataset(
      ds.name, ds.train.subset(train_subset), ds.test, ds.num_classes, ds.flip, ds.pad
    )
  return ds


# --------------------------------------------------------------------------
# The pipeline.


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int, flip: bool):
  """Zero-pads by ``pad``, takes a random crop of the original size, flips."""
  n, h, w, _ = images.shape
  if pad:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    images = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
  if flip:
    mask = rng.random(n) < 0.5
    images = np.where(mask[:, None, None, None], images[:, :, ::-1], images)
  return images


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 -> float32 ``(x/255 - mean) / std`` per channel."""
  return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


class Loader:
  """Deterministic batches of one split; ``epoch(e, start)`` iterates an epoch.

  Training batches: epoch permutation from ``(seed, epoch)``, this host's
  ``shard_index``-th of ``shard_count`` interleaved shards, full batches only,
  augmentation from ``(seed, epoch, step)``. Evaluation batches: in order, the
  last batch zero-padded, with a ``mask`` of real examples.

  Each item is ``{'image': float32 (batch, H, W, C), 'label': int32 (batch,),
  'mask': float32 (batch,)}``.
  """

  def __init__(
    self,
    dataset: Dataset,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
  ):
    self.dataset = dataset
    self.split = getattr(dataset, split)
    self.batch_size = batch_size
    self.train = train
    self.seed = seed
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.prefetch = prefetch
    n = len(self.split)
    self.shard_size = (n - shard_index + shard_count - 1) // shard_count
    if train:
      self.steps_per_epoch = (n // shard_count) // batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(
          f"training split of {n} examples ({shard_count} hosts) is smaller "
          f"than one batch of {batch_size}"
        )
    else:
      self.steps_per_epoch = -(-self.shard_size // batch_size)

  def _indices(self, epoch: int) -> np.ndarray:
    n = len(self.split)
    if self.train:
      order = np.random.default_rng([self.seed, epoch]).permutation(n)
      per_host = n // self.shard_count
      return order[self.shard_index :: self.shard_count][:per_host]
    return np.arange(self.shard_index, n, self.shard_count)

  def _batch(self, order: np.ndarray, epoch: int, step: int):
    ids = order[step * self.batch_size : (step + 1) * self.batch_size]
    images, labels = self.split.get(ids)
    real = len(ids)
    if self.train:
      rng = np.random.default_rng([self.seed, epoch, step, 1])
      images = random_crop_flip(images, rng, self.dataset.pad, self.dataset.flip)
    mask = np.ones(self.batch_size, np.float32)
    if real < self.batch_size:
      fill = self.batch_size - real
      images = np.concatenate([images, np.zeros((fill,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(fill, labels.dtype)])
      mask[real:] = 0
    return {
      "image": normalize(images, self.dataset.mean, self.dataset.std),
      "label": labels.astype(np.int32),
      "mask": mask,
    }

  def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
    """Batches ``start..steps_per_epoch-1`` of ``epoch``, prefetched."""
    order = self._indices(epoch)
    make = lambda step: self._batch(order, epoch, step)
    return prefetch(make, range(start, self.steps_per_epoch), self.prefetch)


_END = object()


def prefetch(make: Callable[[int], dict], steps, size: int = 2) -> Iterator[dict]:
  """``make(step)`` for each step, computed ``size`` ahead in a thread.

  numpy releases the GIL in copies and arithmetic, so the batch for the next
  step is built while the accelerator (or XLA's CPU threads) runs this one.
  """
  steps = list(steps)
  if size <= 0:
    for s in steps:
      yield make(s)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def work():
    try:
      for s in steps:
        if stop.is_set():
          return
        item = make(s)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
      q.put(_END)
    except BaseException as e:  # surfaced in the consumer
      q.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
