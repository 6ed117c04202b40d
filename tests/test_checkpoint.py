"""State survives an orbax checkpoint and a fresh process, bit for bit on CPU.

The model (tests/_checkpoint_run.py) stacks MABN, Batch Renorm, CBN, BN and
naive CBN blocks with short schedules, so the checkpoint falls in the middle
of every phase: MABN's ring buffers have wrapped around (their order
matters), BRN's ramp and CBN's window depend on the step counters. A run
saved with orbax after step K and continued in a new Python process gives
exactly the outputs, gradients and state (params, batch_stats, taps, optimizer)
of the uninterrupted run.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

import _checkpoint_run as run

K = 5  # steps before the checkpoint
MORE = 4  # steps after it
HERE = pathlib.Path(__file__).resolve().parent


def test_restore_in_fresh_process_continues_bit_for_bit(tmp_path):
  state = run.init()
  for t in range(1, K + 1):
    state, _, _ = run.train_step(state, *run.batch(t))
  steps = state["variables"]["batch_stats"]["block0"]["norm"]["step"]
  assert int(steps) == K > 3  # MABN's buffer of 3 has wrapped around
  checkpoint = tmp_path / "ckpt"
  run.save(str(checkpoint), state)
  uninterrupted = run.run(state, K, MORE)

  out = tmp_path / "resumed.npz"
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)])
  )
  proc = subprocess.run(
    [
      sys.executable,
      str(HERE / "_checkpoint_run.py"),
      str(checkpoint),
      str(K),
      str(MORE),
      str(out),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = dict(np.load(out))

  assert resumed.keys() == uninterrupted.keys()
  kinds = {key.split("/")[1].split("[")[0] for key in resumed}
  assert kinds == {"out", "grads", "state"}
  for key, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert resumed[key].dtype == value.dtype, key
  # The ring buffers and counters were really restored (not re-initialized).
  last = f"{K + MORE}/state['variables']['batch_stats']['block0']['norm']"
  assert int(resumed[last + "['step']"]) == K + MORE
  assert np.all(resumed[last + "['psi_buffer']"] != 0)


def test_restored_state_equals_saved_state_leaf_by_leaf(tmp_path):
  state = run.init()
  for t in range(1, 4):
    state, _, _ = run.train_step(state, *run.batch(t))
  run.save(str(tmp_path / "c"), state)
  restored = run.restore(str(tmp_path / "c"))
  saved = jax.tree_util.tree_leaves_with_path(state)
  back = jax.tree_util.tree_leaves_with_path(restored)
  assert [p for p, _ in saved] == [p for p, _ in back]
  for (path, a), (_, b) in zip(saved, back, strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
