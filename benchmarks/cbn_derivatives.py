"""CBN's compensation error with derivatives over a subset of positions, or
stored in a narrower dtype.

``CBNConfig.derivative_stride = s`` takes a new window entry's kernel
derivatives ``d mu / d W`` and ``d nu / d W`` over every ``s``-th output
position per spatial axis, about ``1 / s^d`` of the extra backward-weight
convolution's cost (``benchmarks/bench.py``'s ``cbn_s2`` row times it). This
script measures what that costs in accuracy of the compensation, the way the
compensated-vs-naive comparison does: train the CIFAR-10 6-conv CNN with CBN
for a few hundred steps on real images, then for every CBN layer carry the
statistics of the batch of ``lag`` steps ago to the current kernel (naive:
not at all; Taylor with derivatives at stride 1, 2, 4, each stored in float32
and in bfloat16 (``CBNConfig.derivative_dtype``, which halves the derivative
buffers' memory)) and compare them with the statistics recomputed with the
current kernel on the same layer input. ``--task segmentation`` measures
the same on the segmentation experiment's U-Net trained at a true batch of 2
(``experiments/tasks/segmentation/``)::

  python -m benchmarks.cbn_derivatives --steps 300 \\
      --json benchmarks/results/cbn_derivatives_cpu.json
  python -m benchmarks.cbn_derivatives --task segmentation --steps 2000 --strides 1 --dtypes float32

Printed and written: per layer and lag, the relative error of the variance
``|var_est - var| / |var|`` and of ``nu = mean(y^2)`` (norms over channels).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import unfreeze

import mabn_jax as mj
from benchmarks import bench
from experiments import data as D
from experiments.models import build_model
from mabn_jax.functional import cross_iteration as F
from mabn_jax.functional.centering import center_kernel


def _layer_inputs(model, variables, images):
  """``{layer path: (x, effective kernel, spec)}`` of every CBN layer, from one
  eager training-mode forward pass (its state updates are discarded)."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    out = next_fun(*args, **kwargs)
    if isinstance(module, mj.CrossIterationConvNorm) and context.method_name == "__call__":
      kernel = module.variables["params"]["conv"]["kernel"]
      if module.centered:
        kernel = center_kernel(kernel)
      spec = F.ConvSpec.make(kernel.ndim - 2, module.strides, module.padding)
      captured["/".join(module.path)] = (args[0], kernel, spec)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=True, mutable=["batch_stats"])
  return captured


def _relative(estimate, exact):
  return float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))


def method_name(stride: int, dtype: str = "float32") -> str:
  """A column of the report: ``'stride s'``, or ``'stride s, dtype'`` for
  derivative buffers narrower than float32."""
  return f"stride {stride}" + ("" if dtype == "float32" else f", {dtype}")


def compensation_errors(
  x, w_old, w_new, spec, strides: Sequence[int], dtypes: Sequence[str] = ("float32",)
) -> Dict[str, Dict[str, float]]:
  """Relative errors of the statistics of ``conv(x, w_old)`` carried to
  ``w_new``, naive and with derivatives at each stride, stored in each dtype
  (``CBNConfig.derivative_dtype``) as the layer stores them."""
  y_old = F.conv(x, w_old, spec)
  mu_old, nu_old = F.batch_moments(y_old, 1)
  mu, nu = F.batch_moments(F.conv(x, w_new, spec), 1)
  var = nu - mu**2
  rows = {"naive": {"var": _relative(nu_old - mu_old**2, var), "nu": _relative(nu_old, nu)}}
  for s in strides:
    exact_dmu, exact_dnu = F.moment_derivatives(x, y_old, w_old, spec, 1, stride=s)
    for dtype in dtypes:
      dmu, dnu, mu_offset, nu_offset = F.stored_entries(
        mu_old, nu_old, exact_dmu, exact_dnu, w_old, jnp.dtype(dtype)
      )
      mu_c, nu_c = F.compensate(mu_offset, nu_offset, dmu, dnu, w_new)
      rows[method_name(s, dtype)] = {
        "var": _relative(nu_c - mu_c**2, var),
        "nu": _relative(nu_c, nu),
      }
  rows["kernel change"] = {"relative": _relative(w_new, w_old)}
  return rows


def train(steps: int, batch: int, seed: int, train_subset: int, lr: float, keep: int):
  """SGD on CIFAR-10 with CBN (window 4, burn-in 50); returns the model, the
  variables of the last ``keep`` steps (oldest first) and their batches."""
  ds = D.load_dataset("cifar10_jpeg", train_subset=train_subset)
  model = build_model("cnn6", mj.make_normalizer("cbn", window=4, burn_in=50), 10)
  rng = np.random.default_rng(seed)

  def batch_at():
    idx = rng.choice(len(ds.train), batch, replace=False)
    images, labels = ds.train.get(idx)
    return (
      jnp.asarray(D.normalize(images, ds.mean, ds.std), jnp.float32),
      jnp.asarray(labels, jnp.int32),
    )

  images, _ = batch_at()
  variables = model.init(jax.random.key(seed), images, train=True)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))
  opt_state = tx.init(variables["params"])

  def loss_fn(variables, images, labels):
    logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), mutated

  @jax.jit
  def step(variables, opt_state, images, labels):
    (loss, variables), grads = mj.value_and_grad(loss_fn)(variables, images, labels)
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return (
      {**variables, "params": optax.apply_updates(variables["params"], updates)},
      opt_state,
      loss,
    )

  history = []
  for t in range(steps):
    images, labels = batch_at()
    history = (history + [(variables, images)])[-keep:]
    variables, opt_state, loss = step(variables, opt_state, images, labels)
    if (t + 1) % 100 == 0:
      print(f"step {t + 1}: loss {float(loss):.3f}", flush=True)
  return model, history + [(variables, None)]


def train_segmentation(
  steps: int, seed: int, keep: int, preset: str = "seg_cpu", epochs: float = 16.0, **overrides
):
  """The segmentation experiment's U-Net with CBN at a true batch of 2
  (``experiments/tasks/segmentation/``: its preset and learning-rate schedule
  for ``epochs``), stopped after ``steps``; returns what :func:`train` does.
  ``overrides`` replace fields of the preset (the tests' tiny data)."""
  from experiments import segmentation as S

  config = S.preset(preset, norm="cbn", batch_size=2, seed=seed, epochs=epochs, **overrides)
  dataset = S.load_data(config)
  model = S.TASK.build(config, dataset)
  loader = S.TASK.train_loader(config, dataset, config.batch_size)
  spe = loader.steps_per_epoch
  tx = S.optimizer(config, S.learning_rate_schedule(config, spe, config.total_steps(spe)))
  train_step = jax.jit(S.step_functions(model, tx, dataset.num_classes)[0], donate_argnums=(0, 1))
  x = jnp.zeros((config.batch_size,) + dataset.image_shape, jnp.float32)
  variables = unfreeze(model.init(jax.random.PRNGKey(seed), x, train=True))
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  opt_state = tx.init(variables["params"])
  history, t, epoch = [], 0, 0
  while t < steps:
    for batch in loader.epoch(epoch):
      # The step donates its inputs: keep copies of the last ``keep`` states.
      kept = jax.tree_util.tree_map(jnp.copy, variables)
      history = (history + [(kept, jnp.asarray(batch["image"]))])[-keep:]
      variables, opt_state, metrics = train_step(variables, opt_state, batch)
      t += 1
      if t % 100 == 0:
        print(f"step {t}: loss {float(metrics['loss']):.3f}", flush=True)
      if t >= steps:
        break
    epoch += 1
  return model, history + [(variables, None)]


def run(args) -> Dict[str, Any]:
  keep = max(args.lags)
  if args.task == "segmentation":
    model, history = train_segmentation(args.steps, args.seed, keep, args.seg_preset)
  else:
    model, history = train(args.steps, args.batch, args.seed, args.train_subset, args.lr, keep)
  current, _ = history[-1]
  report = {"config": vars(args), "layers": {}}
  for lag in args.lags:
    old, images = history[-1 - lag]
    inputs = _layer_inputs(model, old, images)
    kernels_now = _layer_inputs(model, current, images)
    for path, (x, w_old, spec) in inputs.items():
      w_new = kernels_now[path][1]
      report["layers"].setdefault(path, {})[f"lag {lag}"] = compensation_errors(
        x, w_old, w_new, spec, args.strides, args.dtypes
      )
  return report


def markdown(report: Dict[str, Any]) -> str:
  config = report["config"]
  methods = ["naive"] + [
    method_name(s, dtype) for s in config["strides"] for dtype in config.get("dtypes", ["float32"])
  ]
  lines = [
    "| layer | lag | |dW|/|W| | " + " | ".join(f"var err {m}" for m in methods) + " |",
    "| --- | ---: | ---: | " + " | ".join("---:" for _ in methods) + " |",
  ]
  for path, lags in report["layers"].items():
    for lag, rows in lags.items():
      lines.append(
        f"| {path} | {lag.split()[1]} | {rows['kernel change']['relative']:.2e} | "
        + " | ".join(f"{rows[m]['var']:.2e}" for m in methods)
        + " |"
      )
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--task",
    choices=("classification", "segmentation"),
    default="classification",
    help="classification: the 6-conv CNN on CIFAR-10 (batch --batch, lr "
    "--lr); segmentation: the segmentation experiment's U-Net at a "
    "true batch of 2 (its 16-epoch schedule, stopped after --steps)",
  )
  parser.add_argument("--seg_preset", default="seg_cpu")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--train_subset", type=int, default=10000)
  parser.add_argument("--lags", type=int, nargs="+", default=[1, 3])
  parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument(
    "--dtypes",
    nargs="+",
    default=["float32", "bfloat16"],
    help="derivative_dtype values to store the derivatives in",
  )
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  report = run(args)
  print(markdown(report))
  if args.json:
    bench.write_json(args.json, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
