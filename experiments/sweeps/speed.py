"""The inference-speed sweep (``python -m experiments.sweep speed``): images/s per normalizer."""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from experiments.loop.config import GROUP_NORMALIZERS, Config
from experiments.loop.metrics import device_info
from experiments.sweeps.report import _plot, _save_plot, _write

SPEED_ROWS = (
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
)
"""(label, normalizer, folded for inference) of every row."""


def inference_model(args, base: Config, name: str, fold: bool, x):
  """``(apply, variables)``: the jitted inference of the model with normalizer
  ``name`` (folded, or WS+GN's kernels standardized once, with ``fold``)."""
  import jax

  import mabn_jax as mj
  from experiments import models

  groups = {"num_groups": base.gn_groups} if name in GROUP_NORMALIZERS else {}
  norm = mj.make_normalizer(name, **groups)
  model = models.build_model(base.model, norm, args.num_classes, base.width)
  variables = model.init(jax.random.PRNGKey(0), x, train=True)
  if fold:  # WS+GN cannot fold; its standardized kernels are precomputed instead
    prepare = mj.precompute_standardized_kernels if name == "ws_gn" else mj.fold
    variables, norm = prepare(variables, norm)
    model = models.build_model(base.model, norm, args.num_classes, base.width)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  apply = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
  return apply, variables


def best_time(apply, variables, x, iters: int, repeats: int) -> float:
  """The fastest of ``repeats`` timings of ``iters`` calls (after one compiling call)."""
  import jax

  jax.block_until_ready(apply(variables, x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      y = apply(variables, x)
    jax.block_until_ready(y)
    times.append(time.perf_counter() - t)
  return min(times)


def speed_table(args, base: Config, results: Dict[str, Any], dev: Dict[str, Any]) -> str:
  """``table.md``: images/s, ms/batch and the ratio to no normalization per row."""
  size, batch = args.image_size, args.batch
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
  return table


def inference_speed(args, base: Config) -> Dict[str, Any]:
  """Images/s of the model with every :data:`SPEED_ROWS` normalizer; writes the
  table, ``results.json`` and ``plot.png``."""
  import jax
  import jax.numpy as jnp

  out_dir = os.path.join(args.results_root, args.name)
  size, batch = args.image_size, args.batch
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  results = {}
  for label, name, fold in SPEED_ROWS:
    apply, variables = inference_model(args, base, name, fold, x)
    best = best_time(apply, variables, x, args.iters, args.repeats)
    results[label] = {
      "images_per_s": batch * args.iters / best,
      "ms_per_batch": 1000 * best / args.iters,
    }
    print(f"{label:<20} {results[label]['images_per_s']:10.1f} images/s", flush=True)
  dev = device_info()
  _write(out_dir, speed_table(args, base, results, dev), {"device": dev, "rows": results})
  plt = _plot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.barh(list(results), [r["images_per_s"] for r in results.values()])
  ax.invert_yaxis()
  ax.set_xlabel("images/s")
  ax.set_title(f"{base.model} inference, batch {batch}")
  _save_plot(plt, fig, out_dir)
  return results
