"""Smoke test of the benchmark command: it runs and writes well-formed output."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from benchmarks import bench


def test_smoke_run_writes_tables_json_and_target_rows(tmp_path):
  md, js = tmp_path / "BENCH.md", tmp_path / "bench.json"
  code = bench.main(
    [
      "--smoke",
      "--rounds",
      "1",
      "--networks",
      "resnet18",
      "--norms",
      "flax_bn",
      "mabn",
      "--variants",
      "mabn_folded",
      "gn",
      "none",
      "--markdown",
      str(md),
      "--json",
      str(js),
    ]
  )
  assert code == 0
  report = json.loads(js.read_text())
  train = report["networks"]["resnet18"]["train"]
  assert set(train) == {"flax_bn", "mabn"}
  for r in train.values():
    assert r["step_ms"] > 0 and r["compile_s"] > 0 and r["total_mib"] > 0
    assert len(r["step_ms_per_compile"]) == 1 and len(r["step_ms_all"][0]) == 1
  infer = report["networks"]["resnet18"]["infer"]
  assert all(v["images_per_s"] > 0 for v in infer.values())
  targets = {row["target"] for row in report["targets"]}
  assert "MABN / flax BN training step" in targets and train["mabn"]["gflops"] > 0
  assert {"folded MABN / GN inference", "folded MABN / none inference"} <= targets
  text = md.read_text()
  assert "| mabn |" in text and "| flax_bn |" in text and "/ flax BN" in text
  assert "### Targets" in text


def test_ws_gn_variants_compute_the_same_inference_and_get_their_target_row():
  run_in_graph, model, variables, images = bench.build_inference(bench.SMOKE_MODEL, "ws_gn", 4, 8)
  precomputed = bench.build_inference(bench.SMOKE_MODEL, "ws_gn_precomputed", 4, 8)
  assert precomputed[1].normalizer.name == "gn" and model.normalizer.name == "ws_gn"
  np.testing.assert_allclose(precomputed[0](), run_in_graph(), rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(bench.build_inference(bench.SMOKE_MODEL, "frn", 4, 8)[0]()))
  args = bench.parse_args(
    [
      "--smoke",
      "--rounds",
      "1",
      "--networks",
      "cnn6",
      "--skip-train",
      "--variants",
      "mabn_folded",
      "ws_gn_precomputed",
      "none",
    ]
  )
  report = bench.run(args)
  targets = {row["target"]: row for row in report["targets"]}
  row = targets["folded MABN / WS+GN (kernels precomputed) inference"]
  infer = report["networks"]["cnn6"]["infer"]
  expected = infer["mabn_folded"]["images_per_s"] / infer["ws_gn_precomputed"]["images_per_s"]
  assert row["ratio"] == pytest.approx(expected) and row["bound"] == ">= 1.1"


def test_report_keeps_the_environment_variables_that_change_timings(monkeypatch):
  environ = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "XLA_FLAGS": "--x", "HOME": "/h"}
  assert bench.timing_environment(environ) == {
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    "XLA_FLAGS": "--x",
  }
  assert bench.timing_environment({}) == {}
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  args = bench.parse_args(
    ["--smoke", "--rounds", "1", "--networks", "cnn6", "--norms", "flax_bn", "--skip-infer"]
  )
  report = bench.run(args)
  assert report["meta"]["environment"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert "with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`" in bench.markdown(report)


def test_time_budget_skips_the_sections_left_and_saves_after_each_section():
  args = bench.parse_args(
    [
      "--smoke",
      "--rounds",
      "1",
      "--networks",
      "cnn6",
      "resnet18",
      "--norms",
      "flax_bn",
      "--variants",
      "none",
      "--time-budget",
      "5",
    ]
  )
  clock = iter([0.0, 1.0, 6.0, 7.0, 8.0]).__next__  # start, then one read per section
  saved = []
  report = bench.run(args, save=lambda r: saved.append(json.loads(json.dumps(r))), clock=clock)
  assert report["skipped"] == ["cnn6/infer", "resnet18/train", "resnet18/infer"]
  assert set(report["networks"]["cnn6"]) == {"config", "train"}
  assert set(report["networks"]["resnet18"]) == {"config"}
  assert len(saved) == 1 and set(saved[0]["networks"]["cnn6"]["train"]) == {"flax_bn"}
  assert report["meta"]["time_budget_s"] == 5.0
  text = bench.markdown(report)
  assert "Not measured (the time budget of 5 s was spent): cnn6/infer, resnet18/train" in text


def test_json_is_written_after_every_section(tmp_path, monkeypatch):
  js = tmp_path / "bench.json"
  writes = []
  real = bench.write_json
  monkeypatch.setattr(
    bench,
    "write_json",
    lambda path, report: (
      writes.append(
        sorted((n, s) for n, ss in report["networks"].items() for s in ss if s != "config")
      ),
      real(path, report),
    ),
  )
  bench.main(
    [
      "--smoke",
      "--rounds",
      "1",
      "--networks",
      "cnn6",
      "--norms",
      "flax_bn",
      "--variants",
      "none",
      "--markdown",
      "",
      "--json",
      str(js),
    ]
  )
  assert writes == [
    [("cnn6", "train")],
    [("cnn6", "infer"), ("cnn6", "train")],
    [("cnn6", "infer"), ("cnn6", "train")],
  ]
  assert json.loads(js.read_text())["skipped"] == []


def test_accelerator_run_uses_its_batch_and_reads_the_peak_after_each_first_step(monkeypatch):
  monkeypatch.setattr(bench, "NETWORKS", {"tiny": (bench.SMOKE_MODEL, 8, 2, 4)})
  monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
  calls = []
  real_call = bench._Stepper.__call__
  monkeypatch.setattr(
    bench._Stepper, "__call__", lambda self: (calls.append("step"), real_call(self))[1]
  )
  monkeypatch.setattr(
    bench, "measured_peak_mib", lambda: (calls.append("peak"), 10.0 * len(calls))[1]
  )
  args = bench.parse_args(
    [
      "--networks",
      "tiny",
      "--norms",
      "flax_bn",
      "mabn",
      "--skip-infer",
      "--rounds",
      "1",
      "--compile-rounds",
      "1",
    ]
  )
  report = bench.run(args)
  assert report["networks"]["tiny"]["config"]["batch"] == 4  # the accelerator batch
  assert calls[:6] == ["peak", "step", "peak", "peak", "step", "peak"]
  train = report["networks"]["tiny"]["train"]
  assert train["flax_bn"]["measured_peak_mib_so_far"] == 30.0
  assert train["mabn"]["measured_peak_mib_so_far"] == 60.0


def test_cpu_reports_no_measured_peak():
  assert jax.default_backend() == "cpu" and bench.measured_peak_mib() is None


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_time_budget_must_be_positive(budget):
  with pytest.raises(SystemExit):
    bench.parse_args(["--smoke", "--time-budget", budget])


def test_flax_baseline_matches_mj_batch_norm_step():
  """The flax.linen.BatchNorm row is the same network, loss and update as mj.BatchNorm's."""
  import jax

  losses = {}
  for norm in ("flax_bn", "bn"):
    compiled, args, _, _ = bench.build_training_step(bench.SMOKE_MODEL, norm, 4, 8)
    variables, _, loss = compiled(*jax.tree_util.tree_map(lambda a: a.copy(), args))
    losses[norm] = (float(loss), variables)
  assert abs(losses["flax_bn"][0] - losses["bn"][0]) < 1e-5


def test_cbn_floor_row_is_flax_bn_plus_the_derivative_convolutions_of_cbn():
  """The same loss and update as flax BN's, with CBN's extra FLOPs (its two
  derivative convolutions per layer) and none of CBN's state."""
  import jax
  import numpy as np

  out = {}
  for norm in ("flax_bn", "cbn_floor", "cbn"):
    compiled, args, _, memory = bench.build_training_step(bench.SMOKE_MODEL, norm, 4, 8)
    variables, _, loss = compiled(*jax.tree_util.tree_map(lambda a: a.copy(), args))
    out[norm] = (float(loss), variables, memory["gflops"])
  (l0, v0, f0), (l1, v1, f1), (_, _, f2) = out["flax_bn"], out["cbn_floor"], out["cbn"]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), v0, v1
  )
  # The floor adds the derivative convolutions' FLOPs; CBN adds those and
  # its window's per-channel work.
  assert 1.1 * f0 < f1 < f2


def test_training_times_every_compiled_executable():
  results = bench.bench_training(bench.SMOKE_MODEL, 4, 8, ["mabn"], rounds=3, compile_rounds=2)
  for r in results.values():
    assert len(r["compile_s_all"]) == 2
    assert [len(ts) for ts in r["step_ms_all"]] == [3, 3]
    assert len(r["step_ms_per_compile"]) == 2
    all_steps = sorted(t for ts in r["step_ms_all"] for t in ts)
    assert r["step_ms"] == (all_steps[2] + all_steps[3]) / 2  # median of all six steps


def test_bursts_run_each_variant_back_to_back_and_split_off_the_first_step():
  calls = []

  class Fn:
    def __init__(self, name):
      self.name = name

    def prepare(self):
      calls.append(("prepare", self.name))

    def __call__(self):
      calls.append(("call", self.name))
      return jnp.zeros(())

  firsts, later = bench.interleaved_bursts(
    {"a": Fn("a"), "b": Fn("b")}, rounds=2, burst=3, warmup=1
  )
  assert {k: len(v) for k, v in firsts.items()} == {"a": 2, "b": 2}
  assert {k: len(v) for k, v in later.items()} == {"a": 4, "b": 4}
  steps = [name for kind, name in calls if kind == "call"]
  assert steps == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
  assert calls.count(("prepare", "a")) == calls.count(("call", "a")) == 7


def test_training_with_bursts_times_the_later_steps_and_keeps_the_first():
  results = bench.bench_training(
    bench.SMOKE_MODEL, 4, 8, ["mabn"], rounds=2, compile_rounds=1, burst=3
  )
  r = results["mabn"]
  assert [len(ts) for ts in r["step_ms_all"]] == [4]
  assert r["first_step_ms"] > 0 and r["step_ms"] > 0
  with pytest.raises(SystemExit):
    bench.main(["--smoke", "--burst", "0"])


def test_inference_times_every_compiled_copy():
  results = bench.bench_inference(
    bench.SMOKE_MODEL, 4, 8, ["none", "gn"], rounds=2, compile_rounds=2
  )
  for r in results.values():
    assert r["images_per_s"] > 0 and len(r["images_per_s_per_compile"]) == 2


@pytest.mark.parametrize(
  "row, changed",
  [
    ("cbn_s2", {"derivative_stride": 2}),
    ("cbn_published", {"backward": "published"}),
    ("cbn_batch", {"backward": "batch"}),
  ],
)
def test_cbn_option_rows_are_the_registry_cbn_with_one_setting_changed(row, changed):
  normalizer = bench.make_normalizer(row, "cnn6")
  assert normalizer.name == "cbn"
  assert normalizer.options == {**bench.make_normalizer("cbn", "cnn6").options, **changed}


def test_derivative_benchmark_captures_every_cbn_layer_and_orders_the_errors():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import cbn_derivatives as CD
  from experiments.models import build_model

  model = build_model("cnn2", mj.make_normalizer("cbn", window=4, burn_in=0), 10, width=4)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=True)
  inputs = CD._layer_inputs(model, variables, images)
  assert sorted(inputs) == ["conv1", "conv2"]
  x, w_old, spec = inputs["conv1"]
  assert x.shape == (4, 8, 8, 3) and w_old.shape == (3, 3, 3, 4)
  w_new = w_old + 0.01 * jnp.asarray(rng.normal(size=w_old.shape), jnp.float32)
  errors = CD.compensation_errors(x, w_old, w_new, spec, [1, 2], ["float32", "bfloat16"])
  assert set(errors) == {
    "naive",
    "stride 1",
    "stride 2",
    "stride 1, bfloat16",
    "stride 2, bfloat16",
    "kernel change",
  }
  assert errors["stride 1"]["var"] < errors["naive"]["var"]
  assert errors["stride 1, bfloat16"]["var"] < errors["naive"]["var"]
  assert errors["stride 1, bfloat16"]["var"] != errors["stride 1"]["var"]


def test_compile_time_option_variants_change_the_compiled_step():
  from benchmarks import compile_time as CT

  result = CT.measure(
    bench.SMOKE_MODEL, ["mabn", "mabn_uncentred"], rounds=1, step_rounds=1, log=lambda _: None
  )
  assert result["mabn_uncentred"]["kernels"] < result["mabn"]["kernels"]
  assert all(row["compile"] > 0 and row["step_ms"] > 0 for row in result.values())
  table = CT.table(bench.SMOKE_MODEL, result)
  assert "| mabn_uncentred |" in table and "compile / flax BN" in table


def test_compile_time_variants_are_the_public_options_of_the_benchmark_rows():
  from benchmarks import compile_time as CT

  assert set(CT.VARIANTS) == {"flax_bn", "bn", "mabn", "cbn", *CT.OPTIONS}
  for variant in CT.OPTIONS:
    assert bench.ROW_NORMS[variant] == variant.split("_")[0]
    assert bench.normalizer_kwargs(variant, bench.SMOKE_MODEL), variant


def test_saved_activations_option_is_the_same_training_step():
  """CBN without its rematerialization differs only in what the backward
  pass keeps, not in what the step computes."""
  import jax
  import numpy as np

  outputs = {}
  for name in ("cbn", "cbn_saved_activations"):
    step, args = bench.training_step_and_args(bench.SMOKE_MODEL, name, 4, 8)
    outputs[name] = jax.jit(step)(*args)
  (v1, _, l1), (v2, _, l2) = outputs["cbn"], outputs["cbn_saved_activations"]
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), v1, v2
  )


def test_compile_time_measures_the_networks_of_the_step_benchmark():
  from benchmarks import compile_time as CT

  for network, (model, size, batch, _) in bench.NETWORKS.items():
    assert CT.shapes(network) == (model, batch, size)
  assert CT.shapes("resnet18")[0] == "resnet18_cifar"
  assert CT.shapes(bench.SMOKE_MODEL) == (bench.SMOKE_MODEL, 4, 8)


def test_llvm_module_log_is_read_after_the_mark_in_every_unit():
  from benchmarks import compile_time as CT

  log = (
    "I1205 ir_compiler.cc:293] Compiled LLVM module: __compute_module_init_kernel_module "
    "time: 9.0 ms (9000 us)\n" + CT._MARK + "\n"
    "I1205 ir_compiler.cc:293] Compiled LLVM module: __compute_module_add_select_fusion.3_"
    "kernel_module time: 12.5 ms (12500 us) (cumulative: 1 ms)\n"
    "I1205 ir_compiler.cc:293] Compiled LLVM module: __compute_module_wrapped_reduce_kernel_"
    "module time: 850 us (850 us)\n"
    "I1205 ir_compiler.cc:293] Compiled LLVM module: __compute_module_ynn_fusion.2_kernel_"
    "module time: 1.5 s (1500000 us)\n"
  )
  assert CT.llvm_module_times(log) == [
    ("add_select_fusion.3", 12.5),
    ("wrapped_reduce", 0.85),
    ("ynn_fusion.2", 1500.0),
  ]


def test_kernel_sources_name_the_library_function_of_each_kernel():
  from benchmarks import compile_time as CT

  hlo = """HloModule m

ENTRY %main {
  %a = f32[4]{0} fusion(%p), kind=kLoop, calls=%c1, metadata={op_name="jit(step)/jvp(M)/n/jit(commit_if_finite)/select_n" stack_frame_id=3}
  %b = f32[4]{0} fusion(%p), kind=kLoop, calls=%c2, metadata={op_name="jit(step)/transpose(jvp(M))/n/jit(_train_step)/mul"}
  %c = f32[4]{0} fusion(%p), kind=kLoop, calls=%c3, metadata={op_name="jit(step)/jvp(M)/n/jit(_train_step)/sqrt"}
  %d = f32[4]{0} fusion(%p), kind=kLoop, calls=%c4, metadata={op_name="jit(step)/transpose(jvp(M))/conv/jit(center_kernel)/reduce_sum"}
  %e = f32[4]{0} fusion(%p), kind=kLoop, calls=%c5, metadata={op_name="jit(step)/jit(add_increment)/select_n"}
  %f = f32[4]{0} fusion(%p), kind=kLoop, calls=%c6, metadata={op_name="jit(step)/transpose(jvp(M))/relu"}
}
"""  # noqa: E501 (an HLO text as XLA prints it)
  assert CT.kernel_sources(hlo) == {
    "a": "state commit (statistics.commit_if_finite)",
    "b": "normalizer step, backward",
    "c": "normalizer step, forward",
    "d": "weight centring (centering.center_kernel)",
    "e": "tap commit (training.add_increment)",
    "f": "other",
  }


def test_llvm_modules_attributes_mabn_kernels_to_the_library_functions():
  from benchmarks import compile_time as CT

  result = {v: CT.llvm_modules(bench.SMOKE_MODEL, v) for v in ("flax_bn", "mabn")}
  assert set(result["flax_bn"]) == {"other"}
  assert {label for label, _ in CT.SOURCES} <= set(result["mabn"])
  for rows in result.values():
    assert all(row["modules"] > 0 and row["ms"] > 0 for row in rows.values())
  table = CT.llvm_table(bench.SMOKE_MODEL, result)
  assert "| state commit (statistics.commit_if_finite) | 0 (0) |" in table
  assert table.splitlines()[-1].startswith("| total |")


def test_second_process_loads_the_mabn_step_from_the_persistent_cache(tmp_path):
  from benchmarks import compile_time as CT

  rows = CT.cached_load(bench.SMOKE_MODEL, "mabn", str(tmp_path))
  assert rows["first"]["entries"] > 0
  assert rows["second"]["entries"] == rows["first"]["entries"]  # loaded, nothing written
  assert all(rows[p][k] > 0 for p in ("first", "second") for k in ("trace", "compile"))
  table = CT.cached_table(bench.SMOKE_MODEL, {"flax_bn": rows, "mabn": rows})
  assert table.splitlines()[-1].startswith("| mabn |")
  assert table.splitlines()[-1].count("| 1.00 |") == 2  # both processes, against itself


def test_conv_derivatives_variant_takes_every_d_nu_from_a_convolution():
  from benchmarks import compile_time as CT
  from mabn_jax.functional import cross_iteration as F

  x = jnp.ones((2, 4, 4, 2))
  kernel = jnp.ones((1, 1, 2, 5))
  spec = F.ConvSpec.make(2)

  def convs(**options):
    jaxpr = jax.make_jaxpr(
      lambda x, k: F.moment_derivatives(x, F.conv(x, k, spec), k, spec, 1, **options)
    )
    return str(jaxpr(x, kernel)).count("conv_general_dilated")

  with CT.ablated("cbn_conv_derivatives") as norm:
    assert bench.ROW_NORMS[norm] == "cbn"
    options = bench.normalizer_kwargs(norm, bench.SMOKE_MODEL)
  assert options == dict(
    bench.normalizer_kwargs("cbn", bench.SMOKE_MODEL), kernel_derivatives="convolution"
  )
  assert (convs(), convs(kernel_derivatives=options["kernel_derivatives"])) == (2, 3)


def test_compensation_benchmark_forms_agree_and_are_timed():
  from benchmarks import cbn_compensation

  d = jax.random.normal(jax.random.PRNGKey(1), (3, 18, 4))
  w = jax.random.normal(jax.random.PRNGKey(2), (18, 4))
  ct = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
  values = [f(d, w) for f in cbn_compensation.FORWARD.values()]
  grads = [
    cbn_compensation.kernel_cotangent(f)(d, w, ct) for f in cbn_compensation.FORWARD.values()
  ]
  for v, g in zip(values[1:], grads[1:], strict=True):
    np.testing.assert_allclose(v, values[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, grads[0], rtol=1e-5, atol=1e-5)
  medians = cbn_compensation.run((2, 9, 4), rounds=1, repeats=1)
  assert set(medians) == {"library", "library_vjp", "einsum", "einsum_vjp", "sum", "sum_vjp"}
  assert all(ms > 0 for ms in medians.values())


def test_derivative_benchmark_trains_the_segmentation_unet_at_batch_2(tmp_path, tiny_tarball):
  """``--task segmentation``: the segmentation experiment's U-Net with CBN at
  a true batch of 2, each kept state the one its step started from (the step
  donates its inputs), and every CBN layer of it measured."""
  from benchmarks import cbn_derivatives as CD

  model, history = CD.train_segmentation(
    3,
    0,
    2,
    "seg_quick",
    epochs=1.0,
    widths=(4, 8),
    tarball=tiny_tarball,
    cache_dir=str(tmp_path / "cache"),
  )
  assert len(history) == 3 and history[-1][1] is None
  assert all(images.shape[0] == 2 for _, images in history[:-1])
  from flax import traverse_util

  def layer_steps(variables):
    flat = traverse_util.flatten_dict(variables["batch_stats"])
    return {int(v) for k, v in flat.items() if k[-1] == "step"}

  # The states steps 2 and 3 started from, then the final one.
  assert [layer_steps(v) for v, _ in history] == [{1}, {2}, {3}]
  inputs = CD._layer_inputs(model, history[0][0], history[0][1])
  assert len(inputs) >= 4
  path = sorted(inputs)[0]
  x, w_old, spec = inputs[path]
  w_new = CD._layer_inputs(model, history[-1][0], history[0][1])[path][1]
  errors = CD.compensation_errors(x, w_old, w_new, spec, [1])
  assert errors["kernel change"]["relative"] > 0
  assert set(errors) == {"naive", "stride 1", "kernel change"}


def test_markdown_replaces_the_tables_of_its_device_and_keeps_the_rest(tmp_path):
  report = json.loads(
    (
      Path(__file__).resolve().parent.parent / "benchmarks/results/cpu_current_2026-12-05.json"
    ).read_text()
  )
  page = tmp_path / "BENCHMARKS.md"
  page.write_text(
    "# Benchmarks\n\nMethod text.\n\n<!-- bench:gpu -->\nGPU tables\n<!-- /bench:gpu -->\n"
  )
  assert bench.device_kind(report) == "cpu"
  bench.write_markdown(str(page), report)
  bench.write_markdown(str(page), report)  # a second run replaces, not appends
  text = page.read_text()
  assert text.count("<!-- bench:cpu -->") == 1 and text.count("### cnn6 (cnn6") == 1
  assert text.startswith("# Benchmarks\n\nMethod text.") and "GPU tables" in text
  saved = tmp_path / "report.json"
  saved.write_text(json.dumps(report))
  out = tmp_path / "rendered.md"
  assert bench.main(["--from-json", str(saved), "--markdown", str(out), "--json", ""]) == 0
  assert "| mabn_folded |" in out.read_text() and "<!-- /bench:cpu -->" in out.read_text()
