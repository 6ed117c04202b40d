"""Semantic-segmentation data: CIFAR-10 composites and Oxford-IIIT Pet.

Two sources, both giving :class:`SegDataset` (uint8 images, int32 masks):

* ``cifar_composite`` (:func:`load_cifar_composite`), an offline *composite*
  task, not a standard benchmark: each canvas is a square of side
  ``canvas_size`` (a multiple of 8, e.g. 64 or 96) filled with one plain grey
  level (drawn per canvas, or fixed), onto which 2-4 real 32x32 CIFAR-10
  images are pasted at random positions, one after another. Each pixel is
  labelled with the class of the image covering it, the later-pasted image
  winning where images overlap, or background: label 0 is background and
  CIFAR class ``k`` (0..9) is label ``k + 1``, so 11 classes. Canvases are
  deterministic given the seed. Training canvases use training-split images
  only, test canvases test-split images only, and validation canvases a set
  of training images held out from the training canvases
  (:func:`experiments.data.hold_out`), so their source images are disjoint.
  Each split records which source images (indices into its CIFAR split) and
  positions every canvas used (:class:`SegSplit`).
* ``oxford_iiit_pet`` (:func:`load_oxford_pets`): the standard tfds dataset
  read from a prepared ``data_dir`` (no download), images and trimaps resized
  to ``image_size x image_size`` (bilinear for images, nearest for masks;
  the aspect ratio is not kept). Trimap values 1/2/3 are pet / background /
  boundary; :data:`PET_LABEL_MAPPINGS` lists the label maps.

Pixels whose label is :data:`IGNORE` (255) count in neither the loss nor the
metrics (padding of evaluation batches, Pet's boundary with ``'binary'``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple, Union

import numpy as np

from experiments import data as data_lib

IGNORE = 255
"""Label of pixels excluded from the loss and the metrics."""

CIFAR_PATCH = 32
COMPOSITE_CLASSES = ("background",) + data_lib.CIFAR10_CLASSES

PET_LABEL_MAPPINGS = {
  # trimap value -> label. 'trimap': all three kept as classes (the usual
  # tfds-tutorial choice); 'binary': pet vs background, boundary ignored.
  "trimap": {1: 1, 2: 0, 3: 2},
  "binary": {1: 1, 2: 0, 3: IGNORE},
}
PET_CLASSES = {"trimap": ("background", "pet", "boundary"), "binary": ("background", "pet")}


@dataclasses.dataclass
class SegSplit:
  """One split: ``images`` uint8 ``(N, H, W, 3)``, ``masks`` int32 ``(N, H, W)``.

  ``sources`` int64 ``(N, K)`` and ``positions`` int64 ``(N, K, 2)`` (top,
  left) are the composite canvases' pasted images in paste order, ``-1``
  padded; ``None`` for natural images.
  """

  images: np.ndarray
  masks: np.ndarray
  sources: Optional[np.ndarray] = None
  positions: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.images)


@dataclasses.dataclass
class SegDataset:
  """Train/val/test splits, ``num_classes`` (``IGNORE`` excluded), per-channel
  ``mean``/``std`` on the 0..1 scale measured on the training images."""

  name: str
  train: SegSplit
  val: Optional[SegSplit]
  test: SegSplit
  class_names: Tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> Tuple[int, ...]:
    """``(H, W, 3)`` of one image."""
    return tuple(self.train.images.shape[1:])


# --------------------------------------------------------------------------
# CIFAR-10 composites.


def paste_canvas(
  patches: np.ndarray, classes: np.ndarray, positions: np.ndarray, canvas_size: int, background: int
) -> Tuple[np.ndarray, np.ndarray]:
  """Pastes ``patches`` onto a plain canvas, in order (later on top).

  Args:
    patches: uint8 ``(K, h, w, 3)``.
    classes: int ``(K,)`` labels of the patches (``>= 1``; 0 is background).
    positions: int ``(K, 2)`` top-left corners, each patch inside the canvas.
    canvas_size: the canvas side ``S``.
    background: the canvas's grey level, 0..255.

  Returns:
    ``(canvas uint8 (S, S, 3), mask int32 (S, S))``.
  """
  canvas = np.full((canvas_size, canvas_size, 3), background, np.uint8)
  mask = np.zeros((canvas_size, canvas_size), np.int32)
  for patch, cls, (top, left) in zip(patches, classes, positions, strict=True):
    h, w = patch.shape[:2]
    canvas[top : top + h, left : left + w] = patch
    mask[top : top + h, left : left + w] = cls
  return canvas, mask


def composite_split(
  images: np.ndarray,
  labels: np.ndarray,
  pool: np.ndarray,
  num_canvases: int,
  canvas_size: int,
  objects: Tuple[int, int] = (2, 4),
  background: Union[str, int] = "random",
  seed: int = 0,
) -> SegSplit:
  """``num_canvases`` composites of images drawn from ``pool``.

  Args:
    images: uint8 ``(M, 32, 32, 3)`` source images (one CIFAR split).
    labels: int ``(M,)`` their classes 0..9 (mask label ``class + 1``).
    pool: int indices into ``images`` the canvases may use (distinct within a
      canvas; a source image may appear on several canvases).
    num_canvases: ``N``.
    canvas_size: side ``S >= 32``.
    objects: ``(min, max)`` pasted images per canvas, inclusive.
    background: ``'random'`` (a grey level uniform in 0..255 per canvas) or a
      fixed level.
    seed: an int or a sequence of ints (``numpy.random.default_rng``);
      everything (choice, order, positions, grey) follows from it.

  Returns:
    a :class:`SegSplit` with ``sources`` (indices into ``images``) and
    ``positions`` of every pasted image.
  """
  lo, hi = objects
  if not 1 <= lo <= hi or hi > len(pool) or canvas_size < CIFAR_PATCH:
    raise ValueError(
      f"composite_split: objects={objects} from a pool of {len(pool)} "
      f"on a {canvas_size}x{canvas_size} canvas"
    )
  rng = np.random.default_rng(seed)
  pool = np.asarray(pool, np.int64)
  out_images = np.zeros((num_canvases, canvas_size, canvas_size, 3), np.uint8)
  out_masks = np.zeros((num_canvases, canvas_size, canvas_size), np.int32)
  sources = np.full((num_canvases, hi), -1, np.int64)
  positions = np.full((num_canvases, hi, 2), -1, np.int64)
  span = canvas_size - CIFAR_PATCH + 1
  for n in range(num_canvases):
    k = int(rng.integers(lo, hi + 1))
    chosen = pool[rng.choice(len(pool), k, replace=False)]
    corners = rng.integers(0, span, (k, 2))
    grey = int(rng.integers(0, 256)) if background == "random" else int(background)
    out_images[n], out_masks[n] = paste_canvas(
      images[chosen], labels[chosen] + 1, corners, canvas_size, grey
    )
    sources[n, :k], positions[n, :k] = chosen, corners
  return SegSplit(out_images, out_masks, sources, positions)


def load_cifar_composite(
  canvas_size: int = 64,
  num_train: int = 2000,
  num_val: int = 200,
  num_test: int = 500,
  objects: Tuple[int, int] = (2, 4),
  background: Union[str, int] = "random",
  val_images: int = 5000,
  seed: int = 0,
  tarball: Optional[str] = None,
  cache_dir: Optional[str] = None,
  cifar: Optional[dict] = None,
) -> SegDataset:
  """The composite CIFAR-10 segmentation task (see the module docstring).

  Args:
    canvas_size: canvas side (a multiple of 8 for the U-Net).
    num_train, num_val, num_test: canvases per split.
    objects, background: as :func:`composite_split`.
    val_images: training images held out for the validation canvases (the
      training canvases never use them; 0: no validation split).
    seed: canvases follow from it (split ``s`` uses ``[seed, s]``); the
      held-out images do not depend on it.
    tarball, cache_dir: the CIFAR-10 JPEG tarball (default: found next to
      the repository) and the decode cache (:mod:`experiments.data`).
    cifar: ``{'train': Split, 'test': Split}`` to use instead of the tarball
      (tests).
  """
  if cifar is None:
    tarball = tarball or data_lib.default_cifar10_tarball()
    cifar = data_lib.load_cifar10_jpeg_arrays(tarball, cache_dir)
  train_src, test_src = cifar["train"], cifar["test"]
  train_pool, val_pool = data_lib.hold_out(len(train_src), val_images if num_val else 0)
  make = lambda src, pool, n, s: composite_split(
    src.images, src.labels, pool, n, canvas_size, objects, background, seed=[seed, s]
  )
  train = make(train_src, train_pool, num_train, 0)
  val = make(train_src, val_pool, num_val, 1) if num_val else None
  test = make(test_src, np.arange(len(test_src)), num_test, 2)
  mean, std = data_lib.channel_stats(train.images)
  return SegDataset("cifar_composite", train, val, test, COMPOSITE_CLASSES, mean, std)


# --------------------------------------------------------------------------
# Oxford-IIIT Pet (tfds).


def map_trimap(trimap: np.ndarray, mapping: str = "trimap") -> np.ndarray:
  """Trimap values 1/2/3 -> labels (:data:`PET_LABEL_MAPPINGS`); int32, same shape.

  Values outside 1..3 become :data:`IGNORE`.
  """
  table = np.full(256, IGNORE, np.int32)
  for value, label in PET_LABEL_MAPPINGS[mapping].items():
    table[value] = label
  return table[np.asarray(trimap, np.uint8)]


def resize_pair(image: np.ndarray, trimap: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
  """``(H, W, 3)`` uint8 and ``(H, W[, 1])`` trimap -> ``(size, size, 3)``, ``(size, size)``.

  Bilinear for the image, nearest for the trimap (values stay 1/2/3).
  """
  from PIL import Image

  img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  img = img.resize((size, size), Image.BILINEAR)
  tri = Image.fromarray(np.asarray(trimap, np.uint8).reshape(np.shape(trimap)[:2]))
  tri = tri.resize((size, size), Image.NEAREST)
  return np.asarray(img, np.uint8), np.asarray(tri, np.uint8)


def _tfds_rows(builder, split: str) -> Iterator[dict]:
  """Decoded examples of a prepared split: array_record through a data source
  (no tensorflow), TFRecord through ``as_dataset`` (needs tensorflow)."""
  import tensorflow_datasets as tfds

  if str(getattr(builder.info, "file_format", "")).lower().endswith("array_record"):
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      yield source[i]
  else:
    yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def _pet_split(builder, split: str, image_size: int, mapping: str) -> Tuple[SegSplit, list]:
  rows = []
  for row in _tfds_rows(builder, split):
    name = row["file_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    image, trimap = resize_pair(row["image"], row["segmentation_mask"], image_size)
    rows.append((name, image, map_trimap(trimap, mapping)))
  rows.sort(key=lambda r: r[0])  # tfds writes in hashed-key order: a canonical order
  if not rows:
    raise ValueError(f"oxford_iiit_pet split {split!r} is empty")
  return SegSplit(np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])), [
    r[0] for r in rows
  ]


def load_oxford_pets(
  data_dir: Optional[str], image_size: int = 64, mapping: str = "trimap", val_size: int = 0
) -> SegDataset:
  """tfds ``oxford_iiit_pet`` from ``data_dir`` (prepared; never downloaded).

  Args:
    data_dir: the tfds data directory (``tfds build oxford_iiit_pet --data_dir=...``).
    image_size: the square side images and masks are resized to.
    mapping: ``'trimap'`` (3 classes: background 0, pet 1, boundary 2) or
      ``'binary'`` (background 0, pet 1; the boundary is :data:`IGNORE`).
    val_size: hold out this many ``train`` (trainval) images as validation
      (fixed, seed-independent, :func:`experiments.data.hold_out`).

  Raises:
    ValueError: tensorflow-datasets missing, the dataset not prepared there,
      or an unknown mapping.
  """
  if mapping not in PET_LABEL_MAPPINGS:
    raise ValueError(
      f"unknown pet mapping {mapping!r}; expected one of {tuple(PET_LABEL_MAPPINGS)}"
    )
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ValueError(
      "oxford_iiit_pet is read through tensorflow-datasets, which is not "
      "installed: pip install 'mabn_jax[experiments]'"
    ) from e
  builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir)
  if not builder.is_prepared():
    raise ValueError(
      f"tfds dataset 'oxford_iiit_pet' is not prepared under data_dir="
      f"{data_dir!r}; prepare it with `tfds build oxford_iiit_pet --data_dir=...`"
    )
  train, _ = _pet_split(builder, "train", image_size, mapping)
  test, _ = _pet_split(builder, "test", image_size, mapping)
  val = None
  if val_size:
    keep, held = data_lib.hold_out(len(train), val_size)
    train, val = (
      SegSplit(train.images[keep], train.masks[keep]),
      SegSplit(train.images[held], train.masks[held]),
    )
  mean, std = data_lib.channel_stats(train.images)
  return SegDataset("oxford_iiit_pet", train, val, test, PET_CLASSES[mapping], mean, std)


# --------------------------------------------------------------------------
# Batches.


def flip_pairs(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator):
  """Flips a random half of ``(N, H, W, C)`` images and ``(N, H, W)`` masks left-right."""
  flip = rng.random(len(images)) < 0.5
  return (
    np.where(flip[:, None, None, None], images[:, :, ::-1], images),
    np.where(flip[:, None, None], masks[:, :, ::-1], masks),
  )


def train_batches(
  split: SegSplit,
  mean: np.ndarray,
  std: np.ndarray,
  batch_size: int,
  seed: int,
  epoch: int,
  flip: bool = True,
) -> Iterator[dict]:
  """Full batches of one epoch: permutation and flips from ``(seed, epoch)``.

  Yields ``{'image': float32 (B, H, W, 3) normalized, 'label': int32 (B, H, W)}``.
  """
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  for step in range(len(split) // batch_size):
    ids = np.sort(order[step * batch_size : (step + 1) * batch_size])
    images, masks = split.images[ids], split.masks[ids]
    if flip:
      images, masks = flip_pairs(images, masks, np.random.default_rng([seed, epoch, step, 1]))
    yield {"image": data_lib.normalize(images, mean, std), "label": masks.astype(np.int32)}


def eval_batches(
  split: SegSplit, mean: np.ndarray, std: np.ndarray, batch_size: int
) -> Iterator[dict]:
  """The split in order; the last batch padded with zero images labelled :data:`IGNORE`."""
  for start in range(0, len(split), batch_size):
    images = split.images[start : start + batch_size]
    masks = split.masks[start : start + batch_size].astype(np.int32)
    fill = batch_size - len(images)
    if fill:
      images = np.concatenate([images, np.zeros((fill,) + images.shape[1:], images.dtype)])
      masks = np.concatenate([masks, np.full((fill,) + masks.shape[1:], IGNORE, np.int32)])
    yield {"image": data_lib.normalize(images, mean, std), "label": masks}
