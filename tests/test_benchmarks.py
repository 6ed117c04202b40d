"""Smoke test of the benchmark command: it runs and writes well-formed output."""

from __future__ import annotations

import json

from benchmarks import bench


def test_smoke_run_writes_tables_json_and_target_rows(tmp_path):
  md, js = tmp_path / "BENCH.md", tmp_path / "bench.json"
  code = bench.main(["--smoke", "--rounds", "1", "--networks", "resnet18",
                     "--norms", "bn", "mabn", "--variants", "bn_folded", "mabn_folded",
                     "gn", "none", "--markdown", str(md), "--json", str(js)])
  assert code == 0
  report = json.loads(js.read_text())
  train = report["networks"]["resnet18"]["train"]
  assert set(train) == {"bn", "mabn"}
  for r in train.values():
    assert r["step_ms"] > 0 and r["compile_s"] > 0 and r["total_mib"] > 0
  infer = report["networks"]["resnet18"]["infer"]
  assert all(v["images_per_s"] > 0 for v in infer.values())
  targets = {row["target"] for row in report["targets"]}
  assert "MABN / BN training step" in targets and train["bn"]["gflops"] > 0
  assert "MABN / BN training step" in targets and "folded MABN / GN inference" in targets
  text = md.read_text()
  assert "| bn |" in text and "### Targets" in text
