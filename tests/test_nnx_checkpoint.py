"""An NNX model's state survives an orbax checkpoint and a fresh process, bit
for bit on CPU (tests/_nnx_checkpoint_run.py; the linen version is
tests/test_checkpoint.py).

The model stacks CBN, MABN, Batch Renorm and BN with short schedules, so the
checkpoint falls in the middle of every phase. A run saved after step K and
continued in a new Python process, in a freshly built model, gives exactly
the outputs, gradients and state (params, statistics, taps, optimizer) of the
uninterrupted run.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
from flax import nnx

import _nnx_checkpoint_run as run

K = 5  # steps before the checkpoint
MORE = 3  # steps after it
HERE = pathlib.Path(__file__).resolve().parent


def test_nnx_restore_in_fresh_process_continues_bit_for_bit(tmp_path):
  model, optimizer = run.init()
  for t in range(1, K + 1):
    run.train_step(model, optimizer, *run.batch(t))
  assert int(model.mabn.step[...]) == K > 3  # MABN's buffer of 3 has wrapped around
  run.save(str(tmp_path / "ckpt"), model, optimizer)
  uninterrupted = run.run(model, optimizer, K, MORE)

  out = tmp_path / "resumed.npz"
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)])
  )
  proc = subprocess.run(
    [
      sys.executable,
      str(HERE / "_nnx_checkpoint_run.py"),
      str(tmp_path / "ckpt"),
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
  assert {key.split("/")[1] for key in resumed} == {"out", "grads", "model", "optimizer"}
  for key, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert resumed[key].dtype == value.dtype, key
  last = f"{K + MORE}/model/mabn"
  assert int(resumed[f"{last}/step"]) == K + MORE
  assert np.abs(resumed[f"{last}/psi_buffer"]).max() > 0
  assert int(resumed[f"{K + MORE}/model/cbn/norm/count"]) == 2


def test_nnx_restored_state_equals_saved_state_leaf_by_leaf(tmp_path):
  model, optimizer = run.init()
  for t in range(1, 4):
    run.train_step(model, optimizer, *run.batch(t))
  run.save(str(tmp_path / "c"), model, optimizer)
  restored_model, restored_optimizer = run.restore(str(tmp_path / "c"))
  for a, b in ((model, restored_model), (optimizer, restored_optimizer)):
    saved = dict(nnx.to_flat_state(nnx.state(a)))
    back = dict(nnx.to_flat_state(nnx.state(b)))
    assert saved.keys() == back.keys()
    for path in saved:
      assert type(saved[path]) is type(back[path]), path
      np.testing.assert_array_equal(back[path][...], saved[path][...], err_msg=str(path))
      assert back[path][...].dtype == saved[path][...].dtype, path
