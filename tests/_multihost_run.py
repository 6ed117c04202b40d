"""One process of a multi-process data-parallel MABN run (tests/test_multihost.py).

    python tests/_multihost_run.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Every process has :data:`LOCAL_DEVICES` CPU devices and joins the others at
``127.0.0.1:PORT`` (``jax.distributed``, gloo CPU collectives). It feeds its
rows of each global batch (:func:`batches`) and trains :data:`STEPS` steps
two ways over the global mesh axis ``'batch'``:

* ``shard_map``: replicated state, MABN with ``axis_name='batch'``
  (statistics synchronized across every device of every process);
* ``jit``: one program over the batch sharded along ``'batch'`` (global
  statistics, no ``axis_name``).

It writes this process's copy of both final variable trees to ``OUT.npz``.
Imported, the module gives the model, data and step for the single-process
reference.
"""

from __future__ import annotations

import os
import sys

LOCAL_DEVICES = 2
STEPS = 4
PER_DEVICE = 2
MABN = dict(buffer_size=2, warmup_steps=1, renorm_start=2)
SHAPE = (6, 6, 3)


def model(axis_name=None):
  import flax.linen as nn
  import jax.numpy as jnp

  import mabn_jax as mj

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      norm = mj.make_normalizer("mabn", axis_name=axis_name, **MABN)
      x = norm.conv_norm(4, 3, name="block")(x, train=train)
      return nn.Dense(2, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))

  return Net()


def batches(global_batch):
  """``STEPS`` global batches ``(x, y)``; device ``d``'s rows are scaled by ``1 + d``."""
  import numpy as np

  rng = np.random.default_rng(0)
  xs = rng.normal(size=(STEPS, global_batch) + SHAPE).astype(np.float32)
  scale = 1.0 + np.repeat(np.arange(global_batch // PER_DEVICE), PER_DEVICE)
  xs *= scale.reshape(1, -1, 1, 1, 1).astype(np.float32)
  return xs, rng.normal(size=(STEPS, global_batch, 2)).astype(np.float32)


def init(net):
  import jax
  import jax.numpy as jnp

  return net.init(jax.random.key(0), jnp.zeros((PER_DEVICE,) + SHAPE), train=True)


def step_fn(net, axis=None):
  """SGD on the mean loss (``pmean`` over ``axis`` under shard_map)."""
  import jax
  import jax.numpy as jnp

  import mabn_jax as mj

  def loss_fn(variables, x, y):
    out, mutated = net.apply(variables, x, train=True, mutable=["batch_stats"])
    loss = jnp.mean(jnp.square(out - y))
    return (jax.lax.pmean(loss, axis) if axis else loss), mutated

  def step(variables, x, y):
    (_, variables), grads = mj.value_and_grad(loss_fn)(variables, x, y)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {**variables, "params": params}

  return step


def flat(tree):
  import jax
  import numpy as np

  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def main(process_id: int, num_processes: int, port: int, out: str):
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.process_count() == num_processes
  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  rows, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  local = PER_DEVICE * LOCAL_DEVICES
  xs, ys = batches(local * num_processes)
  mine = slice(process_id * local, (process_id + 1) * local)
  put_rows = lambda a: jax.make_array_from_process_local_data(rows, a[mine])
  put_all = lambda t: jax.tree_util.tree_map(
    lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)), t
  )

  results = {}
  synced = model("batch")
  step = jax.jit(
    jax.shard_map(
      step_fn(synced, "batch"), mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P()
    )
  )
  variables = put_all(init(synced))
  for x, y in zip(xs, ys, strict=True):
    variables = step(variables, put_rows(x), put_rows(y))
  results["shard_map"] = variables

  plain = model()
  step = jax.jit(step_fn(plain), out_shardings=replicated)
  variables = put_all(init(plain))
  for x, y in zip(xs, ys, strict=True):
    variables = step(variables, put_rows(x), put_rows(y))
  results["jit"] = variables

  local_copy = lambda a: np.asarray(a.addressable_data(0))
  np.savez(
    out,
    **{
      f"{mode}{k}": v
      for mode, tree in results.items()
      for k, v in flat(jax.tree_util.tree_map(local_copy, tree)).items()
    },
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
