"""Where a training step's compile time goes: MABN against flax.linen.BatchNorm.

::

  python -m benchmarks.compile_time --json benchmarks/results/compile_time_cpu.json
  python -m benchmarks.compile_time --network cnn2_smoke --rounds 1 --step-rounds 1
  python -m benchmarks.compile_time --variants flax_bn mabn --llvm-modules
  python -m benchmarks.compile_time --variants flax_bn mabn --cached-load

Every variant is the training step of :mod:`benchmarks.bench` on its
network (the same model, batch and image size; SGD). Variants are traced
and compiled ``--rounds`` times, interleaved (A B C A B C ...); the table
gives median seconds of tracing
(``lower()``) and of XLA's compilation (``compile()``, wall and process CPU
time), the kernels (fusions) of the optimized HLO, the compile ratio to
flax BN, and the step time of the compiled executables (interleaved,
``--step-rounds`` rounds of 3 steps each) as a ratio to flax BN.

With ``--llvm-modules`` it instead compiles every variant once more, each
in a process of its own with XLA's LLVM log on
(``TF_CPP_VMODULE=ir_compiler=2``), and sums the LLVM time of the compiled
kernel modules by the library function each kernel comes from (the
``op_name`` of the optimized HLO; :data:`SOURCES`): where a step's compile
time goes, per source.

With ``--cached-load`` it instead measures what JAX's persistent
compilation cache saves: for every variant, two fresh processes share an
empty cache directory (``jax_compilation_cache_dir``, entries written
whatever their compile time or size); the first compiles the step and
writes it, the second traces the step and loads the executable; the pairs
are repeated ``--rounds`` times, interleaved. Reported per process
(medians): tracing and ``compile()`` seconds and the cache's entries after
it (the second process adds none when it loaded the step).

The variants are the library's normalizers and the library with one of
its public options set (:data:`OPTIONS`, rows of :mod:`benchmarks.bench`):

* ``flax_bn``, ``bn``, ``mabn`` (``mj.MABN`` after ``mj.CenteredConv``) and
  ``cbn`` (window 4);
* ``mabn_uncentred``: the convolutions' kernels used as they are (no
  weight centralization, so MABN's premise of zero-mean inputs is gone):
  the registry option ``centered=False``;
* ``cbn_conv_derivatives``: CBN's ``d nu / d W`` always as the
  backward-weight convolution, also for the pointwise kernels with fewer
  input than output channels where the library takes the same derivative
  from the inputs' Gram matrix
  (:func:`~mabn_jax.functional.cross_iteration.gram_is_cheaper`): the
  option ``kernel_derivatives='convolution'``;
* ``cbn_saved_activations``: CBN's training step without its
  ``jax.checkpoint``, so that its backward pass keeps what autodiff saves
  (two more activation-sized arrays per layer) instead of recomputing them
  from the conv output: the option ``rematerialize=False``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Sequence

import jax

from benchmarks import bench

OPTIONS = ("cbn_conv_derivatives", "cbn_saved_activations", "mabn_uncentred")
"""Variants that are the library with an option set: rows of
:mod:`benchmarks.bench` (:func:`benchmarks.bench.normalizer_kwargs`)."""
VARIANTS = ("flax_bn", "bn", "mabn", "cbn") + OPTIONS


@contextlib.contextmanager
def ablated(variant: str) -> Iterator[str]:
  """Yields the norm of :mod:`benchmarks.bench` that builds ``variant``, with
  JAX's caches empty before and after, as a fresh process would have them
  (the library jits its per-layer steps)."""
  jax.clear_caches()
  try:
    yield variant
  finally:
    jax.clear_caches()


def count_kernels(compiled) -> int:
  """Fusions (kernels) in the entry computation of the optimized HLO."""
  text = compiled.as_text()
  entry = text[text.index("ENTRY") :]
  return len(re.findall(r"= \S+ fusion\(", entry))


def shapes(network: str):
  """``(model, batch, image size)`` of ``network``'s CPU training step in
  :mod:`benchmarks.bench` (``resnet18`` is the CIFAR ResNet-18 there)."""
  if network == bench.SMOKE_MODEL:
    return network, 4, 8
  model, size, batch, _ = bench.NETWORKS[network]
  return model, batch, size


def measure(
  network: str,
  variants: Sequence[str],
  rounds: int,
  step_rounds: int,
  log: Callable[[str], None] = print,
) -> Dict:
  """Compile (and time) every variant ``rounds`` times, interleaved; returns medians.

  Returns ``{variant: row}`` with median ``trace``, ``compile`` and
  ``compile_cpu`` seconds, ``kernels``, ``step_ms`` (if ``step_rounds``) and
  the ratios ``compile_vs_flax_bn`` and ``step_vs_flax_bn`` where flax BN is
  among the variants.
  """
  model, batch, size = shapes(network)
  samples = {v: {"trace": [], "compile": [], "compile_cpu": []} for v in variants}
  kernels, steppers = {}, {}
  for index in range(max(1, rounds)):
    for variant in variants:
      with ablated(variant) as norm:
        step, args = bench.training_step_and_args(model, norm, batch, size)
        start = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args)
      traced = time.perf_counter()
      cpu = time.process_time()
      compiled = lowered.compile()
      samples[variant]["compile_cpu"].append(time.process_time() - cpu)
      samples[variant]["compile"].append(time.perf_counter() - traced)
      samples[variant]["trace"].append(traced - start)
      kernels[variant] = count_kernels(compiled)
      steppers[variant, index] = bench._Stepper(compiled, args)
      log(f"  compiled {network}/{variant} in {samples[variant]['compile'][-1]:.2f}s")
  step_times: Dict[str, List[float]] = {v: [] for v in variants}
  for _ in range(max(0, step_rounds)):
    for (variant, _index), stepper in steppers.items():
      stepper.prepare()
      jax.block_until_ready(stepper())  # warm
      for _ in range(3):
        stepper.prepare()
        start = time.perf_counter()
        jax.block_until_ready(stepper())
        step_times[variant].append(time.perf_counter() - start)
  result = {}
  for variant in variants:
    row = {key: statistics.median(values) for key, values in samples[variant].items()}
    row["kernels"] = kernels[variant]
    if step_times[variant]:
      row["step_ms"] = 1e3 * statistics.median(step_times[variant])
    result[variant] = row
  base = result.get(bench.BASELINE)
  if base is not None:
    for row in result.values():
      row["compile_vs_flax_bn"] = row["compile"] / base["compile"]
      if "step_ms" in row and "step_ms" in base:
        row["step_vs_flax_bn"] = row["step_ms"] / base["step_ms"]
  return result


def table(network: str, result: Dict) -> str:
  lines = [
    f"| {network} variant | trace s | compile s (wall) | compile s (CPU) | kernels "
    "| compile / flax BN | step / flax BN |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for variant, row in result.items():
    ratio = lambda key, row=row: f"{row[key]:.3f}" if key in row else "-"
    lines.append(
      f"| {variant} | {row['trace']:.2f} | {row['compile']:.2f} | "
      f"{row['compile_cpu']:.2f} | {row['kernels']} | {ratio('compile_vs_flax_bn')} | "
      f"{ratio('step_vs_flax_bn')} |"
    )
  return "\n".join(lines)


SOURCES = (
  # (source, op_name fragments): a kernel belongs to the first whose
  # fragments all occur in its op_name.
  ("state commit (statistics.commit_if_finite)", ("jit(commit_if_finite)",)),
  ("tap commit (training.add_increment)", ("jit(add_increment)",)),
  ("weight centring (centering.center_kernel)", ("jit(center_kernel)",)),
  ("normalizer step, backward", ("jit(_train_step)", "transpose(")),
  ("normalizer step, forward", ("jit(_train_step)",)),
)
"""Library sources that ``--llvm-modules`` reports (the per-layer functions
the library jits); the rest of the step is ``other``."""

_LLVM_MODULE = re.compile(
  r"Compiled LLVM module: __compute_module_(\S+?)_kernel_module time: ([\d.]+) (us|ms|s) "
)
_MARK = "-- compile starts --"


def kernel_sources(hlo_text: str) -> Dict[str, str]:
  """``{kernel name: source}`` for the instructions of the optimized HLO's entry."""
  sources = {}
  entry = hlo_text[hlo_text.index("ENTRY") :]
  for match in re.finditer(r"^\s*%(\S+) = .*?op_name=\"([^\"]*)\"", entry, re.M):
    name, op_name = match.groups()
    sources[name] = next(
      (label for label, fragments in SOURCES if all(f in op_name for f in fragments)), "other"
    )
  return sources


def llvm_module_times(log: str) -> List[tuple]:
  """``[(kernel name, ms)]`` of the LLVM modules XLA's log lists after :data:`_MARK`."""
  units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
  tail = log.split(_MARK, 1)[-1]
  return [(m.group(1), float(m.group(2)) * units[m.group(3)]) for m in _LLVM_MODULE.finditer(tail)]


def _run_child(network: str, variant: str, mode: str, env: Dict[str, str]):
  """Runs this module with ``mode`` (a hidden flag) for one variant in a fresh
  process; returns the finished process. Raises ``RuntimeError`` if it fails."""
  child = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.compile_time",
      "--network",
      network,
      "--variants",
      variant,
      mode,
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if child.returncode:
    raise RuntimeError(f"compiling {network}/{variant} failed:\n{child.stderr[-2000:]}")
  return child


def _lowered(network: str, variant: str):
  """``(lowered training step, seconds it took to trace)`` of ``variant``."""
  model, batch, size = shapes(network)
  with ablated(variant) as norm:
    step, args = bench.training_step_and_args(model, norm, batch, size)
    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args)
  return lowered, time.perf_counter() - start


def _print_kernel_sources(network: str, variant: str) -> None:
  """Child of :func:`llvm_modules`: compiles once, prints the kernels' sources."""
  lowered, _ = _lowered(network, variant)
  os.write(2, (_MARK + "\n").encode())
  print(json.dumps(kernel_sources(lowered.compile().as_text())))


def llvm_modules(network: str, variant: str) -> Dict[str, Dict[str, float]]:
  """``{source: {"modules": n, "ms": LLVM time}}`` of one compilation of ``variant``.

  Compiles in a fresh process with XLA's per-module LLVM log
  (``TF_CPP_VMODULE=ir_compiler=2``) and no persistent compilation cache;
  the process inherits ``XLA_FLAGS`` (the optimization level, for one). XLA
  compiles a kernel that occurs several times once, so these are modules,
  not kernels. Raises ``RuntimeError`` if the process fails or its log
  lists no module.
  """
  # A persistent compilation cache would load the executable without
  # compiling (and logging) its modules.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(
    TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="ir_compiler=2", JAX_ENABLE_COMPILATION_CACHE="false"
  )
  child = _run_child(network, variant, "--print-kernel-sources", env)
  sources = json.loads(child.stdout.strip().splitlines()[-1])
  modules = llvm_module_times(child.stderr)
  if not modules:
    raise RuntimeError(
      f"XLA's log lists no LLVM module for {network}/{variant} (this jaxlib may not "
      "log them with TF_CPP_VMODULE=ir_compiler=2)."
    )
  rows: Dict[str, Dict[str, float]] = {}
  for name, ms in modules:
    row = rows.setdefault(sources.get(name, "other"), {"modules": 0, "ms": 0.0})
    row["modules"] += 1
    row["ms"] += ms
  return rows


def _print_compile_time(network: str, variant: str) -> None:
  """Child of :func:`cached_load`: traces and compiles once, prints the seconds."""
  lowered, trace = _lowered(network, variant)
  start = time.perf_counter()
  lowered.compile()
  print(json.dumps({"trace": trace, "compile": time.perf_counter() - start}))


def cache_entries(cache_dir: str) -> int:
  """Number of entries in a persistent compilation cache directory (the step
  and every small computation the process compiled, such as initialization)."""
  return sum(1 for name in os.listdir(cache_dir) if not name.startswith("."))


def cached_load(network: str, variant: str, cache_dir: str) -> Dict[str, Dict[str, float]]:
  """Two fresh processes compiling ``variant`` with one persistent cache.

  ``cache_dir`` should be empty. Returns ``{"first": row, "second": row}``,
  each row the process's ``trace`` and ``compile`` seconds and the cache's
  ``entries`` after it. Raises ``RuntimeError`` if a process fails.
  """
  env = dict(
    os.environ,
    JAX_ENABLE_COMPILATION_CACHE="true",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  rows = {}
  for process in ("first", "second"):
    child = _run_child(network, variant, "--print-compile-time", env)
    rows[process] = json.loads(child.stdout.strip().splitlines()[-1])
    rows[process]["entries"] = cache_entries(cache_dir)
  return rows


def cached_load_rounds(
  network: str, variants: Sequence[str], rounds: int
) -> Dict[str, Dict[str, Dict[str, float]]]:
  """:func:`cached_load` ``rounds`` times per variant, interleaved, each pair
  with an empty cache of its own; medians per process and quantity."""
  samples: Dict[str, List[Dict]] = {v: [] for v in variants}
  for _ in range(max(1, rounds)):
    for variant in variants:
      with tempfile.TemporaryDirectory() as cache_dir:
        samples[variant].append(cached_load(network, variant, cache_dir))
  return {
    variant: {
      process: {key: statistics.median(r[process][key] for r in runs) for key in runs[0][process]}
      for process in ("first", "second")
    }
    for variant, runs in samples.items()
  }


def cached_table(network: str, result: Dict[str, Dict[str, Dict[str, float]]]) -> str:
  """Markdown table of :func:`cached_load_rounds` rows, one row per variant;
  with flax BN among them, each process's trace + compile (or load) as a
  ratio to flax BN's."""
  total = lambda row: row["trace"] + row["compile"]
  base = result.get(bench.BASELINE)
  lines = [
    f"| {network} | first: trace s | compile s | / flax BN "
    "| second: trace s | load s | / flax BN | cache entries after first / second |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for variant, rows in result.items():
    first, second = rows["first"], rows["second"]
    ratio = lambda process, rows=rows: (
      f"{total(rows[process]) / total(base[process]):.2f}" if base else "-"
    )
    lines.append(
      f"| {variant} | {first['trace']:.2f} | {first['compile']:.2f} | "
      f"{ratio('first')} | {second['trace']:.2f} | {second['compile']:.2f} | "
      f"{ratio('second')} | {int(first['entries'])} / {int(second['entries'])} |"
    )
  return "\n".join(lines)


def llvm_table(network: str, result: Dict[str, Dict[str, Dict[str, float]]]) -> str:
  """Markdown table of :func:`llvm_modules` rows, one column per variant."""
  cell = lambda ms, modules: f"{ms:.0f} ({modules})"
  lines = [
    f"| {network}: LLVM ms (modules) | " + " | ".join(result) + " |",
    "| --- |" + " ---: |" * len(result),
  ]
  for label in [label for label, _ in SOURCES] + ["other"]:
    rows = [r.get(label, {"ms": 0.0, "modules": 0}) for r in result.values()]
    lines.append(f"| {label} | " + " | ".join(cell(r["ms"], r["modules"]) for r in rows) + " |")
  totals = [
    cell(sum(r["ms"] for r in rows.values()), sum(r["modules"] for r in rows.values()))
    for rows in result.values()
  ]
  lines.append("| total | " + " | ".join(totals) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--network", default="cnn6", choices=list(bench.NETWORKS) + [bench.SMOKE_MODEL]
  )
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--rounds", type=int, default=3, help="compilations per variant")
  parser.add_argument(
    "--step-rounds",
    type=int,
    default=4,
    help="interleaved rounds of 3 timed steps per executable (0: none)",
  )
  parser.add_argument("--json", default=None, help="also write the rows here")
  parser.add_argument(
    "--llvm-modules",
    action="store_true",
    help="instead: LLVM time of one compilation per variant, by source",
  )
  parser.add_argument(
    "--cached-load",
    action="store_true",
    help="instead: compile and cached load, each in a fresh process",
  )
  parser.add_argument("--print-kernel-sources", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--print-compile-time", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.print_kernel_sources:
    _print_kernel_sources(args.network, args.variants[0])
    return 0
  if args.print_compile_time:
    _print_compile_time(args.network, args.variants[0])
    return 0
  if args.cached_load:
    result = cached_load_rounds(args.network, args.variants, args.rounds)
    print(cached_table(args.network, result))
  elif args.llvm_modules:
    result = {variant: llvm_modules(args.network, variant) for variant in args.variants}
    print(llvm_table(args.network, result))
  else:
    result = measure(args.network, args.variants, args.rounds, args.step_rounds)
    print(table(args.network, result))
  if args.json:
    step_rounds = None if args.llvm_modules or args.cached_load else args.step_rounds
    report = dict(
      bench.process_meta(),
      network=args.network,
      rounds=args.rounds,
      step_rounds=step_rounds,
      llvm_modules=args.llvm_modules,
      cached_load=args.cached_load,
      rows=result,
    )
    bench.write_json(args.json, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
