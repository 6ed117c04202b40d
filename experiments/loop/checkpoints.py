"""Checkpoints of a run (orbax): save, restore (checked), clear."""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict

import jax
import numpy as np

from experiments.loop.parallel import Parallel


def _to_host(tree):
  """A device tree as numpy arrays on the host."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _checkpoint_manager(directory: str):
  """An orbax manager of ``directory`` keeping the last 2 checkpoints, saving synchronously."""
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
  )


def save_checkpoint(manager, step: int, state, host: Dict[str, Any]):
  """Saves the device ``state`` (as numpy with one process; with several, the
  global arrays, each process writing its devices' shards) and ``host``."""
  import orbax.checkpoint as ocp

  if jax.process_count() == 1:
    state = _to_host(state)
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
    force=True,
  )
  manager.wait_until_finished()


def restore_checkpoint(manager, target):
  """``(step, state, host)`` of the latest checkpoint; ``target`` is like the
  saved state (numpy, or the global arrays with several processes)."""
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  if jax.process_count() == 1:
    target = _to_host(target)
  path = os.path.join(str(manager.directory), str(step))
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()),
    )
    state = _one_device_layout(restored["state"], target)
    _check_restored(state, target)
  except Exception as error:  # noqa: BLE001 - any failure to read it means a bad checkpoint
    raise ValueError(
      f"checkpoint {path} is incomplete or corrupted and was not loaded (or it was "
      "saved by a run with another --parallel mode or number of devices) "
      f"({type(error).__name__}: {str(error)[:300]}); checkpoints in "
      f"{manager.directory}: steps {list(manager.all_steps())}. Delete {path} to resume "
      "from the previous one, or rerun without --resume."
    ) from error
  return step, state, restored["host"]


def _one_device_layout(state, target):
  """One device's state saved with a leading device axis of 1 (``pmap``,
  ``shard_map``) in ``target``'s layout without it (``jit``), or the reverse:
  on one device the modes compute the same thing."""

  def convert(a, b):
    if a.shape == (1,) + b.shape:
      return a[0]
    if b.shape == (1,) + a.shape:
      return a[None]
    return a

  if jax.process_count() > 1 or (
    jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(target)
  ):
    return state
  return jax.tree_util.tree_map(convert, state, target)


def _check_restored(state, target) -> None:
  """Raises unless ``state`` has ``target``'s structure, shapes and dtypes."""
  got = jax.tree_util.tree_structure(state)
  if got != jax.tree_util.tree_structure(target):
    raise ValueError(f"restored tree {got} differs from the expected one")
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(target), strict=True
  ):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
        f"{jax.tree_util.keystr(path)}: restored {a.shape} {a.dtype}, expected {b.shape} {b.dtype}"
      )


def clear_run(workdir: str, ckpt_dir: str) -> None:
  """Removes a previous run's checkpoints, metrics and summary (process 0;
  the others wait for it)."""
  if jax.process_index() == 0:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    for f in ("metrics.jsonl", "summary.json"):
      if os.path.exists(os.path.join(workdir, f)):
        os.remove(os.path.join(workdir, f))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("experiments.train clear_run")


def _checkpoint_target(parallel: Parallel, host_state):
  """What a checkpoint restores into: the host state, or with several
  processes its global arrays (orbax then reads each process's shards)."""
  return host_state if jax.process_count() == 1 else parallel.put(host_state)


def check_checkpointable(parallel: Parallel) -> None:
  """Raises for checkpoints orbax cannot write: pmap with several processes."""
  if jax.process_count() > 1 and parallel.mode == "pmap":
    raise ValueError(
      "checkpoints of several processes need --parallel jit or shard_map "
      "(pmap's arrays are local to each process); or run without --workdir"
    )
