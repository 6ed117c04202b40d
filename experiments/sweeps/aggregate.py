"""Aggregating the sweeps' finished runs: values per cell over seeds, paired
differences, the share of BN's gap closed, steps to a loss."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments.common import mean_std


def group_runs(keys: Sequence[Any], summaries: Sequence[Optional[Dict[str, Any]]]):
  """``{key: [finished summaries]}`` in the order of ``keys`` (every key present)."""
  rows: Dict[Any, List[Dict[str, Any]]] = {}
  for key, s in zip(keys, summaries, strict=True):
    rows.setdefault(key, [])
    if s is not None:
      rows[key].append(s)
  return rows


def batch_size_results(summaries: Dict[str, Any], norms, sizes, seeds, batch, batch_norms):
  """``{'<norm>/<b>': {norm, norm_batch_size, final, best}}`` over the seeds
  (a batch-independent normalizer's runs at the SGD ``batch`` in every column)."""
  results = {}
  for norm in norms:
    for b in sizes:
      bb = b if norm in batch_norms else batch
      names = [n for n in (f"{norm}_b{bb}_s{s}" for s in seeds) if n in summaries]
      results[f"{norm}/{b}"] = {
        "norm": norm,
        "norm_batch_size": b,
        "final": [summaries[n]["final_test_top1"] for n in names],
        "best": [summaries[n]["best_test_top1"] for n in names],
      }
  return results


def _last_loss(summary: Dict[str, Any], window: int = 4) -> Optional[float]:
  """The mean train loss of the last ``window`` logged windows."""
  curve = summary.get("train_loss_curve") or []
  tail = [loss for _, loss in curve[-window:]]
  return float(np.mean(tail)) if tail else None


RECIPE_COLUMNS = (
  ("val", "final_val_top1"),
  ("test", "final_test_top1"),
  ("test, precise BN", "final_test_top1_precise"),
  ("train loss", None),
)
"""The columns of the recipe table: (header, summary field; None: the last train loss)."""


def recipe_values(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Any]]:
  """Each :data:`RECIPE_COLUMNS` column's values over the runs of one row."""
  return {
    col: [r.get(field) if field else _last_loss(r) for r in runs] for col, field in RECIPE_COLUMNS
  }


def _run_dir(summary: Dict[str, Any]) -> str:
  """The folder name of a finished run (under ``<results>/runs/``)."""
  return os.path.basename(os.path.normpath(summary["config"]["workdir"]))


def _test_by_seed(runs: Sequence[Dict[str, Any]]) -> Dict[int, float]:
  """``{seed: final test top-1}``."""
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
  means = [mean_std([r["final_test_top1"] for r in v])[0] for v in (runs, bn_small, bn_large)]
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


def steps_to_loss(curve: Sequence[Sequence[float]], threshold: float) -> Optional[int]:
  """The step of the first logged train-loss window (``[step, loss]`` of a
  summary's ``train_loss_curve``) at or below ``threshold``; ``None`` if none is."""
  for step, loss in curve or ():
    if loss is not None and loss <= threshold:
      return int(step)
  return None


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]):
  """Steps and mean loss over the curves, at the steps every curve logged."""
  steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
  by_step = [dict((s, l) for s, l in c) for c in curves]
  return steps, [float(np.mean([c[s] for c in by_step])) for s in steps]


def loss_curves(runs: Sequence[Dict[str, Any]]):
  """The mean train-loss curve of the runs that logged one (see :func:`_mean_curve`)."""
  return _mean_curve([r["train_loss_curve"] for r in runs if r.get("train_loss_curve")])


def placement_cells(rows: Dict[Any, List[Dict[str, Any]]], threshold: float) -> Dict[str, Any]:
  """``{'<norm>/<placement>/<b>': cell}``: the runs, their final test top-1,
  steps to ``threshold`` and mean loss curve."""
  cells = {}
  for (norm, layers, b), runs in rows.items():
    cells[f"{norm}/{layers}/{b}"] = {
      "norm": norm,
      "placement": layers,
      "norm_batch_size": b,
      "runs": [_run_dir(r) for r in runs],
      "final": [r["final_test_top1"] for r in runs],
      "steps_to_threshold": [steps_to_loss(r.get("train_loss_curve"), threshold) for r in runs],
      "mean_loss_curve": [list(p) for p in zip(*loss_curves(runs), strict=True)],
    }
  return cells
