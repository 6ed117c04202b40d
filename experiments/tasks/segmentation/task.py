"""Semantic segmentation as a task of the loop: data, loaders, the U-Net, the
pixel-wise loss and the confusion-matrix metrics."""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mabn_jax as mj
from experiments.loop import steps
from experiments.loop.config import GROUP_NORMALIZERS, Config
from experiments.tasks.segmentation import data as seg_data
from experiments.tasks.segmentation import models as seg_models
from experiments.tasks.segmentation.metrics import (
  class_iou,
  confusion_matrix,
  mean_iou,
  pixel_accuracy,
)


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


def run_normalizer(
  config: Config, total_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None
):
  """The run's registry normalizer for the U-Net: ``config.normalizer_kwargs``,
  GroupNorm with :func:`~.models.group_count` groups (unless given)."""
  kw = config.normalizer_kwargs(total_steps, steps_per_epoch)
  if config.norm in GROUP_NORMALIZERS and "num_groups" not in config.norm_kwargs:
    kw["num_groups"] = seg_models.group_count(config.widths, config.gn_groups)
  return mj.make_normalizer(config.norm, **kw)


class SegLoader:
  """Batches of one split (:class:`experiments.loop.task.Loader`).

  Training: full batches, permutation and flips from ``(seed, epoch)``
  (:func:`~.data.train_batches`); evaluation: the split in order, the last
  batch padded with pixels labelled ``IGNORE`` (:func:`~.data.eval_batches`).
  """

  def __init__(
    self,
    dataset: seg_data.SegDataset,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    flip: bool = True,
  ):
    self.dataset, self.split = dataset, getattr(dataset, split)
    self.batch_size, self.train, self.seed, self.flip = batch_size, train, seed, flip
    n = len(self.split)
    self.steps_per_epoch = n // batch_size if train else -(-n // batch_size)
    if train and self.steps_per_epoch == 0:
      raise ValueError(f"{n} training images are fewer than one batch of {batch_size}")

  def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """Batches ``start..steps_per_epoch - 1`` of ``epoch``."""
    mean, std = self.dataset.mean, self.dataset.std
    if self.train:
      batches = seg_data.train_batches(
        self.split, mean, std, self.batch_size, self.seed, epoch, self.flip
      )
    else:
      batches = seg_data.eval_batches(self.split, mean, std, self.batch_size)
    return itertools.islice(batches, start, None)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the pixels not labelled ``IGNORE``.

  Args:
    logits: float ``(N, H, W, K)``.
    labels: int ``(N, H, W)``; labels outside ``0..K-1`` are excluded.

  Returns:
    float32 scalar (0 when no pixel counts).
  """
  k = logits.shape[-1]
  valid = (labels >= 0) & (labels < k)
  safe = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def objective(model, num_classes: int):
  """``(loss_fn, eval_fn)`` (see :mod:`experiments.loop.steps`):
  :func:`pixel_cross_entropy`, no other training metric; evaluation counts
  ``{'confusion': (K, K) int32}`` in inference mode."""

  def loss_fn(variables, batch, mutable):
    logits, mutated = model.apply(variables, batch["image"], train=True, mutable=mutable)
    return pixel_cross_entropy(logits, batch["label"]), (mutated, {})

  def eval_fn(variables, batch):
    preds = jnp.argmax(model.apply(variables, batch["image"], train=False), -1)
    return {"confusion": confusion_matrix(batch["label"], preds, num_classes)}

  return loss_fn, eval_fn


def step_functions(model, tx, num_classes: int, axis: Optional[str] = None):
  """:func:`experiments.loop.steps.step_functions` of :func:`objective`:
  ``train_step(variables, opt_state, batch) -> (variables, opt_state,
  {'loss'})``, ``eval_step(variables, batch) -> {'confusion'}``."""
  return steps.step_functions(objective(model, num_classes), tx, axis)


def split_metrics(counts: Dict[str, Any]) -> Dict[str, Any]:
  """``miou``, ``pixel_acc`` and ``iou_per_class`` (``None`` for a class absent
  from labels and predictions) of a summed confusion matrix."""
  cm = np.asarray(counts["confusion"], np.int64)
  iou = class_iou(cm)
  return {
    "miou": mean_iou(cm),
    "pixel_acc": pixel_accuracy(cm),
    "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
  }


class Segmentation:
  """Semantic segmentation (:class:`experiments.loop.task.Task`): CIFAR-10
  composites or Oxford-IIIT Pet, the :class:`~.models.UNet`, pixel-wise
  softmax cross-entropy, mean IoU over the classes."""

  metric = "miou"

  def load_data(self, config: Config) -> seg_data.SegDataset:
    """:func:`load_data`."""
    return load_data(config)

  def train_loader(self, config, dataset, batch_size, shard_index=0, shard_count=1):
    """Shuffled, flipped (``config.flip``) full batches of the training split."""
    _one_host(shard_count)
    return SegLoader(dataset, "train", batch_size, True, config.seed, config.flip)

  def eval_loaders(self, config, dataset, batch_size, shard_index=0, shard_count=1):
    """``val`` (when it has canvases) and ``test`` in order, ``config.eval_batch_size`` each."""
    _one_host(shard_count)
    size = config.eval_batch_size or batch_size
    splits = ("val", "test") if dataset.val is not None and len(dataset.val) else ("test",)
    return {split: SegLoader(dataset, split, size, False) for split in splits}

  def build(self, config, dataset, total_steps=None, steps_per_epoch=None, normalizer=None):
    """The U-Net (``config.model == 'unet'``) at ``config.widths``."""
    if config.model != "unet":
      raise ValueError(f"segmentation model {config.model!r}: expected 'unet'")
    norm = normalizer or run_normalizer(config, total_steps, steps_per_epoch)
    return seg_models.UNet(norm, dataset.num_classes, tuple(config.widths))

  def objective(self, config: Config, model, dataset):
    """:func:`objective`."""
    return objective(model, dataset.num_classes)

  def split_metrics(self, counts: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`split_metrics`."""
    return split_metrics(counts)


def _one_host(shard_count: int) -> None:
  if shard_count != 1:
    raise ValueError(
      f"segmentation reads its data on one host; this run has {shard_count} processes"
    )


TASK = Segmentation()
"""The segmentation task of the loop."""
