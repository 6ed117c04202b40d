"""Reporting of the segmentation runs: the table over seeds, the plot and example predictions.

Every function reads run summaries (the dicts of ``runs/<run>.json`` written
by :mod:`experiments.segmentation`) or arrays; none trains.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from experiments.common import mean_std
from experiments.tasks.segmentation import data as seg_data


def aggregate(summaries: Sequence[dict]) -> List[dict]:
  """One row per ``(method, batch)``: test mIoU and pixel accuracy over seeds (in %)."""
  groups: Dict[Tuple[str, int], List[dict]] = {}
  for s in summaries:
    groups.setdefault((s["method"], s["batch_size"]), []).append(s)
  rows = []
  for (method, batch), runs in groups.items():
    miou = mean_std([100 * r["test_miou"] for r in runs])[:2]
    acc = mean_std([100 * r["test_pixel_acc"] for r in runs])[:2]
    rows.append(
      {
        "method": method,
        "batch": batch,
        "seeds": sorted(r["seed"] for r in runs),
        "miou": miou,
        "pixel_acc": acc,
        "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs])),
      }
    )
  return rows


def table_markdown(rows: Sequence[dict], title: str = "") -> str:
  """``table.md``: method, batch, mIoU and pixel accuracy (mean +- std over seeds)."""
  lines = ([f"# {title}", ""] if title else []) + [
    "| method | batch | test mIoU (%) | test pixel acc (%) | seeds | s/step |",
    "|---|---:|---:|---:|---|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['method']} | {r['batch']} | {r['miou'][0]:.2f} ± {r['miou'][1]:.2f} | "
      f"{r['pixel_acc'][0]:.2f} ± {r['pixel_acc'][1]:.2f} | "
      f"{','.join(map(str, r['seeds']))} | {r['seconds_per_step']:.3f} |"
    )
  return "\n".join(lines) + "\n"


def write_plot(path: str, rows: Sequence[dict], summaries: Sequence[dict]) -> None:
  """Bars of test mIoU (± std over seeds) per method and batch; loss curves of seed 0."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
  labels = [f"{r['method']}\nb={r['batch']}" for r in rows]
  ax0.bar(
    range(len(rows)),
    [r["miou"][0] for r in rows],
    yerr=[r["miou"][1] for r in rows],
    capsize=3,
    color="tab:blue",
  )
  ax0.set_xticks(range(len(rows)), labels, fontsize=7)
  ax0.set_ylabel("test mIoU (%)")
  ax0.set_title("mean IoU, mean ± std over seeds")
  first_seed = min(s["seed"] for s in summaries)
  for s in summaries:
    if s["seed"] == first_seed and s["train_loss_curve"]:
      steps, losses = zip(*s["train_loss_curve"], strict=True)
      ax1.plot(
        np.asarray(steps) / s["steps"] * s["epochs"],
        losses,
        label=f"{s['method']} b={s['batch_size']}",
      )
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("train loss (window mean)")
  ax1.set_title(f"training loss, seed {first_seed}")
  ax1.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """int ``(H, W)`` labels -> float ``(H, W, 3)`` colours (``IGNORE`` white)."""
  import matplotlib

  cmap = matplotlib.colormaps["tab20"].resampled(max(num_classes, 2))
  colours = cmap(np.clip(mask, 0, num_classes - 1))[..., :3]
  colours[mask == seg_data.IGNORE] = 1.0
  return colours


def write_examples(
  path: str,
  images: np.ndarray,
  masks: np.ndarray,
  preds: np.ndarray,
  class_names: Sequence[str],
  title: str = "",
) -> None:
  """One row per example: input, ground truth, prediction."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = len(class_names)
  n = len(preds)
  fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
  for i in range(n):
    for j, (img, name) in enumerate(
      (
        (images[i], "input"),
        (colorize(masks[i], k), "ground truth"),
        (colorize(preds[i], k), "prediction"),
      )
    ):
      axes[i, j].imshow(img, interpolation="nearest")
      axes[i, j].set_axis_off()
      if i == 0:
        axes[i, j].set_title(name)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
