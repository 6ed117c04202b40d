"""The reproductions, one command each; results under experiments/results/<name>/.

    # 1. accuracy against normalization batch size (incremental: reruns skip finished runs)
    python -m experiments.sweep batch_size --preset cifar_cpu --norms bn,brn,gn,cbn_naive,cbn,mabn \
        --batch_sizes 2,8,32 --seeds 0,1,2 --name batch_size_cifar_cpu
    # 2. batch-statistics instability (BN b=2, BN b=32, MABN b=2)
    python -m experiments.sweep statistics --preset quick --steps 300 --name statistics_quick
    # 3. MABN ablation at normalization batch 2
    python -m experiments.sweep ablation --preset cifar_cpu --seeds 0 --name ablation_cifar_cpu
    # 4. inference speed (images/s), folded BN and MABN against GN, WS+GN, FRN, LN, IN, none
    python -m experiments.sweep speed --model resnet50 --image_size 224 --batch 32 --name speed_cpu
    # 6. placement: BN/MABN after every conv, the first half, the first one, none (b = 2, 32)
    python -m experiments.sweep placement --preset cifar_cpu --seeds 0,1 --name placement_cifar_cpu

``--norm_kwargs`` apply to the MABN runs only (GN and WS+GN take ``--gn_groups``).
Every registry name is a valid ``--norms`` entry (e.g. ``ws_gn``, ``frn``:
weight-standardized GroupNorm, filter response normalization).
Each training run writes its own ``runs/<run>/summary.json``; a rerun skips
runs that have one and resumes runs that were interrupted. Every command
(re)writes ``table.md``, ``plot.png`` and ``results.json`` from whatever has
finished, so partial results can be committed at any time.

The code lives in :mod:`experiments.sweeps` (plan, aggregate, report and a
module per sweep with its own measurements); this module is the entry point
and keeps their names importable as ``experiments.sweep.<name>``.
"""

import sys

from experiments.sweeps.aggregate import (
  MIN_GAP,
  RECIPE_COLUMNS,
  _mean_curve,
  gap_closed,
  paired_differences,
  steps_to_loss,
)
from experiments.sweeps.cli import (
  COMMANDS,
  ablation,
  batch_size_sweep,
  main,
  placement,
  recipe_sweep,
)
from experiments.sweeps.plan import (
  ABLATION,
  BATCH_SIZES,
  PLACEMENT_BATCH_SIZES,
  PLACEMENT_NORMS,
  PLACEMENTS,
  RESULTS_ROOT,
  SWEEP_NORMS,
  _same_run,
  copy_finished_twin,
  run_or_load,
  run_plan,
)
from experiments.sweeps.recipes_report import DIAGNOSTICS, _recipes_against_bn
from experiments.sweeps.report import _cell, _steps_cell
from experiments.sweeps.speed import inference_speed
from experiments.sweeps.statistics import statistics

__all__ = [
  "MIN_GAP",
  "RECIPE_COLUMNS",
  "_mean_curve",
  "gap_closed",
  "paired_differences",
  "steps_to_loss",
  "COMMANDS",
  "ablation",
  "batch_size_sweep",
  "main",
  "placement",
  "recipe_sweep",
  "ABLATION",
  "BATCH_SIZES",
  "PLACEMENT_BATCH_SIZES",
  "PLACEMENT_NORMS",
  "PLACEMENTS",
  "RESULTS_ROOT",
  "SWEEP_NORMS",
  "_same_run",
  "copy_finished_twin",
  "run_or_load",
  "run_plan",
  "DIAGNOSTICS",
  "_recipes_against_bn",
  "_cell",
  "_steps_cell",
  "inference_speed",
  "statistics",
]

if __name__ == "__main__":
  sys.exit(main())
