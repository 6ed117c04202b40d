"""The segmentation run's :class:`Config`, its presets (a table) and its data."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from experiments.tasks.segmentation import data as seg_data
from experiments.tasks.segmentation import models as seg_models

PRESETS = ("seg_quick", "seg_cpu")


@dataclasses.dataclass
class Config:
  """One segmentation run; see :func:`preset` for the named ones."""

  preset: str = "seg_quick"
  # Data (cifar_composite: canvas_size ... background; oxford_iiit_pet: data_dir ...).
  dataset: str = "cifar_composite"
  canvas_size: int = 40
  num_train: int = 16
  num_val: int = 4
  num_test: int = 8
  objects: Tuple[int, int] = (1, 2)
  background: Any = "random"
  val_images: int = 8
  data_seed: int = 0  # the canvases: the same for every run seed
  tarball: Optional[str] = None
  cache_dir: Optional[str] = None
  data_dir: Optional[str] = None
  image_size: int = 64
  pet_mapping: str = "trimap"
  # Model and normalizer.
  widths: Tuple[int, ...] = (4, 8, 16, 32)
  norm: str = "bn"
  norm_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  norm_batch_size: Optional[int] = None
  gn_groups: int = 8
  # Optimization.
  batch_size: int = 2
  reference_batch: int = 16
  optimizer: str = "sgd"
  lr: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  epochs: float = 1.0
  warmup_epochs: float = 0.0
  steps: int = 0  # > 0: overrides epochs
  flip: bool = True
  seed: int = 0  # initialization, batch order and flips
  eval_batch_size: int = 16
  log_every: int = 50
  num_examples: int = 4

  def peak_lr(self) -> float:
    """``lr`` scaled linearly to the batch: ``lr * batch_size / reference_batch``."""
    return self.lr * self.batch_size / self.reference_batch

  def total_steps(self, num_train: int) -> int:
    """``steps``, else ``round(epochs * num_train / batch_size)`` (at least 1)."""
    if self.steps > 0:
      return self.steps
    return max(1, int(round(self.epochs * num_train / self.batch_size)))

  def normalizer(self):
    """The run's normalizer (:func:`.models.segmentation_normalizer` of its fields)."""
    return seg_models.segmentation_normalizer(
      self.norm, self.norm_batch_size, self.widths, self.gn_groups, self.norm_kwargs
    )


PRESET_FIELDS: Dict[str, Dict[str, Any]] = {
  # 40x40 canvases with 1-2 images, a 4..32-wide U-Net, 16 training
  # canvases: seconds per run (tests, smoke runs).
  "seg_quick": {},
  # 64x64 canvases with 2-4 images, a 16..128-wide U-Net, 2,000 training /
  # 200 validation / 500 test canvases, 4 epochs (4,000 steps at batch 2,
  # 500 at 16), SGD lr 0.1 at batch 16: minutes per run on 2 CPU cores.
  # Measured on 2 shared cores (load 4-5): per step at batch 2 bn 0.11 s,
  # mabn 0.08 s, gn 0.07 s, cbn 0.21 s, at batch 16 bn 0.64 s, so about 5-7
  # min a run at batch 2 (cbn 14), 5.5 min for BN at 16, plus about half a
  # minute of compilation and evaluation; fine-tuning (2 epochs at batch 2)
  # 3-4 min.
  "seg_cpu": dict(
    canvas_size=64,
    num_train=2000,
    num_val=200,
    num_test=500,
    objects=(2, 4),
    val_images=5000,
    widths=(16, 32, 64, 128),
    epochs=4.0,
    warmup_epochs=0.2,
    lr=0.1,
    eval_batch_size=50,
    log_every=100,
  ),
}
"""Each preset's fields; the others keep :class:`Config`'s defaults."""


def preset(name: str, **overrides) -> Config:
  """The named configuration (see :data:`PRESET_FIELDS`); keyword overrides replace fields."""
  if name not in PRESET_FIELDS:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
  return dataclasses.replace(Config(preset=name, **PRESET_FIELDS[name]), **overrides)


def load_data(config: Config) -> seg_data.SegDataset:
  """The run's :class:`~experiments.tasks.segmentation.data.SegDataset`."""
  if config.dataset == "cifar_composite":
    return seg_data.load_cifar_composite(
      config.canvas_size,
      config.num_train,
      config.num_val,
      config.num_test,
      tuple(config.objects),
      config.background,
      config.val_images,
      config.data_seed,
      config.tarball,
      config.cache_dir,
    )
  if config.dataset == "oxford_iiit_pet":
    return seg_data.load_oxford_pets(
      config.data_dir, config.image_size, config.pet_mapping, config.num_val
    )
  raise ValueError(
    f"unknown dataset {config.dataset!r}; expected cifar_composite or oxford_iiit_pet"
  )
