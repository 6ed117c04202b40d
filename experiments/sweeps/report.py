"""Reporting the sweeps: table cells, headers, ``table.md``/``results.json`` and plots."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax

from experiments.common import mean_std
from experiments.loop.config import BATCH_NORMALIZERS, Config


def _cell(values) -> str:
  """``mean ± std (n)`` of the values (``—`` for none)."""
  mean, std, n = mean_std(values)
  if mean is None:
    return "—"
  return f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)"


def _machine() -> str:
  """The line naming the machine, JAX and the time of writing."""
  import datetime
  import platform

  device = jax.devices()[0]
  return (
    f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on "
    f"{device.platform} ({device.device_kind}); written "
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC."
  )


def _header(args, base: Config, what: str) -> str:
  """The head of ``table.md``: title, command, machine, preset."""
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
  """Writes ``table.md`` and ``results.json`` and prints the table."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(table, flush=True)


def _plot():
  """``matplotlib.pyplot`` on the Agg backend."""
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
    stats = [mean_std(values) for values in per_size]
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


def _difference_cell(values: Sequence[float]) -> str:
  """``+mean ± std (n)`` of paired differences (``—`` for none)."""
  mean, std, n = mean_std(values)
  if mean is None:
    return "—"
  return f"{mean:+.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:+.2f} (1)"


def _share_cell(share: Optional[float], per_seed: Sequence[float]) -> str:
  """A share of BN's gap in %, with its spread over seeds (``—`` for none)."""
  if share is None:
    return "—"
  mean, std, n = mean_std([100 * v for v in per_seed])
  spread = f"; per seed {mean:.0f} ± {std:.0f}% ({n})" if n > 1 else ""
  return f"{100 * share:.1f}%{spread}"


def _steps_cell(values: Sequence[Optional[int]]) -> str:
  """Steps to the threshold over seeds: mean ± sample std over the runs that
  reached it (reached/runs); ``'—'`` if none did."""
  reached = [v for v in values if v is not None]
  if not reached:
    return "—"
  mean, std, n = mean_std(reached)
  spread = f" ± {std:.0f}" if n > 1 else ""
  return f"{mean:.0f}{spread} ({n}/{len(values)})"


def batch_size_table(args, base: Config, results, norms, sizes) -> str:
  """``table.md`` of the batch-size sweep: one row per normalizer, one column per b."""
  table = _header(args, base, "Test top-1 against normalization batch size")
  table += "| method | " + " | ".join(f"b={b}" for b in sizes) + " |\n"
  table += "|---|" + "---|" * len(sizes) + "\n"
  for norm in norms:
    row = [_cell(results[f"{norm}/{b}"]["final"]) for b in sizes]
    if norm not in BATCH_NORMALIZERS:
      row = [f"{row[0]} (batch-independent)"] + ["″"] * (len(sizes) - 1)
    table += f"| {norm} | " + " | ".join(row) + " |\n"
  return table


def ablation_table(args, base: Config, b_small: int, labels, results) -> str:
  """``table.md`` of the ablation: one row per variant."""
  table = _header(args, base, f"MABN ablation at normalization batch {b_small}")
  table += "| variant | test top-1 |\n|---|---|\n"
  for label in labels:
    table += f"| {label} | {_cell(results.get(label, []))} |\n"
  return table


def plot_ablation(out_dir: str, labels: Sequence[str], results: Dict[str, List[float]]) -> None:
  """``plot.png`` of the ablation: a bar (mean ± std over seeds) per finished variant."""
  plt = _plot()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  labels = [l for l in labels if results.get(l)]
  ms = [mean_std(results[l])[0] for l in labels]
  ss = [mean_std(results[l])[1] for l in labels]
  ax.barh(range(len(labels)), ms, xerr=ss, capsize=3)
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("test top-1 (%)")
  _save_plot(plt, fig, out_dir)
