"""Reporting the recipe sweep: its tables (against b, against BN, the
mechanism diagnostics) and plots."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import numpy as np

from experiments.loop.config import BATCH_NORMALIZERS, Config
from experiments.loop.metrics import read_metrics
from experiments.sweeps.aggregate import (
  MIN_GAP,
  RECIPE_COLUMNS,
  _run_dir,
  gap_closed,
  paired_differences,
  recipe_values,
)
from experiments.sweeps.report import (
  _cell,
  _difference_cell,
  _header,
  _plot,
  _plot_against_batch,
  _share_cell,
)


def recipe_table(args, base: Config, rows: Dict[Any, List[Dict[str, Any]]]):
  """``(results, table)``: per (recipe, b) row the :data:`RECIPE_COLUMNS` values
  over seeds, and the head of ``table.md`` with the table of them."""
  results, table = {}, _header(args, base, "Recipes against normalization batch size")
  table += (
    "Validation: "
    + (f"{base.val_split} training images held out" if base.val_split else "none (test only)")
    + ".\n\n"
  )
  table += "| recipe | b | " + " | ".join(c for c, _ in RECIPE_COLUMNS) + " |\n"
  table += "|---|---|" + "---|" * len(RECIPE_COLUMNS) + "\n"
  for (name, b), runs in rows.items():
    values = recipe_values(runs)
    results[f"{name}/{b}"] = {
      "recipe": name,
      "norm_batch_size": b,
      "runs": [_run_dir(r) for r in runs],
      **values,
    }
    cells = [_cell([v for v in values[c] if v is not None]) for c, _ in RECIPE_COLUMNS]
    table += f"| {name} | {b or base.batch_size} | " + " | ".join(cells) + " |\n"
  return results, table


def _recipes_against_batch(
  out_dir: str,
  names: Sequence[str],
  sizes: Sequence[int],
  rows: Dict[Any, List[Dict[str, Any]]],
  base: Config,
) -> str:
  """The test column again as one row per recipe and one column per
  normalization batch (a batch-independent recipe's single run fills its row),
  and ``plot.png`` of it; returns the table."""
  from experiments import recipes as R

  flat = [n for n in names if R.get(n).norm not in BATCH_NORMALIZERS]
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
    (n, b): rows[(n, b if R.get(n).norm in BATCH_NORMALIZERS else None)]
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


def _diagnostics_table(out_dir: str, runs: Dict[str, str]) -> str:
  """Markdown table of the ``'diag'`` records: per run, the mean over conv
  layers of the kernel norm at the first and the last log, and of
  ``grad_cos_channel`` and ``mu_over_sigma`` over the second half of
  training (where every window is on)."""
  lines = []
  for label, run in runs.items():
    records = [
      r for r in read_metrics(os.path.join(out_dir, "runs", run, "metrics.jsonl")) if "diag" in r
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
    records = read_metrics(os.path.join(out_dir, "runs", run, "metrics.jsonl"))
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
