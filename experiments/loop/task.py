"""What the loop asks of a task (:class:`Task`) and the tasks by name (:func:`get_task`).

The loop (:func:`experiments.loop.loop.train`) is the same for every task:
schedule, optimizer, parallel mode, checkpoints, metrics and hooks. A task
brings what differs: its data and their loaders, the model, its objective
(the loss and the evaluation counts, from which :mod:`experiments.loop.steps`
makes the steps) and the metrics made of the counts.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Tuple

from experiments.loop.config import TASKS, Config


class Loader(Protocol):
  """Batches of one split: ``{'image': float32 (B, H, W, C), 'label': ..., ...}``."""

  steps_per_epoch: int

  def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Dict[str, Any]]:
    """Batches ``start..steps_per_epoch - 1`` of ``epoch`` (evaluation: ``epoch(0)``)."""
    ...


class Task(Protocol):
  """A learning problem the loop trains.

  ``metric`` names the evaluation metric the summary tracks (its final and
  best value per split, e.g. ``'top1'`` for ``final_test_top1``).
  """

  metric: str

  def load_data(self, config: Config) -> Any:
    """The run's dataset: ``.image_shape`` (one input, no batch axis) and
    ``.num_classes``, plus whatever its loaders read."""
    ...

  def train_loader(
    self, config: Config, dataset, batch_size: int, shard_index: int = 0, shard_count: int = 1
  ) -> Loader:
    """Shuffled, augmented training batches of ``batch_size`` (this host's share)."""
    ...

  def eval_loaders(
    self, config: Config, dataset, batch_size: int, shard_index: int = 0, shard_count: int = 1
  ) -> Dict[str, Loader]:
    """``{split: loader}`` of the evaluated splits (``'val'`` if held out, ``'test'``)."""
    ...

  def build(
    self,
    config: Config,
    dataset,
    total_steps: Optional[int] = None,
    steps_per_epoch: Optional[int] = None,
    normalizer=None,
  ):
    """The flax model (``apply(variables, images, train=...)``) with the
    run's normalizer, or ``normalizer`` when given (a converted one)."""
    ...

  def objective(self, config: Config, model, dataset) -> Tuple[Callable, Callable]:
    """``(loss_fn, eval_fn)``, the loss and the evaluation counts the loop's
    steps are made of (see :mod:`experiments.loop.steps`)."""
    ...

  def split_metrics(self, counts: Dict[str, Any]) -> Dict[str, Any]:
    """The metrics of one split from its summed counts (``{metric: value, ...}``)."""
    ...


_MODULES = {
  "classification": "experiments.tasks.classification",
  "segmentation": "experiments.tasks.segmentation.task",
}


def get_task(name: str) -> Task:
  """The task named ``name`` (one of :data:`~experiments.loop.config.TASKS`)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
  return importlib.import_module(_MODULES[name]).TASK
