"""What converting a trained BatchNorm network to MABN changes, before fine-tuning.

Two BN networks are trained briefly on scikit-learn's ``digits`` (16x16x1):
the project's 6-conv network (``experiments.models.CNN6`` with the ``'bn'``
normalizer, converted in registry mode) and a small ResNet written as
Flax's ImageNet example writes it (hard-coded ``nn.BatchNorm``/``nn.Conv``,
converted through :func:`mabn_jax.substitute`). Each is converted to MABN
several ways, and the converted model's inference logits on the test split
are compared with the BN model's: relative L2 error
``||logits' - logits|| / ||logits||``, top-1 agreement, and accuracy.

Conversions:

* ``copy``: statistics converted (``chi = var + mean^2``), ``scale``/``bias``
  copied (``compensate=False``, the behaviour before compensation existed);
* ``copy_recomputed``: ``copy``, then ``mj.recompute_batch_stats`` on the
  calibration batches (MABN's ``chi`` from data, training-mode passes);
* ``compensated``: ``scale``/``bias`` keep BN's inference map without data
  (``compensate=True``; exact for zero-mean kernels only);
* ``calibrated``: ``calibration_batches`` (each layer's input mean and second
  moment measured in inference mode, layer by layer) with compensation (the
  default with data);
* ``calibrated_stats_only``: the same measured statistics, ``scale``/``bias``
  copied (``compensate=False``);
* ``centred_bn``: a control: the BN model with every conv kernel centred
  (BN re-estimating its statistics on the calibration batches), i.e. how
  much centring alone changes the BN network.

A third network, a pre-activation ResNet-8 (every convolution centred for
MABN, since its norms read sums of convolution outputs), is converted with
calibration and then fine-tuned at normalization batch 2 (``--finetune-steps``,
Adam), against BN fine-tuned at b = 2 from the same checkpoint and both
trained from scratch at b = 2 for the same total steps.

Run (CPU, about five minutes)::

  python -m benchmarks.conversion_agreement [--steps 400] [--finetune-steps 300] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from typing import Any, Callable, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mabn_jax as mj  # noqa: E402
from experiments.data import load_digits  # noqa: E402
from experiments.models import CNN6, PreActResNet  # noqa: E402
from mabn_jax.functional.centering import center_kernel  # noqa: E402

BATCH = 32
MABN = dict(norm_batch_size=2, buffer_size=16, warmup_steps=100)


class Block(nn.Module):
  """A basic residual block as in Flax's ImageNet example."""

  filters: int
  conv: Any
  norm: Any
  strides: Sequence[int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A small ResNet with hard-coded ``nn.BatchNorm``/``nn.Conv`` (third-party style)."""

  stage_sizes: Sequence[int] = (1, 1, 1)
  num_filters: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = Block(self.num_filters * 2**i, conv, norm, strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _data():
  data = load_digits()
  scale = lambda images: (images.astype(np.float32) / 255.0 - data.mean) / data.std
  train = (scale(data.train.images), data.train.labels)
  test = (scale(data.test.images), data.test.labels)
  return train, test


def _train(model, train, steps: int, seed: int = 0):
  """BN training (Adam, batch 32); returns the variables."""
  images, labels = train
  variables = model.init(jax.random.key(seed), images[:BATCH], train=False)
  tx = optax.adam(2e-3)
  opt = tx.init(variables["params"])

  @jax.jit
  def step(variables, opt, x, y):
    def loss(params):
      logits, mutated = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

    (_, mutated), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    updates, opt = tx.update(grads, opt, variables["params"])
    return {**mutated, "params": optax.apply_updates(variables["params"], updates)}, opt

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.choice(len(labels), BATCH, replace=False)
    variables, opt = step(variables, opt, images[idx], labels[idx])
  return variables


def _logits(apply_fn: Callable, variables, images) -> np.ndarray:
  run = jax.jit(lambda v, x: apply_fn(v, x, train=False))
  return np.concatenate(
    [np.asarray(run(variables, images[i : i + 256])) for i in range(0, len(images), 256)]
  )


def _compare(reference: np.ndarray, logits: np.ndarray, labels) -> Dict[str, float]:
  return {
    "logit_rel_l2_error": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
    "top1_agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
    "accuracy": float(np.mean(logits.argmax(-1) == labels)),
  }


def _centred(variables):
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: center_kernel(a) if p[-1].key == "kernel" and a.ndim == 4 else a,
    variables["params"],
  )
  return {**variables, "params": params}


def _calibration(train, count: int):
  rng = np.random.default_rng(1)
  return [train[0][rng.choice(len(train[1]), BATCH, replace=False)] for _ in range(count)]


def cnn6(train, test, steps: int, batches) -> Dict[str, Any]:
  widths = (16, 16, 32, 32, 64, 64)
  bn_norm = mj.make_normalizer("bn")
  bn_model = CNN6(bn_norm, 10, widths=widths)
  bn_vars = _train(bn_model, train, steps)
  reference = _logits(bn_model.apply, bn_vars, test[0])
  mabn_model = lambda norm: CNN6(norm, 10, widths=widths)
  results = {"bn": _compare(reference, reference, test[1])}
  for name, options in (
    ("copy", dict(compensate=False)),
    ("compensated", dict(compensate=True)),
    (
      "calibrated",
      dict(
        calibration_batches=batches,
        apply_fn=lambda norm: mabn_model(norm).apply,
        call_kwargs={"train": False},
      ),
    ),
    (
      "calibrated_stats_only",
      dict(
        calibration_batches=batches,
        apply_fn=lambda norm: mabn_model(norm).apply,
        call_kwargs={"train": False},
        compensate=False,
      ),
    ),
  ):
    variables, norm = mj.convert_batch_norm(bn_vars, bn_norm, **MABN, **options)
    results[name] = _compare(
      reference, _logits(mabn_model(norm).apply, variables, test[0]), test[1]
    )
    if name == "copy":
      recomputed = mj.recompute_batch_stats(mabn_model(norm).apply, variables, batches, train=True)
      logits = _logits(mabn_model(norm).apply, recomputed, test[0])
      results["copy_recomputed"] = _compare(reference, logits, test[1])
  centred = mj.recompute_batch_stats(bn_model.apply, _centred(bn_vars), batches, train=True)
  results["centred_bn"] = _compare(reference, _logits(bn_model.apply, centred, test[0]), test[1])
  return results


def resnet(train, test, steps: int, batches) -> Dict[str, Any]:
  model = ResNet()
  bn_vars = _train(model, train, steps)
  reference = _logits(model.apply, bn_vars, test[0])
  swap = mj.substitute("mabn", **MABN)
  apply = swap.wrap(model.apply)
  with swap:
    template = model.init(jax.random.key(1), test[0][:2], train=False)
  results = {"bn": _compare(reference, reference, test[1])}
  for name, options in (
    ("copy", dict(compensate=False)),
    ("compensated", dict(compensate=True)),
    ("calibrated", dict(calibration_batches=batches, apply_fn=apply, call_kwargs={"train": False})),
    (
      "calibrated_stats_only",
      dict(
        calibration_batches=batches, apply_fn=apply, call_kwargs={"train": False}, compensate=False
      ),
    ),
  ):
    variables = mj.convert_batch_norm(bn_vars, target=template, **options)
    results[name] = _compare(reference, _logits(apply, variables, test[0]), test[1])
    if name == "copy":
      recomputed = mj.recompute_batch_stats(apply, variables, batches, train=True)
      results["copy_recomputed"] = _compare(reference, _logits(apply, recomputed, test[0]), test[1])
  centred = mj.recompute_batch_stats(model.apply, _centred(bn_vars), batches, train=True)
  results["centred_bn"] = _compare(reference, _logits(model.apply, centred, test[0]), test[1])
  return results


def _finetune(model, variables, train, steps: int, seed: int = 0):
  """Fine-tuning with ``mj.value_and_grad`` (Adam 1e-3, batch 32)."""
  images, labels = train
  tx = optax.adam(1e-3)
  opt = tx.init(variables["params"])

  def loss(v, x, y):
    logits, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

  @jax.jit
  def step(variables, opt, x, y):
    (_, variables), grads = mj.value_and_grad(loss)(variables, x, y)
    updates, opt = tx.update(grads, opt, variables["params"])
    return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt

  rng = np.random.default_rng(seed + 100)
  for _ in range(steps):
    idx = rng.choice(len(labels), BATCH, replace=False)
    variables, opt = step(variables, opt, images[idx], labels[idx])
  return variables


def preactivation(train, test, steps: int, batches, finetune_steps: int) -> Dict[str, Any]:
  """A pre-activation ResNet-8 (``experiments.models.PreActResNet``, width 8)
  trained with BN at batch 32, then fine-tuned at normalization batch 2: as
  BN, and converted to MABN (calibrated; every convolution centred, since
  the norms read sums of convolution outputs); and MABN and BN at b = 2
  trained from scratch for the same total steps."""
  make = lambda norm: PreActResNet(norm, (1, 1, 1), 10, 8)
  bn_norm = mj.make_normalizer("bn")
  bn_vars = _train(make(bn_norm), train, steps)
  reference = _logits(make(bn_norm).apply, bn_vars, test[0])
  mabn_vars, mabn_norm = mj.convert_batch_norm(
    bn_vars,
    bn_norm,
    **MABN,
    calibration_batches=batches,
    apply_fn=lambda norm: make(norm).apply,
    call_kwargs={"train": False},
  )
  mj.check_zero_mean_inputs(make(mabn_norm), test[0][:4], mabn_vars, train=True)
  results = {
    "bn": _compare(reference, reference, test[1]),
    "converted_calibrated": _compare(
      reference, _logits(make(mabn_norm).apply, mabn_vars, test[0]), test[1]
    ),
  }
  bn2 = mj.make_normalizer("bn", norm_batch_size=2)
  tuned = {"finetuned_bn_b2": (bn2, bn_vars), "finetuned_converted_mabn_b2": (mabn_norm, mabn_vars)}
  for name, (norm, variables) in tuned.items():
    variables = _finetune(make(norm), variables, train, finetune_steps)
    results[name] = _compare(reference, _logits(make(norm).apply, variables, test[0]), test[1])
  for name, norm in (
    ("scratch_bn_b2", bn2),
    ("scratch_mabn_b2", mj.make_normalizer("mabn", **MABN)),
  ):
    model = make(norm)
    variables = model.init(jax.random.key(0), train[0][:BATCH], train=False)
    variables = _finetune(model, variables, train, steps + finetune_steps)
    results[name] = _compare(reference, _logits(model.apply, variables, test[0]), test[1])
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--calibration-batches", type=int, default=8)
  parser.add_argument("--finetune-steps", type=int, default=300)
  parser.add_argument(
    "--out",
    default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "conversion_agreement_cpu.json"
    ),
  )
  args = parser.parse_args(argv)
  start = time.time()
  train, test = _data()
  batches = _calibration(train, args.calibration_batches)
  report = {
    "what": "BN -> MABN conversion before fine-tuning: test-split logits vs the BN model",
    "dataset": "sklearn digits 16x16x1",
    "train_steps": args.steps,
    "batch": BATCH,
    "calibration_batches": args.calibration_batches,
    "mabn": MABN,
    "cnn6": cnn6(train, test, args.steps, batches),
    "resnet_flax_imagenet_style": resnet(train, test, args.steps, batches),
    "finetune_steps": args.finetune_steps,
    "preactivation_resnet8": preactivation(train, test, args.steps, batches, args.finetune_steps),
    "backend": jax.default_backend(),
    "platform": platform.platform(),
    "jax": jax.__version__,
  }
  report["seconds"] = round(time.time() - start, 1)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
