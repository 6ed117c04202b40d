"""The numpy input pipeline: augmentation, normalization, the :class:`Loader`
(per-epoch permutation, per-host shards) and the prefetch thread."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np

from experiments.data.splits import Dataset


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int, flip: bool):
  """Zero-pads by ``pad``, takes a random crop of the original size, flips."""
  n, h, w, _ = images.shape
  if pad:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    images = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
  if flip:
    mask = rng.random(n) < 0.5
    images = np.where(mask[:, None, None, None], images[:, :, ::-1], images)
  return images


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 -> float32 ``(x/255 - mean) / std`` per channel."""
  return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


class Loader:
  """Deterministic batches of one split; ``epoch(e, start)`` iterates an epoch.

  Training batches: epoch permutation from ``(seed, epoch)``, this host's
  ``shard_index``-th of ``shard_count`` interleaved shards, full batches only,
  augmentation from ``(seed, epoch, step)``. Evaluation batches: in order, the
  last batch zero-padded, with a ``mask`` of real examples.

  Each item is ``{'image': float32 (batch, H, W, C), 'label': int32 (batch,),
  'mask': float32 (batch,)}``.
  """

  def __init__(
    self,
    dataset: Dataset,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
  ):
    self.dataset = dataset
    self.split = getattr(dataset, split)
    self.batch_size = batch_size
    self.train = train
    self.seed = seed
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.prefetch = prefetch
    n = len(self.split)
    self.shard_size = (n - shard_index + shard_count - 1) // shard_count
    if train:
      self.steps_per_epoch = (n // shard_count) // batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(
          f"training split of {n} examples ({shard_count} hosts) is smaller "
          f"than one batch of {batch_size}"
        )
    else:
      self.steps_per_epoch = -(-self.shard_size // batch_size)

  def _indices(self, epoch: int) -> np.ndarray:
    n = len(self.split)
    if self.train:
      order = np.random.default_rng([self.seed, epoch]).permutation(n)
      per_host = n // self.shard_count
      return order[self.shard_index :: self.shard_count][:per_host]
    return np.arange(self.shard_index, n, self.shard_count)

  def _batch(self, order: np.ndarray, epoch: int, step: int):
    ids = order[step * self.batch_size : (step + 1) * self.batch_size]
    images, labels = self.split.get(ids)
    real = len(ids)
    if self.train:
      rng = np.random.default_rng([self.seed, epoch, step, 1])
      images = random_crop_flip(images, rng, self.dataset.pad, self.dataset.flip)
    mask = np.ones(self.batch_size, np.float32)
    if real < self.batch_size:
      fill = self.batch_size - real
      images = np.concatenate([images, np.zeros((fill,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(fill, labels.dtype)])
      mask[real:] = 0
    return {
      "image": normalize(images, self.dataset.mean, self.dataset.std),
      "label": labels.astype(np.int32),
      "mask": mask,
    }

  def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
    """Batches ``start..steps_per_epoch-1`` of ``epoch``, prefetched."""
    order = self._indices(epoch)
    make = lambda step: self._batch(order, epoch, step)
    return prefetch(make, range(start, self.steps_per_epoch), self.prefetch)


_END = object()


def prefetch(make: Callable[[int], dict], steps, size: int = 2) -> Iterator[dict]:
  """``make(step)`` for each step, computed ``size`` ahead in a thread.

  numpy releases the GIL in copies and arithmetic, so the batch for the next
  step is built while the accelerator (or XLA's CPU threads) runs this one.
  """
  steps = list(steps)
  if size <= 0:
    for s in steps:
      yield make(s)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def work():
    try:
      for s in steps:
        if stop.is_set():
          return
        item = make(s)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
      q.put(_END)
    except BaseException as e:  # surfaced in the consumer
      q.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
