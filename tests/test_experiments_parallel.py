"""Data parallelism of the training loop (experiments/loop/): ``--parallel jit|shard_map|pmap``.

On the 8 fake CPU devices of tests/conftest.py, a tiny CNN on synthetic data:

* ``jit`` (one program over the batch sharded along ``'batch'``) computes
  global statistics: 8 devices equal 1 device training on the whole batch,
  with and without ``norm_batch_size`` (BN and MABN).
* ``shard_map`` keeps per-device statistics (they differ across devices);
  with ``--sync_stats`` they are identical and equal the ``jit`` result.
* ``pmap`` equals ``shard_map`` (the same per-device semantics).
* Resuming equals the uninterrupted run, in every mode.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from experiments import data as D
from experiments import train as T

DEVICES = 8
MABN = {"warmup_steps": 2, "buffer_size": 4, "renorm_start": 3}


@functools.lru_cache(maxsize=None)
def _tiny():
  return D.synthetic(n_train=64, n_test=24)


def _config(norm="bn", parallel="jit", devices=DEVICES, batch=2, **kw):
  """Global batch 16 whatever the number of devices: 4 steps an epoch."""
  base = dict(
    norm=norm,
    model="cnn2",
    width=4,
    batch_size=batch,
    norm_batch_size=None,
    epochs=1,
    log_every=1,
    num_devices=devices,
    progress=False,
    lr=0.05,
    parallel=parallel,
    norm_kwargs=MABN if norm == "mabn" else {},
  )
  base.update(kw)
  return T.Config(**base)


@functools.lru_cache(maxsize=None)
def _run(**kw):
  return T.train(_config(**kw), _tiny())


def _close(a, b, rtol=2e-4, atol=2e-5):
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
  ):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _spread(summary, name="mean"):
  """Largest difference between device 0's and any device's statistic."""
  stat = summary["device_batch_stats"]["conv1"]["norm"][name]
  assert stat.shape[0] == DEVICES
  return max(float(np.max(np.abs(stat[d] - stat[0]))) for d in range(1, DEVICES))


@pytest.mark.parametrize("parallel", T.PARALLEL_MODES)
def test_every_mode_trains_mabn(parallel):
  s = _run(norm="mabn", parallel=parallel, norm_batch_size=2)
  assert s["finished"] and s["step"] == s["total_steps"] == 4
  losses = [l for _, l in s["train_loss_curve"]]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert 0.0 <= s["final_test_top1"] <= 100.0
  assert s["config"]["parallel"] == parallel
  steps = s["device_batch_stats"]["conv1"]["norm"]["step"]
  np.testing.assert_array_equal(steps, np.full(DEVICES, 4))


@pytest.mark.parametrize("norm,groups", [("bn", None), ("mabn", 2)])
def test_jit_statistics_are_global_one_device_on_the_whole_batch(norm, groups):
  sharded = _run(norm=norm, parallel="jit", norm_batch_size=groups)
  single = _run(norm=norm, parallel="jit", devices=1, batch=2 * DEVICES, norm_batch_size=groups)
  _close(sharded["variables"], single["variables"])
  np.testing.assert_allclose(
    [l for _, l in sharded["train_loss_curve"]],
    [l for _, l in single["train_loss_curve"]],
    rtol=1e-5,
  )
  assert sharded["final_test_top1"] == single["final_test_top1"]
  # One global copy: every device holds the same statistics.
  assert _spread(sharded, "chi_ema" if norm == "mabn" else "mean") == 0.0
  if norm == "mabn":  # 8 groups of 2 a step: the buffer of 4 holds this step's last 4
    assert sharded["variables"]["batch_stats"]["conv1"]["norm"]["chi_buffer"].shape == (4, 4)


def test_jit_syncbn_and_sync_stats_are_plain_global_bn():
  bn = _run(norm="bn", parallel="jit")
  syncbn = _run(norm="syncbn", parallel="jit")
  synced = _run(norm="bn", parallel="jit", sync_stats=True)
  _close(syncbn["variables"], bn["variables"], rtol=0, atol=0)
  _close(synced["variables"], bn["variables"], rtol=0, atol=0)
  losses = lambda run: [loss for _, loss in run["train_loss_curve"]]
  assert losses(bn) and np.all(np.isfinite(losses(bn)))
  np.testing.assert_allclose(losses(syncbn), losses(bn), rtol=1e-6)
  np.testing.assert_allclose(losses(synced), losses(bn), rtol=1e-6)


def test_shard_map_statistics_per_device_unless_synchronized_then_equal_jit():
  own = _run(norm="bn", parallel="shard_map")
  assert _spread(own) > 1e-3 and _spread(own, "var") > 1e-3
  synced = _run(norm="bn", parallel="shard_map", sync_stats=True)
  assert _spread(synced) < 1e-6 and _spread(synced, "var") < 1e-6
  _close(synced["variables"], _run(norm="bn", parallel="jit")["variables"])
  # Per-device statistics train a different model than global ones.
  assert own["train_loss_curve"] != synced["train_loss_curve"]


@pytest.mark.parametrize("norm,groups", [("bn", None), ("mabn", 2)])
def test_pmap_equals_shard_map(norm, groups):
  a = _run(norm=norm, parallel="pmap", norm_batch_size=groups)
  b = _run(norm=norm, parallel="shard_map", norm_batch_size=groups)
  _close(a["device_batch_stats"], b["device_batch_stats"], rtol=1e-5, atol=1e-6)
  _close(a["variables"], b["variables"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    [l for _, l in a["train_loss_curve"]], [l for _, l in b["train_loss_curve"]], rtol=1e-5
  )


def test_unknown_mode_raises():
  with pytest.raises(ValueError, match="parallel 'vmap'"):
    T.train(_config(parallel="vmap"), _tiny())


@pytest.mark.parametrize("parallel", T.PARALLEL_MODES)
def test_resume_equals_uninterrupted(parallel, tmp_path):
  kw = dict(
    norm="mabn",
    norm_batch_size=2,
    devices=2,
    batch=4,
    parallel=parallel,
    epochs=2,
    checkpoint_every=3,
    eval_every=1,
  )
  full = T.train(_config(workdir=str(tmp_path / "a"), **kw), _tiny())
  part = T.train(_config(workdir=str(tmp_path / "b"), stop_after=5, **kw), _tiny())
  assert not part["finished"] and part["step"] == 5
  rest = T.train(_config(workdir=str(tmp_path / "b"), resume=True, **kw), _tiny())
  assert rest["finished"] and rest["step"] == full["step"] == full["total_steps"] == 16
  assert full["train_loss_curve"] == rest["train_loss_curve"]
  assert full["test_top1_curve"] == rest["test_top1_curve"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, full["variables"], rest["variables"])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, full["device_batch_stats"], rest["device_batch_stats"]
  )
  assert os.path.exists(tmp_path / "b" / "summary.json")


@pytest.mark.parametrize("saved,resumed", [("pmap", "jit"), ("jit", "shard_map")])
def test_one_device_checkpoints_resume_in_another_mode(saved, resumed, tmp_path):
  # Checkpoints of one device hold the same state in every mode (with or
  # without a leading device axis of 1): a run saved in one resumes in another.
  kw = dict(
    norm="mabn", norm_batch_size=2, devices=1, batch=8, checkpoint_every=3, workdir=str(tmp_path)
  )
  part = T.train(_config(parallel=saved, stop_after=5, **kw), _tiny())
  rest = T.train(_config(parallel=resumed, resume=True, **kw), _tiny())
  assert rest["finished"] and rest["step"] == rest["total_steps"] == 8
  assert rest["train_loss_curve"][:5] == part["train_loss_curve"]
  full = _run(norm="mabn", parallel=resumed, devices=1, batch=8, norm_batch_size=2)
  _close(rest["variables"], full["variables"], rtol=1e-5, atol=1e-6)
