"""The command line of the segmentation sweep (``python -m experiments.segmentation``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Optional, Sequence

import mabn_jax as mj
from experiments.common import ints, names
from experiments.loop.config import Config
from experiments.loop.presets import preset, task_presets
from experiments.tasks.segmentation.runs import (
  ALL_FINETUNE_METHODS,
  DEFAULT_OUT_DIR,
  FINETUNE_METHODS,
  plan_runs,
  read_summary,
  run_one,
  run_path,
  write_report,
)
from experiments.tasks.segmentation.task import load_data

DESCRIPTION = "Small-batch semantic segmentation with every registry normalizer."
PRESETS = task_presets("segmentation")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
  """The sweep's own flags: which runs, where, fine-tuning, normalizer options."""
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
    help=f"which fine-tune runs --finetune adds (of {', '.join(ALL_FINETUNE_METHODS)})",
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
  p.add_argument(
    "--verbose", action="store_true", help="show each run's progress and training loss on stderr"
  )


def add_config_arguments(p: argparse.ArgumentParser) -> None:
  """One flag per :class:`Config` field the command line sets (default: the preset's)."""
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """The arguments of ``python -m experiments.segmentation``."""
  p = argparse.ArgumentParser(
    description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  add_sweep_arguments(p)
  add_config_arguments(p)
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
  """The preset with every given flag applied."""
  overrides = {}
  for field in dataclasses.fields(Config):
    value = getattr(args, field.name, None)
    if value is None or field.name in ("batch_size", "norm_kwargs", "preset"):
      continue
    if field.name in ("objects", "widths"):
      value = tuple(ints(value))
    elif field.name == "background" and value != "random":
      value = int(value)
    overrides[field.name] = value
  return preset(args.preset, **overrides)


def check_names(args: argparse.Namespace) -> None:
  """Exits naming any unknown normalizer or fine-tune method."""
  for norm in names(args.norms):
    if norm not in mj.normalizer_names():
      raise SystemExit(f"unknown normalizer {norm!r}; valid: {', '.join(mj.normalizer_names())}")
  for method in names(args.finetune_methods):
    if method not in ALL_FINETUNE_METHODS:
      valid = ", ".join(ALL_FINETUNE_METHODS)
      raise SystemExit(f"unknown fine-tune method {method!r}; valid: {valid}")


SUMMARY_KEYS = (
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
"""What the line printed per run holds (and ``skipped``)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs (or reads back) every planned run, then writes the report."""
  args = parse_args(argv)
  base = config_from_args(args)
  check_names(args)
  specs = plan_runs(
    names(args.norms),
    ints(args.batch_size),
    ints(args.seeds),
    base.reference_batch,
    reference=not args.no_reference,
    finetune=args.finetune,
    pretrained=bool(args.pretrained),
    finetune_methods=names(args.finetune_methods),
  )
  dataset = None
  finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else base.epochs / 2
  finetune_lr = args.finetune_lr if args.finetune_lr is not None else base.lr / 5
  options = (json.loads(args.mabn_kwargs), json.loads(args.norm_kwargs), args.verbose)
  summaries = []
  for spec in specs:
    if dataset is None and read_summary(run_path(args.out_dir, spec)) is None:
      dataset = load_data(base)
    summary = run_one(
      spec, base, dataset, args.out_dir, args.pretrained, finetune_epochs, finetune_lr, *options
    )
    summaries.append(summary)
    line = {k: summary.get(k) for k in SUMMARY_KEYS}
    line["skipped"] = bool(summary.get("skipped"))
    print(json.dumps(line), flush=True)
  title = f"Segmentation, {base.dataset} ({base.preset}): U-Net {list(base.widths)}, test split"
  write_report(args.out_dir, summaries, title)
  return 0
