"""Planning the sweeps: their runs (configs with workdirs), reusing finished
twins, training what is missing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments.common import ints
from experiments.loop.config import BATCH_NORMALIZERS, Config
from experiments.loop.loop import train as train_run
from experiments.tasks.classification import load_data

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
SWEEP_NORMS = ("bn", "brn", "gn", "cbn_naive", "cbn", "mabn")
BATCH_SIZES = (2, 4, 8, 16, 32)


def _load_summary(workdir: str) -> Optional[Dict[str, Any]]:
  """The summary of a finished run in ``workdir``, else ``None``."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    s = json.load(f)
  return s if s.get("finished") else None


# Config fields that do not change what a run computes.
_BOOKKEEPING = (
  "workdir",
  "progress",
  "resume",
  "stop_after",
  "checkpoint_every",
  "log_every",
  "diagnose",
  "coordinator_address",
  "num_processes",
  "process_id",
)
# Config fields that only add evaluations after training (precise-BN test
# accuracy): two runs differing in them train the same weights and report the
# same test accuracy, so one is the other's twin (the missing evaluation reads
# as absent). So does ``val_split`` when a ``train_subset`` is set: the
# validation images then come from outside the (unchanged) training subset.
_EVALUATION_ONLY = ("precise_bn_batches",)


def _same_run(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
  """Whether two config dicts describe the same training run."""

  def canonical(c):
    # Fields added after a run was made have their default in it.
    c = {**dataclasses.asdict(Config()), **c}
    ignored = _BOOKKEEPING + _EVALUATION_ONLY + (("val_split",) if c.get("train_subset") else ())
    c = json.loads(json.dumps({k: v for k, v in c.items() if k not in ignored}))
    device_batch = Config(
      **{k: v for k, v in c.items() if k in Config.__dataclass_fields__}
    ).device_batch()
    if c.get("norm_batch_size") is None:  # None means the device batch
      c["norm_batch_size"] = device_batch
    if c["norm_batch_size"] == device_batch and c.get("norm_kwargs"):
      # With one normalization group a step, CBN's history per group is its
      # ordinary history (tests/test_cross_iteration.py).
      c["norm_kwargs"] = {
        k: v
        for k, v in c["norm_kwargs"].items()
        if not (k == "group_history" and c.get("norm") in ("cbn", "cbn_naive"))
      }
    return c

  return canonical(a) == canonical(b)


def copy_finished_twin(config: Config, search_dirs: Sequence[str]) -> bool:
  """Copies a finished run with the same config from ``<dir>/runs/*`` into
  ``config.workdir`` (so that a reproduction's runs stay in its own folder);
  returns whether one was found."""
  wanted = dataclasses.asdict(config)
  for root in search_dirs:
    runs = os.path.join(root, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
      done = _load_summary(os.path.join(runs, name))
      if done is not None and _same_run(done["config"], wanted):
        shutil.copytree(os.path.join(runs, name), config.workdir, dirs_exist_ok=True)
        print(f"copied {config.workdir} from {os.path.join(runs, name)} (same config)", flush=True)
        return True
  return False


def run_or_load(
  config: Config, dataset_cache: Dict[str, Any], reuse_from: Sequence[str] = ()
) -> Dict[str, Any]:
  """The run's summary: loaded if it finished before (here, or as an identical
  run under one of the ``reuse_from`` result folders), else trained (resuming)."""
  done = _load_summary(config.workdir)
  if done is None and reuse_from and copy_finished_twin(config, reuse_from):
    done = _load_summary(config.workdir)
  if done is not None:
    print(f"skip {config.workdir} (finished)", flush=True)
    return done
  key = (config.dataset, config.train_subset, config.val_split)
  if key not in dataset_cache:
    dataset_cache[key] = load_data(config)
  s = train_run(dataclasses.replace(config, resume=True), dataset_cache[key])
  if not s["finished"]:
    raise KeyboardInterrupt
  # A finished run is summarized; its checkpoints are not results.
  shutil.rmtree(os.path.join(config.workdir, "checkpoints"), ignore_errors=True)
  s.pop("variables", None)
  s.pop("model", None)
  return s


def run_plan(plan: List[Config], args, what: str) -> List[Optional[Dict[str, Any]]]:
  """Trains the unfinished runs of ``plan`` (none with ``--dry_run``).

  Returns every run's summary, ``None`` for runs not finished, reading them
  from disk so that runs finished by other invocations count too. An
  interrupt stops training and keeps what has finished.
  """
  cache: Dict[str, Any] = {}
  try:
    for cfg in [] if args.dry_run else plan:
      run_or_load(cfg, cache, _reuse_dirs(args))
  except KeyboardInterrupt:
    print(f"{what} interrupted; writing the finished runs", file=sys.stderr)
  return [_load_summary(cfg.workdir) for cfg in plan]


def _reuse_dirs(args) -> List[str]:
  """The result folders of ``--reuse``."""
  return [os.path.join(args.results_root, n) for n in (args.reuse or "").split(",") if n]


def with_workdir(config: Config, out_dir: str, name: Optional[str] = None) -> Config:
  """``config`` with its workdir ``<out_dir>/runs/<name>`` (default its run name)."""
  workdir = os.path.join(out_dir, "runs", name or config.run_name())
  return dataclasses.replace(config, workdir=workdir)


def mabn_options(base: Config, norm: str, extra: Optional[Dict[str, Any]] = None):
  """The normalizer options of a run: ``--norm_kwargs`` (and ``extra``) for MABN only."""
  return {**base.norm_kwargs, **(extra or {})} if norm == "mabn" else {}


def check_divides(batch: int, sizes: Sequence[int]) -> None:
  """Raises unless every normalization batch divides the SGD ``batch``."""
  for b in sizes:
    if b is not None and batch % b:
      raise ValueError(f"normalization batch {b} does not divide the SGD batch {batch}")


def batch_size_plan(base: Config, out_dir: str, norms, sizes, seeds) -> List[Config]:
  """Every normalizer at every normalization batch (batch-independent ones
  once) for every seed; seeds outermost, so a stopped sweep has every method
  at least once."""
  plan = []
  for seed in seeds:
    for norm in norms:
      batches = sizes if norm in BATCH_NORMALIZERS else [None]
      check_divides(base.batch_size, batches)
      for b in batches:
        cfg = dataclasses.replace(
          base, norm=norm, norm_batch_size=b, seed=seed, norm_kwargs=mabn_options(base, norm)
        )
        plan.append(with_workdir(cfg, out_dir))
  return plan


ABLATION = (
  ("BN, b = SGD batch", "bn", {}, None),
  ("BN", "bn", {}, 2),
  ("MABN (centring + SMA forward and backward + renorm)", "mabn", {}, 2),
  ("MABN without weight centralization", "mabn", {"centered": False}, 2),
  ("MABN without renormalization (r = 1)", "mabn", {"renorm_start": 10**9}, 2),
  ("MABN, only the forward statistic averaged", "mabn", {"average_backward": False}, 2),
  ("MABN, only the backward statistic averaged", "mabn", {"average_forward": False}, 2),
  ("MABN with EMA instead of SMA", "mabn", {"moving_average": "ema"}, 2),
  ("MABN without moving averages (m = 1: batch chi and Psi)", "mabn", {"buffer_size": 1}, 2),
)
"""The ablation's variants: (label, normalizer, normalizer options,
normalization batch: None = SGD batch, 2 = ``--norm_batch_size_ablation``)."""


def ablation_plan(base: Config, out_dir: str, seeds, b_small: int) -> List[Tuple[str, Config]]:
  """``(label, config)`` of every :data:`ABLATION` variant for every seed."""
  plan = []
  for seed in seeds:
    for i, (label, norm, kw, b) in enumerate(ABLATION):
      b = b_small if b == 2 else b
      cfg = dataclasses.replace(
        base, norm=norm, norm_batch_size=b, seed=seed, norm_kwargs=mabn_options(base, norm, kw)
      )
      plan.append((label, with_workdir(cfg, out_dir, f"v{i}_{cfg.run_name()}")))
  return plan


def recipe_plan(base: Config, out_dir: str, names, sizes, seeds):
  """``(plan, keys)``: every recipe at every normalization batch (batch-independent
  ones once) for every seed, and each run's ``(recipe, b)``."""
  from experiments import recipes as R

  plan, keys = [], []
  for seed in seeds:
    for name in names:
      for b in sizes if R.get(name).norm in BATCH_NORMALIZERS else [None]:
        cfg = R.config(name, base, b, seed)
        plan.append(with_workdir(cfg, out_dir, R.run_name(name, cfg)))
        keys.append((name, b))
  return plan, keys


PLACEMENTS = ("all", "first_half", "first", "none")
PLACEMENT_NORMS = ("bn", "mabn")
PLACEMENT_BATCH_SIZES = (2, 32)


def placement_none_sizes(base: Config, sizes: Sequence[int]) -> List[Optional[int]]:
  """The batches of the 'none' placement: without normalization b changes
  nothing, unless it is the SGD batch (``--small_batch``)."""
  return list(sizes) if base.small_batch else [None]


def placement_plan(base: Config, out_dir: str, norms, sizes, seeds):
  """``(plan, keys)``: every normalizer at every placement but 'none' and
  batch, and the 'none' normalizer, for every seed (seeds outermost: a
  stopped sweep has every cell at least once); keys ``(norm, placement, b)``."""
  check_divides(base.batch_size, sizes)
  plan, keys = [], []
  for seed in seeds:
    for norm in norms:
      for layers in PLACEMENTS[:-1]:
        for b in sizes:
          cfg = dataclasses.replace(
            base,
            norm=norm,
            norm_layers=layers,
            norm_batch_size=b,
            seed=seed,
            norm_kwargs=mabn_options(base, norm),
          )
          plan.append(cfg)
          keys.append((norm, layers, b))
    for b in placement_none_sizes(base, sizes):  # the 'none' placement is the 'none' normalizer
      plan.append(
        dataclasses.replace(
          base, norm="none", norm_layers="all", norm_batch_size=b, seed=seed, norm_kwargs={}
        )
      )
      keys.append(("none", "none", b))
  return [with_workdir(c, out_dir) for c in plan], keys


def sizes_and_seeds(args, default_sizes: Sequence[int]) -> Tuple[List[int], List[int]]:
  """``--batch_sizes`` (default ``default_sizes``) and ``--seeds`` as ints."""
  sizes = ints(args.batch_sizes) if args.batch_sizes else list(default_sizes)
  return sizes, ints(args.seeds)
