"""Named configurations of the runs of both tasks: a table of :class:`Config` fields."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from experiments.loop.config import Config

PRESET_FIELDS: Dict[str, Dict[str, Any]] = {
  # CPU, 15-30 s a run: digits at their native 8x8, narrow 6-conv CNN (the
  # last conv pair sees 2x2 positions, so a group of 2 images normalizes
  # over 8 values per channel). 6 epochs chosen on a validation split (see
  # experiments.tasks.main_job.MAIN_JOB).
  "quick": dict(
    dataset="digits8",
    model="cnn6",
    width=16,
    batch_size=32,
    norm_batch_size=2,
    epochs=6,
    lr=0.05,
    weight_decay=5e-4,
    warmup_epochs=1,
    log_every=10,
    eval_every=2,
    gn_groups=8,
  ),
  # Full CIFAR-10 schedule (GPU): ResNet-20, 160 epochs, steps at 80 and 120.
  "cifar": dict(
    dataset="cifar10_jpeg",
    model="resnet20",
    batch_size=128,
    epochs=160,
    lr=0.1,
    weight_decay=1e-4,
    schedule="step",
    step_epochs=(80, 120),
    warmup_epochs=1,
    log_every=50,
    eval_every=5,
    checkpoint_every=2000,
  ),
  # 2 CPU cores, 5-10 minutes: the 6-conv CNN on 10,000 CIFAR-10 images.
  "cifar_cpu": dict(
    dataset="cifar10_jpeg",
    model="cnn6",
    width=32,
    batch_size=32,
    train_subset=10000,
    epochs=8,
    lr=0.05,
    weight_decay=5e-4,
    warmup_epochs=0.5,
    log_every=25,
    eval_every=2,
    gn_groups=8,
  ),
  # The MABN paper's setting: ResNet-50, normalization batch 2, SGD batch 32 per device.
  "imagenet": dict(
    dataset="imagenet2012",
    model="resnet50",
    norm="mabn",
    batch_size=32,
    norm_batch_size=2,
    epochs=90,
    lr=0.1,
    weight_decay=1e-4,
    schedule="step",
    step_epochs=(30, 60, 80),
    warmup_epochs=5,
    image_size=224,
    log_every=100,
    eval_every=5,
    checkpoint_every=5000,
    prefetch=4,
  ),
}

_SEGMENTATION = dict(
  task="segmentation",
  dataset="cifar_composite",
  model="unet",
  image_size=64,
  batch_size=2,
  reference_batch=16,
  gn_groups=8,
  epochs=1.0,
  lr=0.1,
  eval_every=0,
  eval_batch_size=16,
  log_every=50,
  progress=False,
  num_devices=1,  # a true batch of batch_size per step (set 0 for every local device)
)
PRESET_FIELDS.update(
  {
    # Segmentation (experiments.tasks.segmentation): 40x40 canvases with 1-2
    # CIFAR-10 images, a 4..32-wide U-Net, 16 training canvases: seconds per
    # run (tests, smoke runs). The rate lr is for the reference batch 16 and
    # scaled linearly to the batch; evaluation at the end only.
    "seg_quick": _SEGMENTATION,
    # 64x64 canvases with 2-4 images, a 16..128-wide U-Net, 2,000 training /
    # 200 validation / 500 test canvases, 4 epochs (4,000 steps at batch 2,
    # 500 at 16), SGD lr 0.1 at batch 16: minutes per run on 2 CPU cores
    # (about 0.05 s a step at batch 2 on one core, 0.35 s at 16).
    "seg_cpu": dict(
      _SEGMENTATION,
      canvas_size=64,
      num_train=2000,
      num_val=200,
      num_test=500,
      objects=(2, 4),
      val_images=5000,
      widths=(16, 32, 64, 128),
      epochs=4.0,
      warmup_epochs=0.2,
      eval_batch_size=50,
      log_every=100,
    ),
  }
)
"""Each preset's fields; the others keep :class:`Config`'s defaults."""

PRESETS = tuple(PRESET_FIELDS)


def task_presets(task: str):
  """The names of the presets of ``task``."""
  return tuple(n for n in PRESETS if PRESET_FIELDS[n].get("task", "classification") == task)


def preset(name: str, **overrides) -> Config:
  """The named configuration; keyword overrides replace fields."""
  if name not in PRESET_FIELDS:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
  return dataclasses.replace(Config(preset=name, **PRESET_FIELDS[name]), **overrides)
