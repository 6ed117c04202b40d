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
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

from experiments.common import ints
from experiments.loop.cli import add_config_arguments, overrides_from_args
from experiments.loop.config import BATCH_NORMALIZERS, Config
from experiments.loop.presets import preset, task_presets
from experiments.sweeps import aggregate as A
from experiments.sweeps import placement_report, recipes_report
from experiments.sweeps import plan as P
from experiments.sweeps import report as Rep
from experiments.sweeps.speed import inference_speed
from experiments.sweeps.statistics import statistics


def batch_size_sweep(args, base: Config) -> Dict[str, Any]:
  """1. Final test top-1 of ``--norms`` against the normalization batch."""
  out_dir = os.path.join(args.results_root, args.name)
  norms = args.norms.split(",") if args.norms else list(P.SWEEP_NORMS)
  sizes, seeds = P.sizes_and_seeds(args, P.BATCH_SIZES)
  plan = P.batch_size_plan(base, out_dir, norms, sizes, seeds)
  summaries = {
    cfg.run_name(): s
    for cfg, s in zip(plan, P.run_plan(plan, args, "sweep"), strict=True)
    if s is not None
  }
  results = A.batch_size_results(summaries, norms, sizes, seeds, base.batch_size, BATCH_NORMALIZERS)
  Rep._write(out_dir, Rep.batch_size_table(args, base, results, norms, sizes), results)
  Rep._plot_against_batch(
    out_dir,
    {norm: [results[f"{norm}/{b}"]["final"] for b in sizes] for norm in norms},
    sizes,
    {norm for norm in norms if norm not in BATCH_NORMALIZERS},
    f"{base.model} on {base.dataset}, SGD batch {base.batch_size}",
  )
  return results


def ablation(args, base: Config) -> Dict[str, Any]:
  """3. The MABN ablation (:data:`experiments.sweeps.plan.ABLATION`) at a small batch."""
  out_dir = os.path.join(args.results_root, args.name)
  b_small = int(args.norm_batch_size_ablation)
  plan = P.ablation_plan(base, out_dir, ints(args.seeds), b_small)
  results = {}
  for (label, _), s in zip(
    plan, P.run_plan([cfg for _, cfg in plan], args, "ablation"), strict=True
  ):
    if s is not None:
      results.setdefault(label, []).append(s["final_test_top1"])
  labels = [label for label, *_ in P.ABLATION]
  table = Rep.ablation_table(args, base, b_small, labels, results)
  Rep._write(out_dir, table, {k: {"final": v} for k, v in results.items()})
  Rep.plot_ablation(out_dir, labels, results)
  return results


def recipe_sweep(args, base: Config) -> Dict[str, Any]:
  """Every recipe of ``--recipes`` at every ``--batch_sizes`` and seed.

  The table has one row per (recipe, b): validation top-1 (what recipes are
  chosen by), test top-1 (evaluated once, at the end), test top-1 after
  precise BN (``--precise_bn_batches``) and the train loss of the last
  logged windows. Runs trained with ``--diagnose true`` add
  ``diagnostics.png``: per-layer kernel norm, gradient-kernel cosine and
  ``|mu|/sigma`` over training (seed 0 of each row).
  """
  from experiments import recipes as R

  out_dir = os.path.join(args.results_root, args.name)
  names = args.recipes.split(",") if args.recipes else list(R.recipe_names())
  sizes, seeds = P.sizes_and_seeds(args, [base.batch_size])
  plan, keys = P.recipe_plan(base, out_dir, names, sizes, seeds)
  rows = A.group_runs(keys, P.run_plan(plan, args, "recipes"))
  results, table = recipes_report.recipe_table(args, base, rows)
  table += recipes_report._recipes_against_batch(out_dir, names, sizes, rows, base)
  table += recipes_report._recipes_against_bn(names, sizes, rows)
  table += "\nRecipes:\n\n" + "".join(f"- `{n}`: {R.get(n).description}\n" for n in names)
  first_runs = {
    (n, b or base.batch_size): A._run_dir(runs[0]) for (n, b), runs in rows.items() if runs
  }
  table += recipes_report._diagnostics_table(
    out_dir, {f"{n} | {b}": run for (n, b), run in first_runs.items()}
  )
  Rep._write(out_dir, table, results)
  recipes_report._plot_diagnostics(
    out_dir, {f"{n} b={b}": run for (n, b), run in first_runs.items()}
  )
  return results


def placement(args, base: Config) -> Dict[str, Any]:
  """``--norms`` (default BN, MABN) after every conv, only the first half of
  the convs, only the first one, and none (one normalizer-independent row), at
  each ``--batch_sizes`` normalization batch (default 2 and 32) and seed.

  ``table.md``: final test top-1 and the steps to reach a train loss of
  ``--loss_threshold`` (the first logged window at or below it); ``plot.png``:
  the train-loss curves (mean over seeds), one panel per normalizer and b.
  """
  out_dir = os.path.join(args.results_root, args.name)
  norms = args.norms.split(",") if args.norms else list(P.PLACEMENT_NORMS)
  sizes, seeds = P.sizes_and_seeds(args, P.PLACEMENT_BATCH_SIZES)
  threshold = float(args.loss_threshold)
  plan, keys = P.placement_plan(base, out_dir, norms, sizes, seeds)
  rows = A.group_runs(keys, P.run_plan(plan, args, "placement"))
  cells = A.placement_cells(rows, threshold)
  results = {"loss_threshold": threshold, "cells": cells}
  table = placement_report.placement_table(args, base, rows, cells, norms, sizes, threshold)
  Rep._write(out_dir, table, results)
  placement_report.plot_placement(out_dir, rows, base, norms, sizes, threshold)
  return results


COMMANDS = {
  "batch_size": batch_size_sweep,
  "ablation": ablation,
  "speed": inference_speed,
  "statistics": statistics,
  "recipes": recipe_sweep,
  "placement": placement,
}


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of the sweeps (the :class:`Config` fields come after them)."""
  parser.add_argument("command", choices=sorted(COMMANDS))
  parser.add_argument("--preset", default="quick", choices=task_presets("classification"))
  parser.add_argument("--name", default=None, help="results/<name> (default: command_preset)")
  parser.add_argument("--results_root", default=P.RESULTS_ROOT)
  parser.add_argument("--norms", default=None)
  parser.add_argument("--batch_sizes", default=None)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--norm_batch_size_ablation", default="2")
  parser.add_argument(
    "--recipes", default=None, help="recipes: comma-separated names of experiments/recipes.py"
  )
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument(
    "--reuse",
    default="",
    help="result names (comma-separated) whose finished runs with an "
    "identical config are copied instead of retrained",
  )
  parser.add_argument(
    "--loss_threshold",
    type=float,
    default=1.2,
    help="placement: the train loss whose first crossing is counted in steps",
  )
  parser.add_argument("--steps", type=int, default=300, help="statistics: training steps")
  parser.add_argument(
    "--no_record",
    action="store_true",
    help="statistics: train without the recorder (loss curve only)",
  )
  parser.add_argument("--channels", type=int, default=8, help="statistics: channels recorded")
  parser.add_argument("--batch", type=int, default=32, help="speed: batch size")
  parser.add_argument("--iters", type=int, default=10, help="speed: batches per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--num_classes", type=int, default=10, help="speed: classifier size")


OWN_FLAGS = ("preset", "norm", "image_size", "steps")
"""Config fields whose flags are the sweep's own: ``--steps`` (statistics)
and ``--image_size`` (speed) mean something else here."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The arguments of ``python -m experiments.sweep`` (``args.argv``: ``argv``)."""
  parser = argparse.ArgumentParser(
    prog="python -m experiments.sweep",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  add_sweep_arguments(parser)
  add_config_arguments(parser, skip=OWN_FLAGS)
  parser.add_argument("--image_size", type=int, default=32, help="speed: input side")
  args = parser.parse_args(argv)
  args.argv = argv
  args.name = args.name or f"{args.command}_{args.preset}"
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one sweep command."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  overrides = overrides_from_args(args, skip=OWN_FLAGS)
  overrides.setdefault("progress", False)
  base = preset(args.preset, **overrides)
  COMMANDS[args.command](args, base)
  return 0
