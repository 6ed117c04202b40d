"""The configuration of a training run of any task (:class:`Config`) and its step-count options."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from experiments import models

# Normalizers whose statistics depend on the batch: they get norm_batch_size.
BATCH_NORMALIZERS = ("bn", "syncbn", "brn", "cbn", "cbn_naive", "mabn")
# Normalizers that are GroupNorm: they get num_groups (``gn_groups``).
GROUP_NORMALIZERS = ("gn", "ws_gn")
AXIS = "batch"

TASKS = ("classification", "segmentation")
"""What a run learns (``Config.task``; see :mod:`experiments.loop.task`)."""

PARALLEL_MODES = ("jit", "shard_map", "pmap")
"""How a step runs on the devices (``Config.parallel``; see
:class:`experiments.loop.parallel.Parallel`)."""


@dataclasses.dataclass
class Config:
  """One training run of either task. ``norm`` is a registry name; see
  :func:`experiments.loop.presets.preset` for the named ones.

  The fields marked *segmentation* are read by that task only (the
  composite canvases, the U-Net's widths, the example predictions).
  """

  preset: str = "quick"
  task: str = "classification"
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
  # Segmentation data: cifar_composite's canvases (the same for every run
  # seed, from data_seed), oxford_iiit_pet's label mapping, random flips.
  canvas_size: int = 40
  num_train: int = 16
  num_val: int = 4
  num_test: int = 8
  objects: Tuple[int, int] = (1, 2)
  background: Any = "random"
  val_images: int = 8
  data_seed: int = 0
  pet_mapping: str = "trimap"
  flip: bool = True
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
  # The U-Net's widths, finest first (segmentation).
  widths: Tuple[int, ...] = (4, 8, 16, 32)
  # Which convs are normalized (models.NORM_LAYERS or 1-based conv numbers
  # '1,3'; cnn2/cnn6 only); the others are biased convs without normalization.
  norm_layers: str = "all"
  # Optimization. ``lr`` is the rate at ``reference_batch`` (default
  # ``batch_size``), scaled linearly to the SGD batch (see ``peak_lr``).
  optimizer: str = "sgd"
  epochs: float = 10.0
  steps: int = 0  # > 0: overrides epochs
  lr: float = 0.05
  reference_batch: Optional[int] = None
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
  eval_every: int = 1  # epochs; 0: at the end only
  eval_batch_size: Optional[int] = None  # None: the training batch
  log_every: int = 20
  num_examples: int = 4  # example predictions kept (segmentation)
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
    """The SGD batch per device: ``norm_batch_size`` with ``small_batch``, else ``batch_size``."""
    return self.norm_batch_size if self.small_batch else self.batch_size

  def peak_lr(self) -> float:
    """``lr``, scaled linearly from ``reference_batch`` (default
    ``batch_size``) to the SGD batch :meth:`device_batch`: with
    ``small_batch`` ``lr * b / batch_size`` (the same epochs take
    ``batch_size / b`` times more steps of a ``b / batch_size`` smaller
    gradient step); ``lr`` when the two batches are equal."""
    reference = self.reference_batch or self.batch_size
    if self.device_batch() == reference:
      return self.lr
    return self.lr * self.device_batch() / reference

  def total_steps(self, steps_per_epoch: int) -> int:
    """``steps`` if set, else ``round(epochs * steps_per_epoch)`` (at least 1)."""
    if self.steps > 0:
      return self.steps
    return max(1, int(round(self.epochs * steps_per_epoch)))

  def validate(self):
    """Raises ``ValueError`` for inconsistent fields."""
    if self.small_batch and not self.norm_batch_size:
      raise ValueError("--small_batch needs --norm_batch_size (the SGD batch becomes b)")
    b, B = self.norm_batch_size, self.device_batch()
    if b is not None and (b <= 0 or B % b):
      raise ValueError(f"norm_batch_size b={b} must divide the per-device batch B={B}")
    if self.task not in TASKS:
      raise ValueError(f"task {self.task!r}: expected one of {TASKS}")
    if self.optimizer not in ("sgd", "adamw"):
      raise ValueError(f"optimizer {self.optimizer!r}: expected sgd or adamw")
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
    """``<norm>_b<b>_s<seed>`` (and the normalized layers if not all)."""
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
