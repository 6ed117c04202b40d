"""The training loop of every task: one run from its config to its summary (:func:`train`).

The task (``config.task``, :mod:`experiments.loop.task`) brings the data,
the model, the loss and the metrics; the loop is the same for all of them.

Each run writes into its workdir: ``metrics.jsonl`` (train windows and test
evaluations), ``checkpoints/`` (orbax, every ``checkpoint_every`` steps, at
the end and on Ctrl-C) and ``summary.json``. ``resume`` continues from the
latest checkpoint to exactly the result of an uninterrupted run. The loop
calls its :class:`~experiments.loop.hooks.Hooks` after every step and around
every checkpoint save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax.core import unfreeze

import mabn_jax as mj
from experiments.loop.checkpoints import (
  _checkpoint_manager,
  _checkpoint_target,
  _to_host,
  check_checkpointable,
  clear_run,
  restore_checkpoint,
  save_checkpoint,
)
from experiments.loop.config import AXIS, Config
from experiments.loop.evaluation import evaluate_splits, precise_bn_evaluation
from experiments.loop.hooks import NO_HOOKS, Hooks
from experiments.loop.metrics import (
  Progress,
  RunLog,
  read_metrics,
  summarize,
  write_metrics,
  write_summary,
)
from experiments.loop.optimizer import learning_rate_schedule, optimizer
from experiments.loop.parallel import Parallel
from experiments.loop.steps import step_functions
from experiments.loop.task import Loader, Task, get_task


def _devices_to_use(config: Config) -> int:
  """Starts ``jax.distributed`` if asked; returns the local devices the run uses."""
  if config.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
  devices = jax.local_devices()
  n = config.num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"num_devices={n} but only {len(devices)} local devices")
  return n


def make_loaders(config: Config, dataset, host_batch: int, task: Optional[Task] = None):
  """``(train_loader, {split: eval_loader})`` of this process's share of the data."""
  task = task or get_task(config.task)
  shard = (jax.process_index(), jax.process_count())
  return (
    task.train_loader(config, dataset, host_batch, *shard),
    task.eval_loaders(config, dataset, host_batch, *shard),
  )


def open_run(config: Config, parallel: Parallel, state):
  """``(manager, step, state, run_log)``: the run directory, resumed if asked.

  Without ``config.workdir`` nothing is written (``manager`` is ``None``).
  With it, ``config.json`` is written, a previous run is cleared (no
  ``resume``) or continued from its latest checkpoint, its metrics cut back
  to that step.
  """
  workdir = config.workdir
  if not workdir:
    return None, 0, state, RunLog()
  os.makedirs(workdir, exist_ok=True)
  run_log = RunLog(path=os.path.join(workdir, "metrics.jsonl"))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  check_checkpointable(parallel)
  if not config.resume:
    clear_run(workdir, ckpt_dir)
  manager = _checkpoint_manager(ckpt_dir)
  step = 0
  if config.resume and manager.latest_step() is not None:
    step, state, run_log.host = restore_checkpoint(manager, _checkpoint_target(parallel, state))
    state = parallel.to_host(state)
    run_log.records = [r for r in read_metrics(run_log.path) if r["step"] <= step]
    if jax.process_index() == 0:
      write_metrics(run_log.path, run_log.records)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=1)
  return manager, step, state, run_log


@dataclasses.dataclass
class Run:
  """A run being trained: what the steps of the loop read and update.

  ``variables`` and ``opt_state`` are on the devices (the step donates them);
  ``last_time``/``last_step`` mark the previous training record (its rate);
  ``times`` holds the training's start and end, the end of its first step
  and the seconds spent evaluating (:func:`timing`).
  """

  config: Config
  task: Task
  dataset: Any
  model: Any
  schedule: Any
  parallel: Parallel
  train_loader: Loader
  eval_loaders: Dict[str, Loader]
  steps_per_epoch: int
  total_steps: int
  manager: Any
  step: int
  run_log: RunLog
  variables: Any
  opt_state: Any
  hooks: Hooks = NO_HOOKS
  last_time: float = 0.0
  last_step: int = 0
  times: Dict[str, float] = dataclasses.field(default_factory=dict)


def initial_state(config: Config, task: Task, model, tx, dataset, n: int, variables=None):
  """``(parallel, host_state)``: the compiled steps over ``n`` local devices
  and the initial ``{'variables', 'opt_state'}`` in their host layout
  (``variables``, e.g. a model to fine-tune, instead of a fresh init)."""
  if variables is None:
    variables = model.init(
      jax.random.PRNGKey(config.seed),
      jnp.zeros((config.device_batch(),) + tuple(dataset.image_shape), jnp.float32),
      train=True,
    )
  variables = jax.tree_util.tree_map(jnp.asarray, unfreeze(variables))
  opt_state = tx.init(variables["params"])
  axis = None if config.parallel == "jit" else AXIS
  objective = task.objective(config, model, dataset)
  parallel = Parallel(config.parallel, step_functions(objective, tx, axis, config.diagnose), n)
  return parallel, parallel.replicate(_to_host({"variables": variables, "opt_state": opt_state}))


def start_run(config: Config, dataset, hooks: Hooks, variables=None, normalizer=None) -> Run:
  """The run ready for its first (or resumed) step: data, model, optimizer,
  devices, and the state of its workdir (see :func:`open_run`)."""
  task = get_task(config.task)
  n = _devices_to_use(config)
  if dataset is None:
    dataset = task.load_data(config)
  train_loader, eval_loaders = make_loaders(config, dataset, config.device_batch() * n, task)
  spe = train_loader.steps_per_epoch
  total_steps = config.total_steps(spe)
  model = task.build(config, dataset, total_steps, spe, normalizer)
  schedule = learning_rate_schedule(config, spe, total_steps)
  tx = optimizer(config, schedule)
  parallel, state = initial_state(config, task, model, tx, dataset, n, variables)
  manager, step, state, run_log = open_run(config, parallel, state)
  dev_state = parallel.put(state)
  return Run(
    config,
    task,
    dataset,
    model,
    schedule,
    parallel,
    train_loader,
    eval_loaders,
    spe,
    total_steps,
    manager,
    step,
    run_log,
    dev_state["variables"],
    dev_state["opt_state"],
    hooks,
  )


def checkpoint(run: Run) -> None:
  """Saves the run's state at its step (unless saved already or no workdir),
  within :meth:`Hooks.around_save`."""
  if run.manager is not None and run.manager.latest_step() != run.step:
    run.run_log.fold_pending(run.parallel)
    state = {"variables": run.variables, "opt_state": run.opt_state}
    with run.hooks.around_save(run.step):
      save_checkpoint(run.manager, run.step, state, dict(run.run_log.host))


def log_training(run: Run, progress: Progress) -> None:
  """Writes the training record of the steps since the last one."""
  run.run_log.fold_pending(run.parallel)  # waits for the steps, so the rate is true
  now, step = time.time(), run.step
  rate = (step - run.last_step) / max(now - run.last_time, 1e-9)
  rec = run.run_log.log_training(step, run.steps_per_epoch, float(run.schedule(step - 1)), rate)
  run.last_time, run.last_step = now, step
  progress.update(step, {k: rec[k] for k in run.run_log.metric_names()})


def maybe_evaluate(run: Run) -> None:
  """At the end of an epoch: evaluates if due (every ``eval_every`` epochs and
  at the end) and not done already at this step."""
  step, spe, config = run.step, run.steps_per_epoch, run.config
  e = -(-step // spe)
  due = step == run.total_steps or (config.eval_every and e % config.eval_every == 0)
  if due and not run.run_log.evaluated(step):
    final = step == run.total_steps
    start = time.time()
    results = evaluate_splits(run.task, run.parallel, run.variables, run.eval_loaders, final)
    run.times["eval"] = run.times.get("eval", 0.0) + time.time() - start
    run.run_log.log({"step": step, "epoch": step / spe, **results})


def train_step(run: Run, batch, progress: Progress) -> None:
  """One training step and what follows it: the training record, evaluation,
  checkpoint, :meth:`Hooks.after_step` and ``stop_after``."""
  parallel, config = run.parallel, run.config
  run.variables, run.opt_state, metrics = parallel.train_step(
    run.variables, run.opt_state, parallel.batch(batch)
  )
  run.run_log.pending.append(metrics)
  run.step += 1
  if "first_step_end" not in run.times:  # the first step compiles: timed apart
    jax.block_until_ready(metrics)
    run.times["first_step_end"] = time.time()
  step, total = run.step, run.total_steps
  end_of_epoch = step % run.steps_per_epoch == 0
  if step % config.log_every == 0 or step == total or end_of_epoch:
    log_training(run, progress)
  if end_of_epoch or step == total:
    maybe_evaluate(run)
  if config.checkpoint_every and step % config.checkpoint_every == 0:
    checkpoint(run)
  run.hooks.after_step(step)
  if config.stop_after and step >= config.stop_after and step < total:
    raise KeyboardInterrupt  # simulated interruption (tests, time-boxed runs)


def train_epochs(run: Run, progress: Progress) -> None:
  """Steps until the end of training (raises ``KeyboardInterrupt`` if interrupted)."""
  run.last_time, run.last_step = time.time(), run.step
  run.times.update(start=run.last_time, first_step=run.step)
  try:
    while run.step < run.total_steps:
      epoch, start = divmod(run.step, run.steps_per_epoch)
      for batch in run.train_loader.epoch(epoch, start):
        train_step(run, batch, progress)
        if run.step >= run.total_steps:
          break
  finally:
    run.times["end"] = time.time()


def timing(run: Run) -> Dict[str, Optional[float]]:
  """``train_seconds`` (this process's training, evaluations excluded) and
  ``seconds_per_step`` (the mean over the steps after the first, which
  compiles; ``None`` with fewer than two steps)."""
  t = run.times
  if "first_step_end" not in t:
    return {"train_seconds": 0.0, "seconds_per_step": None}
  evaluating = t.get("eval", 0.0)
  steps = run.step - int(t["first_step"])
  after_first = t["end"] - t["first_step_end"] - evaluating
  return {
    "train_seconds": t["end"] - t["start"] - evaluating,
    "seconds_per_step": after_first / (steps - 1) if steps > 1 else None,
  }


def finish(run: Run, finished: bool, wall_time_s: float) -> Dict[str, Any]:
  """The run's summary (written if finished), with its final variables."""
  config, parallel, dev_vars = run.config, run.parallel, run.variables
  mj.check_finite({"batch_stats": parallel.first(dev_vars.get("batch_stats", {}))})
  summary = summarize(
    config, run.run_log.records, run.step, run.total_steps, finished, wall_time_s, run.task.metric
  )
  summary.update(timing(run))
  if config.precise_bn_batches and finished:
    summary.update(
      precise_bn_evaluation(
        run.task, config, run.model, dev_vars, run.dataset, parallel, run.eval_loaders
      )
    )
  if config.workdir and finished and jax.process_index() == 0:
    write_summary(config.workdir, summary)
  summary["variables"] = parallel.first(dev_vars)
  # Every device's statistics (leading device axis), for per-device/synchronized checks.
  summary["device_batch_stats"] = parallel.device_view(dev_vars.get("batch_stats", {}))
  summary["model"] = run.model
  return summary


def train(
  config: Config, dataset=None, hooks: Hooks = NO_HOOKS, variables=None, normalizer=None
) -> Dict[str, Any]:
  """Trains one run of ``config.task``; returns (and writes) its summary.

  Args:
    config: the run.
    dataset: its data (default: loaded by the task).
    hooks: callbacks of the loop (:class:`~experiments.loop.hooks.Hooks`).
    variables: start from these (fine-tuning) instead of a fresh init.
    normalizer: the model's normalizer instead of the config's (e.g. one
      made by :func:`mabn_jax.convert_batch_norm`).

  Returns:
    the summary (``summary.json``'s fields), plus what is not written:
    ``variables`` (device 0's final variables, numpy), ``device_batch_stats``
    and ``model``.
  """
  config.validate()
  wall_start = time.time()
  run = start_run(config, dataset, hooks, variables, normalizer)
  progress = Progress(
    run.total_steps,
    run.step,
    config.progress and jax.process_index() == 0,
    f"{config.norm} b={config.norm_batch_size or config.device_batch()}",
  )
  interrupted = False
  try:
    train_epochs(run, progress)
  except KeyboardInterrupt:
    interrupted = True
    checkpoint(run)
  finally:
    progress.close()
  if not interrupted:
    checkpoint(run)
  return finish(run, not interrupted, time.time() - wall_start)
