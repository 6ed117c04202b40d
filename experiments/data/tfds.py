"""Standard tensorflow-datasets datasets read from ``data_dir``."""

from __future__ import annotations

from typing import Optional

import numpy as np

from experiments.data.cifar10_jpeg import _split_from_source
from experiments.data.splits import Dataset, Split, _make_dataset

TFDS_NAMES = ("cifar10", "cifar100", "imagenette", "imagenet2012")


def tfds_available() -> bool:
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    return False
  return True


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
