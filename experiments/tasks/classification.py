"""Image classification: data, model, loss (the training step) and evaluation."""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import unfreeze

import mabn_jax as mj
from experiments import data as data_lib
from experiments import diagnostics, models
from experiments.loop.checkpoints import _to_host
from experiments.loop.config import AXIS, BATCH_NORMALIZERS, Config
from experiments.loop.parallel import Parallel, _scalar, pmap_steps


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
):
  """The run's model with its normalizer (step options resolved for the run)."""
  norm = make_normalizer(config.norm, **config.normalizer_kwargs(total_steps, steps_per_epoch))
  return models.build_model(config.model, norm, num_classes, config.width, config.norm_layers)


def step_functions(
  model,
  tx,
  num_classes: int,
  label_smoothing: float,
  diagnose: bool = False,
  axis: Optional[str] = AXIS,
):
  """``(train_step, eval_step)`` of one program, not yet mapped or compiled.

  ``axis`` is the mapped axis (``pmap``/``shard_map``) over which gradients
  and metrics are averaged and evaluation counts summed; ``None`` for one
  program over the whole global batch (``jit``), whose loss, gradients and
  counts are already those of the whole batch.
  With ``diagnose`` the train step's metrics also hold ``'diag'``, the
  per-layer :func:`experiments.diagnostics.layer_diagnostics` of the step.
  """
  mutable = ["batch_stats"] + ([diagnostics.MOMENTS] if diagnose else [])
  mean = (lambda t: jax.lax.pmean(t, axis)) if axis else (lambda t: t)
  total = (lambda t: jax.lax.psum(t, axis)) if axis else (lambda t: t)

  def loss_fn(variables, images, labels):
    logits, mutated = model.apply(variables, images, train=True, mutable=mutable)
    targets = (
      optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      if label_smoothing
      else jax.nn.one_hot(labels, num_classes)
    )
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, (mutated, logits)

  grad_fn = mj.value_and_grad(loss_fn, has_aux=True)

  def train_step(variables, opt_state, batch):
    ((loss, logits), new_vars), grads = grad_fn(variables, batch["image"], batch["label"])
    moments = new_vars.pop(diagnostics.MOMENTS, None)
    grads = mean(grads)
    updates, opt_state = tx.update(grads, opt_state, new_vars["params"])
    new_vars = {**new_vars, "params": optax.apply_updates(new_vars["params"], updates)}
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "acc": acc.astype(jnp.float32)}
    if diagnose:
      metrics["diag"] = diagnostics.layer_diagnostics(variables["params"], grads, moments)
    return new_vars, opt_state, mean(metrics)

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])
    return total({"correct": correct, "count": jnp.sum(batch["mask"])})

  return train_step, eval_step


def make_steps(model, tx, num_classes: int, label_smoothing: float, diagnose: bool = False):
  """``(train_step, eval_step)``, both pmapped over axis ``'batch'``."""
  return pmap_steps(step_functions(model, tx, num_classes, label_smoothing, diagnose), None)


def evaluate_splits(
  parallel: Parallel, variables, loaders: Dict[str, data_lib.Loader], final: bool, suffix: str = ""
) -> Dict[str, float]:
  """``{'<split>_top1<suffix>': accuracy}`` of one evaluation.

  With a validation split, evaluations during training use it alone and the
  test split is evaluated once, at the end (``final``); without one, every
  evaluation is on the test split.
  """
  splits = ["val"] if "val" in loaders else ["test"]
  if final and "val" in loaders:
    splits.append("test")
  return {
    f"{split}_top1{suffix}": evaluate(parallel, variables, loaders[split]) for split in splits
  }


def evaluate(parallel: Parallel, variables, loader: data_lib.Loader) -> float:
  """Top-1 accuracy (%) on the loader's split."""
  correct = count = 0.0
  for batch in loader.epoch(0):
    out = parallel.to_host(parallel.eval_step(variables, parallel.batch(batch)))
    correct += _scalar(out["correct"])
    count += _scalar(out["count"])
  return 100.0 * correct / max(count, 1.0)


def precise_bn_evaluation(
  config: Config, model, dev_vars, dataset: data_lib.Dataset, parallel: Parallel, eval_loaders
) -> Dict[str, Any]:
  """Evaluation after precise BN (:func:`mabn_jax.recompute_batch_stats`).

  The running statistics of device 0's trained variables are replaced by
  exact averages over ``config.precise_bn_batches`` training batches of the
  normalization batch (the per-device batch; ``'jit'``: the global batch),
  augmented as in training, in the order of the last epoch, and normalized
  as in training (groups of ``norm_batch_size``); the model is then
  evaluated like at the end of training. Returns
  ``{'final_<split>_top1_precise': accuracy}`` for each evaluated split, or
  ``{}`` for a model with synchronized statistics (precise BN then needs the
  device mapping) or no batch statistics.
  """
  synced = config.parallel != "jit" and (config.sync_stats or config.norm == "syncbn")
  if synced or config.norm not in BATCH_NORMALIZERS:
    return {}
  variables = parallel.first(dev_vars)
  loader = data_lib.Loader(
    dataset, "train", parallel.normalization_batch(config.device_batch()), True, config.seed
  )
  last_epoch = max(0, int(np.ceil(config.epochs)) - 1)
  batches = (
    b["image"]
    for _, b in zip(range(config.precise_bn_batches), loader.epoch(last_epoch), strict=False)
  )
  precise = mj.recompute_batch_stats(model.apply, variables, batches, train=True)
  precise = parallel.put(parallel.replicate(_to_host(unfreeze(precise))))
  results = evaluate_splits(parallel, precise, eval_loaders, final=True, suffix="_precise")
  return {f"final_{k}": v for k, v in results.items()}
