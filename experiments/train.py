"""Training ResNets/CNNs with any normalizer of the registry.

    python -m experiments.train  # main job: BN at b=32 and 2, MABN at 2 (digits)
    python -m experiments.train --preset cifar_cpu --norms bn,mabn --norm_batch_size 2
    python -m experiments.train --preset cifar --norms mabn --norm_batch_size 2 --workdir runs/x
    python -m experiments.train --preset imagenet --data_dir ~/tensorflow_datasets

The paper's simulated setting: each device's SGD batch ``B`` (``batch_size``)
is split into groups of ``b`` (``norm_batch_size``) normalized separately;
``--small_batch`` makes the SGD batch itself ``b`` (the true small batch per
device, learning rate scaled linearly: ``lr * b / batch_size``).
``--val_split N`` holds out ``N`` training images for choosing recipes:
evaluations during training use them and the test split is evaluated once,
at the end. Normalizer options counted in steps may be relative to the run
(``--norm_kwargs burn_in=67%``, ``2ep``, ``first_decay``; see
:func:`resolve_steps`). Data-parallel over the devices (mesh axis
``'batch'``, ``--parallel``, see :class:`Parallel`): ``jit`` (default) runs
one program over the global batch, so batch statistics are global (SyncBN
for free; ``syncbn`` is ``bn`` and ``--sync_stats`` changes nothing);
``shard_map`` and ``pmap`` keep per-device statistics unless the normalizer
synchronizes them (``syncbn``, or ``--sync_stats`` for any normalizer
accepting ``axis_name``); gradients are averaged in every mode.

Each run writes into its workdir: ``metrics.jsonl`` (train windows and test
evaluations), ``checkpoints/`` (orbax, every ``checkpoint_every`` steps, at
the end and on Ctrl-C) and ``summary.json``. ``--resume`` continues from the
latest checkpoint to exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.core import unfreeze

import mabn_jax as mj
from experiments import data as data_lib
from experiments import diagnostics, models

# Normalizers whose statistics depend on the batch: they get norm_batch_size.
BATCH_NORMALIZERS = ("bn", "syncbn", "brn", "cbn", "cbn_naive", "mabn")
# Normalizers that are GroupNorm: they get num_groups (``gn_groups``).
GROUP_NORMALIZERS = ("gn", "ws_gn")
AXIS = "batch"


@dataclasses.dataclass
class Config:
  """One training run. ``norm`` is a registry name; see :func:`preset`."""

  preset: str = "quick"
  # Data.
  dataset: str = "digits"
  data_dir: Optional[str] = None
  cache_dir: Optional[str] = None
  tarball: Optional[str] = None
  use_tfds: bool = False
  train_subset: Optional[int] = None
  val_split: int = 0
  image_size: int = 224
  prefetch: int = 2
  # Model and normalizer.
  model: str = "cnn6"
  width: int = 0
  norm: str = "bn"
  norm_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  batch_size: int = 32
  norm_batch_size: Optional[int] = None
  small_batch: bool = False
  sync_stats: bool = False
  gn_groups: int = 32
  # Which convs are normalized (models.NORM_LAYERS or 1-based conv numbers
  # '1,3'; cnn2/cnn6 only); the others are biased convs without normalization.
  norm_layers: str = "all"
  # Optimization.
  epochs: float = 10.0
  lr: float = 0.05
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  schedule: str = "cosine"
  warmup_epochs: float = 0.0
  step_epochs: Tuple[float, ...] = ()
  step_factor: float = 0.1
  label_smoothing: float = 0.0
  seed: int = 0
  # Devices.
  num_devices: int = 0
  distributed: bool = False
  # jax.distributed.initialize's arguments (None: detected from the cluster).
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  parallel: str = "jit"
  # Bookkeeping.
  workdir: Optional[str] = None
  eval_every: int = 1
  log_every: int = 20
  checkpoint_every: int = 0
  resume: bool = False
  progress: bool = True
  stop_after: int = 0
  precise_bn_batches: int = 0
  diagnose: bool = False

  def normalizer_kwargs(
    self, total_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None
  ) -> Dict[str, Any]:
    """The registry keyword arguments of the run's normalizer.

    Step-count options (:data:`STEP_OPTIONS`) may be given relative to the
    run (see :func:`resolve_steps`); they become step counts here, which
    needs ``total_steps`` and ``steps_per_epoch``.
    """
    kw = {
      k: resolve_steps(k, v, self, total_steps, steps_per_epoch) if k in STEP_OPTIONS else v
      for k, v in self.norm_kwargs.items()
    }
    if self.norm in BATCH_NORMALIZERS and self.norm_batch_size is not None:
      kw.setdefault("norm_batch_size", self.norm_batch_size)
    if self.norm in GROUP_NORMALIZERS:
      kw.setdefault("num_groups", self.gn_groups)
    if self.parallel == "jit":
      # One program over the global batch: statistics are global already and
      # no mapped axis is bound ('syncbn' is 'bn' here, --sync_stats a no-op).
      if self.norm == "syncbn":
        kw.setdefault("axis_name", None)
    elif self.sync_stats and self.norm != "syncbn":
      kw.setdefault("axis_name", AXIS)
    return kw

  def device_batch(self) -> int:
    return self.norm_batch_size if self.small_batch else self.batch_size

  def peak_lr(self) -> float:
    """``lr``, scaled linearly to the SGD batch with ``small_batch``
    (``lr * b / batch_size``: the same epochs take ``batch_size / b`` times
    more steps of a ``b / batch_size`` smaller gradient step)."""
    return self.lr * self.device_batch() / self.batch_size if self.small_batch else self.lr

  def validate(self):
    if self.small_batch and not self.norm_batch_size:
      raise ValueError("--small_batch needs --norm_batch_size (the SGD batch becomes b)")
    b, B = self.norm_batch_size, self.device_batch()
    if b is not None and (b <= 0 or B % b):
      raise ValueError(f"norm_batch_size b={b} must divide the per-device batch B={B}")
    if self.parallel not in PARALLEL_MODES:
      raise ValueError(f"parallel {self.parallel!r}: expected one of {PARALLEL_MODES}")
    if self.schedule not in ("cosine", "step", "constant"):
      raise ValueError(f"schedule {self.schedule!r}: expected cosine, step or constant")
    self.validate_norm_layers()

  def validate_norm_layers(self):
    """``norm_layers`` is a placement the model takes (a ``ValueError`` naming
    the field and the allowed values otherwise)."""
    if self.norm_layers == "all":
      return
    allowed = f"{', '.join(map(repr, models.NORM_LAYERS))} or 1-based conv numbers such as '1,3'"
    if not isinstance(self.norm_layers, str):
      raise ValueError(
        f"Config.norm_layers={self.norm_layers!r}: expected a string, one of {allowed}"
      )
    if self.model not in models.PLACEMENT_MODELS:
      raise ValueError(
        f"Config.norm_layers={self.norm_layers!r} needs model one of "
        f"{models.PLACEMENT_MODELS}, not {self.model!r} (which takes only 'all')"
      )
    try:
      models.normalized_layers(self.norm_layers, 2 if self.model == "cnn2" else 6)
    except ValueError as error:
      raise ValueError(
        f"Config.norm_layers={self.norm_layers!r}: expected one of {allowed} ({error})"
      ) from None

  def run_name(self) -> str:
    b = self.norm_batch_size or self.device_batch()
    layers = "" if self.norm_layers == "all" else "_" + str(self.norm_layers).replace(",", "-")
    return f"{self.norm}_b{b}_s{self.seed}{layers}"


STEP_OPTIONS = ("burn_in", "warmup_steps", "ramp_steps", "renorm_start")
"""Normalizer options counted in training steps (CBN's burn-in, Batch Renorm's
plain-BN steps and ramp, MABN's warm-up and renormalization start)."""


def first_decay_step(config: Config, steps_per_epoch: int) -> int:
  """The first step at which the learning rate decays (``'step'`` schedules)."""
  if config.schedule != "step" or not config.step_epochs:
    raise ValueError(
      f"'first_decay' needs a step schedule with step_epochs, not schedule "
      f"{config.schedule!r} with step_epochs {tuple(config.step_epochs)}; give a "
      "fraction of training ('67%') instead"
    )
  return int(min(config.step_epochs) * steps_per_epoch)


def resolve_steps(
  name: str, value: Any, config: Config, total_steps: Optional[int], steps_per_epoch: Optional[int]
) -> int:
  """A step-count option as an int number of steps.

  ``value`` is an int (steps), ``'<p>%'`` (that share of the run's training
  steps, rounded), ``'<e>ep'`` (epochs) or ``'first_decay'`` (the step where
  a ``'step'`` learning-rate schedule first decays: the CBN authors' burn-in).
  """
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise ValueError(
      f"normalizer option {name}={value!r}: expected an int number of steps, "
      "'<p>%', '<e>ep' or 'first_decay'"
    )
  if isinstance(value, int):
    return value
  if total_steps is None or steps_per_epoch is None:
    raise ValueError(
      f"normalizer option {name}={value!r} is relative to the run; its "
      "length (total_steps, steps_per_epoch) is needed"
    )
  text = value.strip()
  try:
    if text == "first_decay":
      return first_decay_step(config, steps_per_epoch)
    if text.endswith("%"):
      return int(round(float(text[:-1]) / 100.0 * total_steps))
    if text.endswith("ep"):
      return int(round(float(text[:-2]) * steps_per_epoch))
  except ValueError as error:
    raise ValueError(f"normalizer option {name}={value!r}: {error}") from error
  raise ValueError(
    f"normalizer option {name}={value!r}: expected an int number of steps, "
    "'<p>%', '<e>ep' or 'first_decay'"
  )


PRESETS = ("quick", "cifar", "cifar_cpu", "imagenet")


def preset(name: str, **overrides) -> Config:
  """Named configurations; keyword overrides replace fields."""
  if name == "quick":
    # CPU, 15-30 s a run: digits at their native 8x8, narrow 6-conv CNN (the
    # last conv pair sees 2x2 positions, so a group of 2 images normalizes
    # over 8 values per channel). 6 epochs chosen on a validation split (see
    # MAIN_JOB).
    c = Config(
      preset=name,
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
    )
  elif name == "cifar_cpu":
    # 2 CPU cores, 5-10 minutes: the 6-conv CNN on 10,000 CIFAR-10 images.
    c = Config(
      preset=name,
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
    )
  elif name == "cifar":
    # Full CIFAR-10 schedule (GPU): ResNet-20, 160 epochs, steps at 80 and 120.
    c = Config(
      preset=name,
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
    )
  elif name == "imagenet":
    # The MABN paper's setting: ResNet-50, normalization batch 2, SGD batch 32 per device.
    c = Config(
      preset=name,
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
    )
  else:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
  return dataclasses.replace(c, **overrides)


# --------------------------------------------------------------------------
# Pieces of the training step.


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
  norm = make_normalizer(config.norm, **config.normalizer_kwargs(total_steps, steps_per_epoch))
  return models.build_model(config.model, norm, num_classes, config.width, config.norm_layers)


def learning_rate_schedule(config: Config, steps_per_epoch: int, total_steps: int):
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  lr = config.peak_lr()
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
  elif config.schedule == "step":
    main = optax.piecewise_constant_schedule(
      lr, {int(e * steps_per_epoch) - warmup: config.step_factor for e in config.step_epochs}
    )
  else:
    main = optax.constant_schedule(lr)
  if warmup <= 0:
    return main
  return optax.join_schedules(
    [optax.linear_schedule(lr / max(1, warmup), lr, warmup), main], [warmup]
  )


def optimizer(config: Config, schedule) -> optax.GradientTransformation:
  """SGD + momentum; weight decay on conv/dense kernels only."""

  def kernel_mask(params):
    flat = traverse_util.flatten_dict(unfreeze(params))
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})

  return optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
    optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
  )


PARALLEL_MODES = ("jit", "shard_map", "pmap")
"""How a step runs on the devices (``Config.parallel``; see :class:`Parallel`)."""


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


def jit_steps(steps, mesh):
  """One ``jax.jit`` program over the global batch; outputs replicated."""
  train_step, eval_step = steps
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (
    jax.jit(train_step, donate_argnums=(0, 1), out_shardings=replicated),
    jax.jit(eval_step, out_shardings=replicated),
  )


def shard_map_steps(steps, mesh):
  """The per-device step under ``jax.shard_map``: state with a leading device
  axis sharded along ``'batch'`` (each device's own statistics), the batch
  split along ``'batch'``, metrics and counts reduced over it."""
  train_step, eval_step = steps
  spec, none = jax.sharding.PartitionSpec(AXIS), jax.sharding.PartitionSpec()
  own = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
  lead = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)

  def train_body(variables, opt_state, batch):
    variables, opt_state, metrics = train_step(own(variables), own(opt_state), batch)
    return lead(variables), lead(opt_state), metrics

  mapped_train = jax.shard_map(
    train_body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec, none)
  )
  mapped_eval = jax.shard_map(
    lambda v, b: eval_step(own(v), b), mesh=mesh, in_specs=(spec, spec), out_specs=none
  )
  return jax.jit(mapped_train, donate_argnums=(0, 1)), jax.jit(mapped_eval)


def pmap_steps(steps, mesh):
  """The per-device step under ``jax.pmap`` over the mesh's (local) devices."""
  del mesh
  train_step, eval_step = steps
  return (
    jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0, 1)),
    jax.pmap(eval_step, axis_name=AXIS),
  )


def _local_value(x) -> np.ndarray:
  """This process's numpy view of an array: the whole array, one replica of a
  replicated one, or its devices' shards of the leading axis, in order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _scalar(x) -> float:
  """A reduced metric (pmap: one copy per device, identical) as a float."""
  return float(np.asarray(x).reshape(-1)[0])


class Parallel:
  """Data parallelism of the loop: the mesh, the compiled steps, the layouts.

  ``mode`` (see :data:`PARALLEL_MODES`):

  * ``'jit'``: one ``jax.jit`` program; the batch is sharded along the mesh
    axis ``'batch'`` (``NamedSharding(mesh, P('batch'))``), variables and
    optimizer state are replicated. Normalizers see the global batch, so
    batch statistics are global (groups of ``norm_batch_size`` consecutive
    samples of the global batch) and there is one copy of them.
  * ``'shard_map'``: the per-device step under ``jax.shard_map``; variables and
    optimizer state carry a leading device axis sharded along ``'batch'``, so
    every device keeps the statistics of its own shard (averaged over
    ``'batch'`` by layers with ``axis_name``); gradients are ``pmean``-ed.
  * ``'pmap'``: the same per-device semantics with ``jax.pmap``.

  Host-side state (initial values, checkpoints) is this process's view: one
  copy (``'jit'``) or a leading axis over its ``n`` devices.
  """

  def __init__(self, mode: str, steps, n: int):
    if mode not in PARALLEL_MODES:
      raise ValueError(f"parallel {mode!r}: expected one of {PARALLEL_MODES}")
    self.mode, self.n = mode, n
    self.per_device = mode != "jit"
    local = jax.local_devices()[:n]
    if mode == "pmap" or jax.process_count() == 1:
      devices = local
    else:  # every process's first n devices, process by process
      devices = [
        d
        for p in range(jax.process_count())
        for d in [d for d in jax.devices() if d.process_index == p][:n]
      ]
    self.mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    spec = jax.sharding.PartitionSpec
    self.sharded = jax.sharding.NamedSharding(self.mesh, spec(AXIS))
    self.replicated = jax.sharding.NamedSharding(self.mesh, spec())
    make = {"jit": jit_steps, "shard_map": shard_map_steps, "pmap": pmap_steps}[mode]
    self.train_step, self.eval_step = make(steps, self.mesh)

  def replicate(self, host_tree):
    """One copy (e.g. initial variables) -> the host layout of the mode."""
    if not self.per_device:
      return host_tree
    return jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * self.n), host_tree)

  def put(self, host_tree):
    """Host layout -> device arrays (the global arrays of all processes)."""
    sharding = self.sharded if self.per_device else self.replicated
    return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_tree
    )

  def batch(self, batch: Dict[str, np.ndarray]):
    """This process's batch ``(n * B, ...)`` -> the step's input."""
    if self.mode == "pmap":
      return shard(batch, self.n)
    return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

  def to_host(self, tree):
    """Device arrays -> this process's host layout (numpy)."""
    return jax.tree_util.tree_map(_local_value, tree)

  def first(self, tree):
    """One device's copy (device 0 of this process), as numpy."""
    host = self.to_host(tree)
    return jax.tree_util.tree_map(lambda x: x[0], host) if self.per_device else host

  def device_view(self, tree):
    """Every local device's copy, along a leading axis (``'jit'``: the one
    global copy that every device holds)."""
    host = self.to_host(tree)
    if self.per_device:
      return host
    return jax.tree_util.tree_map(lambda x: np.stack([x] * self.n), host)

  def normalization_batch(self, device_batch: int) -> int:
    """Samples a layer normalizes together without ``norm_batch_size``."""
    return device_batch * self.n * jax.process_count() if self.mode == "jit" else device_batch


def put_per_device(tree, devices):
  """Host arrays ``(n, ...)`` -> arrays sharded along axis 0 over ``devices``."""
  # The sharding pmap gives its outputs (mesh axis named like the pmap axis),
  # so the step does not recompile after its first call.
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def shard(batch: Dict[str, np.ndarray], n: int):
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def _evaluated(record: Dict[str, Any]) -> bool:
  return any(k.endswith("_top1") for k in record)


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


# --------------------------------------------------------------------------
# Bookkeeping.


def git_commit() -> str:
  try:
    return (
      subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        timeout=10,
      ).stdout.strip()
      or "unknown"
    )
  except Exception:  # noqa: BLE001 - bookkeeping only
    return "unknown"


def device_info() -> Dict[str, Any]:
  d = jax.local_devices()[0]
  return {
    "platform": d.platform,
    "kind": d.device_kind,
    "local_devices": jax.local_device_count(),
    "processes": jax.process_count(),
    "host": platform.node(),
    "cpus": os.cpu_count(),
  }


def read_metrics(path: str):
  """The records of ``metrics.jsonl``; a last line cut short (a run killed
  while writing it) is dropped, any other unreadable line raises."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = [json.loads(line) for line in lines[:-1]]
  if lines:
    try:
      records.append(json.loads(lines[-1]))
    except json.JSONDecodeError:
      if lines[-1].endswith("\n"):
        raise
  return records


def write_metrics(path: str, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


class Progress:
  """tqdm bar with step, loss, acc, steps/s and ETA (a plain line without tqdm)."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str):
    self.total, self.enabled, self.desc = total, enabled, desc
    self.start, self.initial = time.time(), initial
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm

        self.bar = tqdm(
          total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr
        )
      except ImportError:
        self.bar = None

  def update(self, step: int, info: Dict[str, float]):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
      return
    rate = (step - self.initial) / max(time.time() - self.start, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    items = " ".join(f"{k}={v:.4g}" for k, v in info.items())
    print(
      f"{self.desc} step {step}/{self.total} {items} {rate:.2f} steps/s ETA {eta:.0f}s",
      file=sys.stderr,
      flush=True,
    )

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _to_host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _checkpoint_manager(directory: str):
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
  )


def save_checkpoint(manager, step: int, state, host: Dict[str, Any]):
  """Saves the device ``state`` (as numpy with one process; with several, the
  global arrays, each process writing its devices' shards) and ``host``."""
  import orbax.checkpoint as ocp

  if jax.process_count() == 1:
    state = _to_host(state)
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
    force=True,
  )
  manager.wait_until_finished()


def restore_checkpoint(manager, target):
  """``(step, state, host)`` of the latest checkpoint; ``target`` is like the
  saved state (numpy, or the global arrays with several processes)."""
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  if jax.process_count() == 1:
    target = _to_host(target)
  path = os.path.join(str(manager.directory), str(step))
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()),
    )
    state = _one_device_layout(restored["state"], target)
    _check_restored(state, target)
  except Exception as error:  # noqa: BLE001 - any failure to read it means a bad checkpoint
    raise ValueError(
      f"checkpoint {path} is incomplete or corrupted and was not loaded (or it was "
      "saved by a run with another --parallel mode or number of devices) "
      f"({type(error).__name__}: {str(error)[:300]}); checkpoints in "
      f"{manager.directory}: steps {list(manager.all_steps())}. Delete {path} to resume "
      "from the previous one, or rerun without --resume."
    ) from error
  return step, state, restored["host"]


def _one_device_layout(state, target):
  """One device's state saved with a leading device axis of 1 (``pmap``,
  ``shard_map``) in ``target``'s layout without it (``jit``), or the reverse:
  on one device the modes compute the same thing."""

  def convert(a, b):
    if a.shape == (1,) + b.shape:
      return a[0]
    if b.shape == (1,) + a.shape:
      return a[None]
    return a

  if jax.process_count() > 1 or (
    jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(target)
  ):
    return state
  return jax.tree_util.tree_map(convert, state, target)


def _check_restored(state, target) -> None:
  """Raises unless ``state`` has ``target``'s structure, shapes and dtypes."""
  got = jax.tree_util.tree_structure(state)
  if got != jax.tree_util.tree_structure(target):
    raise ValueError(f"restored tree {got} differs from the expected one")
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(target), strict=True
  ):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
        f"{jax.tree_util.keystr(path)}: restored {a.shape} {a.dtype}, expected {b.shape} {b.dtype}"
      )


FAULT_ENV = "MABN_TRAIN_KILL"
"""Fault injection (tests): ``step:N`` SIGKILLs the run after training step
``N``; ``save:N`` while saving step ``N``'s checkpoint, after its files are
written and before orbax finalizes it (renames its temporary directory)."""


def _kill_self():
  os.kill(os.getpid(), signal.SIGKILL)


def install_fault() -> Optional[int]:
  """Arms :data:`FAULT_ENV`; returns the step to be killed after (``step:N``)."""
  kind, _, at = os.environ.get(FAULT_ENV, "").partition(":")
  if kind == "save":
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    def kill_if_armed(path):
      if path._final_path.name == at:
        _kill_self()

    # A coroutine in recent orbax-checkpoint releases, a function in 0.11.17.
    if inspect.iscoroutinefunction(finalize):

      async def killing_finalize(self, *args, **kwargs):
        kill_if_armed(self)
        return await finalize(self, *args, **kwargs)
    else:

      def killing_finalize(self, *args, **kwargs):
        kill_if_armed(self)
        return finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
  return int(at) if kind == "step" else None


def clear_run(workdir: str, ckpt_dir: str) -> None:
  """Removes a previous run's checkpoints, metrics and summary (process 0;
  the others wait for it)."""
  if jax.process_index() == 0:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    for f in ("metrics.jsonl", "summary.json"):
      if os.path.exists(os.path.join(workdir, f)):
        os.remove(os.path.join(workdir, f))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("experiments.train clear_run")


def _checkpoint_target(parallel: "Parallel", host_state):
  """What a checkpoint restores into: the host state, or with several
  processes its global arrays (orbax then reads each process's shards)."""
  return host_state if jax.process_count() == 1 else parallel.put(host_state)


def check_checkpointable(parallel: "Parallel") -> None:
  """Raises for checkpoints orbax cannot write: pmap with several processes."""
  if jax.process_count() > 1 and parallel.mode == "pmap":
    raise ValueError(
      "checkpoints of several processes need --parallel jit or shard_map "
      "(pmap's arrays are local to each process); or run without --workdir"
    )


# --------------------------------------------------------------------------
# The loop.


def _devices_to_use(config: Config) -> int:
  """Starts ``jax.distributed`` if asked; returns the local devices the run uses."""
  if config.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
  devices = jax.local_devices()
  n = config.num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"num_devices={n} but only {len(devices)} local devices")
  return n


def make_loaders(config: Config, dataset: data_lib.Dataset, host_batch: int):
  """``(train_loader, {split: eval_loader})`` of this process's share of the data."""

  def loader(split, shuffle):
    return data_lib.Loader(
      dataset,
      split,
      host_batch,
      shuffle,
      config.seed,
      jax.process_index(),
      jax.process_count(),
      config.prefetch,
    )

  evals = {
    split: loader(split, False) for split in ("val", "test") if getattr(dataset, split) is not None
  }
  return loader("train", True), evals


@dataclasses.dataclass
class RunLog:
  """A run's metrics: the records of ``metrics.jsonl`` (``path``, process 0
  writes it) and the training metrics accumulated since the last record.

  ``pending`` holds the device metrics of the steps not yet read back (read
  back in batches: a transfer per step would stall the loop).
  """

  path: Optional[str] = None
  records: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  host: Dict[str, Any] = dataclasses.field(
    default_factory=lambda: {"loss_sum": 0.0, "acc_sum": 0.0, "count": 0}
  )
  pending: List[Any] = dataclasses.field(default_factory=list)
  latest_diag: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def log(self, record: Dict[str, Any]) -> None:
    self.records.append(record)
    if self.path and jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def fold_pending(self, parallel: Parallel) -> None:
    """Adds the pending steps' loss and accuracy to the sums (and keeps the
    latest diagnostics)."""
    for m in parallel.to_host(self.pending):
      self.host["loss_sum"] += _scalar(m["loss"])
      self.host["acc_sum"] += _scalar(m["acc"])
      self.host["count"] += 1
      if "diag" in m:
        self.latest_diag["diag"] = jax.tree_util.tree_map(_scalar, m["diag"])
    self.pending.clear()

  def log_training(
    self, step: int, steps_per_epoch: int, lr: float, steps_per_sec: float
  ) -> Dict[str, Any]:
    """Logs the averages since the last training record and resets them
    (after :meth:`fold_pending`)."""
    host = self.host
    record = {
      "step": step,
      "epoch": step / steps_per_epoch,
      "loss": host["loss_sum"] / host["count"],
      "acc": host["acc_sum"] / host["count"],
      "lr": lr,
      "steps_per_sec": steps_per_sec,
      **self.latest_diag,
    }
    host.update(loss_sum=0.0, acc_sum=0.0, count=0)
    self.log(record)
    return record

  def evaluated(self, step: int) -> bool:
    return any(r["step"] == step and _evaluated(r) for r in self.records)


def open_run(config: Config, parallel: Parallel, state):
  """``(manager, step, state, run_log)``: the run directory, resumed if asked.

  Without ``config.workdir`` nothing is written (``manager`` is ``None``).
  With it, ``config.json`` is written, a previous run is cleared (no
  ``resume``) or continued from its latest checkpoint, its metrics cut back
  to that step.
  """
  workdir = config.workdir
  if not workdir:
    return None, 0, state, RunLog()
  os.makedirs(workdir, exist_ok=True)
  run_log = RunLog(path=os.path.join(workdir, "metrics.jsonl"))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  check_checkpointable(parallel)
  if not config.resume:
    clear_run(workdir, ckpt_dir)
  manager = _checkpoint_manager(ckpt_dir)
  step = 0
  if config.resume and manager.latest_step() is not None:
    step, state, run_log.host = restore_checkpoint(manager, _checkpoint_target(parallel, state))
    state = parallel.to_host(state)
    run_log.records = [r for r in read_metrics(run_log.path) if r["step"] <= step]
    if jax.process_index() == 0:
      write_metrics(run_log.path, run_log.records)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=1)
  return manager, step, state, run_log


def summarize(
  config: Config, records, step: int, total_steps: int, finished: bool, wall_time_s: float
) -> Dict[str, Any]:
  """The summary of a run (what ``summary.json`` holds) from its records."""
  evals = [r for r in records if "test_top1" in r]
  vals = [r for r in records if "val_top1" in r]
  trains = [r for r in records if "loss" in r]
  return {
    "name": config.run_name(),
    "finished": finished,
    "step": step,
    "total_steps": total_steps,
    "config": dataclasses.asdict(config),
    "git_commit": git_commit(),
    "device": device_info(),
    "wall_time_s": wall_time_s,
    "final_test_top1": evals[-1]["test_top1"] if evals else None,
    "best_test_top1": max(r["test_top1"] for r in evals) if evals else None,
    "final_val_top1": vals[-1]["val_top1"] if vals else None,
    "best_val_top1": max(r["val_top1"] for r in vals) if vals else None,
    "train_loss_curve": [[r["step"], r["loss"]] for r in trains],
    "test_top1_curve": [[r["step"], r["test_top1"]] for r in evals],
    "val_top1_curve": [[r["step"], r["val_top1"]] for r in vals],
  }


def write_summary(workdir: str, summary: Dict[str, Any]) -> None:
  """Writes ``summary.json`` atomically (its presence marks a finished run)."""
  tmp = os.path.join(workdir, "summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "summary.json"))


def train(config: Config, dataset: Optional[data_lib.Dataset] = None) -> Dict[str, Any]:
  """Trains one run; returns (and writes) its summary."""
  config.validate()
  wall_start = time.time()
  kill_after = install_fault()
  n = _devices_to_use(config)
  if dataset is None:
    dataset = load_data(config)
  B = config.device_batch()
  train_loader, eval_loaders = make_loaders(config, dataset, B * n)
  spe = train_loader.steps_per_epoch
  total_steps = max(1, int(round(config.epochs * spe)))

  model = build(config, dataset.num_classes, total_steps, spe)
  schedule = learning_rate_schedule(config, spe, total_steps)
  tx = optimizer(config, schedule)
  variables = unfreeze(
    model.init(
      jax.random.PRNGKey(config.seed),
      jnp.zeros((B,) + dataset.image_shape, jnp.float32),
      train=True,
    )
  )
  opt_state = tx.init(variables["params"])
  parallel = Parallel(
    config.parallel,
    step_functions(
      model,
      tx,
      dataset.num_classes,
      config.label_smoothing,
      config.diagnose,
      None if config.parallel == "jit" else AXIS,
    ),
    n,
  )
  state = parallel.replicate(_to_host({"variables": variables, "opt_state": opt_state}))
  manager, step, state, run_log = open_run(config, parallel, state)
  dev_state = parallel.put(state)
  dev_vars, dev_opt = dev_state["variables"], dev_state["opt_state"]

  def checkpoint():
    if manager is not None and manager.latest_step() != step:
      run_log.fold_pending(parallel)
      save_checkpoint(
        manager, step, {"variables": dev_vars, "opt_state": dev_opt}, dict(run_log.host)
      )

  progress = Progress(
    total_steps,
    step,
    config.progress and jax.process_index() == 0,
    f"{config.norm} b={config.norm_batch_size or B}",
  )
  last_time, last_step = time.time(), step
  interrupted = False
  try:
    while step < total_steps:
      epoch, start = divmod(step, spe)
      for batch in train_loader.epoch(epoch, start):
        dev_vars, dev_opt, metrics = parallel.train_step(dev_vars, dev_opt, parallel.batch(batch))
        run_log.pending.append(metrics)
        step += 1
        end_of_epoch = step % spe == 0
        if step % config.log_every == 0 or step == total_steps or end_of_epoch:
          run_log.fold_pending(parallel)  # waits for the steps, so the rate is true
          now = time.time()
          rec = run_log.log_training(
            step, spe, float(schedule(step - 1)), (step - last_step) / max(now - last_time, 1e-9)
          )
          last_time, last_step = now, step
          progress.update(step, {"loss": rec["loss"], "acc": rec["acc"]})
        if end_of_epoch or step == total_steps:
          e = -(-step // spe)
          due = step == total_steps or (config.eval_every and e % config.eval_every == 0)
          if due and not run_log.evaluated(step):
            run_log.log(
              {
                "step": step,
                "epoch": step / spe,
                **evaluate_splits(parallel, dev_vars, eval_loaders, final=step == total_steps),
              }
            )
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          checkpoint()
        if step == kill_after:
          _kill_self()
        if config.stop_after and step >= config.stop_after and step < total_steps:
          raise KeyboardInterrupt  # simulated interruption (tests, time-boxed runs)
        if step >= total_steps:
          break
  except KeyboardInterrupt:
    interrupted = True
    checkpoint()
  finally:
    progress.close()

  if not interrupted:
    checkpoint()
  mj.check_finite({"batch_stats": parallel.first(dev_vars.get("batch_stats", {}))})
  summary = summarize(
    config, run_log.records, step, total_steps, not interrupted, time.time() - wall_start
  )
  if config.precise_bn_batches and not interrupted:
    summary.update(precise_bn_evaluation(config, model, dev_vars, dataset, parallel, eval_loaders))
  if config.workdir and not interrupted and jax.process_index() == 0:
    write_summary(config.workdir, summary)
  summary["variables"] = parallel.first(dev_vars)
  # Every device's statistics (leading device axis), for per-device/synchronized checks.
  summary["device_batch_stats"] = parallel.device_view(dev_vars.get("batch_stats", {}))
  return summary


# --------------------------------------------------------------------------
# Command line.


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_kwargs(text: str) -> Dict[str, Any]:
  """``'a=1,b=x'`` -> ``{'a': 1, 'b': 'x'}``."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      raise ValueError(f"expected key=value in {text!r}, got {item!r}")
    k, v = item.split("=", 1)
    out[k.strip()] = _parse_value(v.strip())
  return out


def add_config_arguments(parser: argparse.ArgumentParser, skip=("preset", "norm")):
  for f in dataclasses.fields(Config):
    if f.name in skip:
      continue
    parser.add_argument(
      f"--{f.name}", default=None, type=str, help=f"(default from the preset; Config.{f.name})"
    )


def overrides_from_args(args) -> Dict[str, Any]:
  out = {}
  for f in dataclasses.fields(Config):
    value = getattr(args, f.name, None)
    if value is None or f.name in ("preset", "norm"):
      continue
    if f.name == "norm_kwargs":
      out[f.name] = parse_kwargs(value)
    elif f.name == "step_epochs":
      out[f.name] = tuple(float(v) for v in value.split(",") if v)
    elif f.type in ("bool", bool):
      out[f.name] = value.lower() in ("1", "true", "yes", "y")
    elif f.type in ("str", "Optional[str]"):
      out[f.name] = None if value.lower() == "none" and f.type != "str" else value
    else:
      out[f.name] = _parse_value(value)
  return out


# The main job (``python -m experiments.train``: the quick preset, no
# --norms): (normalizer, normalization batch) for BN at the SGD batch and at 2,
# and MABN at 2, each for MAIN_JOB_SEEDS.
MAIN_JOB = (("bn", None), ("bn", 2), ("mabn", 2))  # None: the SGD batch
MAIN_JOB_SEEDS = (0, 1)


def main_job_table(summaries: Sequence[Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
  """The main job's table (final test top-1 per method, mean ± std over
  seeds), BN's small-batch gap and the share of it MABN recovers; returns the
  text and the numbers."""
  cells = {}
  for s in summaries:
    c = s["config"]
    cells.setdefault((c["norm"], c["norm_batch_size"] or c["batch_size"]), []).append(
      s["final_test_top1"]
    )
  mean = {k: float(np.mean(v)) for k, v in cells.items()}
  lines = [f"{'method':<8} {'b':>3} {'final test top-1':>18} {'seeds':>5}"]
  for (norm, b), v in cells.items():
    spread = f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""
    lines.append(f"{norm:<8} {b:>3} {mean[(norm, b)]:>10.2f}{spread:<8} {len(v):>5}")
  numbers = {"top1": {f"{n}_b{b}": m for (n, b), m in mean.items()}}
  small = MAIN_JOB[1][1]
  large = max(b for n, b in mean if n == "bn")
  if {("bn", large), ("bn", small), ("mabn", small)} <= set(mean):
    gap = mean[("bn", large)] - mean[("bn", small)]
    recovered = (mean[("mabn", small)] - mean[("bn", small)]) / gap if gap > 0 else None
    numbers.update(bn_gap=gap, mabn_recovered=recovered)
    lines.append(
      f"BN at b={small} is {gap:.2f} points below BN at b={large}"
      + (
        f"; MABN at b={small} recovers {100 * recovered:.0f}% of that gap."
        if recovered is not None
        else "."
      )
    )
  return "\n".join(lines), numbers


def plot_main_job(summaries: Sequence[Dict[str, Any]], path: str) -> None:
  """Test top-1 over training (mean over seeds) of every main-job method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = {}
  for s in summaries:
    c = s["config"]
    label = f"{c['norm'].upper()}, b={c['norm_batch_size'] or c['batch_size']}"
    curves.setdefault(label, []).append(s["test_top1_curve"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, runs in curves.items():
    steps = [step for step, _ in runs[0]]
    ax.plot(steps, np.mean([[acc for _, acc in r] for r in runs], axis=0), "-o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title("digits (8x8), SGD batch 32, mean over seeds")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.train",
    description="Train with a normalizer of mabn_jax. Without arguments (the main job): the "
    "quick preset (digits at 8x8), BN at normalization batch 32 and 2 and MABN "
    "at 2, two seeds each.",
  )
  parser.add_argument("--preset", default="quick", choices=PRESETS)
  parser.add_argument(
    "--norms",
    "--norm",
    dest="norms",
    default=None,
    help="comma-separated registry names (one run each); "
    "default: the main job for quick, the preset's normalizer otherwise",
  )
  add_config_arguments(parser)
  args = parser.parse_args(argv)
  overrides = overrides_from_args(args)
  base = preset(args.preset, **overrides)
  main_job = (
    args.preset == "quick" and not args.norms and not {"norm_batch_size", "seed"} & set(overrides)
  )
  if main_job:
    runs = [(norm, b, seed) for seed in MAIN_JOB_SEEDS for norm, b in MAIN_JOB]
  else:
    runs = [
      (norm, base.norm_batch_size, base.seed)
      for norm in (args.norms.split(",") if args.norms else [base.norm])
    ]
  root = base.workdir or os.path.join("experiments", "runs", args.preset)
  dataset = None
  results = []
  for norm, b, seed in runs:
    cfg = dataclasses.replace(base, norm=norm, norm_batch_size=b, seed=seed)
    cfg = dataclasses.replace(
      cfg,
      workdir=os.path.join(root, cfg.run_name())
      if len(runs) > 1 or not base.workdir
      else base.workdir,
    )
    if dataset is None:
      dataset = load_data(cfg)
    s = train(cfg, dataset)
    results.append(s)
    print(
      json.dumps(
        {k: s[k] for k in ("name", "final_test_top1", "best_test_top1", "wall_time_s", "finished")}
      ),
      flush=True,
    )
    if not s["finished"]:
      print(
        f"interrupted at step {s['step']}; rerun with --resume true to continue", file=sys.stderr
      )
      return 130
  print(
    f"\n{base.preset}: {base.dataset}, {base.model}, SGD batch {base.device_batch()} per device"
  )
  print(f"{'run':<16} {'final top-1':>11} {'best top-1':>10} {'wall s':>8}")
  for s in results:
    print(
      f"{s['name']:<16} {s['final_test_top1']:>11.2f} {s['best_test_top1']:>10.2f} "
      f"{s['wall_time_s']:>8.1f}"
    )
  if main_job:
    table, numbers = main_job_table(results)
    print("\n" + table)
    os.makedirs(root, exist_ok=True)
    plot_main_job(results, os.path.join(root, "main_job.png"))
    with open(os.path.join(root, "main_job.json"), "w") as f:
      json.dump(numbers, f, indent=1)
    print(f"curves: {os.path.join(root, 'main_job.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
