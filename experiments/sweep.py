"""The reproductions, one command each (``python -m experiments.sweep <sweep>``).

The commands, their options and what each writes are in
:mod:`experiments.sweeps.cli`, which holds the code with the other modules
of :mod:`experiments.sweeps` (plan, aggregate, report and a module per sweep
with its own measurements); this module is the entry point and keeps their
names importable as ``experiments.sweep.<name>``.
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
