"""Tests for the training loop (experiments/loop/): the loop with every registry normalizer."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import mabn_jax as mj
from experiments import data as D
from experiments import train as T

KWARGS = {
  "mabn": {"warmup_steps": 2, "buffer_size": 4, "renorm_start": 4},
  "gn": {"num_groups": 2},
  "ws_gn": {"num_groups": 2},
}


@pytest.fixture(scope="module")
def tiny():
  return D.synthetic(n_train=64, n_test=24)


def _config(norm, **kw):
  base = dict(
    norm=norm,
    model="cnn2",
    width=4,
    batch_size=8,
    norm_batch_size=2,
    epochs=1,
    log_every=2,
    num_devices=1,
    progress=False,
    lr=0.05,
    norm_kwargs=KWARGS.get(norm, {}),
  )
  base.update(kw)
  return T.Config(**base)


def _train_records(workdir):
  return [
    {k: v for k, v in r.items() if k != "steps_per_sec"}
    for r in T.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  ]


@pytest.mark.parametrize("norm", mj.normalizer_names())
def test_every_registry_normalizer_trains_through_the_loop(norm, tiny):
  summary = T.train(_config(norm), tiny)
  assert summary["finished"] and summary["step"] == summary["total_steps"] == 8
  losses = [l for _, l in summary["train_loss_curve"]]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert 0.0 <= summary["final_test_top1"] <= 100.0
  init = T.build(_config(norm), 4).init(
    jax.random.PRNGKey(0), tiny.train.images[:8] * 0.0, train=True
  )
  moved = jax.tree_util.tree_map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
    init["params"],
    summary["variables"]["params"],
  )
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  if norm in T.BATCH_NORMALIZERS:
    assert "batch_stats" in summary["variables"]


def test_resume_equals_uninterrupted(tiny, tmp_path):
  kw = dict(epochs=2, checkpoint_every=3, eval_every=1)
  full = T.train(_config("mabn", workdir=str(tmp_path / "a"), **kw), tiny)
  part = T.train(_config("mabn", workdir=str(tmp_path / "b"), stop_after=5, **kw), tiny)
  assert not part["finished"] and part["step"] == 5
  assert not os.path.exists(tmp_path / "b" / "summary.json")
  rest = T.train(_config("mabn", workdir=str(tmp_path / "b"), resume=True, **kw), tiny)
  assert rest["finished"]
  assert _train_records(tmp_path / "a") == _train_records(tmp_path / "b")
  assert full["train_loss_curve"] == rest["train_loss_curve"]
  assert full["final_test_top1"] == rest["final_test_top1"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, full["variables"], rest["variables"])
  with open(tmp_path / "b" / "summary.json") as f:
    summary = json.load(f)
  for key in (
    "config",
    "git_commit",
    "device",
    "wall_time_s",
    "best_test_top1",
    "final_test_top1",
    "train_loss_curve",
  ):
    assert key in summary


@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_data_parallel_syncbn_shares_statistics_bn_does_not(tiny, parallel):
  out = {}
  for norm in ("bn", "syncbn"):
    s = T.train(
      _config(norm, num_devices=2, batch_size=4, norm_batch_size=None, parallel=parallel), tiny
    )
    out[norm] = s

  # Per-device BN: the two devices saw different halves, so their running
  # means differ; SyncBN averages the statistics over devices.
  def spread(s):
    mean = s["device_batch_stats"]["conv1"]["norm"]["mean"]
    assert mean.shape[0] == 2
    return float(np.max(np.abs(mean[0] - mean[1])))

  assert spread(out["bn"]) > 1e-4
  assert spread(out["syncbn"]) < 1e-6
  assert out["bn"]["train_loss_curve"] != out["syncbn"]["train_loss_curve"]


def test_small_batch_option_makes_the_sgd_batch_b(tiny):
  cfg = _config("bn", small_batch=True, norm_batch_size=4, batch_size=32)
  assert cfg.device_batch() == 4
  s = T.train(cfg, tiny)
  assert s["total_steps"] == 16


def test_bad_batch_configuration_raises(tiny):
  with pytest.raises(ValueError, match="must divide"):
    T.train(_config("bn", batch_size=8, norm_batch_size=3), tiny)
  with pytest.raises(ValueError, match="small_batch"):
    T.train(_config("bn", small_batch=True, norm_batch_size=None), tiny)


def test_schedules_warmup_cosine_and_step():
  cfg = T.Config(lr=0.1, warmup_epochs=1, schedule="cosine")
  s = T.learning_rate_schedule(cfg, steps_per_epoch=10, total_steps=100)
  assert float(s(0)) == pytest.approx(0.01)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(99)) < 1e-3
  step = T.learning_rate_schedule(
    dataclasses.replace(cfg, schedule="step", step_epochs=(5, 8)), 10, 100
  )
  assert float(step(20)) == pytest.approx(0.1)
  assert float(step(60)) == pytest.approx(0.01)
  assert float(step(90)) == pytest.approx(0.001)


def test_weight_decay_only_on_kernels():
  cfg = T.Config(lr=1.0, momentum=0.0, weight_decay=0.5, schedule="constant")
  tx = T.optimizer(cfg, 1.0)
  params = {"conv": {"kernel": np.ones(2, np.float32)}, "norm": {"scale": np.ones(2, np.float32)}}
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def test_cli_runs_two_normalizers_and_prints_the_table(tmp_path, capsys):
  rc = T.main(
    [
      "--dataset",
      "synthetic",
      "--model",
      "cnn2",
      "--width",
      "4",
      "--epochs",
      "1",
      "--batch_size",
      "8",
      "--num_devices",
      "1",
      "--norms",
      "bn,mabn",
      "--norm_kwargs",
      "",
      "--workdir",
      str(tmp_path),
      "--progress",
      "false",
    ]
  )
  assert rc == 0
  out = capsys.readouterr().out
  assert "bn_b2_s0" in out and "mabn_b2_s0" in out and "final top-1" in out
  for run in ("bn_b2_s0", "mabn_b2_s0"):
    with open(tmp_path / run / "summary.json") as f:
      assert json.load(f)["config"]["norm_batch_size"] == 2


def test_main_job_runs_bn_large_and_small_and_mabn_small_and_reports_the_gap(tmp_path, capsys):
  # The README's first command on a miniature config: the main job's plan
  # (BN at the SGD batch and at 2, MABN at 2, two seeds), its table and plot.
  rc = T.main(
    [
      "--dataset",
      "synthetic",
      "--model",
      "cnn2",
      "--width",
      "4",
      "--epochs",
      "1",
      "--batch_size",
      "8",
      "--num_devices",
      "1",
      "--norm_kwargs",
      "",
      "--workdir",
      str(tmp_path),
      "--progress",
      "false",
    ]
  )
  assert rc == 0
  out = capsys.readouterr().out
  names = [json.loads(line)["name"] for line in out.splitlines() if line.startswith("{")]
  assert names == ["bn_b8_s0", "bn_b2_s0", "mabn_b2_s0", "bn_b8_s1", "bn_b2_s1", "mabn_b2_s1"]
  assert "BN at b=2 is" in out and "below BN at b=8" in out
  assert (tmp_path / "main_job.png").exists()
  with open(tmp_path / "main_job.json") as f:
    numbers = json.load(f)
  summaries = []
  for name in names:
    with open(tmp_path / name / "summary.json") as f:
      summaries.append(json.load(f))
  top1 = lambda n: np.mean([s["final_test_top1"] for s in summaries if s["name"].startswith(n)])
  assert numbers["bn_gap"] == pytest.approx(top1("bn_b8") - top1("bn_b2"))
  assert numbers["top1"]["mabn_b2"] == pytest.approx(top1("mabn_b2"))


def test_main_job_table_computes_the_gap_and_the_recovered_share():
  def run(norm, b, top1):
    return {
      "config": {"norm": norm, "norm_batch_size": b, "batch_size": 32},
      "final_test_top1": top1,
    }

  runs = [
    run("bn", None, 96.0),
    run("bn", 2, 90.0),
    run("mabn", 2, 94.0),
    run("bn", None, 94.0),
    run("bn", 2, 88.0),
    run("mabn", 2, 95.0),
  ]
  text, numbers = T.main_job_table(runs)
  assert numbers["bn_gap"] == pytest.approx(95.0 - 89.0)
  assert numbers["mabn_recovered"] == pytest.approx((94.5 - 89.0) / 6.0)
  assert "recovers 92% of that gap" in text and "95.00 ± 1.41" in text


def test_presets_are_consistent():
  for name in T.PRESETS:
    cfg = T.preset(name)
    cfg.validate()
  assert T.preset("imagenet").norm_batch_size == 2 and T.preset("imagenet").batch_size == 32
  assert T.preset("cifar_cpu").train_subset == 10000
  with pytest.raises(ValueError, match="unknown preset"):
    T.preset("tiny")


def test_relative_step_options_resolve_to_steps():
  cfg = T.Config(norm="cbn", norm_kwargs={"burn_in": "67%", "window": 4})
  kw = cfg.normalizer_kwargs(total_steps=300, steps_per_epoch=30)
  assert kw["burn_in"] == 201 and kw["window"] == 4
  cfg = T.Config(norm="brn", norm_kwargs={"warmup_steps": "2ep", "ramp_steps": 7})
  assert cfg.normalizer_kwargs(300, 30)["warmup_steps"] == 60
  assert cfg.normalizer_kwargs(300, 30)["ramp_steps"] == 7
  step = T.Config(
    norm="cbn", schedule="step", step_epochs=(8, 11), norm_kwargs={"burn_in": "first_decay"}
  )
  assert step.normalizer_kwargs(360, 30)["burn_in"] == 240
  with pytest.raises(ValueError, match="first_decay.*step schedule"):
    T.Config(norm="cbn", norm_kwargs={"burn_in": "first_decay"}).normalizer_kwargs(300, 30)
  with pytest.raises(ValueError, match="burn_in='often'"):
    T.Config(norm="cbn", norm_kwargs={"burn_in": "often"}).normalizer_kwargs(300, 30)
  with pytest.raises(ValueError, match="relative to the run"):
    T.Config(norm="cbn", norm_kwargs={"burn_in": "50%"}).normalizer_kwargs()


def test_relative_burn_in_reaches_the_layer(tiny):
  cfg = _config("cbn", norm_kwargs={"burn_in": "50%"})
  model = T.build(cfg, 4, total_steps=8, steps_per_epoch=8)
  assert model.normalizer.options["burn_in"] == 4
  summary = T.train(cfg, tiny)
  stats = summary["variables"]["batch_stats"]
  # 8 steps, burn-in 4: the last 4 steps buffered (window 4 holds 3).
  assert int(stats["conv1"]["norm"]["count"]) == 3
  assert int(stats["conv1"]["norm"]["step"]) == 8


def test_small_batch_scales_the_learning_rate_linearly():
  cfg = T.Config(
    lr=0.08,
    batch_size=32,
    norm_batch_size=4,
    small_batch=True,
    warmup_epochs=0,
    schedule="constant",
  )
  assert cfg.peak_lr() == pytest.approx(0.01)
  assert float(T.learning_rate_schedule(cfg, 10, 100)(5)) == pytest.approx(0.01)
  assert dataclasses.replace(cfg, small_batch=False).peak_lr() == pytest.approx(0.08)


def test_validation_split_is_evaluated_during_training_and_test_once(tiny, tmp_path):
  with_val = dataclasses.replace(tiny, val=D.Split(tiny.test.images[:10], tiny.test.labels[:10]))
  s = T.train(_config("bn", epochs=3, eval_every=1, workdir=str(tmp_path)), with_val)
  assert [step for step, _ in s["val_top1_curve"]] == [8, 16, 24]
  assert [step for step, _ in s["test_top1_curve"]] == [24]
  assert s["final_val_top1"] == s["val_top1_curve"][-1][1]
  records = T.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert sum("test_top1" in r for r in records) == 1
  # Without a validation split every evaluation is on the test split.
  s = T.train(_config("bn", epochs=2, eval_every=1), tiny)
  assert len(s["test_top1_curve"]) == 2 and s["final_val_top1"] is None


@pytest.mark.parametrize("norm", ["cbn", "bn", "gn"])
def test_precise_bn_evaluation_is_reported_for_batch_statistics(norm, tiny):
  s = T.train(_config(norm, precise_bn_batches=3), tiny)
  if norm == "gn":
    assert "final_test_top1_precise" not in s
    return
  assert 0.0 <= s["final_test_top1_precise"] <= 100.0


def test_diagnose_logs_layer_diagnostics_without_changing_training(tiny, tmp_path):
  plain = T.train(_config("bn", workdir=str(tmp_path / "a")), tiny)
  diag = T.train(_config("bn", diagnose=True, workdir=str(tmp_path / "b")), tiny)
  assert plain["train_loss_curve"] == diag["train_loss_curve"]
  records = [
    r for r in T.read_metrics(os.path.join(tmp_path / "b", "metrics.jsonl")) if "loss" in r
  ]
  assert all(set(r["diag"]) == {"conv1", "conv2"} for r in records)
  entry = records[-1]["diag"]["conv2"]
  assert set(entry) == {"kernel_norm", "grad_cos", "grad_cos_channel", "mu_over_sigma"}
  assert entry["kernel_norm"] > 0 and entry["mu_over_sigma"] >= 0


def test_norm_layers_reach_the_model_and_bad_values_name_the_field(tiny):
  assert T.Config().norm_layers == "all"
  x = tiny.train.images[:8]
  for layers, normalized in (
    ("all", {"conv1", "conv2"}),
    ("first", {"conv1"}),
    ("none", set()),
    ("2", {"conv2"}),
  ):
    cfg = _config("bn", norm_layers=layers)
    cfg.validate()
    variables = T.build(cfg, 4).init(jax.random.PRNGKey(0), x, train=True)
    assert set(variables.get("batch_stats", {})) == normalized
  assert _config("bn").run_name() == "bn_b2_s0"  # the default keeps its run names
  assert _config("bn", norm_layers="first_half").run_name() == "bn_b2_s0_first_half"
  assert _config("bn", norm_layers="1,2").run_name() == "bn_b2_s0_1-2"
  for bad in ("second", "0", "1,x"):
    with pytest.raises(
      ValueError,
      match=r"Config\.norm_layers=.*'all', 'first', 'first_half', "
      r"'none'",
    ):
      _config("bn", norm_layers=bad).validate()
  with pytest.raises(ValueError, match=r"Config\.norm_layers='first' needs model"):
    _config("bn", model="resnet20", norm_layers="first").validate()
  with pytest.raises(ValueError, match=r"Config\.norm_layers"):
    T.train(_config("bn", norm_layers="last"), tiny)


def test_norm_layers_command_line_option():
  import argparse

  parser = argparse.ArgumentParser()
  T.add_config_arguments(parser)
  for value in ("first_half", "none", "1,3"):
    args = parser.parse_args(["--norm_layers", value])
    assert T.preset("quick", **T.overrides_from_args(args)).norm_layers == value
  assert T.preset("quick", **T.overrides_from_args(parser.parse_args([]))).norm_layers == "all"
