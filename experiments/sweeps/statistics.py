"""The batch-statistics sweep (``python -m experiments.sweep statistics``):
how much the statistics of BN at b=2, BN at the SGD batch and MABN at b=2
change from step to step."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

import numpy as np

from experiments import data as data_lib
from experiments.loop.config import Config
from experiments.loop.optimizer import learning_rate_schedule, optimizer
from experiments.sweeps.report import _plot, _save_plot, _write
from experiments.tasks.classification import build, load_data


def make_step(grad_fn, tx, channels: int):
  """The jitted training step; it returns the first ``channels`` channels of
  the recorded statistics."""
  import jax
  import optax

  @jax.jit
  def step(v, opt_state, images, labels):
    ((loss, v), grads), stats = grad_fn(v, images, labels)
    updates, opt_state = tx.update(grads, opt_state, v["params"])
    v = {**v, "params": optax.apply_updates(v["params"], updates)}
    stats = jax.tree_util.tree_map(lambda a: a[:, :channels], stats)
    return v, opt_state, loss, stats

  return step


def without_records(grad_fn):
  """``grad_fn`` with the recorder's signature: empty records."""
  return lambda *a: (grad_fn(*a), {})


def setting_step(args, cfg: Config, dataset, spe: int):
  """``(step, variables, opt_state)`` of one setting: its model, optimizer and
  (recording, unless ``--no_record``) training step."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax.core import unfreeze

  import mabn_jax as mj
  from mabn_jax import recording

  total, B = args.steps, cfg.batch_size
  model = build(cfg, dataset.num_classes, max(total, 1), spe)
  tx = optimizer(cfg, learning_rate_schedule(cfg, spe, max(total, 1)))
  variables = unfreeze(
    model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((B,) + dataset.image_shape), train=True)
  )
  opt_state = tx.init(variables["params"])

  def loss_fn(v, images, labels, model=model):
    logits, mutated = model.apply(v, images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, dataset.num_classes))
    return loss.mean(), mutated

  if args.no_record:  # the same training without the recorder (for comparison)
    grad_fn = without_records(mj.value_and_grad(loss_fn))
  else:
    grad_fn = recording.value_and_grad(loss_fn)
  return make_step(grad_fn, tx, args.channels), variables, opt_state


def record_setting(args, cfg: Config, dataset):
  """``(losses, traces)``: the loss of every step and each layer's recorded
  statistics ``(steps * G, C)`` (consecutive normalization groups in order)."""
  import jax

  loader = data_lib.Loader(dataset, "train", cfg.batch_size, True, cfg.seed)
  step, variables, opt_state = setting_step(args, cfg, dataset, loader.steps_per_epoch)
  series: Dict[str, Dict[str, list]] = {}
  losses = []
  s = epoch = 0
  while s < args.steps:
    for batch in loader.epoch(epoch):
      variables, opt_state, loss, stats = step(variables, opt_state, batch["image"], batch["label"])
      losses.append(loss)
      for layer, named in stats.items():
        for stat, value in named.items():
          series.setdefault(layer, {}).setdefault(stat, []).append(value)
      s += 1
      if s >= args.steps:
        break
    epoch += 1
  losses = [float(l) for l in jax.device_get(losses)]
  arr = {
    layer: {stat: np.concatenate(jax.device_get(v)) for stat, v in named.items()}
    for layer, named in series.items()
  }
  return losses, arr


def setting_result(losses, arr) -> Dict[str, Any]:
  """The loss curve and, per layer and statistic, its step-to-step noise
  variance (half the mean squared change) and variance."""
  return {
    "loss_curve": losses,
    "step_variance": {
      layer: {
        stat: float(np.mean(np.var(np.diff(v, axis=0), axis=0)) / 2) for stat, v in named.items()
      }
      for layer, named in arr.items()
    },
    "variance": {
      layer: {stat: float(np.mean(np.var(v, axis=0))) for stat, v in named.items()}
      for layer, named in arr.items()
    },
  }


def statistics_table(args, base: Config, results: Dict[str, Any]) -> str:
  """``table.md``: one table of step variances per setting."""
  table = (
    f"# Batch-statistics instability\n\nCommand: `python -m experiments.sweep "
    f"{' '.join(args.argv)}`\n\nModel `{base.model}` on `{base.dataset}`, SGD batch "
    f"{base.batch_size}, {args.steps} steps, first {args.channels} channels. Cell: half the "
    "mean squared step-to-step change of each statistic (per channel, averaged over "
    "channels), a noise variance; one normalization group is one iteration. BN: mu, var "
    "(forward), g, psi (backward); MABN: the statistics it uses (chi_used, psi_used, moving "
    "averages after warmup) and the batch values (chi_batch, psi_batch).\n\n"
  )
  for label, r in results.items():
    sv = r["step_variance"]
    stats_names = sorted({s for named in sv.values() for s in named})
    table += f"## {label}\n\n| layer | " + " | ".join(stats_names) + " |\n"
    table += "|---|" + "---|" * len(stats_names) + "\n"
    for layer, named in sv.items():
      table += (
        f"| {layer} | "
        + " | ".join(f"{named.get(s, float('nan')):.3g}" for s in stats_names)
        + " |\n"
      )
    table += "\n"
  return table


STATISTICS_PANELS = (
  ("mu", "chi_used", "forward: mu_B (BN) / chi used (MABN)"),
  ("var", None, "forward: var_B"),
  ("g", None, "backward: g_B"),
  ("psi", "psi_used", "backward: Psi_B (BN) / Psi used (MABN)"),
)
"""The plot's panels: (BN statistic, MABN statistic, title)."""


def plot_statistics(out_dir: str, traces: Dict[str, Any], steps: int) -> None:
  """``plot.png``: channel 0 of the second layer's statistics over the iterations."""
  plt = _plot()
  layer = sorted(next(iter(traces.values())))[min(1, len(next(iter(traces.values()))) - 1)]
  fig, axes = plt.subplots(2, 2, figsize=(10, 6))
  for ax, (bn_stat, mabn_stat, title) in zip(axes.ravel(), STATISTICS_PANELS, strict=True):
    for label, arr in traces.items():
      stat = mabn_stat if label.startswith("MABN") else bn_stat
      if stat is None or layer not in arr or stat not in arr[layer]:
        continue
      v = arr[layer][stat][:, 0]
      groups = len(v) // max(steps, 1)
      ax.plot(np.arange(len(v)) / max(groups, 1), v, lw=0.6, label=label)
    ax.set_title(f"{title} ({layer}, channel 0)", fontsize=8)
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)
  _save_plot(plt, fig, out_dir)


def statistics(args, base: Config) -> Dict[str, Any]:
  """Trains BN at b=2, BN at the SGD batch and MABN at b=2 for ``--steps``
  steps, recording their statistics; writes the table, ``results.json`` and
  ``plot.png`` (only the loss curves with ``--no_record``)."""
  out_dir = os.path.join(args.results_root, args.name)
  B = base.batch_size
  settings = [("BN b=2", "bn", 2), (f"BN b={B}", "bn", B), ("MABN b=2", "mabn", 2)]
  dataset = load_data(base)
  results: Dict[str, Any] = {}
  traces: Dict[str, Any] = {}
  for label, norm, b in settings:
    cfg = dataclasses.replace(
      base,
      norm=norm,
      norm_batch_size=b,
      num_devices=1,
      norm_kwargs=base.norm_kwargs if norm == "mabn" else {},
    )
    losses, traces[label] = record_setting(args, cfg, dataset)
    results[label] = setting_result(losses, traces[label])
  if args.no_record:
    _write(out_dir, "# Loss curves without the statistics recorder\n", results)
    return results
  _write(out_dir, statistics_table(args, base, results), results)
  plot_statistics(out_dir, traces, args.steps)
  return results
