"""Training one segmentation model with the loop, and what a run of the sweep keeps of it:
its summary, its final variables and example predictions."""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.core import unfreeze

from experiments.loop import loop
from experiments.loop.config import Config
from experiments.loop.hooks import Hooks
from experiments.tasks.segmentation import data as seg_data


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


def run_summary(
  config: Config, norm: str, loop_summary: Dict[str, Any], num_train: int
) -> Dict[str, Any]:
  """A sweep run's summary (``runs/<run>.json`` without its name and config)
  from the loop's: the final test and validation metrics, the loss curve,
  the timing (the first step, which compiles, excluded from the mean)."""
  s = loop_summary
  return {
    "norm": norm,
    "batch_size": config.batch_size,
    "seed": config.seed,
    "steps": s["total_steps"],
    "epochs": s["total_steps"] * config.batch_size / num_train,
    "peak_lr": config.peak_lr(),
    "test_miou": s["final_test_miou"],
    "test_pixel_acc": s["final_test_pixel_acc"],
    "test_iou_per_class": s["final_test_iou_per_class"],
    "val_miou": s["final_val_miou"],
    "val_pixel_acc": s.get("final_val_pixel_acc"),
    "final_train_loss": s["train_loss_curve"][-1][1] if s["train_loss_curve"] else None,
    "train_loss_curve": s["train_loss_curve"],
    "train_seconds": s["train_seconds"],
    "seconds_per_step": s["seconds_per_step"] or s["train_seconds"],
    "finished": True,
  }


def predict(model, variables, dataset: seg_data.SegDataset, count: int, batch_size: int):
  """int ``(count, H, W)`` predictions for the first ``count <= batch_size``
  test examples (one evaluation batch: the shape evaluation compiled)."""
  part = seg_data.SegSplit(dataset.test.images[:count], dataset.test.masks[:count])
  batch = next(seg_data.eval_batches(part, dataset.mean, dataset.std, batch_size))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch["image"])
  return np.asarray(jnp.argmax(logits, -1))[:count]


def train(
  config: Config,
  dataset: seg_data.SegDataset,
  variables=None,
  normalizer=None,
  hooks: Hooks = loop.NO_HOOKS,
) -> Tuple[Dict[str, Any], dict, np.ndarray]:
  """Trains one model with the loop; returns ``(summary, final host
  variables, example predictions)``.

  Args:
    config: the run (``task='segmentation'``).
    dataset: its data.
    variables: start from these (fine-tuning) instead of a fresh init.
    normalizer: the model's normalizer (default the config's; the converted
      one when fine-tuning).
    hooks: callbacks of the loop.
  """
  s = loop.train(config, dataset, hooks, variables, normalizer)
  final = to_host(s["variables"])  # the loop checked its statistics (mj.check_finite)
  count = min(config.num_examples, len(dataset.test), config.eval_batch_size or config.batch_size)
  examples = predict(s["model"], final, dataset, count, config.eval_batch_size or count)
  norm = normalizer.name if normalizer is not None else config.norm
  return run_summary(config, norm, s, len(dataset.train)), final, examples
