"""benchmarks/step_rusage.py: per-step system time and page faults."""

import argparse
import json
import types

import jax.numpy as jnp
import pytest

from benchmarks import bench, step_rusage


def _usage(utime, stime, minflt):
  return types.SimpleNamespace(ru_utime=utime, ru_stime=stime, ru_minflt=minflt)


class _CountingStepper:
  def __init__(self):
    self.prepared = self.called = 0

  def prepare(self):
    self.prepared += 1

  def __call__(self):
    self.called += 1
    return jnp.zeros(())


def test_step_usage_is_the_rusage_difference_across_one_prepared_step():
  stepper = _CountingStepper()
  usage = step_rusage.step_usage(
    stepper, before=lambda: _usage(1.0, 0.5, 100), after=lambda: _usage(1.25, 0.625, 356)
  )
  assert stepper.prepared == 1 and stepper.called == 1
  assert usage["user_ms"] == pytest.approx(250.0)
  assert usage["sys_ms"] == pytest.approx(125.0)
  assert usage["minor_faults"] == 256.0
  assert usage["wall_ms"] >= 0.0


def test_measure_reports_every_variant_against_flax_bn_from_later_steps(monkeypatch):
  calls = []
  real = step_rusage.step_usage
  monkeypatch.setattr(step_rusage, "step_usage", lambda s: calls.append(s) or real(s))
  rows = step_rusage.measure(
    bench.SMOKE_MODEL, ["flax_bn", "mabn"], rounds=2, burst=3, log=lambda _: None
  )
  # One untimed step each, then 2 turns of 3 steps each.
  assert len(calls) == 2 + 2 * 2 * 3
  assert set(rows) == {"flax_bn", "mabn"}
  assert rows["flax_bn"]["wall_vs_flax_bn"] == 1.0
  for row in rows.values():
    assert row["wall_ms"] > 0 and row["temp_mib"] > 0 and row["user_ms"] >= 0
    assert row["faulted_mib"] == pytest.approx(row["minor_faults"] * 4096 / 2**20)
  assert "| mabn |" in step_rusage.table(rows)


def test_a_burst_without_a_measured_step_is_refused():
  with pytest.raises(ValueError, match="--burst must be at least 2"):
    step_rusage.measure(bench.SMOKE_MODEL, ["flax_bn"], rounds=1, burst=1)


def test_environment_settings_are_name_value_pairs():
  assert step_rusage.parse_environment("") == {}
  assert step_rusage.parse_environment("A=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == {
    "A": "1",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
  }
  with pytest.raises(ValueError, match="'A' is not NAME=VALUE"):
    step_rusage.parse_environment("A")


def test_children_alternate_the_environments_and_keep_their_rows():
  seen = []

  def fake_run(command, env, check, stdout):
    seen.append(env.get("MABN_TEST_SETTING"))
    out = command[command.index("--json") + 1]
    with open(out, "w") as f:
      json.dump({"rows": {"flax_bn": {"wall_ms": float(len(seen))}}}, f)

  args = argparse.Namespace(
    network=bench.SMOKE_MODEL,
    norms=["flax_bn"],
    rounds=1,
    burst=2,
    pairs=2,
    environments=["", "MABN_TEST_SETTING=1"],
  )
  results = step_rusage.in_children(args, run=fake_run)
  assert seen == [None, "1", None, "1"]
  assert [(r["environment"], r["pair"]) for r in results] == [
    ("", 0),
    ("MABN_TEST_SETTING=1", 0),
    ("", 1),
    ("MABN_TEST_SETTING=1", 1),
  ]
  assert [r["rows"]["flax_bn"]["wall_ms"] for r in results] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--burst", "1"], "--burst must be at least 2"),
    (["--pairs", "0"], "--pairs must be at least 1"),
  ],
)
def test_command_line_refuses_counts_that_measure_nothing(flags, message, capsys):
  with pytest.raises(SystemExit):
    step_rusage.main(["--network", bench.SMOKE_MODEL, *flags])
  assert message in capsys.readouterr().err


def test_reports_share_the_process_meta_with_the_other_benchmarks(tmp_path, monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  out = tmp_path / "rusage.json"
  assert (
    step_rusage.main(
      [
        "--network",
        bench.SMOKE_MODEL,
        "--norms",
        "flax_bn",
        "--rounds",
        "1",
        "--burst",
        "2",
        "--json",
        str(out),
      ]
    )
    == 0
  )
  report = json.loads(out.read_text())
  assert set(bench.process_meta()) <= set(report)
  assert report["environment"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert report["rows"]["flax_bn"]["minor_faults"] >= 0
