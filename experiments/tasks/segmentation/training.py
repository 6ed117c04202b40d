"""Training one segmentation model: the pixel-wise loss, the steps, evaluation, the loop."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.core import unfreeze

import mabn_jax as mj
from experiments.loop import optimizer as opt
from experiments.tasks.segmentation import data as seg_data
from experiments.tasks.segmentation import models as seg_models
from experiments.tasks.segmentation.config import Config
from experiments.tasks.segmentation.metrics import (
  class_iou,
  confusion_matrix,
  mean_iou,
  pixel_accuracy,
)


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


def learning_rate_schedule(config: Config, steps_per_epoch: float, total_steps: int):
  """Linear warm-up for ``warmup_epochs``, then cosine decay to 0 at ``total_steps``."""
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  return opt.warmup_cosine(config.peak_lr(), warmup, total_steps)


def make_optimizer(config: Config, schedule) -> optax.GradientTransformation:
  """SGD with momentum (weight decay on kernels only) or AdamW (the same mask)."""
  if config.optimizer == "sgd":
    return opt.sgd(schedule, config.weight_decay, config.momentum)
  if config.optimizer == "adamw":
    return opt.adamw(schedule, config.weight_decay)
  raise ValueError(f"unknown optimizer {config.optimizer!r}; expected sgd or adamw")


def step_functions(model, tx, num_classes: int):
  """``(train_step, eval_step)``, jitted.

  ``train_step(variables, opt_state, batch) -> (variables, opt_state, loss)``
  (``mj.value_and_grad``: statistics, MABN's backward ones included, update);
  ``eval_step(variables, images, labels) -> (cm (K, K) int32, preds (N, H, W))``
  in inference mode.
  """

  def loss_fn(variables, images, labels):
    logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return pixel_cross_entropy(logits, labels), mutated

  grad_fn = mj.value_and_grad(loss_fn)

  def train_step(variables, opt_state, batch):
    (loss, new_vars), grads = grad_fn(variables, batch["image"], batch["label"])
    updates, opt_state = tx.update(grads, opt_state, new_vars["params"])
    new_vars = {**new_vars, "params": optax.apply_updates(new_vars["params"], updates)}
    return new_vars, opt_state, loss

  def eval_step(variables, images, labels):
    preds = jnp.argmax(model.apply(variables, images, train=False), -1)
    return confusion_matrix(labels, preds, num_classes), preds

  return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)


def evaluate(
  eval_step, variables, split: seg_data.SegSplit, dataset: seg_data.SegDataset, batch_size: int
) -> Dict[str, Any]:
  """mIoU, pixel accuracy and per-class IoU of ``split`` (one confusion matrix)."""
  k = dataset.num_classes
  cm = np.zeros((k, k), np.int64)
  for batch in seg_data.eval_batches(split, dataset.mean, dataset.std, batch_size):
    cm += np.asarray(eval_step(variables, batch["image"], batch["label"])[0], np.int64)
  iou = class_iou(cm)
  return {
    "miou": mean_iou(cm),
    "pixel_acc": pixel_accuracy(cm),
    "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
  }


def predict(
  eval_step,
  variables,
  split: seg_data.SegSplit,
  dataset: seg_data.SegDataset,
  count: int,
  batch_size: int,
) -> np.ndarray:
  """int ``(count, H, W)`` predictions for the first ``count <= batch_size`` examples
  of ``split`` (one evaluation batch: the shape :func:`evaluate` compiled)."""
  part = seg_data.SegSplit(split.images[:count], split.masks[:count])
  batch = next(seg_data.eval_batches(part, dataset.mean, dataset.std, batch_size))
  return np.asarray(eval_step(variables, batch["image"], batch["label"])[1])[:count]


def to_host(tree):
  """A variable tree as nested dicts of numpy arrays."""
  return jax.tree_util.tree_map(np.asarray, unfreeze(tree))


def save_variables(path: str, variables) -> None:
  """Writes ``variables`` (host numpy) as msgpack, atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(to_host(variables)))
  os.replace(tmp, path)


def load_variables(path: str) -> dict:
  """The variables :func:`save_variables` wrote (nested dicts of numpy arrays)."""
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def init_variables(model, config: Config, dataset: seg_data.SegDataset):
  """``model.init`` on one training-sized batch, from ``PRNGKey(config.seed)``.

  Jitted: one compilation instead of one per operation.
  """
  x = jnp.zeros((config.batch_size,) + dataset.train.images.shape[1:], jnp.float32)
  init = jax.jit(lambda key, x: model.init(key, x, train=True))
  return unfreeze(init(jax.random.PRNGKey(config.seed), x))


def train_loop(config: Config, dataset: seg_data.SegDataset, train_step, state, total: int, log):
  """Trains ``total`` steps from ``state = (variables, opt_state)``.

  Returns ``(variables, curve, times)``: the final variables, the loss curve
  (``(step, mean loss)`` every ``log_every`` steps and at the end, also given
  to ``log``) and ``(start, end of the first step, end)`` in seconds.
  """
  variables, opt_state = state
  curve, window, step, epoch = [], [], 0, 0
  start = time.time()
  first_step_end = None
  while step < total:
    for batch in seg_data.train_batches(
      dataset.train, dataset.mean, dataset.std, config.batch_size, config.seed, epoch, config.flip
    ):
      variables, opt_state, loss = train_step(variables, opt_state, batch)
      step += 1
      window.append(loss)
      if step == 1:
        jax.block_until_ready(loss)
        first_step_end = time.time()
      if step % config.log_every == 0 or step == total:
        mean_loss = float(np.mean([float(l) for l in window]))
        curve.append((step, mean_loss))
        window = []
        if log:
          log(step, mean_loss)
      if step >= total:
        break
    epoch += 1
  jax.block_until_ready(variables)
  return variables, curve, (start, first_step_end, time.time())


def evaluate_run(config: Config, dataset: seg_data.SegDataset, eval_step, variables):
  """``(test, val or None, example predictions)`` of the trained variables."""
  test = evaluate(eval_step, variables, dataset.test, dataset, config.eval_batch_size)
  val = (
    evaluate(eval_step, variables, dataset.val, dataset, config.eval_batch_size)
    if dataset.val is not None and len(dataset.val)
    else None
  )
  examples = predict(
    eval_step,
    variables,
    dataset.test,
    dataset,
    min(config.num_examples, len(dataset.test), config.eval_batch_size),
    config.eval_batch_size,
  )
  return test, val, examples


def run_summary(config: Config, norm: str, n: int, total: int, curve, times, test, val):
  """The summary of a trained run (``runs/<run>.json`` without its name and config)."""
  start, first_step_end, end = times
  return {
    "norm": norm,
    "batch_size": config.batch_size,
    "seed": config.seed,
    "steps": total,
    "epochs": total * config.batch_size / n,
    "peak_lr": config.peak_lr(),
    "test_miou": test["miou"],
    "test_pixel_acc": test["pixel_acc"],
    "test_iou_per_class": test["iou_per_class"],
    "val_miou": val["miou"] if val else None,
    "val_pixel_acc": val["pixel_acc"] if val else None,
    "final_train_loss": curve[-1][1] if curve else None,
    "train_loss_curve": curve,
    "train_seconds": end - start,
    # The first step includes compilation; the mean is over the others.
    "seconds_per_step": (end - first_step_end) / (total - 1) if total > 1 else end - start,
    "finished": True,
  }


def train(
  config: Config, dataset: seg_data.SegDataset, variables=None, normalizer=None, log=None
) -> Tuple[Dict[str, Any], dict, np.ndarray]:
  """Trains one model; returns ``(summary, final host variables, example predictions)``.

  Args:
    config: the run.
    dataset: its data.
    variables: start from these (fine-tuning) instead of a fresh init.
    normalizer: the model's normalizer (default ``config.normalizer()``; the
      converted MABN one when fine-tuning).
    log: ``log(step, loss)`` every ``log_every`` steps (optional).
  """
  normalizer = normalizer or config.normalizer()
  model = seg_models.UNet(normalizer, dataset.num_classes, tuple(config.widths))
  n = len(dataset.train)
  steps_per_epoch = n // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{n} training images are fewer than one batch of {config.batch_size}")
  total = config.total_steps(n)
  tx = make_optimizer(config, learning_rate_schedule(config, steps_per_epoch, total))
  train_step, eval_step = step_functions(model, tx, dataset.num_classes)
  variables = init_variables(model, config, dataset) if variables is None else unfreeze(variables)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  state = (variables, tx.init(variables["params"]))
  variables, curve, times = train_loop(config, dataset, train_step, state, total, log)
  mj.check_finite(variables)
  test, val, examples = evaluate_run(config, dataset, eval_step, variables)
  summary = run_summary(config, normalizer.name, n, total, curve, times, test, val)
  return summary, to_host(variables), examples
