"""Small-batch semantic segmentation with every registry normalizer.

    python -m experiments.segmentation --preset seg_quick               # seconds
    python -m experiments.segmentation --preset seg_cpu --norms bn,brn,gn,mabn,cbn \\
        --batch_size 2 --seeds 0,1 --finetune                          # 2 CPU cores

A :class:`~experiments.tasks.segmentation.models.UNet` is trained with pixel-wise
softmax cross-entropy (pixels labelled ``IGNORE`` excluded) on the CIFAR-10
composites or Oxford-IIIT Pet (:mod:`experiments.tasks.segmentation.data`).

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
:mod:`experiments.tasks.segmentation.metrics`.

Each run is trained by the loop every task shares
(:func:`experiments.loop.loop.train`, one
:class:`~experiments.loop.config.Config`; presets ``seg_quick`` and
``seg_cpu`` in :mod:`experiments.loop.presets`), so
``python -m experiments.train --preset seg_quick --norm mabn`` trains one
run with the classification command line too. The task lives in
:mod:`experiments.tasks.segmentation` (data, models, metrics, the task,
training, runs, report, the command line); this module is the entry point
and keeps their names importable as ``experiments.segmentation.<name>``.
"""

import sys

from experiments.loop.config import Config
from experiments.loop.optimizer import learning_rate_schedule, optimizer
from experiments.loop.presets import PRESET_FIELDS, preset
from experiments.tasks.segmentation.cli import PRESETS, config_from_args, main, parse_args
from experiments.tasks.segmentation.runs import (
  DEFAULT_OUT_DIR,
  FINETUNE_METHODS,
  RunSpec,
  check_same_run,
  checkpoint_path,
  config_record,
  finetune_start,
  plan_runs,
  pretrained_variables,
  read_summary,
  run_one,
  run_path,
  write_json,
  write_report,
)
from experiments.tasks.segmentation.task import (
  TASK,
  SegLoader,
  load_data,
  pixel_cross_entropy,
  run_normalizer,
  split_metrics,
  step_functions,
)
from experiments.tasks.segmentation.training import (
  load_variables,
  predict,
  save_variables,
  to_host,
  train,
)

__all__ = [
  "Config",
  "learning_rate_schedule",
  "optimizer",
  "PRESET_FIELDS",
  "preset",
  "PRESETS",
  "config_from_args",
  "main",
  "parse_args",
  "DEFAULT_OUT_DIR",
  "FINETUNE_METHODS",
  "RunSpec",
  "check_same_run",
  "checkpoint_path",
  "config_record",
  "finetune_start",
  "plan_runs",
  "pretrained_variables",
  "read_summary",
  "run_one",
  "run_path",
  "write_json",
  "write_report",
  "TASK",
  "SegLoader",
  "load_data",
  "pixel_cross_entropy",
  "run_normalizer",
  "split_metrics",
  "step_functions",
  "load_variables",
  "predict",
  "save_variables",
  "to_host",
  "train",
]

if __name__ == "__main__":
  sys.exit(main())
