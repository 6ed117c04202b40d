"""Two processes on localhost (``jax.distributed``, gloo CPU collectives).

* tests/_multihost_run.py: each process feeds its half of every global batch;
  MABN with statistics synchronized over all devices of both processes
  (``shard_map``, ``axis_name='batch'``) and MABN under ``jit`` over the
  sharded batch both equal one process training on the concatenated batch,
  and both processes hold identical variables.
* ``python -m experiments.train --distributed true`` in two processes (``jit``:
  replicated state; ``shard_map``: one state per device of both processes): each
  reads its shard of the data (``Loader`` ``shard_index``/``shard_count``),
  both finish and write one checkpoint (orbax, the global arrays), process 0
  the summary; resuming both from a checkpoint continues to the same result.

Every process joins a coordinator on 127.0.0.1 and is killed after
:data:`TIMEOUT` seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import _multihost_run as run
from experiments import data as D

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT = 120


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(local_devices: int):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
    PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
  )
  return env


def _launch(commands, env, returncode=0):
  """Runs the commands concurrently; returns their outputs; fails on another
  exit status or a timeout."""
  procs = [
    subprocess.Popen(
      c, env=env, cwd=str(HERE.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for c in commands
  ]
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT)
      outputs.append(out)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    texts = [p.communicate()[0] for p in procs]
    pytest.fail(
      f"processes did not finish in {TIMEOUT} s:\n" + "\n---\n".join(t[-2000:] for t in texts)
    )
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == returncode, out[-4000:]
  return outputs


def test_two_processes_synchronized_mabn_equals_one_process_on_the_whole_batch(tmp_path):
  port, processes = _free_port(), 2
  outs = [tmp_path / f"p{i}.npz" for i in range(processes)]
  _launch(
    [
      [
        sys.executable,
        str(HERE / "_multihost_run.py"),
        str(i),
        str(processes),
        str(port),
        str(outs[i]),
      ]
      for i in range(processes)
    ],
    _env(run.LOCAL_DEVICES),
  )
  got = [dict(np.load(o)) for o in outs]

  net = run.model()
  step = jax.jit(run.step_fn(net))
  variables = run.init(net)
  xs, ys = run.batches(run.PER_DEVICE * run.LOCAL_DEVICES * processes)
  for x, y in zip(xs, ys, strict=True):
    variables = step(variables, x, y)
  reference = run.flat(variables)
  assert int(reference["['batch_stats']['block']['norm']['step']"]) == run.STEPS

  for mode in ("shard_map", "jit"):
    for key, value in reference.items():
      for p in range(processes):
        np.testing.assert_allclose(
          got[p][mode + key], value, rtol=1e-4, atol=1e-6, err_msg=f"process {p} {mode} {key}"
        )
      np.testing.assert_array_equal(got[0][mode + key], got[1][mode + key])


def _train_command(workdir, process_id, port, *extra):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--dataset",
    "synthetic",
    "--model",
    "cnn2",
    "--width",
    "4",
    "--norms",
    "mabn",
    "--batch_size",
    "2",
    "--norm_batch_size",
    "2",
    "--epochs",
    "1",
    "--log_every",
    "1",
    "--norm_kwargs",
    "warmup_steps=1,buffer_size=2,renorm_start=2",
    "--checkpoint_every",
    "2",
    "--progress",
    "false",
    "--workdir",
    str(workdir),
    "--distributed",
    "true",
    "--coordinator_address",
    f"127.0.0.1:{port}",
    "--num_processes",
    "2",
    "--process_id",
    str(process_id),
    *extra,
  ]


# The default mode only: each launch starts two JAX processes (about a minute
# on 2 cores); per-device state across processes is covered by the
# synchronized-MABN test above and by tests/test_experiments_parallel.py.
@pytest.mark.parametrize("parallel", ["jit"])
def test_two_processes_run_the_training_loop_with_sharded_data_and_checkpoints(tmp_path, parallel):
  # The synthetic training split (64 images) in 2 host shards of 32, each
  # host's batch 4 (2 devices x 2): 8 steps on a global batch of 8.
  tiny = D.synthetic()
  shards = [D.Loader(tiny, "train", 4, True, 0, i, 2) for i in range(2)]
  ids = [set(s._indices(0)) for s in shards]
  assert len(ids[0]) == len(ids[1]) == 32 and not ids[0] & ids[1]

  env = _env(2)
  port = _free_port()
  mode = ("--parallel", parallel)
  _launch([_train_command(tmp_path / "a", i, port, *mode) for i in range(2)], env)
  with open(tmp_path / "a" / "summary.json") as f:
    summary = json.load(f)
  assert summary["finished"] and summary["step"] == summary["total_steps"] == 8
  assert summary["device"]["processes"] == 2 and summary["config"]["parallel"] == parallel
  # One checkpoint directory: both processes write their shards of the global arrays.
  steps = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
  assert steps == ["6", "8"], steps

  # Resumed from the step-6 checkpoint (the last one and the summary removed,
  # as if both processes had died after step 7): the same losses as straight
  # through. Interrupting a run itself is covered in one process by
  # tests/test_experiments_faults.py.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "8")
  os.remove(tmp_path / "b" / "summary.json")
  port = _free_port()
  _launch(
    [_train_command(tmp_path / "b", i, port, *mode, "--resume", "true") for i in range(2)], env
  )
  with open(tmp_path / "b" / "summary.json") as f:
    resumed = json.load(f)
  assert resumed["finished"] and resumed["step"] == 8
  assert resumed["train_loss_curve"] == summary["train_loss_curve"]
  assert resumed["final_test_top1"] == summary["final_test_top1"]
