"""Evaluation of any task: counts summed over a split's batches, then the task's metrics."""

from __future__ import annotations

from typing import Any, Dict

import jax
import numpy as np
from flax.core import unfreeze

import mabn_jax as mj
from experiments.loop.checkpoints import _to_host
from experiments.loop.config import BATCH_NORMALIZERS, Config
from experiments.loop.parallel import Parallel
from experiments.loop.task import Loader, Task


def _wide(x) -> np.ndarray:
  """A count as float64 or int64 (sums over many batches stay exact)."""
  x = np.asarray(x)
  return x.astype(np.float64 if np.issubdtype(x.dtype, np.floating) else np.int64)


def evaluate(task: Task, parallel: Parallel, variables, loader: Loader) -> Dict[str, Any]:
  """``task.split_metrics`` of the counts summed over the loader's split."""
  total = None
  for batch in loader.epoch(0):
    counts = parallel.reduced(parallel.eval_step(variables, parallel.batch(batch)))
    counts = jax.tree_util.tree_map(_wide, counts)
    total = counts if total is None else jax.tree_util.tree_map(np.add, total, counts)
  return task.split_metrics(total)


def evaluate_splits(
  task: Task,
  parallel: Parallel,
  variables,
  loaders: Dict[str, Loader],
  final: bool,
  suffix: str = "",
) -> Dict[str, Any]:
  """``{'<split>_<metric><suffix>': value}`` of one evaluation.

  With a validation split, evaluations during training use it alone and the
  test split is evaluated once, at the end (``final``); without one, every
  evaluation is on the test split.
  """
  splits = ["val"] if "val" in loaders else ["test"]
  if final and "val" in loaders:
    splits.append("test")
  return {
    f"{split}_{name}{suffix}": value
    for split in splits
    for name, value in evaluate(task, parallel, variables, loaders[split]).items()
  }


def precise_bn_evaluation(
  task: Task, config: Config, model, dev_vars, dataset, parallel: Parallel, eval_loaders
) -> Dict[str, Any]:
  """Evaluation after precise BN (:func:`mabn_jax.recompute_batch_stats`).

  The running statistics of device 0's trained variables are replaced by
  exact averages over ``config.precise_bn_batches`` training batches of the
  normalization batch (the per-device batch; ``'jit'``: the global batch),
  augmented as in training, in the order of the last epoch, and normalized
  as in training (groups of ``norm_batch_size``); the model is then
  evaluated like at the end of training. Returns
  ``{'final_<split>_<metric>_precise': value}`` for each evaluated split and
  metric, or ``{}`` for a model with synchronized statistics (precise BN
  then needs the device mapping) or no batch statistics.
  """
  synced = config.parallel != "jit" and (config.sync_stats or config.norm == "syncbn")
  if synced or config.norm not in BATCH_NORMALIZERS:
    return {}
  variables = parallel.first(dev_vars)
  loader = task.train_loader(config, dataset, parallel.normalization_batch(config.device_batch()))
  last_epoch = max(0, int(np.ceil(config.epochs)) - 1)
  batches = (
    b["image"]
    for _, b in zip(range(config.precise_bn_batches), loader.epoch(last_epoch), strict=False)
  )
  precise = mj.recompute_batch_stats(model.apply, variables, batches, train=True)
  precise = parallel.put(parallel.replicate(_to_host(unfreeze(precise))))
  results = evaluate_splits(task, parallel, precise, eval_loaders, final=True, suffix="_precise")
  return {f"final_{k}": v for k, v in results.items()}
