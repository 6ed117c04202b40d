"""Learning-rate schedules and the optimizers (weight decay on kernels only), for every task."""

from __future__ import annotations

import optax
from flax import traverse_util
from flax.core import unfreeze


def with_warmup(lr: float, warmup: int, main):
  """``main`` after a linear warm-up from ``lr / warmup`` to ``lr`` over ``warmup`` steps
  (``main`` alone when ``warmup <= 0``)."""
  if warmup <= 0:
    return main
  return optax.join_schedules(
    [optax.linear_schedule(lr / max(1, warmup), lr, warmup), main], [warmup]
  )


def warmup_cosine(lr: float, warmup: int, total_steps: int):
  """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total_steps``."""
  return with_warmup(lr, warmup, optax.cosine_decay_schedule(lr, max(1, total_steps - warmup)))


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int):
  """The schedule of a :class:`~experiments.loop.config.Config` (``cosine``,
  ``step`` at ``step_epochs`` or ``constant``, after ``warmup_epochs``) from
  its :meth:`~experiments.loop.config.Config.peak_lr`."""
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  lr = config.peak_lr()
  if config.schedule == "cosine":
    return warmup_cosine(lr, warmup, total_steps)
  if config.schedule == "step":
    main = optax.piecewise_constant_schedule(
      lr, {int(e * steps_per_epoch) - warmup: config.step_factor for e in config.step_epochs}
    )
  else:
    main = optax.constant_schedule(lr)
  return with_warmup(lr, warmup, main)


def kernel_mask(params):
  """``True`` for conv/dense kernels (the parameters with weight decay)."""
  flat = traverse_util.flatten_dict(unfreeze(params))
  return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def sgd(schedule, weight_decay: float, momentum: float, nesterov: bool = False):
  """SGD + momentum; weight decay on conv/dense kernels only."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=kernel_mask),
    optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
  )


def adamw(schedule, weight_decay: float):
  """AdamW with weight decay on conv/dense kernels only."""
  return optax.adamw(schedule, weight_decay=weight_decay, mask=kernel_mask)


def optimizer(config, schedule) -> optax.GradientTransformation:
  """``config.optimizer``: SGD + momentum (``'sgd'``) or AdamW (``'adamw'``),
  weight decay on conv/dense kernels only."""
  if config.optimizer == "sgd":
    return sgd(schedule, config.weight_decay, config.momentum, config.nesterov)
  if config.optimizer == "adamw":
    return adamw(schedule, config.weight_decay)
  raise ValueError(f"unknown optimizer {config.optimizer!r}; expected sgd or adamw")
