"""Each reproduction command on a miniature configuration."""

from __future__ import annotations

import json
import os

import pytest

from experiments import sweep

TINY = [
  "--dataset",
  "synthetic",
  "--model",
  "cnn2",
  "--width",
  "4",
  "--batch_size",
  "8",
  "--num_devices",
  "1",
  "--gn_groups",
  "2",
]


def _files(root, name):
  return sorted(os.listdir(os.path.join(root, name)))


def test_batch_size_sweep_is_incremental_and_writes_table_and_plot(tmp_path, capsys):
  args = [
    "batch_size",
    *TINY,
    "--epochs",
    "1",
    "--norms",
    "bn,gn,mabn",
    "--batch_sizes",
    "2,8",
    "--seeds",
    "0",
    "--norm_kwargs",
    "warmup_steps=2,buffer_size=4",
    "--results_root",
    str(tmp_path),
    "--name",
    "bs",
  ]
  assert sweep.main(args) == 0
  assert {"table.md", "plot.png", "results.json", "runs"} <= set(_files(tmp_path, "bs"))
  runs = _files(tmp_path / "bs", "runs")
  assert runs == ["bn_b2_s0", "bn_b8_s0", "gn_b8_s0", "mabn_b2_s0", "mabn_b8_s0"]
  # Finished runs keep their summary, not their checkpoints.
  assert not os.path.exists(tmp_path / "bs" / "runs" / "bn_b2_s0" / "checkpoints")
  table = (tmp_path / "bs" / "table.md").read_text()
  assert "| mabn |" in table and "b=2" in table
  with open(tmp_path / "bs" / "results.json") as f:
    results = json.load(f)
  assert len(results["bn/2"]["final"]) == 1
  capsys.readouterr()
  # A rerun trains nothing: every run is skipped.
  mtime = os.path.getmtime(tmp_path / "bs" / "runs" / "bn_b2_s0" / "summary.json")
  assert sweep.main(args) == 0
  assert capsys.readouterr().out.count("skip ") == 5
  assert os.path.getmtime(tmp_path / "bs" / "runs" / "bn_b2_s0" / "summary.json") == mtime


@pytest.mark.parametrize("norm", ["ws_gn", "frn"])
def test_batch_size_sweep_takes_the_batch_independent_baselines(tmp_path, norm):
  args = [
    "batch_size",
    *TINY,
    "--epochs",
    "1",
    "--norms",
    norm,
    "--batch_sizes",
    "2,8",
    "--seeds",
    "0",
    "--results_root",
    str(tmp_path),
    "--name",
    "bs",
  ]
  assert sweep.main(args) == 0
  assert _files(tmp_path / "bs", "runs") == [f"{norm}_b8_s0"]  # one run: batch-independent
  with open(tmp_path / "bs" / "runs" / f"{norm}_b8_s0" / "summary.json") as f:
    summary = json.load(f)
  assert summary["finished"] and summary["config"]["norm"] == norm
  assert 0.0 <= summary["final_test_top1"] <= 100.0
  table = (tmp_path / "bs" / "table.md").read_text()
  assert f"| {norm} | " in table and "(batch-independent)" in table


def test_recipe_sweep_runs_the_ws_gn_and_frn_recipes(tmp_path):
  args = [
    "recipes",
    *TINY,
    "--epochs",
    "1",
    "--recipes",
    "ws_gn,frn",
    "--batch_sizes",
    "2",
    "--seeds",
    "0",
    "--results_root",
    str(tmp_path),
    "--name",
    "rc",
  ]
  assert sweep.main(args) == 0
  assert _files(tmp_path / "rc", "runs") == ["frn_b8_s0", "ws_gn_b8_s0"]
  with open(tmp_path / "rc" / "runs" / "ws_gn_b8_s0" / "summary.json") as f:
    summary = json.load(f)
  assert summary["config"]["norm"] == "ws_gn"
  assert summary["config"]["gn_groups"] == 2  # GroupNorm's groups as for 'gn'
  table = (tmp_path / "rc" / "table.md").read_text()
  assert "| ws_gn |" in table and "| frn |" in table


def test_ablation_lists_every_variant_and_reuses_identical_runs(tmp_path, capsys):
  common = [
    *TINY,
    "--epochs",
    "0.25",
    "--seeds",
    "0",
    "--norm_kwargs",
    "warmup_steps=2,buffer_size=4",
    "--results_root",
    str(tmp_path),
  ]
  assert (
    sweep.main(["batch_size", *common, "--norms", "bn,mabn", "--batch_sizes", "2", "--name", "bs"])
    == 0
  )
  capsys.readouterr()
  assert sweep.main(["ablation", *common, "--name", "abl", "--reuse", "bs"]) == 0
  # BN and MABN at b = 2 are the batch-size sweep's runs, copied, not retrained.
  assert capsys.readouterr().out.count("copied ") == 2
  for ours, theirs in (("v1_bn_b2_s0", "bn_b2_s0"), ("v2_mabn_b2_s0", "mabn_b2_s0")):
    with open(tmp_path / "abl" / "runs" / ours / "summary.json") as f:
      copied = json.load(f)
    with open(tmp_path / "bs" / "runs" / theirs / "summary.json") as f:
      original = json.load(f)
    assert copied == original
  assert sweep._same_run(
    {**original["config"], "workdir": "x", "norm_batch_size": 2}, original["config"]
  )
  assert not sweep._same_run({**original["config"], "lr": 1.0}, original["config"])
  # CBN's history per group is its ordinary history with one group a step.
  cbn = {
    **original["config"],
    "norm": "cbn",
    "norm_kwargs": {"backward": "exact"},
    "norm_batch_size": 8,
  }
  per_group = {**cbn, "norm_kwargs": {"backward": "exact", "group_history": True}}
  assert sweep._same_run({**per_group, "norm_batch_size": None}, cbn)
  assert not sweep._same_run({**per_group, "norm_batch_size": 2}, {**cbn, "norm_batch_size": 2})
  # Evaluation-only fields (precise-BN test accuracy; a validation split held
  # out beside a training subset) do not change the trained weights.
  subset = {**original["config"], "train_subset": 64}
  assert sweep._same_run({**subset, "val_split": 100, "precise_bn_batches": 5}, subset)
  assert not sweep._same_run(
    {**original["config"], "train_subset": None, "val_split": 100},
    {**original["config"], "train_subset": None},
  )
  table = (tmp_path / "abl" / "table.md").read_text()
  for label, *_ in sweep.ABLATION:
    assert f"| {label} | " in table
  assert "not run" not in table and "only the backward statistic averaged" in table
  assert os.path.exists(tmp_path / "abl" / "plot.png")
  # A dry run tabulates the finished runs again; it trains nothing.
  with open(tmp_path / "abl" / "results.json") as f:
    trained = json.load(f)
  assert sweep.main(["ablation", *common, "--name", "abl", "--dry_run"]) == 0
  with open(tmp_path / "abl" / "results.json") as f:
    assert json.load(f) == trained
  rows = lambda text: [line for line in text.splitlines() if line.startswith("|")]
  assert rows((tmp_path / "abl" / "table.md").read_text()) == rows(table)


def test_inference_speed_measures_every_normalizer(tmp_path):
  assert (
    sweep.main(
      [
        "speed",
        "--model",
        "cnn2",
        "--width",
        "4",
        "--gn_groups",
        "2",
        "--batch",
        "4",
        "--image_size",
        "8",
        "--iters",
        "1",
        "--repeats",
        "1",
        "--results_root",
        str(tmp_path),
        "--name",
        "speed",
      ]
    )
    == 0
  )
  with open(tmp_path / "speed" / "results.json") as f:
    rows = json.load(f)["rows"]
  assert {"BN (folded)", "MABN (folded)", "GN", "LN", "IN", "none"} <= set(rows)
  assert {"WS+GN (kernels standardized once)", "WS+GN (kernels standardized every call)"} <= set(
    rows
  )
  assert "FRN" in rows
  assert all(r["images_per_s"] > 0 for r in rows.values())


def test_statistics_records_four_bn_statistics_and_mabn_averages(tmp_path):
  pytest.importorskip("mabn_jax.recording")
  assert (
    sweep.main(
      [
        "statistics",
        *TINY,
        "--steps",
        "4",
        "--channels",
        "2",
        "--norm_kwargs",
        "warmup_steps=2,buffer_size=4",
        "--results_root",
        str(tmp_path),
        "--name",
        "stats",
      ]
    )
    == 0
  )
  with open(tmp_path / "stats" / "results.json") as f:
    results = json.load(f)
  assert set(results) == {"BN b=2", "BN b=8", "MABN b=2"}
  bn = results["BN b=2"]["step_variance"]["conv1/norm"]
  assert set(bn) == {"mu", "var", "g", "psi"}
  mabn = results["MABN b=2"]["step_variance"]["conv1/norm"]
  assert {"chi_used", "psi_used"} <= set(mabn)
  assert len(results["BN b=2"]["loss_curve"]) == 4
  assert os.path.exists(tmp_path / "stats" / "plot.png")


def test_recording_statistics_does_not_change_training(tmp_path):
  pytest.importorskip("mabn_jax.recording")
  common = [
    "statistics",
    *TINY,
    "--steps",
    "5",
    "--channels",
    "2",
    "--norm_kwargs",
    "warmup_steps=2,buffer_size=4",
    "--results_root",
    str(tmp_path),
  ]
  assert sweep.main(common + ["--name", "with"]) == 0
  assert sweep.main(common + ["--name", "without", "--no_record"]) == 0
  curves = []
  for name in ("with", "without"):
    with open(tmp_path / name / "results.json") as f:
      curves.append({k: v["loss_curve"] for k, v in json.load(f).items()})
  assert curves[0] == curves[1]
  assert len(curves[0]["MABN b=2"]) == 5


def test_recipe_sweep_tables_val_test_and_precise_and_plots_diagnostics(tmp_path, capsys):
  args = [
    "recipes",
    *TINY,
    "--epochs",
    "1",
    "--recipes",
    "cbn_exact,gn",
    "--batch_sizes",
    "2,8",
    "--seeds",
    "0",
    "--precise_bn_batches",
    "2",
    "--diagnose",
    "true",
    "--results_root",
    str(tmp_path),
    "--name",
    "rc",
  ]
  assert sweep.main(args) == 0
  assert {"table.md", "results.json", "diagnostics.png", "runs"} <= set(_files(tmp_path, "rc"))
  assert _files(tmp_path / "rc", "runs") == ["cbn_exact_b2_s0", "cbn_exact_b8_s0", "gn_b8_s0"]
  with open(tmp_path / "rc" / "runs" / "cbn_exact_b2_s0" / "summary.json") as f:
    summary = json.load(f)
  assert summary["config"]["norm"] == "cbn"
  assert summary["config"]["norm_kwargs"] == {"backward": "exact", "running_stats": "batch"}
  table = (tmp_path / "rc" / "table.md").read_text()
  assert "| cbn_exact | 2 |" in table and "test, precise BN" in table
  mechanism = table.split("Mechanism")[1]
  assert mechanism.count("| cbn_exact | 2 |") == 1 and mechanism.count("| gn | 8 |") == 1
  with open(tmp_path / "rc" / "results.json") as f:
    results = json.load(f)
  assert results["cbn_exact/2"]["test, precise BN"][0] is not None
  # The test column again, one column per normalization batch, and its plot.
  against_b = table.split("Test top-1 against normalization batch size")[1].split("Recipes:")[0]
  assert "| recipe | b=2 | b=8 |" in against_b
  assert "| cbn_exact | " in against_b and "(batch-independent) | ″ |" in against_b
  assert f"{results['cbn_exact/2']['test'][0]:.2f} (1)" in against_b
  assert os.path.exists(tmp_path / "rc" / "plot.png")
  assert results["gn/None"]["test, precise BN"] == [None]
  capsys.readouterr()
  assert sweep.main(args) == 0
  assert capsys.readouterr().out.count("skip ") == 3


def test_dry_run_before_any_run_and_the_fast_cbn_recipe(tmp_path):
  """A --dry_run with nothing trained writes an empty table and plot (it
  used to fail on the missing directory); the CBN recipe with the cheaper
  derivatives (every 2nd position, bfloat16 buffers given as a JSON string)
  trains and records its settings."""
  args = [
    "recipes",
    *TINY,
    "--epochs",
    "0.25",
    "--recipes",
    "cbn_exact_pooled_fast",
    "--batch_sizes",
    "2",
    "--seeds",
    "0",
    "--results_root",
    str(tmp_path),
    "--name",
    "fast",
  ]
  assert sweep.main([*args, "--dry_run"]) == 0
  assert {"table.md", "plot.png"} <= set(_files(tmp_path, "fast"))
  assert not os.path.exists(tmp_path / "fast" / "runs" / "cbn_exact_pooled_fast_b2_s0")
  assert sweep.main(args) == 0
  with open(tmp_path / "fast" / "runs" / "cbn_exact_pooled_fast_b2_s0" / "summary.json") as f:
    summary = json.load(f)
  assert summary["config"]["norm_kwargs"] == {
    "backward": "exact",
    "running_stats": "pooled",
    "derivative_stride": 2,
    "derivative_dtype": "bfloat16",
  }
  assert summary["finished"] and summary["final_test_top1"] is not None


def _runs(**test_by_seed):
  return [{"config": {"seed": int(s[1:])}, "final_test_top1": v} for s, v in test_by_seed.items()]


def test_differences_to_bn_pair_runs_by_seed():
  runs, bn = _runs(s0=70.0, s1=66.0, s2=64.0), _runs(s1=60.0, s0=61.0)
  assert sweep.paired_differences(runs, bn) == [9.0, 6.0]  # seeds 0, 1; seed 2 has no BN
  assert sweep.paired_differences(runs, []) == []


def test_gap_closed_is_the_ratio_of_mean_gaps_with_per_seed_spread():
  bn_small, bn_large = _runs(s0=60.0, s1=62.0), _runs(s0=70.0, s1=68.0)
  runs = _runs(s0=65.0, s1=68.0, s2=80.0)
  share, per_seed = sweep.gap_closed(runs, bn_small, bn_large)
  # Means: runs 71, BN small 61, BN large 69: (71 - 61) / (69 - 61).
  assert share == pytest.approx(10.0 / 8.0)
  assert per_seed == pytest.approx([5.0 / 10.0, 6.0 / 6.0])
  # BN's gap under MIN_GAP points (in the means): no share.
  assert sweep.gap_closed(runs, bn_small, _runs(s0=62.5, s1=62.9)) == (None, [])
  assert sweep.gap_closed([], bn_small, bn_large) == (None, [])


def test_recipe_table_against_bn_has_differences_and_shares():
  rows = {
    ("bn", 2): _runs(s0=60.0, s1=62.0),
    ("bn", 8): _runs(s0=70.0, s1=68.0),
    ("mabn", 2): _runs(s0=68.0, s1=67.0),
    ("mabn", 8): _runs(s0=71.0),
    ("gn", None): _runs(s0=50.0),
  }
  table = sweep._recipes_against_bn(["bn", "mabn", "gn"], [2, 8], rows)
  assert "| mabn | +6.50 ± 2.12 (2) | +1.00 (1) |" in table
  assert "| gn | -10.00 (1) | -20.00 (1) |" in table  # batch-independent: one run for every b
  # MABN closes (67.5 - 61) / (69 - 61) of BN's gap; per seed 8/10 and 5/6.
  assert "| mabn | 81.2%; per seed 82 ± 2% (2) |" in table
  assert sweep._recipes_against_bn(["mabn", "gn"], [2, 8], rows) == ""


def test_recipe_table_at_one_batch_size_has_no_share_of_a_gap():
  rows = {("bn", 2): _runs(s0=60.0, s1=62.0), ("mabn", 2): _runs(s0=68.0, s1=67.0)}
  table = sweep._recipes_against_bn(["bn", "mabn"], [2], rows)
  assert "| mabn | +6.50 ± 2.12 (2) |" in table
  assert "Share of BN's gap" not in table


def test_steps_to_loss_is_the_first_logged_window_at_or_below_the_threshold():
  curve = [[10, 2.3], [20, 1.5], [30, 1.2], [40, 1.3], [50, 0.9]]
  assert sweep.steps_to_loss(curve, 1.2) == 30  # at the threshold counts
  assert sweep.steps_to_loss(curve, 1.4) == 30
  assert sweep.steps_to_loss(curve, 2.5) == 10
  assert sweep.steps_to_loss(curve, 0.5) is None
  assert sweep.steps_to_loss([], 1.0) is None
  assert sweep._steps_cell([30, 50, None]) == "40 ± 14 (2/3)"
  assert sweep._steps_cell([None, None]) == "—"


def test_placement_sweep_writes_table_plot_and_json_and_skips_on_rerun(tmp_path, capsys):
  args = [
    "placement",
    *TINY,
    "--epochs",
    "0.25",
    "--norms",
    "mabn",
    "--batch_sizes",
    "2,8",
    "--seeds",
    "0",
    "--norm_kwargs",
    "warmup_steps=2,buffer_size=4",
    "--loss_threshold",
    "100",
    "--results_root",
    str(tmp_path),
    "--name",
    "pl",
  ]
  assert sweep.main(args) == 0
  assert {"table.md", "plot.png", "results.json", "runs"} <= set(_files(tmp_path, "pl"))
  # Three placements per b; no normalization once (b does not matter to it).
  assert _files(tmp_path / "pl", "runs") == [
    "mabn_b2_s0",
    "mabn_b2_s0_first",
    "mabn_b2_s0_first_half",
    "mabn_b8_s0",
    "mabn_b8_s0_first",
    "mabn_b8_s0_first_half",
    "none_b8_s0",
  ]
  with open(tmp_path / "pl" / "runs" / "mabn_b2_s0_first" / "summary.json") as f:
    assert json.load(f)["config"]["norm_layers"] == "first"
  with open(tmp_path / "pl" / "results.json") as f:
    results = json.load(f)
  assert results["loss_threshold"] == 100
  cells = results["cells"]
  assert set(cells) == {f"mabn/{p}/{b}" for p in ("all", "first_half", "first") for b in (2, 8)} | {
    "none/none/None"
  }
  first = cells["mabn/first/2"]
  assert len(first["final"]) == 1 and first["mean_loss_curve"]
  assert first["steps_to_threshold"] == [first["mean_loss_curve"][0][0]]  # every loss < 100
  table = (tmp_path / "pl" / "table.md").read_text()
  assert "| normalizer | placement | b=2 top-1 | b=2 steps to loss ≤ 100 | b=8 top-1 |" in table
  for p in ("all", "first_half", "first"):
    assert table.count(f"| mabn | {p} | ") == 1
  assert (
    f"| mabn | first | {first['final'][0]:.2f} (1) | {first['steps_to_threshold'][0]} (1/1) |"
  ) in table
  assert "| none (no normalizer) | none | " in table and "(batch-independent)" in table
  capsys.readouterr()
  # A rerun trains nothing; a threshold never reached reads '—'.
  assert sweep.main(args[:-6] + ["--loss_threshold", "0", *args[-4:]]) == 0
  assert capsys.readouterr().out.count("skip ") == 7
  table = (tmp_path / "pl" / "table.md").read_text()
  assert "| mabn | first | " in table and "(1) | — |" in table
  with open(tmp_path / "pl" / "results.json") as f:
    assert json.load(f)["cells"]["mabn/first/2"]["steps_to_threshold"] == [None]


@pytest.mark.parametrize("command", ["placement", "statistics", "speed"])
def test_sweep_flags_of_its_own_leave_the_preset_config_unchanged(command, monkeypatch):
  """``--steps`` (statistics) and ``--image_size`` (speed) are the sweep's own
  options: their defaults must not reach the runs' Config."""
  from experiments.loop.presets import preset
  from experiments.sweeps import cli

  seen = {}
  monkeypatch.setitem(cli.COMMANDS, command, lambda args, base: seen.update(base=base))
  assert cli.main([command, "--preset", "quick", "--steps", "7", "--image_size", "9"]) == 0
  assert seen["base"] == preset("quick", progress=False)
