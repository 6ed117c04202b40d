"""Reporting the placement sweep: its table (top-1 and steps to a loss) and the loss curves."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from experiments import models
from experiments.loop.config import Config
from experiments.sweeps.aggregate import loss_curves
from experiments.sweeps.plan import PLACEMENTS, placement_none_sizes
from experiments.sweeps.report import _cell, _header, _plot, _save_plot, _steps_cell


def placement_intro(base: Config, threshold: float) -> str:
  """The paragraph of ``table.md`` naming the placements and the steps column."""
  n_convs = 2 if base.model == "cnn2" else 6
  return (
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


def placement_table(args, base: Config, rows, cells, norms, sizes, threshold: float) -> str:
  """``table.md``: per normalizer and placement, top-1 and steps to the loss at each b."""
  table = _header(args, base, "Placement of the normalization") + placement_intro(base, threshold)
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
  for b in placement_none_sizes(base, sizes):
    c = cells[f"none/none/{b}"]
    row += [_cell(c["final"]), _steps_cell(c["steps_to_threshold"])]
  if not base.small_batch:
    row = [f"{row[0]} (batch-independent)", row[1]] + ["″", "″"] * (len(sizes) - 1)
  return table + "| none (no normalizer) | none | " + " | ".join(row) + " |\n"


def placement_runs(rows: Dict[Any, List[Dict[str, Any]]], base: Config, norm, layers, b):
  """The finished runs of one placement cell (the 'none' runs for ``layers == 'none'``)."""
  if layers == "none":
    return rows.get(("none", "none", b if base.small_batch else None), [])
  return rows.get((norm, layers, b), [])


def plot_placement(out_dir: str, rows, base: Config, norms, sizes: Sequence[int], threshold):
  """``plot.png``: the train-loss curves (mean over seeds), one panel per normalizer and b."""
  plt = _plot()
  fig, axes = plt.subplots(
    len(norms), len(sizes), figsize=(4.5 * len(sizes), 3.2 * len(norms)), squeeze=False, sharey=True
  )
  for i, norm in enumerate(norms):
    for j, b in enumerate(sizes):
      ax = axes[i][j]
      for layers in PLACEMENTS:
        runs = placement_runs(rows, base, norm, layers, b)
        steps, losses = loss_curves(runs)
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
