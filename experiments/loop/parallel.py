"""Data parallelism of the loop: ``jit``, ``shard_map`` and ``pmap`` (:class:`Parallel`)."""

from __future__ import annotations

from typing import Dict

import jax
import numpy as np

from experiments.loop.config import AXIS, PARALLEL_MODES


def jit_steps(steps, mesh):
  """One ``jax.jit`` program over the global batch; outputs replicated."""
  train_step, eval_step = steps
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (
    jax.jit(train_step, donate_argnums=(0, 1), out_shardings=replicated),
    jax.jit(eval_step, out_shardings=replicated),
  )


def shard_map_steps(steps, mesh):
  """The per-device step under ``jax.shard_map``: state with a leading device
  axis sharded along ``'batch'`` (each device's own statistics), the batch
  split along ``'batch'``, metrics and counts reduced over it."""
  train_step, eval_step = steps
  spec, none = jax.sharding.PartitionSpec(AXIS), jax.sharding.PartitionSpec()
  own = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
  lead = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)

  def train_body(variables, opt_state, batch):
    variables, opt_state, metrics = train_step(own(variables), own(opt_state), batch)
    return lead(variables), lead(opt_state), metrics

  mapped_train = jax.shard_map(
    train_body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec, none)
  )
  mapped_eval = jax.shard_map(
    lambda v, b: eval_step(own(v), b), mesh=mesh, in_specs=(spec, spec), out_specs=none
  )
  return jax.jit(mapped_train, donate_argnums=(0, 1)), jax.jit(mapped_eval)


def pmap_steps(steps, mesh):
  """The per-device step under ``jax.pmap`` over the mesh's (local) devices."""
  del mesh
  train_step, eval_step = steps
  return (
    jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0, 1)),
    jax.pmap(eval_step, axis_name=AXIS),
  )


def _local_value(x) -> np.ndarray:
  """This process's numpy view of an array: the whole array, one replica of a
  replicated one, or its devices' shards of the leading axis, in order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _scalar(x) -> float:
  """A reduced metric (pmap: one copy per device, identical) as a float."""
  return float(np.asarray(x).reshape(-1)[0])


class Parallel:
  """Data parallelism of the loop: the mesh, the compiled steps, the layouts.

  ``mode`` (see :data:`PARALLEL_MODES`):

  * ``'jit'``: one ``jax.jit`` program; the batch is sharded along the mesh
    axis ``'batch'`` (``NamedSharding(mesh, P('batch'))``), variables and
    optimizer state are replicated. Normalizers see the global batch, so
    batch statistics are global (groups of ``norm_batch_size`` consecutive
    samples of the global batch) and there is one copy of them.
  * ``'shard_map'``: the per-device step under ``jax.shard_map``; variables and
    optimizer state carry a leading device axis sharded along ``'batch'``, so
    every device keeps the statistics of its own shard (averaged over
    ``'batch'`` by layers with ``axis_name``); gradients are ``pmean``-ed.
  * ``'pmap'``: the same per-device semantics with ``jax.pmap``.

  Host-side state (initial values, checkpoints) is this process's view: one
  copy (``'jit'``) or a leading axis over its ``n`` devices.
  """

  def __init__(self, mode: str, steps, n: int):
    if mode not in PARALLEL_MODES:
      raise ValueError(f"parallel {mode!r}: expected one of {PARALLEL_MODES}")
    self.mode, self.n = mode, n
    self.per_device = mode != "jit"
    local = jax.local_devices()[:n]
    if mode == "pmap" or jax.process_count() == 1:
      devices = local
    else:  # every process's first n devices, process by process
      devices = [
        d
        for p in range(jax.process_count())
        for d in [d for d in jax.devices() if d.process_index == p][:n]
      ]
    self.mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    spec = jax.sharding.PartitionSpec
    self.sharded = jax.sharding.NamedSharding(self.mesh, spec(AXIS))
    self.replicated = jax.sharding.NamedSharding(self.mesh, spec())
    make = {"jit": jit_steps, "shard_map": shard_map_steps, "pmap": pmap_steps}[mode]
    self.train_step, self.eval_step = make(steps, self.mesh)

  def replicate(self, host_tree):
    """One copy (e.g. initial variables) -> the host layout of the mode."""
    if not self.per_device:
      return host_tree
    return jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * self.n), host_tree)

  def put(self, host_tree):
    """Host layout -> device arrays (the global arrays of all processes)."""
    sharding = self.sharded if self.per_device else self.replicated
    return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_tree
    )

  def batch(self, batch: Dict[str, np.ndarray]):
    """This process's batch ``(n * B, ...)`` -> the step's input."""
    if self.mode == "pmap":
      return shard(batch, self.n)
    return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

  def to_host(self, tree):
    """Device arrays -> this process's host layout (numpy)."""
    return jax.tree_util.tree_map(_local_value, tree)

  def first(self, tree):
    """One device's copy (device 0 of this process), as numpy."""
    host = self.to_host(tree)
    return jax.tree_util.tree_map(lambda x: x[0], host) if self.per_device else host

  def reduced(self, tree):
    """A step's reduced outputs (metrics, counts; pmap: one identical copy per
    device) as one numpy copy."""
    host = self.to_host(tree)
    return jax.tree_util.tree_map(lambda x: x[0], host) if self.mode == "pmap" else host

  def device_view(self, tree):
    """Every local device's copy, along a leading axis (``'jit'``: the one
    global copy that every device holds)."""
    host = self.to_host(tree)
    if self.per_device:
      return host
    return jax.tree_util.tree_map(lambda x: np.stack([x] * self.n), host)

  def normalization_batch(self, device_batch: int) -> int:
    """Samples a layer normalizes together without ``norm_batch_size``."""
    return device_batch * self.n * jax.process_count() if self.mode == "jit" else device_batch


def put_per_device(tree, devices):
  """Host arrays ``(n, ...)`` -> arrays sharded along axis 0 over ``devices``."""
  # The sharding pmap gives its outputs (mesh axis named like the pmap axis),
  # so the step does not recompile after its first call.
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def shard(batch: Dict[str, np.ndarray], n: int):
  """A batch ``(n * B, ...)`` -> ``(n, B, ...)`` (pmap's layout)."""
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}
