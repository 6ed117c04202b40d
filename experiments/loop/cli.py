"""The command line of single runs of either task (``python -m experiments.train``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments.loop.config import Config
from experiments.loop.hooks import NO_HOOKS, Hooks
from experiments.loop.loop import train
from experiments.loop.presets import PRESETS, preset
from experiments.loop.task import get_task
from experiments.tasks.main_job import MAIN_JOB, MAIN_JOB_SEEDS, main_job_table, plot_main_job


def _parse_value(text: str):
  """A Python literal, or the text itself."""
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
  """One ``--<field>`` string flag per :class:`Config` field not in ``skip``."""
  for f in dataclasses.fields(Config):
    if f.name in skip:
      continue
    parser.add_argument(
      f"--{f.name}", default=None, type=str, help=f"(default from the preset; Config.{f.name})"
    )


def overrides_from_args(args, skip=("preset", "norm")) -> Dict[str, Any]:
  """The :class:`Config` fields given on the command line, parsed to their
  types (``skip``: the fields whose flags :func:`add_config_arguments` left
  to the command itself)."""
  out = {}
  for f in dataclasses.fields(Config):
    value = getattr(args, f.name, None)
    if value is None or f.name in skip:
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


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The arguments of ``python -m experiments.train``."""
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
  return parser.parse_args(argv)


def planned_runs(args, base: Config, main_job: bool) -> List[Tuple[str, Any, int]]:
  """``(norm, norm_batch_size, seed)`` of every run of the command."""
  if main_job:
    return [(norm, b, seed) for seed in MAIN_JOB_SEEDS for norm, b in MAIN_JOB]
  return [
    (norm, base.norm_batch_size, base.seed)
    for norm in (args.norms.split(",") if args.norms else [base.norm])
  ]


def run_config(base: Config, root: str, run: Tuple[str, Any, int], several: bool) -> Config:
  """One run's config: ``base`` with its normalizer, batch, seed and workdir."""
  norm, b, seed = run
  cfg = dataclasses.replace(base, norm=norm, norm_batch_size=b, seed=seed)
  workdir = os.path.join(root, cfg.run_name()) if several or not base.workdir else base.workdir
  return dataclasses.replace(cfg, workdir=workdir)


def print_results(base: Config, results: Sequence[Dict[str, Any]]) -> None:
  """The table of the runs: the final and best test value of the task's metric, wall time."""
  metric = get_task(base.task).metric
  print(
    f"\n{base.preset}: {base.dataset}, {base.model}, SGD batch {base.device_batch()} per device"
  )
  name = "top-1" if metric == "top1" else metric
  print(f"{'run':<16} {'final ' + name:>11} {'best ' + name:>10} {'wall s':>8}")
  for s in results:
    print(
      f"{s['name']:<16} {s[f'final_test_{metric}']:>11.2f} {s[f'best_test_{metric}']:>10.2f} "
      f"{s['wall_time_s']:>8.1f}"
    )


def write_main_job(results: Sequence[Dict[str, Any]], root: str) -> None:
  """Prints the main job's table; writes its plot and numbers under ``root``."""
  table, numbers = main_job_table(results)
  print("\n" + table)
  os.makedirs(root, exist_ok=True)
  plot_main_job(results, os.path.join(root, "main_job.png"))
  with open(os.path.join(root, "main_job.json"), "w") as f:
    json.dump(numbers, f, indent=1)
  print(f"curves: {os.path.join(root, 'main_job.png')}")


def main(argv: Optional[Sequence[str]] = None, hooks: Hooks = NO_HOOKS) -> int:
  """Runs the command; 0, or 130 when a run was interrupted."""
  args = parse_args(argv)
  overrides = overrides_from_args(args)
  base = preset(args.preset, **overrides)
  main_job = (
    args.preset == "quick" and not args.norms and not {"norm_batch_size", "seed"} & set(overrides)
  )
  runs = planned_runs(args, base, main_job)
  root = base.workdir or os.path.join("experiments", "runs", args.preset)
  dataset = None
  results = []
  for run in runs:
    cfg = run_config(base, root, run, len(runs) > 1)
    if dataset is None:
      dataset = get_task(cfg.task).load_data(cfg)
    s = train(cfg, dataset, hooks)
    results.append(s)
    metric = get_task(cfg.task).metric
    keys = ("name", f"final_test_{metric}", f"best_test_{metric}", "wall_time_s", "finished")
    print(json.dumps({k: s[k] for k in keys}), flush=True)
    if not s["finished"]:
      print(
        f"interrupted at step {s['step']}; rerun with --resume true to continue", file=sys.stderr
      )
      return 130
  print_results(base, results)
  if main_job:
    write_main_job(results, root)
  return 0
