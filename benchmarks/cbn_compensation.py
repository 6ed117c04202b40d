"""How fast XLA computes CBN's per-channel inner products ``d nu . W``.

Every CBN training step carries each buffered entry's ``nu`` to the current
kernel with ``sum_k dnu[e, k, c] * W[k, c]`` (spec, section 4), over the
whole ``(E, *K, C)`` derivative buffer, and with ``backward='exact'`` takes
its kernel gradient ``sum_e dnu[e, k, c] * ct[e, c]``. The same numbers can
be written several ways; this script times them, interleaved, on one
buffer shape (default: ResNet-18's largest, 3 entries of a 3x3x512x512
kernel)::

  python -m benchmarks.cbn_compensation
  python -m benchmarks.cbn_compensation --shape 3 576 64 --rounds 3

Forward forms: ``library`` (what :mod:`mabn_jax.functional.cross_iteration`
uses), ``einsum`` (``"ekc,kc->ec"``: a dot with ``C`` as batch axis),
``sum`` (product, then a sum over ``K``). Backward forms (the kernel's
cotangent): ``library`` (its custom VJP), ``einsum_vjp`` and ``sum_vjp``
(autodiff of the forward forms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp

from mabn_jax.functional import cross_iteration as F

FORWARD = {
  "library": F.channel_inner,
  "einsum": lambda d, w: jnp.einsum("ekc,kc->ec", d, w),
  "sum": lambda d, w: jnp.sum(d * w[None], axis=1),
}


def kernel_cotangent(forward: Callable) -> Callable:
  """``(d, w, ct) -> ct``'s cotangent for ``w`` through ``forward``."""
  return lambda d, w, ct: jax.vjp(lambda w: forward(d, w), w)[1](ct)[0]


def time_interleaved(
  fns: Dict[str, Callable], args: Dict[str, tuple], rounds: int, repeats: int
) -> Dict[str, List[float]]:
  """Milliseconds per call of every jitted function, rounds interleaved."""
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))  # compile
  times: Dict[str, List[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(repeats):
        jax.block_until_ready(fn(*args[name]))
      times[name].append(1e3 * (time.perf_counter() - start) / repeats)
  return times


def run(shape: Sequence[int], rounds: int, repeats: int) -> Dict[str, float]:
  """Median milliseconds of every form for a buffer of ``shape`` ``(E, K, C)``."""
  entries, k, c = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  d = jax.random.normal(keys[0], (entries, k, c))
  w = jax.random.normal(keys[1], (k, c))
  ct = jax.random.normal(keys[2], (entries, c))
  fns, args = {}, {}
  for name, forward in FORWARD.items():
    fns[name] = jax.jit(forward)
    args[name] = (d, w)
    fns[f"{name}_vjp"] = jax.jit(kernel_cotangent(forward))
    args[f"{name}_vjp"] = (d, w, ct)
  times = time_interleaved(fns, args, rounds, repeats)
  return {name: statistics.median(values) for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--shape", type=int, nargs=3, default=[3, 3 * 3 * 512, 512], metavar=("E", "K", "C")
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  medians = run(args.shape, args.rounds, args.repeats)
  print(f"buffer {tuple(args.shape)}, median ms per call over {args.rounds} interleaved rounds")
  for name, ms in medians.items():
    base = "library_vjp" if name.endswith("_vjp") else "library"
    print(f"  {name:12s} {ms:8.2f} ms  {ms / medians[base]:5.2f}x {base}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
