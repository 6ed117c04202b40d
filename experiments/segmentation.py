"""Small-batch semantic segmentation with every registry normalizer.

    python -m experiments.segmentation --preset seg_quick               # seconds
    python -m experiments.segmentation --preset seg_cpu --norms bn,brn,gn,mabn,cbn \\
        --batch_size 2 --seeds 0,1 --finetune                          # 2 CPU cores

A :class:`~experiments.segmentation_models.UNet` is trained with pixel-wise
softmax cross-entropy (pixels labelled ``IGNORE`` excluded) on the CIFAR-10
composites or Oxford-IIIT Pet (:mod:`experiments.segmentation_data`).

Batches are true per-device batches: ``--batch_size 2`` means each SGD step
sees 2 images and every batch normalizer normalizes over those 2 (unless
``--norm_batch_size`` splits them further). Runs at different batch sizes see
the same number of epochs, so smaller batches take more steps, and the peak
learning rate is scaled linearly from the reference batch:
``lr * batch_size / reference_batch`` (``--lr`` is the rate at
``--reference_batch``, default 16). BN at the reference batch is the
large-batch baseline and runs unless ``--no_reference``.

``--finetune`` adds the fine-tuning setting: the BN model trained at the
reference batch (the same seed's reference run, whose final variables are
saved under ``OUT/checkpoints``, or ``--pretrained`` files) is fine-tuned at
each small batch for ``--finetune_epochs``, either converted to MABN with
:func:`mabn_jax.convert_batch_norm` (``ft_mabn``: running ``mean``/``var``
become MABN's moving averages, every BN layer of encoder and decoder
converted) or kept as BN (``ft_bn``). The fine-tuned models have seen the
pretraining epochs too.

Everything goes under ``--out_dir``: ``runs/<run>.json`` per run (a finished
run is skipped when the command is rerun), ``table.md`` (test mIoU and pixel
accuracy, mean +- std over seeds), ``plot.png``, ``examples/<run>.png``
(input, ground truth, prediction) and ``checkpoints/``. One JSON line per
run is printed. Runs are found by name, so a finished run made with other
data or optimization settings is an error, not reused: give each
configuration its own ``--out_dir``. Metrics:
:mod:`experiments.segmentation_metrics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util
from flax.core import unfreeze

import mabn_jax as mj
from experiments import segmentation_data as seg_data
from experiments import segmentation_models as seg_models
from experiments.segmentation_metrics import class_iou, confusion_matrix, mean_iou, pixel_accuracy
from experiments.segmentation_report import aggregate, table_markdown, write_examples, write_plot

DEFAULT_OUT_DIR = os.path.join("experiments", "results", "segmentation_cifar_cpu")
PRESETS = ("seg_quick", "seg_cpu")
FINETUNE_METHODS = ("ft_mabn", "ft_bn")


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
    return seg_models.segmentation_normalizer(
      self.norm, self.norm_batch_size, self.widths, self.gn_groups, self.norm_kwargs
    )


def preset(name: str, **overrides) -> Config:
  """Named configurations; keyword overrides replace fields.

  * ``seg_quick``: 40x40 canvases with 1-2 images, a 4..32-wide U-Net, 16
    training canvases: seconds per run (tests, smoke runs).
  * ``seg_cpu``: 64x64 canvases with 2-4 images, a 16..128-wide U-Net,
    2,000 training / 200 validation / 500 test canvases, 4 epochs (4,000
    steps at batch 2, 500 at 16), SGD lr 0.1 at batch 16: minutes per run on
    2 CPU cores. Measured on 2 shared cores (load 4-5): per step at batch 2
    bn 0.11 s, mabn 0.08 s, gn 0.07 s, cbn 0.21 s, at batch 16 bn 0.64 s,
    so about 5-7 min a run at batch 2 (cbn 14), 5.5 min for BN at 16, plus
    about half a minute of compilation and evaluation; fine-tuning (2
    epochs at batch 2) 3-4 min.
  """
  if name == "seg_quick":
    c = Config(preset=name)
  elif name == "seg_cpu":
    c = Config(
      preset=name,
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
    )
  else:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
  return dataclasses.replace(c, **overrides)


def load_data(config: Config) -> seg_data.SegDataset:
  """The run's :class:`~experiments.segmentation_data.SegDataset`."""
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


# --------------------------------------------------------------------------
# The training step.


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
  lr = config.peak_lr()
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup), main], [warmup])


def make_optimizer(config: Config, schedule) -> optax.GradientTransformation:
  """SGD with momentum (weight decay on kernels only) or AdamW (the same mask)."""

  def kernel_mask(params):
    flat = traverse_util.flatten_dict(unfreeze(params))
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})

  if config.optimizer == "sgd":
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
      optax.sgd(schedule, momentum=config.momentum),
    )
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=kernel_mask)
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


# --------------------------------------------------------------------------
# One run.


def to_host(tree):
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
  schedule = learning_rate_schedule(config, steps_per_epoch, total)
  tx = make_optimizer(config, schedule)
  train_step, eval_step = step_functions(model, tx, dataset.num_classes)
  variables = init_variables(model, config, dataset) if variables is None else unfreeze(variables)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  opt_state = tx.init(variables["params"])

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
  end = time.time()
  mj.check_finite(variables)

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
  summary = {
    "norm": normalizer.name,
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
  return summary, to_host(variables), examples


# --------------------------------------------------------------------------
# The sweep: which runs, their files, the table and the plots.


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: ``method`` is a registry name (from scratch) or a fine-tune method."""

  method: str
  batch_size: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.method}_b{self.batch_size}_s{self.seed}"

  @property
  def finetune(self) -> bool:
    return self.method in FINETUNE_METHODS


def plan_runs(
  norms: Sequence[str],
  batch_sizes: Sequence[int],
  seeds: Sequence[int],
  reference_batch: int,
  reference: bool = True,
  finetune: bool = False,
  pretrained: bool = False,
  finetune_methods: Sequence[str] = FINETUNE_METHODS,
) -> List[RunSpec]:
  """The runs, pretraining (BN at ``reference_batch``) first for every seed.

  ``norms`` at every batch size; BN at the reference batch when ``reference``,
  or with ``finetune`` unless the BN variables are given (``pretrained``):
  its final variables are the fine-tuning start; with ``finetune``,
  ``finetune_methods`` (of :data:`FINETUNE_METHODS`) at every batch size
  other than the reference.
  Duplicates are dropped.
  """
  runs: List[RunSpec] = []
  for seed in seeds:
    if reference or (finetune and not pretrained):
      runs.append(RunSpec("bn", reference_batch, seed))
    runs += [RunSpec(norm, b, seed) for b in batch_sizes for norm in norms]
    if finetune:
      runs += [
        RunSpec(m, b, seed) for b in batch_sizes if b != reference_batch for m in finetune_methods
      ]
  return list(dict.fromkeys(runs))


def run_path(out_dir: str, spec: RunSpec) -> str:
  return os.path.join(out_dir, "runs", f"{spec.name}.json")


def checkpoint_path(out_dir: str, spec: RunSpec) -> str:
  return os.path.join(out_dir, "checkpoints", f"{spec.name}.msgpack")


def read_summary(path: str) -> Optional[dict]:
  """A run's summary if it finished, else None."""
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get("finished") else None


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def pretrained_variables(
  spec: RunSpec, out_dir: str, pretrained: Optional[str], reference_batch: int
) -> dict:
  """The BN variables a fine-tune run starts from.

  ``pretrained``: a ``.msgpack`` file (every seed) or a directory holding
  ``bn_b<reference_batch>_s<seed>.msgpack``; default the reference run's
  checkpoint under ``out_dir``.
  """
  source = RunSpec("bn", reference_batch, spec.seed)
  if pretrained and os.path.isfile(pretrained):
    path = pretrained
  elif pretrained:
    path = os.path.join(pretrained, f"{source.name}.msgpack")
  else:
    path = checkpoint_path(out_dir, source)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"fine-tune run {spec.name}: no BN checkpoint at {path!r} (run "
      f"{source.name} first, or pass --pretrained)"
    )
  return load_variables(path)


def finetune_start(
  spec: RunSpec, base: Config, bn_variables: dict, mabn_kwargs: Optional[Dict[str, Any]] = None
):
  """``(config, variables, normalizer)`` of a fine-tune run from BN variables.

  ``ft_mabn``: :func:`mabn_jax.convert_batch_norm` with the BN normalizer the
  checkpoint was trained with (``mabn_kwargs`` become the MABN options);
  ``ft_bn``: the BN variables and normalizer unchanged.
  """
  config = dataclasses.replace(
    base, norm="bn", norm_kwargs={}, batch_size=spec.batch_size, seed=spec.seed
  )
  bn = config.normalizer()
  if spec.method == "ft_bn":
    return config, bn_variables, bn
  variables, mabn = mj.convert_batch_norm(bn_variables, bn, **dict(mabn_kwargs or {}))
  return dataclasses.replace(config, norm="mabn", norm_kwargs=dict(mabn.kwargs)), variables, mabn


# Config fields a finished run may differ in and still be reused (paths, logging,
# and the normalizer, which the run's name fixes).
_NOT_COMPARED = (
  "norm",
  "norm_kwargs",
  "tarball",
  "cache_dir",
  "data_dir",
  "log_every",
  "num_examples",
  "eval_batch_size",
)


def config_record(config: Config) -> dict:
  """``config`` as the JSON-compatible dict a summary stores."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_same_run(summary: dict, config: Config) -> None:
  """Raises ``ValueError`` if a finished run was made with another configuration.

  Runs are found by name (``<method>_b<batch>_s<seed>``), so an ``out_dir``
  reused with other data or optimization settings would mix them silently.
  """
  stored, wanted = summary.get("config", {}), config_record(config)
  differ = sorted(k for k in wanted if k not in _NOT_COMPARED and stored.get(k) != wanted[k])
  if differ:
    raise ValueError(
      f"run {summary.get('run')} in this out_dir finished with other settings "
      f"({', '.join(f'{k}: {stored.get(k)!r} != {wanted[k]!r}' for k in differ)}); "
      "use another --out_dir or remove its runs/ files"
    )


def run_one(
  spec: RunSpec,
  base: Config,
  dataset: seg_data.SegDataset,
  out_dir: str,
  pretrained: Optional[str] = None,
  finetune_epochs: float = 1.0,
  finetune_lr: Optional[float] = None,
  mabn_kwargs: Optional[Dict[str, Any]] = None,
  norm_options: Optional[Dict[str, Dict[str, Any]]] = None,
  verbose: bool = False,
) -> dict:
  """Trains ``spec`` (or reads its finished summary) and writes its files.

  Fine-tune runs train ``finetune_epochs`` (``base.steps`` steps when set) at
  ``finetune_lr`` (default ``base.lr``; scaled to the batch like every run).
  From-scratch runs use ``norm_options[method]`` as their normalizer options.
  BN runs at the reference batch save their final variables (the
  fine-tuning start). A finished run is read back, after
  :func:`check_same_run`.
  """
  path = run_path(out_dir, spec)
  variables = normalizer = None
  norm_kwargs = dict((norm_options or {}).get(spec.method, {}))
  config = dataclasses.replace(
    base, norm=spec.method, norm_kwargs=norm_kwargs, batch_size=spec.batch_size, seed=spec.seed
  )
  length = dict(epochs=finetune_epochs, lr=base.lr if finetune_lr is None else finetune_lr)
  done = read_summary(path)
  if done is not None:
    check_same_run(done, dataclasses.replace(config, **length) if spec.finetune else config)
    return {**done, "skipped": True}
  if spec.finetune:
    bn_vars = pretrained_variables(spec, out_dir, pretrained, base.reference_batch)
    config, variables, normalizer = finetune_start(spec, base, bn_vars, mabn_kwargs)
    config = dataclasses.replace(config, **length)
  log = (
    (
      lambda step, loss: print(
        f"  {spec.name} step {step} loss {loss:.4f}", file=sys.stderr, flush=True
      )
    )
    if verbose
    else None
  )
  summary, final, preds = train(config, dataset, variables, normalizer, log)
  summary = {"run": spec.name, "method": spec.method, **summary, "config": config_record(config)}
  if spec.method == "bn" and spec.batch_size == base.reference_batch:
    save_variables(checkpoint_path(out_dir, spec), final)
  n = len(preds)
  write_examples(
    os.path.join(out_dir, "examples", f"{spec.name}.png"),
    dataset.test.images[:n],
    dataset.test.masks[:n],
    preds,
    dataset.class_names,
    f"{spec.name}: test mIoU {100 * summary['test_miou']:.1f}%",
  )
  write_json(path, summary)
  return summary


def write_report(out_dir: str, summaries: Sequence[dict], title: str) -> List[dict]:
  """``table.md`` and ``plot.png`` of the given runs; returns the table rows."""
  rows = aggregate(summaries)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table_markdown(rows, title))
  write_plot(os.path.join(out_dir, "plot.png"), rows, summaries)
  return rows


# --------------------------------------------------------------------------
# Command line.


def _ints(text: str) -> List[int]:
  return [int(t) for t in str(text).split(",") if t.strip()]


def _names(text: str) -> List[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="seg_quick", choices=PRESETS)
  p.add_argument(
    "--norms",
    default="bn,mabn",
    help=f"registry names, comma-separated: {','.join(mj.normalizer_names())}",
  )
  p.add_argument("--batch_size", default="2", help="SGD batch(es) per step, e.g. 2 or 2,4")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--out_dir", default=DEFAULT_OUT_DIR)
  p.add_argument(
    "--no_reference",
    action="store_true",
    help="skip BN at --reference_batch (kept with --finetune unless --pretrained)",
  )
  p.add_argument(
    "--finetune",
    action="store_true",
    help="also fine-tune the BN reference model at each batch (ft_mabn, ft_bn)",
  )
  p.add_argument(
    "--finetune_methods",
    default=",".join(FINETUNE_METHODS),
    help="which fine-tune runs --finetune adds",
  )
  p.add_argument(
    "--pretrained",
    default=None,
    help="BN variables for --finetune: a .msgpack file or a directory of "
    "bn_b<ref>_s<seed>.msgpack (default: the reference runs' checkpoints)",
  )
  p.add_argument(
    "--finetune_epochs", type=float, default=None, help="default: half the preset's epochs"
  )
  p.add_argument(
    "--finetune_lr",
    type=float,
    default=None,
    help="at the reference batch (default: a fifth of --lr)",
  )
  p.add_argument(
    "--mabn_kwargs",
    default="{}",
    help="MABN options of ft_mabn, a JSON object, e.g. '{\"buffer_size\": 8}'",
  )
  p.add_argument(
    "--norm_kwargs",
    default="{}",
    help="normalizer options per registry name, a JSON object, e.g. "
    '\'{"mabn": {"warmup_steps": 50}, "gn": {"num_groups": 4}}\'',
  )
  p.add_argument("--verbose", action="store_true", help="log the training loss to stderr")
  for field in (
    "dataset",
    "data_dir",
    "tarball",
    "cache_dir",
    "pet_mapping",
    "optimizer",
    "background",
  ):
    p.add_argument(f"--{field}", default=None)
  for field in (
    "canvas_size",
    "num_train",
    "num_val",
    "num_test",
    "val_images",
    "data_seed",
    "image_size",
    "norm_batch_size",
    "reference_batch",
    "steps",
    "gn_groups",
    "eval_batch_size",
    "log_every",
    "num_examples",
  ):
    p.add_argument(f"--{field}", type=int, default=None)
  for field in ("lr", "momentum", "weight_decay", "epochs", "warmup_epochs"):
    p.add_argument(f"--{field}", type=float, default=None)
  p.add_argument("--objects", default=None, help="min,max images per canvas, e.g. 2,4")
  p.add_argument("--widths", default=None, help="U-Net widths, finest first, e.g. 16,32,64,128")
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
  """The preset with every given flag applied."""
  overrides = {}
  for field in dataclasses.fields(Config):
    value = getattr(args, field.name, None)
    if value is None or field.name in ("batch_size", "norm_kwargs", "preset"):
      continue
    if field.name in ("objects", "widths"):
      value = tuple(_ints(value))
    elif field.name == "background" and value != "random":
      value = int(value)
    overrides[field.name] = value
  return preset(args.preset, **overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  base = config_from_args(args)
  norms = _names(args.norms)
  for norm in norms:
    if norm not in mj.normalizer_names():
      raise SystemExit(f"unknown normalizer {norm!r}; valid: {', '.join(mj.normalizer_names())}")
  for method in _names(args.finetune_methods):
    if method not in FINETUNE_METHODS:
      raise SystemExit(f"unknown fine-tune method {method!r}; valid: {', '.join(FINETUNE_METHODS)}")
  specs = plan_runs(
    norms,
    _ints(args.batch_size),
    _ints(args.seeds),
    base.reference_batch,
    reference=not args.no_reference,
    finetune=args.finetune,
    pretrained=bool(args.pretrained),
    finetune_methods=_names(args.finetune_methods),
  )
  dataset = None
  finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else base.epochs / 2
  finetune_lr = args.finetune_lr if args.finetune_lr is not None else base.lr / 5
  summaries = []
  for spec in specs:
    if dataset is None and read_summary(run_path(args.out_dir, spec)) is None:
      dataset = load_data(base)
    summary = run_one(
      spec,
      base,
      dataset,
      args.out_dir,
      args.pretrained,
      finetune_epochs,
      finetune_lr,
      json.loads(args.mabn_kwargs),
      json.loads(args.norm_kwargs),
      args.verbose,
    )
    summaries.append(summary)
    line = {
      k: summary.get(k)
      for k in (
        "run",
        "method",
        "batch_size",
        "seed",
        "steps",
        "test_miou",
        "test_pixel_acc",
        "val_miou",
        "seconds_per_step",
        "train_seconds",
      )
    }
    line["skipped"] = bool(summary.get("skipped"))
    print(json.dumps(line), flush=True)
  title = f"Segmentation, {base.dataset} ({base.preset}): U-Net {list(base.widths)}, test split"
  write_report(args.out_dir, summaries, title)
  return 0


if __name__ == "__main__":
  sys.exit(main())
