"""The standard tfds datasets (cifar10, cifar100, imagenet2012, imagenette),
read from a ``data_dir`` the test prepares with tiny generated images.

Each dataset is prepared by its own registered tfds builder class (same name,
version, features and file layout as ``tfds build``), with only the example
generator replaced: no download, no tensorflow.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from experiments import data as D
from experiments import train as T

tfds = pytest.importorskip("tensorflow_datasets")

SPLITS = {
  "cifar10": ("train", "test"),
  "cifar100": ("train", "test"),
  "imagenet2012": ("train", "validation"),
  "imagenette": ("train", "validation"),
}
SIZES = {"train": 8, "test": 4, "validation": 4}


def _prepare(name: str, data_dir: str, seed: int = 0):
  """Prepares ``name`` under ``data_dir``; returns {split: [(pixels, label)]}."""
  from PIL import Image

  small = name.startswith("cifar")
  rng = np.random.default_rng(seed)
  truth = {split: [] for split in SPLITS[name]}
  for split in SPLITS[name]:
    for i in range(SIZES[split]):
      shape = (32, 32, 3) if small else (30 + 3 * i, 44 - 2 * i, 3)  # ImageNet: varied sizes
      truth[split].append((rng.integers(0, 256, shape, dtype=np.uint8), int(rng.integers(10))))

  class Tiny(tfds.builder_cls(name), skip_registration=True):
    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._examples(split) for split in SPLITS[name]}

    def _examples(self, split):
      for i, (pixels, label) in enumerate(truth[split]):
        buf = io.BytesIO()  # encoded bytes: tfds then needs no tensorflow to write
        Image.fromarray(pixels).save(buf, format="PNG")
        buf.seek(0)
        example = {"image": buf, "label": label}
        features = self.info.features
        if "id" in features:
          example["id"] = f"{split}_{i}"
        if "file_name" in features:
          example["file_name"] = f"{split}_{i}.png"
        if "coarse_label" in features:
          example["coarse_label"] = label
        yield f"{split}_{i}", example

  Tiny.name = name  # the registered name: files land where tfds.builder(name) looks
  Tiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return truth


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_names_read_every_prepared_image_and_label(name, tmp_path):
  truth = _prepare(name, str(tmp_path))
  ds = D.load_dataset(name, data_dir=str(tmp_path))
  assert ds.num_classes == (10 if name == "cifar10" else 100)
  for split, loaded in (("train", ds.train), ("test", ds.test)):
    assert loaded.images.shape == (SIZES[split], 32, 32, 3) and loaded.images.dtype == np.uint8
    # tfds shuffles the records when it writes them: compare as multisets.
    expected = sorted((p.tobytes(), l) for p, l in truth[split])
    actual = sorted(
      (p.tobytes(), int(l)) for p, l in zip(loaded.images, loaded.labels, strict=True)
    )
    assert actual == expected


def test_imagenet_names_resize_and_centre_crop_on_demand(tmp_path):
  truth = _prepare("imagenet2012", str(tmp_path))
  ds = D.load_dataset("imagenet2012", data_dir=str(tmp_path), image_size=16)
  assert ds.num_classes == 1000
  assert len(ds.train) == SIZES["train"] and len(ds.test) == SIZES["validation"]
  images, labels = ds.train.get(np.arange(SIZES["train"]))
  assert images.shape == (SIZES["train"], 16, 16, 3) and images.dtype == np.uint8
  assert sorted(labels.tolist()) == sorted(l for _, l in truth["train"])
  # Each loaded image is the resized, centre-cropped version of one written image.
  from PIL import Image

  def prepared(pixels):
    img = Image.fromarray(pixels)
    w, h = img.size
    s = 16 / min(w, h)
    img = img.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 16) // 2, (h - 16) // 2
    return np.asarray(img.crop((left, top, left + 16, top + 16)))

  expected = sorted((prepared(p).tobytes(), l) for p, l in truth["train"])
  assert sorted((i.tobytes(), int(l)) for i, l in zip(images, labels, strict=True)) == expected


def test_training_loop_runs_on_a_prepared_imagenette(tmp_path):
  _prepare("imagenette", str(tmp_path / "tfds"))
  config = T.Config(
    dataset="imagenette",
    data_dir=str(tmp_path / "tfds"),
    image_size=16,
    norm="mabn",
    model="cnn2",
    width=4,
    batch_size=4,
    norm_batch_size=2,
    epochs=1,
    log_every=1,
    num_devices=1,
    progress=False,
    lr=0.05,
    norm_kwargs={"warmup_steps": 1, "buffer_size": 2, "renorm_start": 1},
    workdir=str(tmp_path / "run"),
  )
  summary = T.train(config)
  assert summary["finished"] and summary["step"] == summary["total_steps"] == 2
  assert all(np.isfinite(loss) for _, loss in summary["train_loss_curve"])
  assert 0.0 <= summary["final_test_top1"] <= 100.0
