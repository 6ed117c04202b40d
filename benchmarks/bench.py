"""Cost of each normalizer: training step, memory, compile time, inference.

One command measures every normalizer on the same network in the same
process, interleaving the variants (A B C A B C ...) so that drifts of the
machine hit all of them alike, and reports medians and ratios to BN. Every
variant is compiled several times (``--compile-rounds``) and every
executable is timed, since separately compiled executables of one step can
differ in speed::

  python -m benchmarks.bench                 # full run, its tables into BENCHMARKS.md
  python -m benchmarks.bench --from-json benchmarks/results/cpu.json  # render a report
  python -m benchmarks.bench --smoke         # tiny shapes, a few steps
  python -m benchmarks.bench --time-budget 360  # start no section after 6 min

Every ratio is reported twice: to ``mj.BatchNorm`` (``bn``) and to the layer a
user would otherwise use, ``flax.linen.BatchNorm`` after a ``flax.linen.Conv``
(``flax_bn``, trained through plain ``jax.value_and_grad``). ``gn`` is
``flax.linen.GroupNorm`` (also plain ``jax.value_and_grad``). ``cbn_floor``
is not a normalizer: flax BN plus CBN's two derivative convolutions per
layer (:func:`mabn_jax.functional.cross_iteration.moment_derivatives`), i.e.
CBN's step without its window, the floor CBN's step can reach on the device.

Measured per network:
  * jitted training-step time (``mj.value_and_grad`` + optax SGD; plain
    ``jax.value_and_grad`` for the Flax baselines);
  * XLA's compiled memory analysis of that step (temporaries, and the total
    with arguments and outputs), and the measured peak where the backend
    reports ``memory_stats`` (GPUs; CPUs report none), read after each
    normalizer's first step: the process's peak so far (it cannot be
    reset), so only the first normalizer of the first network (``flax_bn``
    by default) reads its own; a later reading is an upper bound of its own;
  * compile time of the step (``lower().compile()``);
  * inference throughput (images/s) of the eval graph, unfolded and with
    foldable normalizers folded into the convolutions (``mj.fold``), against
    GroupNorm, weight-standardized GroupNorm (``ws_gn``: kernels standardized
    in the graph; ``ws_gn_precomputed``: standardized once beforehand,
    ``mj.precompute_standardized_kernels``, the best WS+GN inference, as it
    cannot fold), FRN, LayerNorm, InstanceNorm and no normalization.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mabn_jax as mj
from experiments.models import build_model
from mabn_jax.fold import fold
from mabn_jax.functional import cross_iteration

TRAIN_NORMS = (
  "flax_bn",
  "gn",
  "bn",
  "mabn",
  "brn",
  "cbn",
  "cbn_s2",
  "cbn_bf16",
  "cbn_s2_bf16",
  "cbn_published",
  "cbn_batch",
  "cbn_floor",
)
INFER_VARIANTS = (
  "flax_bn",
  "bn",
  "bn_folded",
  "mabn",
  "mabn_folded",
  "gn",
  "ws_gn",
  "ws_gn_precomputed",
  "frn",
  "ln",
  "in",
  "none",
)
BASELINE = "flax_bn"
"""The row every ratio is also reported against: ``flax.linen.BatchNorm``."""
PLAIN_AUTODIFF = ("flax_bn", "gn", "cbn_floor")
"""Rows trained through plain ``jax.value_and_grad`` (no backward statistics)."""

NETWORKS = {
  # name: (model, image size, CPU batch, accelerator batch)
  "cnn6": ("cnn6", 32, 32, 128),
  "resnet18": ("resnet18_cifar", 32, 32, 128),
  "resnet50": ("resnet50", 224, 8, 64),
}


ROW_NORMS = {
  "cbn_s2": "cbn",
  "cbn_bf16": "cbn",
  "cbn_s2_bf16": "cbn",
  "cbn_published": "cbn",
  "cbn_batch": "cbn",
  "cbn_conv_derivatives": "cbn",
  "cbn_saved_activations": "cbn",
  "mabn_uncentred": "mabn",
}
"""Rows that are a registry normalizer with other settings: row -> registry name."""


def normalizer_kwargs(norm: str, network: str) -> Dict[str, Any]:
  """Settings that exercise each method's steady state (not its warmup);
  CBN at the published window (``k = 4``, buffer 3), ``cbn_s2`` with its
  derivatives over every second position (``derivative_stride=2``),
  ``cbn_bf16`` with its derivative buffers in bfloat16
  (``derivative_dtype``), ``cbn_s2_bf16`` with both; ``cbn_published``
  with the authors' gradient (``backward='published'``) and ``cbn_batch``
  with BN's backward on the pooled moments (``backward='batch'``): neither
  differentiates the Taylor compensation, so their backward passes do not
  read the derivative buffers. ``cbn_conv_derivatives`` takes every
  ``d nu / d W`` from the backward-weight convolution
  (``kernel_derivatives='convolution'``) and ``cbn_saved_activations`` keeps
  what autodiff saves for the backward pass (``rematerialize=False``), and
  ``mabn_uncentred`` runs MABN after plain convolutions (``centered=False``):
  the ablations of :mod:`benchmarks.compile_time`."""
  cbn = dict(window=4, burn_in=0)
  return {
    "mabn": dict(warmup_steps=0, renorm_start=0),
    "mabn_uncentred": dict(warmup_steps=0, renorm_start=0, centered=False),
    "brn": dict(warmup_steps=0, ramp_steps=0),
    "cbn": cbn,
    "cbn_s2": dict(cbn, derivative_stride=2),
    "cbn_bf16": dict(cbn, derivative_dtype=jnp.bfloat16),
    "cbn_s2_bf16": dict(cbn, derivative_stride=2, derivative_dtype=jnp.bfloat16),
    "cbn_published": dict(cbn, backward="published"),
    "cbn_batch": dict(cbn, backward="batch"),
    "cbn_conv_derivatives": dict(cbn, kernel_derivatives="convolution"),
    "cbn_saved_activations": dict(cbn, rematerialize=False),
    "gn": dict(num_groups=2 if network == SMOKE_MODEL else 32),
    "ws_gn": dict(num_groups=2 if network == SMOKE_MODEL else 32),
  }.get(norm, {})


class _FlaxConvBatchNorm(nn.Module):
  """``flax.linen.Conv`` (no bias) + ``flax.linen.BatchNorm``: the baseline.

  The same variable layout as the registry's ``conv_norm`` (``conv``/``norm``
  children) and Flax's defaults (momentum 0.99, epsilon 1e-5, fast variance).
  With ``with_derivatives`` (the ``cbn_floor`` row) it also computes, in
  training, the moment derivatives CBN computes for every layer (``d mu / d W``
  and ``d nu / d W``,
  :func:`~mabn_jax.functional.cross_iteration.moment_derivatives`: two
  backward-weight convolutions) and adds ``0 *`` their sum to the output, so
  that XLA keeps them: what CBN's step costs without its window (no
  buffers, no Taylor compensation, no pooling).
  """

  features: int
  kernel_size: Any
  strides: Any = 1
  padding: Any = "SAME"
  kernel_init: Any = None
  with_derivatives: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    rank = x.ndim - 2
    spatial = lambda v: (v,) * rank if isinstance(v, int) else tuple(v)
    extra = {} if self.kernel_init is None else {"kernel_init": self.kernel_init}
    conv = nn.Conv(
      self.features,
      spatial(self.kernel_size),
      spatial(self.strides),
      padding=self.padding,
      use_bias=False,
      name="conv",
      **extra,
    )
    y = conv(x)
    out = nn.BatchNorm(use_running_average=not train, name="norm")(y)
    if self.with_derivatives and train:
      spec = cross_iteration.ConvSpec.make(rank, self.strides, self.padding)
      dmu, dnu = cross_iteration.moment_derivatives(
        x, y, conv.variables["params"]["kernel"], spec, groups=1
      )
      out = out + 0.0 * (jnp.sum(dmu) + jnp.sum(dnu)).astype(out.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class FlaxBatchNormNormalizer:
  """A ``Normalizer`` look-alike for the models: ``flax.linen.BatchNorm``
  (``with_derivatives``: plus CBN's derivative convolutions, ``cbn_floor``)."""

  name: str = "flax_bn"
  with_derivatives: bool = False

  def conv_norm(
    self, features, kernel_size, strides=1, padding="SAME", kernel_init=None, name=None
  ):
    return _FlaxConvBatchNorm(
      features=features,
      kernel_size=kernel_size,
      strides=strides,
      padding=padding,
      kernel_init=kernel_init,
      with_derivatives=self.with_derivatives,
      name=name,
    )


def make_normalizer(norm: str, network: str):
  if norm == "flax_bn":
    return FlaxBatchNormNormalizer()
  if norm == "cbn_floor":
    return FlaxBatchNormNormalizer(name="cbn_floor", with_derivatives=True)
  return mj.make_normalizer(ROW_NORMS.get(norm, norm), **normalizer_kwargs(norm, network))


def _block(tree):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


SMOKE_MODEL = "cnn2_smoke"


def _model(network: str, normalizer):
  # The smoke network is a narrow 2-conv CNN so that CI compiles it quickly.
  if network == SMOKE_MODEL:
    return build_model("cnn2", normalizer, 10, width=4)
  return build_model(network, normalizer, 10)


def training_step_and_args(network: str, norm: str, batch: int, size: int):
  """``(train_step, args)``: one variant's uncompiled SGD step and its inputs.

  ``train_step(variables, opt_state, images, labels)`` returns the new
  variables, optimizer state and loss; ``args`` are the initial values.
  """
  model = _model(network, make_normalizer(norm, network))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
  variables = model.init(jax.random.key(0), images, train=True)
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(variables["params"])

  def loss_fn(variables, images, labels):
    logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, mutated

  def plain_value_and_grad(variables, images, labels):
    # What a user of flax.linen.BatchNorm writes: plain autodiff of the params.
    def of_params(params):
      return loss_fn({**variables, "params": params}, images, labels)

    (loss, mutated), grads = jax.value_and_grad(of_params, has_aux=True)(variables["params"])
    return (loss, {**variables, **mutated}), grads

  value_and_grad = plain_value_and_grad if norm in PLAIN_AUTODIFF else mj.value_and_grad(loss_fn)

  def train_step(variables, opt_state, images, labels):
    (loss, variables), grads = value_and_grad(variables, images, labels)
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {**variables, "params": params}, opt_state, loss

  return train_step, (variables, opt_state, images, labels)


def build_training_step(network: str, norm: str, batch: int, size: int):
  """Returns ``(compiled_step, args, compile_seconds, memory)`` for one variant.

  Every call starts from empty JAX caches, as a fresh process would: the
  variables are initialized (which traces the layers, as a user's
  ``model.init`` does), then the step is traced and compiled, so a later
  round is not faster for having traced the same layers before.
  """
  jax.clear_caches()
  train_step, args = training_step_and_args(network, norm, batch, size)
  start = time.perf_counter()
  # Variables and optimizer state are donated, as in a real training loop, so
  # XLA's memory analysis counts the state once (inputs alias outputs).
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  memory = memory_of(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    memory["gflops"] = cost["flops"] / 1e9
  return compiled, args, compile_seconds, memory


class _Stepper:
  """Calls a donated training step, each time from the same initial state.

  ``prepare`` (untimed) copies the initial variables and optimizer state into
  fresh buffers for the next call to donate, so every timed step computes on
  the same numbers: a state that drifts over the rounds (diverging loss,
  denormals) would otherwise make step times depend on the round.
  """

  def __init__(self, compiled, args):
    self.compiled, self.initial, self.batch = compiled, args[:2], args[2:]
    self.state = None

  def prepare(self):
    self.state = _block(jax.tree_util.tree_map(jnp.copy, self.initial))

  def __call__(self):
    if self.state is None:
      self.prepare()
    state, self.state = self.state, None
    return self.compiled(*state, *self.batch)[2]


def memory_of(compiled) -> Dict[str, float]:
  """XLA's memory analysis of a compiled executable, in MiB."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  mib = 1.0 / 2**20
  temp = analysis.temp_size_in_bytes
  total = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + temp
  )
  return {"temp_mib": temp * mib, "total_mib": total * mib}


def measured_peak_mib() -> float | None:
  """The first device's peak memory in use (MiB) so far, or None if it reports none."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def interleaved_times(fns: Dict[str, Any], rounds: int, warmup: int = 2) -> Dict[str, List[float]]:
  """Runs ``fns`` round-robin; returns each one's list of wall times (s).

  A function with a ``prepare`` method has it called, untimed, before each call.
  """
  return interleaved_bursts(fns, rounds, 1, warmup)[0]


def wall_seconds(fn) -> float:
  """Wall time (s) of one call of ``fn``, its result blocked on; a ``prepare``
  method, where ``fn`` has one, is called untimed first."""
  if hasattr(fn, "prepare"):
    fn.prepare()
  start = time.perf_counter()
  _block(fn())
  return time.perf_counter() - start


def interleaved_bursts(
  fns: Dict[str, Any], rounds: int, burst: int, warmup: int = 2, call=wall_seconds
) -> Tuple[Dict[str, List], Dict[str, List]]:
  """Runs ``fns`` round-robin, ``burst`` calls back to back per turn.

  Returns ``(firsts, later)``: each function's measurements (``call(fn)``,
  by default :func:`wall_seconds`) of the first call of every turn, and of
  the other ``burst - 1`` calls (empty lists for ``burst == 1``). A training
  loop runs one step after another; on a CPU the first step after another
  executable's can be slower (ResNet-50 CBN: BENCHMARKS.md, "CBN's d nu / d
  W from a Gram matrix, and steady-state steps"), and ``later`` measures
  without that. ``warmup`` unmeasured calls of each function come first.
  """
  for fn in fns.values():
    for _ in range(warmup):
      call(fn)
  firsts = {name: [] for name in fns}
  later = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      firsts[name].append(call(fn))
      later[name] += [call(fn) for _ in range(burst - 1)]
  return firsts, later


def _per_compile(times: Dict[Any, List[float]], name: str) -> List[List[float]]:
  """The time lists of ``name``'s executables, from times keyed ``(name, index)``."""
  return [ts for (variant, _), ts in times.items() if variant == name]


def bench_training(
  network: str,
  batch: int,
  size: int,
  norms: Sequence[str],
  rounds: int,
  compile_rounds: int = 3,
  burst: int = 1,
):
  """Training-step time, compile time and memory of each normalizer.

  Each normalizer is compiled ``compile_rounds`` times (fresh traces,
  interleaved), and *every* executable is timed in the interleaved rounds:
  on XLA's CPU backend two compilations of the same step can differ by
  several percent in step time, so one executable per normalizer measures
  that compilation, not the normalizer. Step time is the median over all
  executables' steps, compile time the median of the compilations; the
  per-executable medians are in ``step_ms_per_compile``. With ``burst > 1``
  every turn runs ``burst`` steps back to back (:func:`interleaved_bursts`):
  the step times are those of the later steps of each turn, and
  ``first_step_ms`` is the median of the first ones.
  """
  steps, results, compile_times = {}, {}, {norm: [] for norm in norms}
  for index in range(max(1, compile_rounds)):
    for norm in norms:
      compiled, args, compile_seconds, memory = build_training_step(network, norm, batch, size)
      compile_times[norm].append(compile_seconds)
      steps[norm, index] = _Stepper(compiled, args)
      if norm not in results:
        results[norm] = dict(memory)
        if measured_peak_mib() is not None:  # the backend reports its memory
          # The process's peak so far, after this normalizer's first step.
          _block(steps[norm, index]())
          results[norm]["measured_peak_mib_so_far"] = measured_peak_mib()
      print(f"  compiled {network}/{norm} in {compile_seconds:.1f}s {memory}", flush=True)
  firsts, later = interleaved_bursts(steps, rounds, burst)
  times = later if burst > 1 else firsts
  for norm in norms:
    per_compile = [[1e3 * t for t in ts] for ts in _per_compile(times, norm)]
    if burst > 1:
      results[norm]["first_step_ms"] = 1e3 * statistics.median(
        [t for ts in _per_compile(firsts, norm) for t in ts]
      )
    results[norm].update(
      compile_s=statistics.median(compile_times[norm]),
      compile_s_all=compile_times[norm],
      step_ms=statistics.median([t for ts in per_compile for t in ts]),
      step_ms_per_compile=[statistics.median(ts) for ts in per_compile],
      step_ms_all=per_compile,
    )
  return results


def build_inference(network: str, variant: str, batch: int, size: int):
  """Jitted eval function of one inference variant and its input."""
  norm = variant.replace("_folded", "").replace("_precomputed", "")
  normalizer = make_normalizer(norm, network)
  model = _model(network, normalizer)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=True)
  if variant.endswith("_folded"):
    variables, normalizer = fold(variables, normalizer)
    model = _model(network, normalizer)
  if variant.endswith("_precomputed"):  # WS+GN: the standardized kernels stored
    variables, normalizer = mj.precompute_standardized_kernels(variables, normalizer)
    model = _model(network, normalizer)
  variables = {k: v for k, v in variables.items() if k != mj.BACKWARD_STATS}
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return (lambda: apply(variables, images)), model, variables, images


def bench_inference(
  network: str, batch: int, size: int, variants: Sequence[str], rounds: int, compile_rounds: int = 3
):
  """Images/s of each variant: the median over ``compile_rounds`` separately
  compiled copies (see :func:`bench_training`), timed interleaved."""
  fns = {}
  for index in range(max(1, compile_rounds)):
    for variant in variants:
      fns[variant, index] = build_inference(network, variant, batch, size)[0]
  times = interleaved_times(fns, rounds)
  results = {}
  for variant in variants:
    per_compile = _per_compile(times, variant)
    seconds = statistics.median([t for ts in per_compile for t in ts])
    results[variant] = {
      "images_per_s": batch / seconds,
      "ms": 1e3 * seconds,
      "images_per_s_per_compile": [batch / statistics.median(ts) for ts in per_compile],
    }
  return results


def ratios(results: Dict[str, Dict[str, float]], key: str, base: str) -> Dict[str, float]:
  return {
    name: r[key] / results[base][key]
    for name, r in results.items()
    if key in r and key in results.get(base, {})
  }


TARGETS = [
  # (description, section, key, numerator, denominator, bound, kind).
  # Ratios to flax.linen.BatchNorm (flax_bn), the layer a user would otherwise use.
  ("mj.BatchNorm / flax BN training step", "train", "step_ms", "bn", "flax_bn", 1.02, "<="),
  ("MABN / flax BN training step", "train", "step_ms", "mabn", "flax_bn", 1.00, "<="),
  ("MABN / flax BN peak memory (XLA total)", "train", "total_mib", "mabn", "flax_bn", 1.02, "<="),
  ("MABN / flax BN compile time", "train", "compile_s", "mabn", "flax_bn", 1.2, "<="),
  ("BRN / flax BN training step", "train", "step_ms", "brn", "flax_bn", 1.05, "<="),
  ("CBN / flax BN training step", "train", "step_ms", "cbn", "flax_bn", 1.25, "<="),
  (
    "CBN / flax BN XLA FLOPs (a floor for compute-bound devices)",
    "train",
    "gflops",
    "cbn",
    "flax_bn",
    1.25,
    "<=",
  ),
  ("CBN / flax BN peak memory (XLA total)", "train", "total_mib", "cbn", "flax_bn", 1.5, "<="),
  (
    "CBN's floor (flax BN + CBN's derivative convolutions) / flax BN training step",
    "train",
    "step_ms",
    "cbn_floor",
    "flax_bn",
    1.25,
    "<=",
  ),
  (
    "CBN, derivatives at every 2nd position / flax BN training step",
    "train",
    "step_ms",
    "cbn_s2",
    "flax_bn",
    1.25,
    "<=",
  ),
  (
    "CBN, bfloat16 derivative buffers / flax BN training step",
    "train",
    "step_ms",
    "cbn_bf16",
    "flax_bn",
    1.25,
    "<=",
  ),
  (
    "CBN, bfloat16 derivative buffers / flax BN peak memory (XLA total)",
    "train",
    "total_mib",
    "cbn_bf16",
    "flax_bn",
    1.5,
    "<=",
  ),
  (
    "CBN, every 2nd position and bfloat16 buffers / flax BN training step",
    "train",
    "step_ms",
    "cbn_s2_bf16",
    "flax_bn",
    1.25,
    "<=",
  ),
  (
    "CBN, the authors' gradient / flax BN training step",
    "train",
    "step_ms",
    "cbn_published",
    "flax_bn",
    1.25,
    "<=",
  ),
  (
    "CBN, BN's backward on the pooled moments / flax BN training step",
    "train",
    "step_ms",
    "cbn_batch",
    "flax_bn",
    1.25,
    "<=",
  ),
  ("folded MABN / none inference", "infer", "images_per_s", "mabn_folded", "none", 0.99, ">="),
  ("folded BN / none inference", "infer", "images_per_s", "bn_folded", "none", 0.99, ">="),
  ("folded MABN / GN inference", "infer", "images_per_s", "mabn_folded", "gn", 2.4, ">="),
  (
    "folded MABN / WS+GN (kernels precomputed) inference",
    "infer",
    "images_per_s",
    "mabn_folded",
    "ws_gn_precomputed",
    1.1,
    ">=",
  ),
]


def check_targets(report: Dict[str, Any]) -> List[Dict[str, Any]]:
  rows = []
  for network, sections in report["networks"].items():
    for desc, section, key, num, den, bound, kind in TARGETS:
      res = sections.get(section, {})
      if num not in res or den not in res or key not in res[num] or key not in res[den]:
        continue
      value = res[num][key] / res[den][key]
      ok = value <= bound if kind == "<=" else value >= bound
      rows.append(
        dict(network=network, target=desc, ratio=value, bound=f"{kind} {bound}", met=bool(ok))
      )
  return rows


def _span(result: Dict[str, Any], key: str) -> str:
  """``min-max`` of the per-compile medians of ``key`` (``-`` if absent)."""
  values = result.get(f"{key}_per_compile")
  return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def markdown(report: Dict[str, Any]) -> str:
  meta = report["meta"]
  lines = [
    f"## {meta['device']} — {meta['date']}",
    "",
    f"JAX {meta['jax']}, jaxlib {meta['jaxlib']}, Python {meta['python']}, "
    f"{meta['machine']}; {meta.get('compile_rounds', 1)} compilations of every variant, "
    f"all timed in {meta['rounds']} interleaved rounds"
    + (
      f" of {meta['burst']} back-to-back training steps each (step times: the "
      f"last {meta['burst'] - 1} of every turn; the first are in the json, "
      f"`first_step_ms`)"
      if meta.get("burst", 1) > 1
      else ""
    )
    + "; medians over all their steps. "
    f"Command: `{meta['command']}`"
    + "".join(f", with `{name}={value}`" for name, value in meta.get("environment", {}).items())
    + ".",
    "",
  ]
  if report.get("skipped"):
    lines += [
      f"Not measured (the time budget of {meta['time_budget_s']:g} s was spent): "
      + ", ".join(report["skipped"])
      + ".",
      "",
    ]
  for network, sections in report["networks"].items():
    cfg = sections["config"]
    lines += [
      f"### {network} ({cfg['model']}, {cfg['size']}x{cfg['size']}, batch {cfg['batch']})",
      "",
    ]
    train = sections.get("train", {})
    if train:
      base, flax_base = train.get("bn", {}), train.get(BASELINE, {})
      lines += [
        "| normalizer | step ms | / flax BN | / BN | per compile ms | compile s "
        "| / flax BN | / BN | XLA temp MiB | XLA total MiB | / flax BN | / BN "
        "| XLA GFLOP | / flax BN |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
      ]

      def rel(r, key, base):
        return f"{r[key] / base[key]:.3f}" if key in r and key in base else "-"

      for norm, r in train.items():
        lines.append(
          f"| {norm} | {r['step_ms']:.1f} | {rel(r, 'step_ms', flax_base)} | "
          f"{rel(r, 'step_ms', base)} | {_span(r, 'step_ms')} | {r['compile_s']:.1f} | "
          f"{rel(r, 'compile_s', flax_base)} | {rel(r, 'compile_s', base)} | "
          f"{r.get('temp_mib', float('nan')):.1f} | {r.get('total_mib', float('nan')):.1f} | "
          f"{rel(r, 'total_mib', flax_base)} | {rel(r, 'total_mib', base)} | "
          f"{r.get('gflops', float('nan')):.2f} | {rel(r, 'gflops', flax_base)} |"
        )
      lines.append("")
    infer = sections.get("infer", {})
    if infer:
      none, flax_base = infer.get("none", {}), infer.get(BASELINE, {})
      lines += [
        "| inference variant | images/s | / none | / flax BN | per compile images/s |",
        "| --- | ---: | ---: | ---: | ---: |",
      ]
      for variant, r in infer.items():
        rel = f"{r['images_per_s'] / none['images_per_s']:.3f}" if none else "-"
        rel_flax = f"{r['images_per_s'] / flax_base['images_per_s']:.3f}" if flax_base else "-"
        lines.append(
          f"| {variant} | {r['images_per_s']:.1f} | {rel} | {rel_flax} | "
          f"{_span(r, 'images_per_s')} |"
        )
      lines.append("")
  lines += [
    "### Targets",
    "",
    "| network | target | measured | bound | met |",
    "| --- | --- | ---: | --- | --- |",
  ]
  for row in report["targets"]:
    lines.append(
      f"| {row['network']} | {row['target']} | {row['ratio']:.3f} | {row['bound']} | "
      f"{'yes' if row['met'] else 'NO'} |"
    )
  return "\n".join(lines) + "\n"


# Environment variables that change what is measured without changing the
# code: XLA's flags, and glibc's allocator tunables (on Linux,
# ``glibc.malloc.hugetlb=1`` backs XLA:CPU's per-step temporaries with huge
# pages; BENCHMARKS.md, "Page faults of XLA's temporaries on the CPU").
TIMING_ENVIRONMENT = ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD")


def timing_environment(environ=os.environ) -> Dict[str, str]:
  """The variables of :data:`TIMING_ENVIRONMENT` that are set, as the report's meta keeps them."""
  return {name: environ[name] for name in TIMING_ENVIRONMENT if name in environ}


def process_meta() -> Dict[str, Any]:
  """What the benchmark scripts' json reports say of the process: the date
  (UTC), JAX, the first device, the machine, its CPUs and
  :func:`timing_environment`."""
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "machine": platform.machine(),
    "cpus": os.cpu_count(),
    "environment": timing_environment(),
  }


def run(args, save=None, clock=time.monotonic) -> Dict[str, Any]:
  """Measures every network's sections; returns the report.

  ``save(report)`` (if given) is called after every section, so that a run
  stopped from outside keeps what it measured. With ``args.time_budget``
  (seconds), a section (one network's training or inference benchmark) is
  started only while the budget lasts; the ones left out are listed in
  ``report["skipped"]`` and in the tables. A started section runs to its end.
  """
  accelerator = jax.default_backend() != "cpu"
  report = {
    "meta": {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} "
      f"({os.cpu_count()} CPU cores)",
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else "",
      "python": platform.python_version(),
      "machine": platform.machine(),
      "rounds": args.rounds,
      "compile_rounds": 1 if args.smoke else args.compile_rounds,
      "burst": args.burst,
      "time_budget_s": args.time_budget,
      "command": " ".join(["python -m benchmarks.bench"] + sys.argv[1:]),
      "environment": timing_environment(),
    },
    "networks": {},
    "skipped": [],
  }
  compile_rounds = 1 if args.smoke else args.compile_rounds
  start = clock()

  def within_budget() -> bool:
    return args.time_budget is None or clock() - start < args.time_budget

  for name in args.networks:
    model, size, cpu_batch, acc_batch = NETWORKS[name]
    batch = acc_batch if accelerator else cpu_batch
    if args.smoke:
      model, size, batch = SMOKE_MODEL, 8, 4
    print(f"{name}: {model} {size}x{size} batch {batch}", flush=True)
    sections = {"config": {"model": model, "size": size, "batch": batch}}
    report["networks"][name] = sections
    for section, skip in (("train", args.skip_train), ("infer", args.skip_infer)):
      if skip:
        continue
      if not within_budget():
        print(
          f"  skipped {name}/{section}: the time budget of {args.time_budget:g}s is spent",
          flush=True,
        )
        report["skipped"].append(f"{name}/{section}")
        continue
      if section == "train":
        sections["train"] = bench_training(
          model, batch, size, args.norms, args.rounds, compile_rounds, args.burst
        )
      else:
        sections["infer"] = bench_inference(
          model, batch, size, args.variants, args.rounds, compile_rounds
        )
      report["targets"] = check_targets(report)
      if save is not None:
        save(report)
  report["targets"] = check_targets(report)
  return report


def write_json(path: str, report: Dict[str, Any]) -> None:
  """Writes ``report`` to ``path`` (indented json), creating its directory."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line of :func:`main`, checked."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
  parser.add_argument("--norms", nargs="+", default=list(TRAIN_NORMS))
  parser.add_argument("--variants", nargs="+", default=list(INFER_VARIANTS))
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument(
    "--compile-rounds",
    type=int,
    default=3,
    help="fresh compilations per variant, all of them timed (medians "
    "over every executable's steps)",
  )
  parser.add_argument(
    "--burst",
    type=int,
    default=1,
    help="training steps per variant per turn, back to back; above 1, "
    "step times leave out the first of every turn",
  )
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--skip-infer", action="store_true")
  parser.add_argument(
    "--markdown",
    default="BENCHMARKS.md",
    help="page whose tables of this device the run replaces ('' for none)",
  )
  parser.add_argument(
    "--from-json",
    default=None,
    help="instead of measuring, render this report (a json the benchmark wrote)",
  )
  parser.add_argument(
    "--json",
    default="benchmarks/results/cpu.json",
    help="file the report is written to, after every section ('' for none)",
  )
  parser.add_argument(
    "--time-budget",
    type=float,
    default=None,
    help="seconds; start no further section (one network's training or "
    "inference benchmark) once they are spent",
  )
  args = parser.parse_args(argv)
  if args.burst < 1:
    parser.error(f"--burst must be at least 1, got {args.burst}")
  if args.time_budget is not None and args.time_budget <= 0:
    parser.error(f"--time-budget must be positive, got {args.time_budget:g}")
  return args


def device_kind(report: Dict[str, Any]) -> str:
  """``'cpu'``, ``'gpu'`` or ``'tpu'``: the platform of the report's device."""
  device = report["meta"]["device"].lower()
  for kind in ("gpu", "tpu"):
    if kind in device or (kind == "gpu" and "cuda" in device):
      return kind
  return "cpu"


def replace_section(page: str, kind: str, text: str) -> str:
  """``page`` with the generated tables of device ``kind`` (between the
  markers ``<!-- bench:KIND -->`` and ``<!-- /bench:KIND -->``) replaced by
  ``text``; the markers and ``text`` are appended when absent."""
  start, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
  block = f"{start}\n{text.rstrip()}\n{end}"
  if start in page and end in page:
    head, rest = page.split(start, 1)
    return head + block + rest.split(end, 1)[1]
  return page.rstrip() + "\n\n" + block + "\n"


def write_markdown(path: str, report: Dict[str, Any]) -> None:
  """Replaces the tables of the report's device in the page at ``path``."""
  page = "# Benchmarks\n"
  if os.path.exists(path):
    with open(path) as f:
      page = f.read()
  with open(path, "w") as f:
    f.write(replace_section(page, device_kind(report), markdown(report)))


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      report = json.load(f)
  else:
    report = run(args, save=functools.partial(write_json, args.json) if args.json else None)
  print(markdown(report))
  if args.json and not args.from_json:
    write_json(args.json, report)
  if args.markdown:
    write_markdown(args.markdown, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
