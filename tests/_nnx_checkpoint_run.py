"""A small NNX training run used by tests/test_nnx_checkpoint.py, in-process and as a script.

``python tests/_nnx_checkpoint_run.py CHECKPOINT_DIR FIRST_STEP STEPS OUT.npz``
restores the model and optimizer state saved with orbax after step
``FIRST_STEP`` into a freshly built model, runs ``STEPS`` more steps and
writes every step's outputs, gradients and state (flattened,
``'<step>/<kind>/<path>'``) to ``OUT.npz``.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mabn_jax as mj

SHAPE = (4, 6, 6, 3)
C = 4


class Net(nnx.Module):
  """CBN, MABN, Batch Renorm and BN blocks with short schedules, so that every
  phase runs before and after the checkpoint: MABN's buffers wrap around,
  BRN ramps, CBN fills its window."""

  def __init__(self, rngs: nnx.Rngs):
    self.cbn = mj.nnx.CrossIterationConvNorm(3, C, (3, 3), burn_in=2, window=3, rngs=rngs)
    self.conv1 = mj.nnx.CenteredConv(C, C, (3, 3), use_bias=False, rngs=rngs)
    self.mabn = mj.nnx.MABN(
      C, buffer_size=3, warmup_steps=2, renorm_start=4, r_max=1.5, norm_batch_size=2, rngs=rngs
    )
    self.conv2 = nnx.Conv(C, C, (3, 3), use_bias=False, rngs=rngs)
    self.brn = mj.nnx.BatchRenorm(C, warmup_steps=1, ramp_steps=3, norm_batch_size=2, rngs=rngs)
    self.conv3 = nnx.Conv(C, C, (3, 3), use_bias=False, rngs=rngs)
    self.bn = mj.nnx.BatchNorm(C, norm_batch_size=2, rngs=rngs)
    self.head = nnx.Linear(C, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.cbn(x))
    x = nnx.relu(self.mabn(self.conv1(x)))
    x = nnx.relu(self.brn(self.conv2(x)))
    x = nnx.relu(self.bn(self.conv3(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


TX = optax.adam(1e-2)


def batch(t: int):
  rng = np.random.default_rng(100 + t)
  x = rng.normal(size=SHAPE).astype(np.float32) * (1.0 + 0.2 * t)
  y = rng.normal(size=(SHAPE[0], 2)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def init():
  model = Net(nnx.Rngs(0))
  return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


def _loss(model, x, y):
  out = model(x)
  return jnp.mean(jnp.square(out - y)), out


@nnx.jit
def train_step(model, optimizer, x, y):
  (_, out), grads = mj.nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
  optimizer.update(model, grads)
  return out, grads


def flat(state, prefix: str) -> dict:
  return {
    f"{prefix}/{'/'.join(map(str, path))}": np.asarray(v[...])
    for path, v in nnx.to_flat_state(state)
  }


def run(model, optimizer, first: int, steps: int) -> dict:
  """Steps ``first + 1 .. first + steps``; returns what each produced."""
  record = {}
  for t in range(first + 1, first + steps + 1):
    out, grads = train_step(model, optimizer, *batch(t))
    record[f"{t}/out"] = np.asarray(out)
    record.update(flat(grads, f"{t}/grads"))
    record.update(flat(nnx.state(model), f"{t}/model"))
    record.update(flat(nnx.state(optimizer), f"{t}/optimizer"))
  return record


def save(path: str, model, optimizer) -> None:
  import orbax.checkpoint as ocp

  state = {
    "model": nnx.to_pure_dict(nnx.state(model)),
    "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
  }
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()


def restore(path: str):
  """A freshly built model and optimizer holding the saved state."""
  import orbax.checkpoint as ocp

  model, optimizer = init()
  target = {
    "model": nnx.to_pure_dict(nnx.state(model)),
    "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
  }
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
  restored = ocp.StandardCheckpointer().restore(path, target)
  for tree, values in ((model, restored["model"]), (optimizer, restored["optimizer"])):
    state = nnx.state(tree)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(tree, state)
  return model, optimizer


def main(argv):
  path, first, steps, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
  model, optimizer = restore(path)
  np.savez(out, **run(model, optimizer, first, steps))


if __name__ == "__main__":
  main(sys.argv)
