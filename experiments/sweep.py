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
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from experiments import data as data_lib
from experiments import train as T

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SWEEP_NORMS = ("bn", "brn", "gn", "cbn_naive", "cbn", "mabn")
BATCH_SIZES = (2, 4, 8, 16, 32)


def _ints(text: str) -> List[int]:
  return [int(v) for v in text.split(",") if v]


def _load_summary(workdir: str) -> Optional[Dict[str, Any]]:
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
    c = {**dataclasses.asdict(T.Config()), **c}
    ignored = _BOOKKEEPING + _EVALUATION_ONLY + (("val_split",) if c.get("train_subset") else ())
    c = json.loads(json.dumps({k: v for k, v in c.items() if k not in ignored}))
    device_batch = T.Config(
      **{k: v for k, v in c.items() if k in T.Config.__dataclass_fields__}
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


def copy_finished_twin(config: T.Config, search_dirs: Sequence[str]) -> bool:
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
  config: T.Config, dataset_cache: Dict[str, Any], reuse_from: Sequence[str] = ()
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
    dataset_cache[key] = T.load_data(config)
  s = T.train(dataclasses.replace(config, resume=True), dataset_cache[key])
  if not s["finished"]:
    raise KeyboardInterrupt
  # A finished run is summarized; its checkpoints are not results.
  shutil.rmtree(os.path.join(config.workdir, "checkpoints"), ignore_errors=True)
  s.pop("variables", None)
  return s


def run_plan(plan: List[T.Config], args, what: str) -> List[Optional[Dict[str, Any]]]:
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
  return [os.path.join(args.results_root, n) for n in (args.reuse or "").split(",") if n]


def _mean_std(values: Sequence[float]):
  v = np.asarray([x for x in values if x is not None], np.float64)
  if len(v) == 0:
    return None, None, 0
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _cell(values) -> str:
  mean, std, n = _mean_std(values)
  if mean is None:
    return "—"
  return f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)"


def _machine() -> str:
  import datetime
  import platform

  device = jax.devices()[0]
  return (
    f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on "
    f"{device.platform} ({device.device_kind}); written "
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC."
  )


def _header(args, base: T.Config, what: str) -> str:
  return (
    f"# {what}\n\nCommand: `python -m experiments.sweep {' '.join(args.argv)}`\n\n"
    f"{_machine()}\n\n"
    f"Preset `{base.preset}`: dataset `{base.dataset}` (train subset {base.train_subset}), "
    f"model `{base.model}`, SGD batch {base.device_batch()} per device, "
    f"{base.epochs} epochs, lr {base.lr} ({base.schedule}), "
    f"weight decay {base.weight_decay}. "
    f"Cells: final test top-1 (%), mean ± sample std over seeds (number of seeds).\n\n"
  )


def _write(out_dir: str, table: str, results: Any):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(table, flush=True)


def _plot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save_plot(plt, fig, out_dir: str) -> None:
  """Writes ``fig`` to ``<out_dir>/plot.png`` and closes it."""
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)  # a --dry_run before any run has no directory yet
  fig.savefig(os.path.join(out_dir, "plot.png"), dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------
# 1. Accuracy against normalization batch size.


def batch_size_sweep(args, base: T.Config) -> Dict[str, Any]:
  out_dir = os.path.join(args.results_root, args.name)
  norms = args.norms.split(",") if args.norms else list(SWEEP_NORMS)
  sizes = _ints(args.batch_sizes) if args.batch_sizes else list(BATCH_SIZES)
  seeds = _ints(args.seeds)
  B = base.batch_size
  plan = []
  for seed in seeds:  # seeds outermost: a stopped sweep has every method at least once
    for norm in norms:
      for b in sizes if norm in T.BATCH_NORMALIZERS else [None]:
        if b is not None and B % b:
          raise ValueError(f"normalization batch {b} does not divide the SGD batch {B}")
        cfg = dataclasses.replace(
          base,
          norm=norm,
          norm_batch_size=b,
          seed=seed,
          norm_kwargs=base.norm_kwargs if norm == "mabn" else {},
        )
        plan.append(dataclasses.replace(cfg, workdir=os.path.join(out_dir, "runs", cfg.run_name())))
  summaries = {
    cfg.run_name(): s
    for cfg, s in zip(plan, run_plan(plan, args, "sweep"), strict=True)
    if s is not None
  }

  results = {}
  for norm in norms:
    for b in sizes:
      bb = b if norm in T.BATCH_NORMALIZERS else B
      vals = [
        summaries[n]["final_test_top1"]
        for n in (f"{norm}_b{bb}_s{s}" for s in seeds)
        if n in summaries
      ]
      best = [
        summaries[n]["best_test_top1"]
        for n in (f"{norm}_b{bb}_s{s}" for s in seeds)
        if n in summaries
      ]
      results[f"{norm}/{b}"] = {"norm": norm, "norm_batch_size": b, "final": vals, "best": best}
  table = _header(args, base, "Test top-1 against normalization batch size")
  table += "| method | " + " | ".join(f"b={b}" for b in sizes) + " |\n"
  table += "|---|" + "---|" * len(sizes) + "\n"
  for norm in norms:
    row = [_cell(results[f"{norm}/{b}"]["final"]) for b in sizes]
    if norm not in T.BATCH_NORMALIZERS:
      row = [f"{row[0]} (batch-independent)"] + ["″"] * (len(sizes) - 1)
    table += f"| {norm} | " + " | ".join(row) + " |\n"
  _write(out_dir, table, results)

  _plot_against_batch(
    out_dir,
    {norm: [results[f"{norm}/{b}"]["final"] for b in sizes] for norm in norms},
    sizes,
    {norm for norm in norms if norm not in T.BATCH_NORMALIZERS},
    f"{base.model} on {base.dataset}, SGD batch {B}",
  )
  return results


def _plot_against_batch(
  out_dir: str,
  series: Dict[str, List[List[float]]],
  sizes: Sequence[int],
  flat: Sequence[str],
  title: str,
) -> None:
  """``plot.png``: test top-1 (mean and sample std over seeds) against the
  normalization batch, one line per ``series`` key (its per-size value lists);
  ``flat`` keys (batch-independent methods) are dashed."""
  plt = _plot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, per_size in series.items():
    stats = [_mean_std(values) for values in per_size]
    xs = [b for b, (m, _, _) in zip(sizes, stats, strict=True) if m is not None]
    if not xs:
      continue
    ms = [m for m, _, _ in stats if m is not None]
    ss = [s for m, s, _ in stats if m is not None]
    ax.errorbar(xs, ms, yerr=ss, fmt="--" if label in flat else "-o", capsize=3, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sizes)
  ax.set_xticklabels([str(b) for b in sizes])
  ax.set_xlabel("normalization batch size b")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(title)
  if ax.get_legend_handles_labels()[0]:  # nothing finished yet: an empty plot
    ax.legend(fontsize=8)
  _save_plot(plt, fig, out_dir)


# --------------------------------------------------------------------------
# 3. MABN ablation.

# (label, normalizer, normalizer kwargs, normalization batch: None = SGD batch)
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


def ablation(args, base: T.Config) -> Dict[str, Any]:
  out_dir = os.path.join(args.results_root, args.name)
  seeds = _ints(args.seeds)
  b_small = int(args.norm_batch_size_ablation)
  plan = []
  for seed in seeds:
    for i, (label, norm, kw, b) in enumerate(ABLATION):
      b = b_small if b == 2 else b
      cfg = dataclasses.replace(
        base,
        norm=norm,
        norm_batch_size=b,
        seed=seed,
        norm_kwargs={**base.norm_kwargs, **kw} if norm == "mabn" else {},
      )
      plan.append(
        (
          label,
          dataclasses.replace(cfg, workdir=os.path.join(out_dir, "runs", f"v{i}_{cfg.run_name()}")),
        )
      )
  results = {}
  for (label, _), s in zip(plan, run_plan([cfg for _, cfg in plan], args, "ablation"), strict=True):
    if s is not None:
      results.setdefault(label, []).append(s["final_test_top1"])
  table = _header(args, base, f"MABN ablation at normalization batch {b_small}")
  table += "| variant | test top-1 |\n|---|---|\n"
  for label, *_ in ABLATION:
    table += f"| {label} | {_cell(results.get(label, []))} |\n"
  _write(out_dir, table, {k: {"final": v} for k, v in results.items()})
  plt = _plot()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  labels = [l for l, *_ in ABLATION if results.get(l)]
  ms = [_mean_std(results[l])[0] for l in labels]
  ss = [_mean_std(results[l])[1] for l in labels]
  ax.barh(range(len(labels)), ms, xerr=ss, capsize=3)
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("test top-1 (%)")
  _save_plot(plt, fig, out_dir)
  return results


# --------------------------------------------------------------------------
# 4. Inference speed.


def inference_speed(args, base: T.Config) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp

  import mabn_jax as mj
  from experiments import models

  out_dir = os.path.join(args.results_root, args.name)
  size = args.image_size
  batch = args.batch
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  rows = [
    ("BN (folded)", "bn", True),
    ("MABN (folded)", "mabn", True),
    ("GN", "gn", False),
    ("WS+GN (kernels standardized once)", "ws_gn", True),
    ("FRN", "frn", False),
    ("LN", "ln", False),
    ("IN", "in", False),
    ("none", "none", False),
    ("BN (not folded)", "bn", False),
    ("MABN (not folded)", "mabn", False),
    ("WS+GN (kernels standardized every call)", "ws_gn", False),
  ]
  results = {}
  for label, name, fold in rows:
    groups = {"num_groups": base.gn_groups} if name in T.GROUP_NORMALIZERS else {}
    norm = mj.make_normalizer(name, **groups)
    model = models.build_model(base.model, norm, args.num_classes, base.width)
    variables = model.init(jax.random.PRNGKey(0), x, train=True)
    if fold:  # WS+GN cannot fold; its standardized kernels are precomputed instead
      prepare = mj.precompute_standardized_kernels if name == "ws_gn" else mj.fold
      variables, norm = prepare(variables, norm)
      model = models.build_model(base.model, norm, args.num_classes, base.width)
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    apply = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    jax.block_until_ready(apply(variables, x))
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      for _ in range(args.iters):
        y = apply(variables, x)
      jax.block_until_ready(y)
      times.append(time.perf_counter() - t)
    best = min(times)
    results[label] = {
      "images_per_s": batch * args.iters / best,
      "ms_per_batch": 1000 * best / args.iters,
    }
    print(f"{label:<20} {results[label]['images_per_s']:10.1f} images/s", flush=True)
  dev = T.device_info()
  table = (
    f"# Inference speed\n\nCommand: `python -m experiments.sweep {' '.join(args.argv)}`\n\n"
    f"Model `{base.model}`, batch {batch}, {size}x{size}x3 float32, jit, best of "
    f"{args.repeats} x {args.iters} batches; device {dev['platform']} ({dev['kind']}, "
    f"{dev['cpus']} CPUs). Same network and process for every row.\n\n"
    "| normalizer | images/s | ms/batch | relative to none |\n|---|---|---|---|\n"
  )
  ref = results["none"]["images_per_s"]
  for label, r in results.items():
    table += (
      f"| {label} | {r['images_per_s']:.1f} | {r['ms_per_batch']:.2f} | "
      f"{r['images_per_s'] / ref:.2f} |\n"
    )
  _write(out_dir, table, {"device": dev, "rows": results})
  plt = _plot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.barh(list(results), [r["images_per_s"] for r in results.values()])
  ax.invert_yaxis()
  ax.set_xlabel("images/s")
  ax.set_title(f"{base.model} inference, batch {batch}")
  _save_plot(plt, fig, out_dir)
  return results


# --------------------------------------------------------------------------
# 5. Named recipes (experiments/recipes.py) at several normalization batches.


def _last_loss(summary: Dict[str, Any], window: int = 4) -> Optional[float]:
  curve = summary.get("train_loss_curve") or []
  tail = [loss for _, loss in curve[-window:]]
  return float(np.mean(tail)) if tail else None


RECIPE_COLUMNS = (
  ("val", "final_val_top1"),
  ("test", "final_test_top1"),
  ("test, precise BN", "final_test_top1_precise"),
  ("train loss", None),
)


def recipe_sweep(args, base: T.Config) -> Dict[str, Any]:
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
  sizes = _ints(args.batch_sizes) if args.batch_sizes else [base.batch_size]
  seeds = _ints(args.seeds)
  plan, keys = [], []
  for seed in seeds:
    for name in names:
      for b in sizes if R.get(name).norm in T.BATCH_NORMALIZERS else [None]:
        cfg = R.config(name, base, b, seed)
        plan.append(
          dataclasses.replace(cfg, workdir=os.path.join(out_dir, "runs", R.run_name(name, cfg)))
        )
        keys.append((name, b))
  done = run_plan(plan, args, "recipes")
  rows: Dict[Any, List[Dict[str, Any]]] = {}
  for key, s in zip(keys, done, strict=True):
    rows.setdefault(key, [])
    if s is not None:
      rows[key].append(s)
  results, table = {}, _header(args, base, "Recipes against normalization batch size")
  table += (
    "Validation: "
    + (f"{base.val_split} training images held out" if base.val_split else "none (test only)")
    + ".\n\n"
  )
  table += "| recipe | b | " + " | ".join(c for c, _ in RECIPE_COLUMNS) + " |\n"
  table += "|---|---|" + "---|" * len(RECIPE_COLUMNS) + "\n"
  for (name, b), runs in rows.items():
    values = {
      col: [r.get(field) if field else _last_loss(r) for r in runs] for col, field in RECIPE_COLUMNS
    }
    results[f"{name}/{b}"] = {
      "recipe": name,
      "norm_batch_size": b,
      "runs": [_run_dir(r) for r in runs],
      **values,
    }
    cells = [_cell([v for v in values[c] if v is not None]) for c, _ in RECIPE_COLUMNS]
    table += f"| {name} | {b or base.batch_size} | " + " | ".join(cells) + " |\n"
  table += _recipes_against_batch(out_dir, names, sizes, rows, base)
  table += _recipes_against_bn(names, sizes, rows)
  table += "\nRecipes:\n\n" + "".join(f"- `{n}`: {R.get(n).description}\n" for n in names)
  table += _diagnostics_table(
    out_dir,
    {f"{n} | {b or base.batch_size}": _run_dir(runs[0]) for (n, b), runs in rows.items() if runs},
  )
  _write(out_dir, table, results)
  _plot_diagnostics(
    out_dir,
    {f"{n} b={b or base.batch_size}": _run_dir(runs[0]) for (n, b), runs in rows.items() if runs},
  )
  return results


def _recipes_against_batch(
  out_dir: str,
  names: Sequence[str],
  sizes: Sequence[int],
  rows: Dict[Any, List[Dict[str, Any]]],
  base: T.Config,
) -> str:
  """The test column again as one row per recipe and one column per
  normalization batch (a batch-independent recipe's single run fills its row),
  and ``plot.png`` of it; returns the table."""
  from experiments import recipes as R

  flat = [n for n in names if R.get(n).norm not in T.BATCH_NORMALIZERS]
  series = {
    n: [[r["final_test_top1"] for r in rows[(n, None if n in flat else b)]] for b in sizes]
    for n in names
  }
  table = (
    "\nTest top-1 against normalization batch size:\n\n| recipe | "
    + " | ".join(f"b={b}" for b in sizes)
    + " |\n|---|"
    + "---|" * len(sizes)
    + "\n"
  )
  for n in names:
    cells = [_cell(v) for v in series[n]]
    if n in flat:
      cells = [f"{cells[0]} (batch-independent)"] + ["″"] * (len(sizes) - 1)
    table += f"| {n} | " + " | ".join(cells) + " |\n"
  _plot_against_batch(
    out_dir, series, sizes, flat, f"{base.model} on {base.dataset}, SGD batch {base.device_batch()}"
  )
  return table


def _test_by_seed(runs: Sequence[Dict[str, Any]]) -> Dict[int, float]:
  return {r["config"]["seed"]: r["final_test_top1"] for r in runs}


def paired_differences(
  runs: Sequence[Dict[str, Any]], reference: Sequence[Dict[str, Any]]
) -> List[float]:
  """Test top-1 of ``runs`` minus that of ``reference`` for each seed both have."""
  a, b = _test_by_seed(runs), _test_by_seed(reference)
  return [a[s] - b[s] for s in sorted(set(a) & set(b))]


# A share of BN's gap is not reported when BN's own gap (in the mean over
# seeds) is smaller than this many points: the ratio of two small, noisy
# differences says nothing.
MIN_GAP = 2.0


def gap_closed(
  runs: Sequence[Dict[str, Any]],
  bn_small: Sequence[Dict[str, Any]],
  bn_large: Sequence[Dict[str, Any]],
):
  """The share of BN's large-batch minus small-batch gap that ``runs`` close.

  ``(share, per_seed)``: ``share = (mean(runs) - mean(bn_small)) /
  (mean(bn_large) - mean(bn_small))`` over all their seeds (``None`` if a list
  is empty or BN's gap is under :data:`MIN_GAP` points), and the same ratio
  seed by seed for the seeds all three share (its spread).
  """
  means = [_mean_std([r["final_test_top1"] for r in v])[0] for v in (runs, bn_small, bn_large)]
  if any(m is None for m in means) or means[2] - means[1] < MIN_GAP:
    return None, []
  share = (means[0] - means[1]) / (means[2] - means[1])
  by_seed = [_test_by_seed(v) for v in (runs, bn_small, bn_large)]
  seeds = sorted(set(by_seed[0]) & set(by_seed[1]) & set(by_seed[2]))
  per_seed = [
    (by_seed[0][s] - by_seed[1][s]) / (by_seed[2][s] - by_seed[1][s])
    for s in seeds
    if by_seed[2][s] != by_seed[1][s]
  ]
  return share, per_seed


def _difference_cell(values: Sequence[float]) -> str:
  mean, std, n = _mean_std(values)
  if mean is None:
    return "—"
  return f"{mean:+.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:+.2f} (1)"


def _share_cell(share: Optional[float], per_seed: Sequence[float]) -> str:
  if share is None:
    return "—"
  mean, std, n = _mean_std([100 * v for v in per_seed])
  spread = f"; per seed {mean:.0f} ± {std:.0f}% ({n})" if n > 1 else ""
  return f"{100 * share:.1f}%{spread}"


def _recipes_against_bn(
  names: Sequence[str], sizes: Sequence[int], rows: Dict[Any, List[Dict[str, Any]]]
) -> str:
  """Two tables read against the recipe ``bn`` (empty without it): each
  recipe's test top-1 minus BN's at the same b, paired by seed; and the share
  of BN's gap between the largest b and each smaller b that it closes
  (:func:`gap_closed`; left out when ``sizes`` has one batch size)."""
  from experiments import recipes as R

  if "bn" not in names:
    return ""
  largest = max(sizes)
  runs = {
    (n, b): rows[(n, b if R.get(n).norm in T.BATCH_NORMALIZERS else None)]
    for n in names
    for b in sizes
  }
  others = [n for n in names if n != "bn"]
  header = " | ".join(f"b={b}" for b in sizes)
  table = (
    "\nAgainst BN at the same b: test top-1 minus BN's, seed by seed (mean ± "
    f"sample std over the seeds both have):\n\n| recipe | {header} |\n|---|"
    + "---|" * len(sizes)
    + "\n"
  )
  for n in others:
    table += (
      f"| {n} | "
      + " | ".join(
        _difference_cell(paired_differences(runs[(n, b)], runs[("bn", b)])) for b in sizes
      )
      + " |\n"
    )
  small = [b for b in sizes if b < largest]
  if not small:  # one batch size: there is no gap to close
    return table
  header = " | ".join(f"b={b}" for b in small)
  table += (
    f"\nShare of BN's gap (BN at b={largest} minus BN at b) closed: (recipe - BN(b)) / "
    f"(BN({largest}) - BN(b)) on the means over seeds, then the same ratio seed by seed "
    f"(mean ± std); — where BN's gap is under {MIN_GAP:g} points:\n\n"
    f"| recipe | {header} |\n|---|" + "---|" * len(small) + "\n"
  )
  for n in others:
    table += (
      f"| {n} | "
      + " | ".join(
        _share_cell(*gap_closed(runs[(n, b)], runs[("bn", b)], runs[("bn", largest)]))
        for b in small
      )
      + " |\n"
    )
  return table


DIAGNOSTICS = (
  ("kernel_norm", "kernel norm ||W||"),
  ("grad_cos_channel", "cos(grad, W), channel mean"),
  ("mu_over_sigma", "|mu| / sigma of the conv output"),
)


def _run_dir(summary: Dict[str, Any]) -> str:
  """The folder name of a finished run (under ``<results>/runs/``)."""
  return os.path.basename(os.path.normpath(summary["config"]["workdir"]))


def _diagnostics_table(out_dir: str, runs: Dict[str, str]) -> str:
  """Markdown table of the ``'diag'`` records: per run, the mean over conv
  layers of the kernel norm at the first and the last log, and of
  ``grad_cos_channel`` and ``mu_over_sigma`` over the second half of
  training (where every window is on)."""
  lines = []
  for label, run in runs.items():
    records = [
      r for r in T.read_metrics(os.path.join(out_dir, "runs", run, "metrics.jsonl")) if "diag" in r
    ]
    if not records:
      continue
    half = [r for r in records if r["step"] > records[-1]["step"] / 2]

    def mean(rs, key, fmt):
      values = [d[key] for r in rs for d in r["diag"].values() if key in d]
      return format(float(np.mean(values)), fmt) if values else "—"

    lines.append(
      f"| {label} | {mean(records[:1], 'kernel_norm', '.2f')} | "
      f"{mean(records[-1:], 'kernel_norm', '.2f')} | "
      f"{mean(half, 'grad_cos_channel', '+.4f')} | "
      f"{mean(half, 'mu_over_sigma', '.3f')} |"
    )
  if not lines:
    return ""
  return (
    "\nMechanism (seed 0; means over the conv layers, see diagnostics.png): kernel norm "
    "at the first and the last log; cosine of the kernel gradient with the kernel "
    "(channel mean) and abs(mu)/sigma of the conv output, both averaged over the second "
    "half of training.\n\n| recipe | b | norm of W, first | norm of W, last | cos(g, W) | "
    "mean abs(mu)/sigma |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
  )


def _plot_diagnostics(out_dir: str, runs: Dict[str, str]) -> None:
  """``diagnostics.png`` from the ``'diag'`` records of each run's metrics."""
  curves = {}
  for label, run in runs.items():
    records = T.read_metrics(os.path.join(out_dir, "runs", run, "metrics.jsonl"))
    records = [r for r in records if "diag" in r]
    if records:
      curves[label] = records
  if not curves:
    return
  layers = sorted(next(iter(curves.values()))[0]["diag"])
  shown = [layers[i] for i in sorted({0, len(layers) // 2, len(layers) - 1})]
  plt = _plot()
  fig, axes = plt.subplots(len(DIAGNOSTICS), len(shown), figsize=(4 * len(shown), 8), squeeze=False)
  for i, (key, title) in enumerate(DIAGNOSTICS):
    for j, layer in enumerate(shown):
      ax = axes[i][j]
      for label, records in curves.items():
        pts = [
          (r["step"], r["diag"][layer][key]) for r in records if key in r["diag"].get(layer, {})
        ]
        if pts:
          ax.plot(*zip(*pts, strict=True), label=label, lw=1)
      ax.set_title(f"{layer}: {title}", fontsize=8)
      ax.set_xlabel("step", fontsize=8)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "diagnostics.png"), dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------
# 6. Placement of the normalization: after every conv, the first half, the
# first one, none.

PLACEMENTS = ("all", "first_half", "first", "none")
PLACEMENT_NORMS = ("bn", "mabn")
PLACEMENT_BATCH_SIZES = (2, 32)


def steps_to_loss(curve: Sequence[Sequence[float]], threshold: float) -> Optional[int]:
  """The step of the first logged train-loss window (``[step, loss]`` of a
  summary's ``train_loss_curve``) at or below ``threshold``; ``None`` if none is."""
  for step, loss in curve or ():
    if loss is not None and loss <= threshold:
      return int(step)
  return None


def _steps_cell(values: Sequence[Optional[int]]) -> str:
  """Steps to the threshold over seeds: mean ± sample std over the runs that
  reached it (reached/runs); ``'—'`` if none did."""
  reached = [v for v in values if v is not None]
  if not reached:
    return "—"
  mean, std, n = _mean_std(reached)
  spread = f" ± {std:.0f}" if n > 1 else ""
  return f"{mean:.0f}{spread} ({n}/{len(values)})"


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]):
  """Steps and mean loss over the curves, at the steps every curve logged."""
  steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
  by_step = [dict((s, l) for s, l in c) for c in curves]
  return steps, [float(np.mean([c[s] for c in by_step])) for s in steps]


def placement(args, base: T.Config) -> Dict[str, Any]:
  """``--norms`` (default BN, MABN) after every conv, only the first half of
  the convs, only the first one, and none (one normalizer-independent row), at
  each ``--batch_sizes`` normalization batch (default 2 and 32) and seed.

  ``table.md``: final test top-1 and the steps to reach a train loss of
  ``--loss_threshold`` (the first logged window at or below it); ``plot.png``:
  the train-loss curves (mean over seeds), one panel per normalizer and b.
  """
  from experiments import models

  out_dir = os.path.join(args.results_root, args.name)
  norms = args.norms.split(",") if args.norms else list(PLACEMENT_NORMS)
  sizes = _ints(args.batch_sizes) if args.batch_sizes else list(PLACEMENT_BATCH_SIZES)
  seeds = _ints(args.seeds)
  threshold = float(args.loss_threshold)
  B = base.batch_size
  for b in sizes:
    if B % b:
      raise ValueError(f"normalization batch {b} does not divide the SGD batch {B}")
  # Without normalization b changes nothing, unless it is the SGD batch (--small_batch).
  none_sizes = sizes if base.small_batch else [None]
  plan, keys = [], []
  for seed in seeds:  # seeds outermost: a stopped sweep has every cell at least once
    for norm in norms:
      for layers in PLACEMENTS[:-1]:
        for b in sizes:
          cfg = dataclasses.replace(
            base,
            norm=norm,
            norm_layers=layers,
            norm_batch_size=b,
            seed=seed,
            norm_kwargs=base.norm_kwargs if norm == "mabn" else {},
          )
          plan.append(cfg)
          keys.append((norm, layers, b))
    for b in none_sizes:  # the 'none' placement is the 'none' normalizer
      plan.append(
        dataclasses.replace(
          base, norm="none", norm_layers="all", norm_batch_size=b, seed=seed, norm_kwargs={}
        )
      )
      keys.append(("none", "none", b))
  plan = [dataclasses.replace(c, workdir=os.path.join(out_dir, "runs", c.run_name())) for c in plan]
  rows: Dict[Any, List[Dict[str, Any]]] = {}
  for key, s in zip(keys, run_plan(plan, args, "placement"), strict=True):
    rows.setdefault(key, [])
    if s is not None:
      rows[key].append(s)

  def runs_of(norm, layers, b):
    if layers == "none":
      return rows.get(("none", "none", b if base.small_batch else None), [])
    return rows.get((norm, layers, b), [])

  cells = {}
  for (norm, layers, b), runs in rows.items():
    cells[f"{norm}/{layers}/{b}"] = {
      "norm": norm,
      "placement": layers,
      "norm_batch_size": b,
      "runs": [_run_dir(r) for r in runs],
      "final": [r["final_test_top1"] for r in runs],
      "steps_to_threshold": [steps_to_loss(r.get("train_loss_curve"), threshold) for r in runs],
      "mean_loss_curve": [
        list(p)
        for p in zip(
          *_mean_curve([r["train_loss_curve"] for r in runs if r.get("train_loss_curve")]),
          strict=True,
        )
      ],
    }
  results = {"loss_threshold": threshold, "cells": cells}

  table = _header(args, base, "Placement of the normalization")
  n_convs = 2 if base.model == "cnn2" else 6
  table += (
    f"Placements ({n_convs} convs): `all` every conv, `first_half` convs "
    + ", ".join(str(i + 1) for i in models.normalized_layers("first_half", n_convs))
    + ", `first` conv 1, `none` no normalization (every conv biased, no normalizer: "
    "one run for all normalizers"
    + ("" if base.small_batch else " and normalization batches")
    + "). Steps: the "
    f"first logged train-loss window (every {base.log_every} steps) at or below "
    f"{threshold:g}, mean ± sample std over the seeds that reached it (reached/runs); "
    "— if none did.\n\n"
  )
  table += (
    "| normalizer | placement | "
    + " | ".join(f"b={b} top-1 | b={b} steps to loss ≤ {threshold:g}" for b in sizes)
    + " |\n|---|---|"
    + "---|---|" * len(sizes)
    + "\n"
  )
  for norm in norms:
    for layers in PLACEMENTS[:-1]:
      row = []
      for b in sizes:
        runs = rows.get((norm, layers, b), [])
        row += [
          _cell([r["final_test_top1"] for r in runs]),
          _steps_cell(cells[f"{norm}/{layers}/{b}"]["steps_to_threshold"]),
        ]
      table += f"| {norm} | {layers} | " + " | ".join(row) + " |\n"
  row = []
  for b in none_sizes:
    c = cells[f"none/none/{b}"]
    row += [_cell(c["final"]), _steps_cell(c["steps_to_threshold"])]
  if not base.small_batch:
    row = [f"{row[0]} (batch-independent)", row[1]] + ["″", "″"] * (len(sizes) - 1)
  table += "| none (no normalizer) | none | " + " | ".join(row) + " |\n"
  _write(out_dir, table, results)

  plt = _plot()
  fig, axes = plt.subplots(
    len(norms), len(sizes), figsize=(4.5 * len(sizes), 3.2 * len(norms)), squeeze=False, sharey=True
  )
  for i, norm in enumerate(norms):
    for j, b in enumerate(sizes):
      ax = axes[i][j]
      for layers in PLACEMENTS:
        runs = runs_of(norm, layers, b)
        steps, losses = _mean_curve(
          [r["train_loss_curve"] for r in runs if r.get("train_loss_curve")]
        )
        if steps:
          ax.plot(
            steps,
            losses,
            "--" if layers == "none" else "-",
            lw=1,
            marker="." if len(steps) < 10 else None,
            label=f"{layers} ({len(runs)})",
          )
      ax.axhline(threshold, color="gray", lw=0.6, ls=":")
      ax.set_title(f"{norm}, b={b}", fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      ax.set_ylabel("train loss", fontsize=8)
      if ax.get_lines()[:-1]:  # a placement besides the threshold line
        ax.legend(fontsize=7, title="placement (seeds)", title_fontsize=7)
  _save_plot(plt, fig, out_dir)
  return results


# --------------------------------------------------------------------------
# 2. Batch-statistics instability.


def statistics(args, base: T.Config) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import optax
  from flax.core import unfreeze

  import mabn_jax as mj
  from mabn_jax import recording

  out_dir = os.path.join(args.results_root, args.name)
  B = base.batch_size
  settings = [("BN b=2", "bn", 2), (f"BN b={B}", "bn", B), ("MABN b=2", "mabn", 2)]
  dataset = T.load_data(base)
  channels = args.channels
  results: Dict[str, Any] = {}
  traces: Dict[str, Any] = {}

  def make_step(grad_fn, tx):
    @jax.jit
    def step(v, opt_state, images, labels):
      ((loss, v), grads), stats = grad_fn(v, images, labels)
      updates, opt_state = tx.update(grads, opt_state, v["params"])
      v = {**v, "params": optax.apply_updates(v["params"], updates)}
      stats = jax.tree_util.tree_map(lambda a: a[:, :channels], stats)
      return v, opt_state, loss, stats

    return step

  def without_records(grad_fn):  # the recorder's signature: empty records
    return lambda *a: (grad_fn(*a), {})

  for label, norm, b in settings:
    cfg = dataclasses.replace(
      base,
      norm=norm,
      norm_batch_size=b,
      num_devices=1,
      norm_kwargs=base.norm_kwargs if norm == "mabn" else {},
    )
    loader = data_lib.Loader(dataset, "train", B, True, cfg.seed)
    spe = loader.steps_per_epoch
    total = args.steps
    model = T.build(cfg, dataset.num_classes, max(total, 1), spe)
    tx = T.optimizer(cfg, T.learning_rate_schedule(cfg, spe, max(total, 1)))
    variables = unfreeze(
      model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((B,) + dataset.image_shape), train=True)
    )
    opt_state = tx.init(variables["params"])

    def loss_fn(v, images, labels, model=model):
      logits, mutated = model.apply(v, images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, dataset.num_classes))
      return loss.mean(), mutated

    if args.no_record:  # the same training without the recorder (for comparison)
      step = make_step(without_records(mj.value_and_grad(loss_fn)), tx)
    else:
      step = make_step(recording.value_and_grad(loss_fn), tx)

    series: Dict[str, Dict[str, list]] = {}
    losses = []
    s = 0
    epoch = 0
    while s < total:
      for batch in loader.epoch(epoch):
        variables, opt_state, loss, stats = step(
          variables, opt_state, batch["image"], batch["label"]
        )
        losses.append(loss)
        for layer, named in stats.items():
          for stat, value in named.items():
            series.setdefault(layer, {}).setdefault(stat, []).append(value)
        s += 1
        if s >= total:
          break
      epoch += 1
    losses = [float(l) for l in jax.device_get(losses)]
    # (steps, G, C) -> (steps * G, C): consecutive normalization groups in order.
    arr = {
      layer: {stat: np.concatenate(jax.device_get(v)) for stat, v in named.items()}
      for layer, named in series.items()
    }
    traces[label] = arr
    results[label] = {
      "loss_curve": losses,
      "step_variance": {
        layer: {
          stat: float(np.mean(np.var(np.diff(v, axis=0), axis=0)) / 2) for stat, v in named.items()
        }
        for layer, named in arr.items()
      },
      "variance": {
        layer: {stat: float(np.mean(np.var(v, axis=0))) for stat, v in named.items()}
        for layer, named in arr.items()
      },
    }
  if args.no_record:
    _write(out_dir, "# Loss curves without the statistics recorder\n", results)
    return results
  table = (
    f"# Batch-statistics instability\n\nCommand: `python -m experiments.sweep "
    f"{' '.join(args.argv)}`\n\nModel `{base.model}` on `{base.dataset}`, SGD batch {B}, "
    f"{args.steps} steps, first {channels} channels. Cell: half the mean squared "
    "step-to-step change of each statistic (per channel, averaged over channels), a "
    "noise variance; one normalization group is one iteration. BN: mu, var (forward), "
    "g, psi (backward); MABN: the statistics it uses (chi_used, psi_used, moving averages "
    "after warmup) and the batch values (chi_batch, psi_batch).\n\n"
  )
  for label, r in results.items():
    sv = r["step_variance"]
    stats_names = sorted({s for named in sv.values() for s in named})
    table += f"## {label}\n\n| layer | " + " | ".join(stats_names) + " |\n"
    table += "|---|" + "---|" * len(stats_names) + "\n"
    for layer, named in sv.items():
      table += (
        f"| {layer} | "
        + " | ".join(f"{named.get(s, float('nan')):.3g}" for s in stats_names)
        + " |\n"
      )
    table += "\n"
  _write(out_dir, table, results)

  plt = _plot()
  layer = sorted(next(iter(traces.values())))[min(1, len(next(iter(traces.values()))) - 1)]
  fig, axes = plt.subplots(2, 2, figsize=(10, 6))
  panels = [
    ("mu", "chi_used", "forward: mu_B (BN) / chi used (MABN)"),
    ("var", None, "forward: var_B"),
    ("g", None, "backward: g_B"),
    ("psi", "psi_used", "backward: Psi_B (BN) / Psi used (MABN)"),
  ]
  for ax, (bn_stat, mabn_stat, title) in zip(axes.ravel(), panels, strict=True):
    for label, arr in traces.items():
      stat = mabn_stat if label.startswith("MABN") else bn_stat
      if stat is None or layer not in arr or stat not in arr[layer]:
        continue
      v = arr[layer][stat][:, 0]
      groups = len(v) // max(args.steps, 1)
      ax.plot(np.arange(len(v)) / max(groups, 1), v, lw=0.6, label=label)
    ax.set_title(f"{title} ({layer}, channel 0)", fontsize=8)
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)
  _save_plot(plt, fig, out_dir)
  return results


# --------------------------------------------------------------------------


COMMANDS = {
  "batch_size": batch_size_sweep,
  "ablation": ablation,
  "speed": inference_speed,
  "statistics": statistics,
  "recipes": recipe_sweep,
  "placement": placement,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
    prog="python -m experiments.sweep",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("command", choices=sorted(COMMANDS))
  parser.add_argument("--preset", default="quick", choices=T.PRESETS)
  parser.add_argument("--name", default=None, help="results/<name> (default: command_preset)")
  parser.add_argument("--results_root", default=RESULTS_ROOT)
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
  T.add_config_arguments(parser, skip=("preset", "norm", "image_size"))
  parser.add_argument("--image_size", type=int, default=32, help="speed: input side")
  args = parser.parse_args(argv)
  args.argv = argv
  args.name = args.name or f"{args.command}_{args.preset}"
  overrides = T.overrides_from_args(args)
  overrides.pop("image_size", None)
  overrides.setdefault("progress", False)
  base = T.preset(args.preset, **overrides)
  COMMANDS[args.command](args, base)
  return 0


if __name__ == "__main__":
  sys.exit(main())
