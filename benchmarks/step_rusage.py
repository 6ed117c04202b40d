"""What a training step costs the process besides computing: system time and page faults.

::

  python -m benchmarks.step_rusage --network resnet50 --norms flax_bn mabn cbn
  python -m benchmarks.step_rusage --network resnet50 --norms flax_bn cbn \\
      --environments "" "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" --pairs 2

The training steps are :mod:`benchmarks.bench`'s (the same model, batch,
image size and SGD step, donated state). Each variant is compiled once;
then ``--rounds`` interleaved turns of ``--burst`` steps each run (A A A B B
B ...), and every step but the first of a turn is measured with
``getrusage`` of the process: wall time, user and system CPU time, and
minor page faults (``faulted_mib``: the faults times the 4 KiB base page,
in MiB; a fault on a huge page maps 2 MiB, so with huge pages only the
count ``minor_faults`` means anything).
XLA's CPU runtime allocates a step's temporaries on every execution, so a
step faults its pages in again each time; ``temp_mib`` is XLA's memory
analysis of those temporaries. Medians per variant.

With ``--environments``, the measurement runs instead in a child process
per environment (``NAME=VALUE`` settings separated by spaces, ``""`` for
none, applied on top of this process's environment), the environments
alternating ``--pairs`` times (E1 E2 E1 E2 ...), so that a drift of the
machine hits both alike. Variables such as ``GLIBC_TUNABLES`` act when a
process starts, which is why each needs a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

from benchmarks import bench
from benchmarks.compile_time import shapes

PAGE_MIB = 4096 / 2**20
"""MiB per minor page fault on a 4 KiB base page (x86-64 and most ARM Linux)."""


def _usage() -> resource.struct_rusage:
  return resource.getrusage(resource.RUSAGE_SELF)


def step_usage(stepper, before=_usage, after=_usage) -> Dict[str, float]:
  """One call of ``stepper`` (prepared untimed first): wall, user and system
  milliseconds and minor page faults of the process during the call."""
  stepper.prepare()
  start_usage, start = before(), time.perf_counter()
  bench._block(stepper())
  end, end_usage = time.perf_counter(), after()
  return {
    "wall_ms": 1e3 * (end - start),
    "user_ms": 1e3 * (end_usage.ru_utime - start_usage.ru_utime),
    "sys_ms": 1e3 * (end_usage.ru_stime - start_usage.ru_stime),
    "minor_faults": float(end_usage.ru_minflt - start_usage.ru_minflt),
  }


def measure(
  network: str, norms: Sequence[str], rounds: int, burst: int, log=print
) -> Dict[str, Dict[str, float]]:
  """Per variant: median ``wall_ms``, ``user_ms``, ``sys_ms``,
  ``minor_faults``, ``faulted_mib`` over the later steps of every turn, and
  XLA's ``temp_mib``; with ``flax_bn`` among them, ``wall_vs_flax_bn``."""
  if burst < 2:
    raise ValueError(
      f"step_rusage: --burst must be at least 2 (the first step of a "
      f"turn is not measured), got {burst}."
    )
  model, batch, size = shapes(network)
  steppers, temp = {}, {}
  for norm in norms:
    log(f"compiling {network}/{norm}")
    compiled, args, _, memory = bench.build_training_step(model, norm, batch, size)
    steppers[norm] = bench._Stepper(compiled, args)
    temp[norm] = memory.get("temp_mib", float("nan"))
  # The first step of a turn follows another executable's: not measured.
  _, samples = bench.interleaved_bursts(steppers, rounds, burst, warmup=1, call=step_usage)
  rows = {}
  for norm, steps in samples.items():
    row = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    row["faulted_mib"] = row["minor_faults"] * PAGE_MIB
    row["temp_mib"] = temp[norm]
    rows[norm] = row
  if bench.BASELINE in rows:
    for row in rows.values():
      row["wall_vs_flax_bn"] = row["wall_ms"] / rows[bench.BASELINE]["wall_ms"]
  return rows


def parse_environment(text: str) -> Dict[str, str]:
  """``"A=1 B=2"`` -> ``{"A": "1", "B": "2"}``; ``""`` -> ``{}``."""
  settings = {}
  for item in text.split():
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise ValueError(f"step_rusage: environment setting {item!r} is not NAME=VALUE.")
    settings[name] = value
  return settings


def in_children(args: argparse.Namespace, run=subprocess.run) -> List[Dict]:
  """Runs the measurement in one child process per environment, alternating
  ``args.pairs`` times; returns ``[{"environment", "pair", "rows"}, ...]``."""
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for pair in range(args.pairs):
      for index, text in enumerate(args.environments):
        settings = parse_environment(text)
        out = os.path.join(tmp, f"{pair}_{index}.json")
        command = [
          sys.executable,
          "-m",
          "benchmarks.step_rusage",
          "--network",
          args.network,
          "--norms",
          *args.norms,
          "--rounds",
          str(args.rounds),
          "--burst",
          str(args.burst),
          "--json",
          out,
        ]
        print(f"pair {pair}: {text or '(no settings)'}", flush=True)
        # The child's table is printed here, with the others: its stdout is not needed.
        run(command, env={**os.environ, **settings}, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
          rows = json.load(f)["rows"]
        results.append({"environment": text, "pair": pair, "rows": rows})
  return results


def table(rows: Dict[str, Dict[str, float]], title: str = "") -> str:
  """A markdown table of :func:`measure`'s rows."""
  lines = [title, ""] if title else []
  lines += [
    "| variant | wall ms | / flax BN | user ms | sys ms | minor faults | "
    "x 4 KiB, MiB | XLA temp MiB |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for norm, r in rows.items():
    ratio = f"{r['wall_vs_flax_bn']:.3f}" if "wall_vs_flax_bn" in r else "-"
    lines.append(
      f"| {norm} | {r['wall_ms']:.0f} | {ratio} | {r['user_ms']:.0f} | "
      f"{r['sys_ms']:.0f} | {r['minor_faults']:.0f} | {r['faulted_mib']:.1f} | "
      f"{r['temp_mib']:.1f} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--network", default="resnet50", choices=list(bench.NETWORKS) + [bench.SMOKE_MODEL]
  )
  parser.add_argument(
    "--norms", nargs="+", default=["flax_bn", "mabn", "cbn"], choices=list(bench.TRAIN_NORMS)
  )
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--burst", type=int, default=3)
  parser.add_argument(
    "--environments",
    nargs="+",
    default=None,
    help="measure in one child process per environment instead",
  )
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  for name in ("rounds", "burst", "pairs"):
    if getattr(args, name) < (2 if name == "burst" else 1):
      parser.error(
        f"--{name} must be at least {2 if name == 'burst' else 1}, got {getattr(args, name)}"
      )
  meta = dict(bench.process_meta(), network=args.network, rounds=args.rounds, burst=args.burst)
  if args.environments:
    results = in_children(args)
    for result in results:
      print(
        table(result["rows"], f"{result['environment'] or '(no settings)'}, pair {result['pair']}")
      )
    report = dict(meta, pairs=args.pairs, results=results)
  else:
    rows = measure(args.network, args.norms, args.rounds, args.burst)
    print(table(rows))
    report = dict(meta, rows=rows)
  if args.json:
    bench.write_json(args.json, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
