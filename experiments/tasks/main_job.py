"""The main job (``python -m experiments.train`` without arguments): its runs,
table and plot."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np

# The main job (``python -m experiments.train``: the quick preset, no
# --norms): (normalizer, normalization batch) for BN at the SGD batch and at 2,
# and MABN at 2, each for MAIN_JOB_SEEDS.
MAIN_JOB = (("bn", None), ("bn", 2), ("mabn", 2))  # None: the SGD batch
MAIN_JOB_SEEDS = (0, 1)


def main_job_table(summaries: Sequence[Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
  """The main job's table (final test top-1 per method, mean ± std over
  seeds), BN's small-batch gap and the share of it MABN recovers; returns the
  text and the numbers."""
  cells = {}
  for s in summaries:
    c = s["config"]
    cells.setdefault((c["norm"], c["norm_batch_size"] or c["batch_size"]), []).append(
      s["final_test_top1"]
    )
  mean = {k: float(np.mean(v)) for k, v in cells.items()}
  lines = [f"{'method':<8} {'b':>3} {'final test top-1':>18} {'seeds':>5}"]
  for (norm, b), v in cells.items():
    spread = f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""
    lines.append(f"{norm:<8} {b:>3} {mean[(norm, b)]:>10.2f}{spread:<8} {len(v):>5}")
  numbers = {"top1": {f"{n}_b{b}": m for (n, b), m in mean.items()}}
  small = MAIN_JOB[1][1]
  large = max(b for n, b in mean if n == "bn")
  if {("bn", large), ("bn", small), ("mabn", small)} <= set(mean):
    gap = mean[("bn", large)] - mean[("bn", small)]
    recovered = (mean[("mabn", small)] - mean[("bn", small)]) / gap if gap > 0 else None
    numbers.update(bn_gap=gap, mabn_recovered=recovered)
    lines.append(
      f"BN at b={small} is {gap:.2f} points below BN at b={large}"
      + (
        f"; MABN at b={small} recovers {100 * recovered:.0f}% of that gap."
        if recovered is not None
        else "."
      )
    )
  return "\n".join(lines), numbers


def plot_main_job(summaries: Sequence[Dict[str, Any]], path: str) -> None:
  """Test top-1 over training (mean over seeds) of every main-job method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = {}
  for s in summaries:
    c = s["config"]
    label = f"{c['norm'].upper()}, b={c['norm_batch_size'] or c['batch_size']}"
    curves.setdefault(label, []).append(s["test_top1_curve"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, runs in curves.items():
    steps = [step for step, _ in runs[0]]
    ax.plot(steps, np.mean([[acc for _, acc in r] for r in runs], axis=0), "-o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title("digits (8x8), SGD batch 32, mean over seeds")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
