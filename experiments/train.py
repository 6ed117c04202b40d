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
:func:`experiments.loop.config.resolve_steps`). Data-parallel over the
devices (mesh axis ``'batch'``, ``--parallel``, see
:class:`experiments.loop.parallel.Parallel`): ``jit`` (default) runs
one program over the global batch, so batch statistics are global (SyncBN
for free; ``syncbn`` is ``bn`` and ``--sync_stats`` changes nothing);
``shard_map`` and ``pmap`` keep per-device statistics unless the normalizer
synchronizes them (``syncbn``, or ``--sync_stats`` for any normalizer
accepting ``axis_name``); gradients are averaged in every mode.

Each run writes into its workdir: ``metrics.jsonl`` (train windows and test
evaluations), ``checkpoints/`` (orbax, every ``checkpoint_every`` steps, at
the end and on Ctrl-C) and ``summary.json``. ``--resume`` continues from the
latest checkpoint to exactly the result of an uninterrupted run.

The code lives in :mod:`experiments.loop` (config, presets, optimizer,
parallel modes, checkpoints, metrics, evaluation, hooks, the task
interface, the loop, the command line) and :mod:`experiments.tasks`
(classification, segmentation); ``--preset seg_quick`` or ``seg_cpu`` trains
the segmentation task with the same loop. This module is the entry point
and keeps their names importable as ``experiments.train.<name>``.
"""

import sys

from experiments.loop.checkpoints import (
  check_checkpointable,
  clear_run,
  restore_checkpoint,
  save_checkpoint,
)
from experiments.loop.cli import add_config_arguments, main, overrides_from_args, parse_kwargs
from experiments.loop.config import (
  AXIS,
  BATCH_NORMALIZERS,
  GROUP_NORMALIZERS,
  PARALLEL_MODES,
  STEP_OPTIONS,
  Config,
  first_decay_step,
  resolve_steps,
)
from experiments.loop.evaluation import evaluate, evaluate_splits, precise_bn_evaluation
from experiments.loop.hooks import Hooks
from experiments.loop.loop import make_loaders, open_run, train
from experiments.loop.metrics import (
  Progress,
  RunLog,
  device_info,
  git_commit,
  read_metrics,
  summarize,
  write_metrics,
  write_summary,
)
from experiments.loop.optimizer import learning_rate_schedule, optimizer
from experiments.loop.parallel import (
  Parallel,
  jit_steps,
  pmap_steps,
  put_per_device,
  shard,
  shard_map_steps,
)
from experiments.loop.presets import PRESETS, preset
from experiments.loop.task import Task, get_task
from experiments.tasks.classification import (
  TASK,
  build,
  load_data,
  make_normalizer,
  make_steps,
  step_functions,
)
from experiments.tasks.main_job import MAIN_JOB, MAIN_JOB_SEEDS, main_job_table, plot_main_job

__all__ = [
  "check_checkpointable",
  "clear_run",
  "restore_checkpoint",
  "save_checkpoint",
  "add_config_arguments",
  "main",
  "overrides_from_args",
  "parse_kwargs",
  "AXIS",
  "BATCH_NORMALIZERS",
  "GROUP_NORMALIZERS",
  "PARALLEL_MODES",
  "STEP_OPTIONS",
  "Config",
  "first_decay_step",
  "resolve_steps",
  "Hooks",
  "make_loaders",
  "open_run",
  "train",
  "Progress",
  "RunLog",
  "device_info",
  "git_commit",
  "read_metrics",
  "summarize",
  "write_metrics",
  "write_summary",
  "learning_rate_schedule",
  "optimizer",
  "Parallel",
  "jit_steps",
  "pmap_steps",
  "put_per_device",
  "shard",
  "shard_map_steps",
  "PRESETS",
  "preset",
  "Task",
  "get_task",
  "TASK",
  "build",
  "evaluate",
  "evaluate_splits",
  "load_data",
  "make_normalizer",
  "make_steps",
  "precise_bn_evaluation",
  "step_functions",
  "MAIN_JOB",
  "MAIN_JOB_SEEDS",
  "main_job_table",
  "plot_main_job",
]

if __name__ == "__main__":
  sys.exit(main())
