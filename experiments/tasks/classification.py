"""Image classification: data, model, loss (the training step) and its metric, as a task."""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import optax

import mabn_jax as mj
from experiments import data as data_lib
from experiments import models
from experiments.loop import steps
from experiments.loop.config import AXIS, Config
from experiments.loop.parallel import pmap_steps


def make_normalizer(name: str, **kwargs):
  """``mj.make_normalizer`` (looked up at call time)."""
  return mj.make_normalizer(name, **kwargs)


def load_data(config: Config) -> data_lib.Dataset:
  """The run's dataset (``config``'s data fields, validation split included)."""
  return data_lib.load_dataset(
    config.dataset,
    config.data_dir,
    config.cache_dir,
    config.train_subset,
    config.tarball,
    config.use_tfds,
    config.image_size,
    config.val_split,
  )


def build(
  config: Config,
  num_classes: int,
  total_steps: Optional[int] = None,
  steps_per_epoch: Optional[int] = None,
  normalizer=None,
):
  """The run's model with its normalizer (step options resolved for the
  run), or with ``normalizer`` when given (a converted one)."""
  if normalizer is None:
    kwargs = config.normalizer_kwargs(total_steps, steps_per_epoch)
    normalizer = make_normalizer(config.norm, **kwargs)
  return models.build_model(config.model, normalizer, num_classes, config.width, config.norm_layers)


def objective(model, num_classes: int, label_smoothing: float = 0.0):
  """``(loss_fn, eval_fn)`` (see :mod:`experiments.loop.steps`): softmax
  cross-entropy (with ``label_smoothing``) and the batch's accuracy
  ``'acc'``; evaluation counts ``correct`` and ``count`` (the batch's
  ``mask`` of real examples)."""

  def loss_fn(variables, batch, mutable):
    logits, mutated = model.apply(variables, batch["image"], train=True, mutable=mutable)
    labels = batch["label"]
    targets = (
      optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      if label_smoothing
      else jax.nn.one_hot(labels, num_classes)
    )
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return loss, (mutated, {"acc": acc})

  def eval_fn(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])
    return {"correct": correct, "count": jnp.sum(batch["mask"])}

  return loss_fn, eval_fn


def step_functions(
  model,
  tx,
  num_classes: int,
  label_smoothing: float,
  diagnose: bool = False,
  axis: Optional[str] = AXIS,
):
  """:func:`experiments.loop.steps.step_functions` of :func:`objective`."""
  return steps.step_functions(objective(model, num_classes, label_smoothing), tx, axis, diagnose)


def make_steps(model, tx, num_classes: int, label_smoothing: float, diagnose: bool = False):
  """``(train_step, eval_step)``, both pmapped over axis ``'batch'``."""
  return pmap_steps(step_functions(model, tx, num_classes, label_smoothing, diagnose), None)


def top1(counts: Dict[str, Any]) -> Dict[str, float]:
  """``{'top1': accuracy in %}`` from summed ``correct``/``count``."""
  return {"top1": 100.0 * float(counts["correct"]) / max(float(counts["count"]), 1.0)}


def _loader(config: Config, dataset, split: str, batch_size: int, shard) -> data_lib.Loader:
  """This host's loader of ``split`` (``shard``: its index and the host count)."""
  train = split == "train"
  return data_lib.Loader(dataset, split, batch_size, train, config.seed, *shard, config.prefetch)


class Classification:
  """Image classification (:class:`experiments.loop.task.Task`): the datasets
  of :mod:`experiments.data`, the models of :mod:`experiments.models`,
  softmax cross-entropy (with ``label_smoothing``), top-1 accuracy."""

  metric = "top1"

  def load_data(self, config: Config) -> data_lib.Dataset:
    """:func:`load_data`."""
    return load_data(config)

  def train_loader(self, config: Config, dataset, batch_size, shard_index=0, shard_count=1):
    """:class:`experiments.data.Loader` over the training split, augmented."""
    return _loader(config, dataset, "train", batch_size, (shard_index, shard_count))

  def eval_loaders(self, config: Config, dataset, batch_size, shard_index=0, shard_count=1):
    """In-order loaders of ``val`` (when held out) and ``test``, last batch masked
    (``config.eval_batch_size`` examples, default ``batch_size``)."""
    size, shard = config.eval_batch_size or batch_size, (shard_index, shard_count)
    return {
      split: _loader(config, dataset, split, size, shard)
      for split in ("val", "test")
      if getattr(dataset, split) is not None
    }

  def build(self, config, dataset, total_steps=None, steps_per_epoch=None, normalizer=None):
    """:func:`build`."""
    return build(config, dataset.num_classes, total_steps, steps_per_epoch, normalizer)

  def objective(self, config: Config, model, dataset):
    """:func:`objective` with the config's label smoothing."""
    return objective(model, dataset.num_classes, config.label_smoothing)

  def split_metrics(self, counts: Dict[str, Any]) -> Dict[str, float]:
    """:func:`top1`."""
    return top1(counts)


TASK = Classification()
"""The classification task of the loop."""
