"""The run's records: ``metrics.jsonl``, the progress bar, ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import jax

from experiments.loop.config import Config
from experiments.loop.parallel import Parallel, _scalar


def _evaluated(record: Dict[str, Any]) -> bool:
  """Whether a record holds an evaluation (``<split>_<metric>`` entries)."""
  return any(k.startswith(("val_", "test_")) for k in record)


def git_commit() -> str:
  """The repository's commit (``'unknown'`` outside git)."""
  try:
    return (
      subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        timeout=10,
      ).stdout.strip()
      or "unknown"
    )
  except Exception:  # noqa: BLE001 - bookkeeping only
    return "unknown"


def device_info() -> Dict[str, Any]:
  """The platform, device kind and counts, host and CPUs of this process."""
  d = jax.local_devices()[0]
  return {
    "platform": d.platform,
    "kind": d.device_kind,
    "local_devices": jax.local_device_count(),
    "processes": jax.process_count(),
    "host": platform.node(),
    "cpus": os.cpu_count(),
  }


def read_metrics(path: str):
  """The records of ``metrics.jsonl``; a last line cut short (a run killed
  while writing it) is dropped, any other unreadable line raises."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = [json.loads(line) for line in lines[:-1]]
  if lines:
    try:
      records.append(json.loads(lines[-1]))
    except json.JSONDecodeError:
      if lines[-1].endswith("\n"):
        raise
  return records


def write_metrics(path: str, records):
  """Rewrites ``metrics.jsonl`` with ``records``."""
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


class Progress:
  """tqdm bar with step, the training metrics, steps/s and ETA (a plain line without tqdm)."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str):
    self.total, self.enabled, self.desc = total, enabled, desc
    self.start, self.initial = time.time(), initial
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm

        self.bar = tqdm(
          total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr
        )
      except ImportError:
        self.bar = None

  def update(self, step: int, info: Dict[str, float]):
    """Shows ``step`` and ``info``."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
      return
    rate = (step - self.initial) / max(time.time() - self.start, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    items = " ".join(f"{k}={v:.4g}" for k, v in info.items())
    print(
      f"{self.desc} step {step}/{self.total} {items} {rate:.2f} steps/s ETA {eta:.0f}s",
      file=sys.stderr,
      flush=True,
    )

  def close(self):
    """Closes the bar."""
    if self.bar is not None:
      self.bar.close()


@dataclasses.dataclass
class RunLog:
  """A run's metrics: the records of ``metrics.jsonl`` (``path``, process 0
  writes it) and the training metrics accumulated since the last record.

  ``host`` holds ``count`` and a ``<name>_sum`` per training metric the
  task's step returns (``loss``, and ``acc`` for classification).
  ``pending`` holds the device metrics of the steps not yet read back (read
  back in batches: a transfer per step would stall the loop).
  """

  path: Optional[str] = None
  records: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  host: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"count": 0})
  pending: List[Any] = dataclasses.field(default_factory=list)
  latest_diag: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def log(self, record: Dict[str, Any]) -> None:
    """Appends ``record`` (and writes it, process 0)."""
    self.records.append(record)
    if self.path and jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def fold_pending(self, parallel: Parallel) -> None:
    """Adds the pending steps' metrics to the sums (and keeps the latest
    diagnostics)."""
    for m in parallel.to_host(self.pending):
      for name, value in m.items():
        if name != "diag":
          self.host[f"{name}_sum"] = self.host.get(f"{name}_sum", 0.0) + _scalar(value)
      self.host["count"] += 1
      if "diag" in m:
        self.latest_diag["diag"] = jax.tree_util.tree_map(_scalar, m["diag"])
    self.pending.clear()

  def metric_names(self) -> List[str]:
    """The training metrics summed in ``host``, in the step's order."""
    return [k[: -len("_sum")] for k in self.host if k.endswith("_sum")]

  def log_training(
    self, step: int, steps_per_epoch: int, lr: float, steps_per_sec: float
  ) -> Dict[str, Any]:
    """Logs the averages since the last training record and resets them
    (after :meth:`fold_pending`)."""
    host, names = self.host, self.metric_names()
    record = {
      "step": step,
      "epoch": step / steps_per_epoch,
      **{name: host[f"{name}_sum"] / host["count"] for name in names},
      "lr": lr,
      "steps_per_sec": steps_per_sec,
      **self.latest_diag,
    }
    host.update({f"{name}_sum": 0.0 for name in names}, count=0)
    self.log(record)
    return record

  def evaluated(self, step: int) -> bool:
    """Whether step ``step`` has an evaluation record."""
    return any(r["step"] == step and _evaluated(r) for r in self.records)


def summarize(
  config: Config,
  records,
  step: int,
  total_steps: int,
  finished: bool,
  wall_time_s: float,
  metric: str = "top1",
) -> Dict[str, Any]:
  """The summary of a run (what ``summary.json`` holds) from its records:
  the final and best value and the curve of the task's ``metric`` per split,
  the training loss curve, and the last evaluation's other metrics
  (``final_<split>_<name>``)."""
  evals = [r for r in records if f"test_{metric}" in r]
  vals = [r for r in records if f"val_{metric}" in r]
  trains = [r for r in records if "loss" in r]
  last = {
    f"final_{k}": v
    for r in (vals[-1:] + evals[-1:])
    for k, v in r.items()
    if k.startswith(("val_", "test_")) and not k.endswith(f"_{metric}")
  }
  summary = {
    "name": config.run_name(),
    "finished": finished,
    "step": step,
    "total_steps": total_steps,
    "config": dataclasses.asdict(config),
    "git_commit": git_commit(),
    "device": device_info(),
    "wall_time_s": wall_time_s,
    **{
      key: value
      for split, rs in (("test", evals), ("val", vals))
      for key, value in _metric_fields(split, metric, rs).items()
    },
    "train_loss_curve": [[r["step"], r["loss"]] for r in trains],
    **{
      f"{split}_{metric}_curve": [[r["step"], r[f"{split}_{metric}"]] for r in rs]
      for split, rs in (("test", evals), ("val", vals))
    },
  }
  summary.update(last)
  return summary


def _metric_fields(split: str, metric: str, records) -> Dict[str, Any]:
  """``final_<split>_<metric>`` and ``best_<split>_<metric>`` of the records."""
  key = f"{split}_{metric}"
  return {
    f"final_{key}": records[-1][key] if records else None,
    f"best_{key}": max(r[key] for r in records) if records else None,
  }


def write_summary(workdir: str, summary: Dict[str, Any]) -> None:
  """Writes ``summary.json`` atomically (its presence marks a finished run)."""
  tmp = os.path.join(workdir, "summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "summary.json"))
