"""A small training run used by tests/test_checkpoint.py, in-process and as a script.

``python tests/_checkpoint_run.py CHECKPOINT_DIR FIRST_STEP STEPS OUT.npz``
restores ``{'variables', 'opt_state'}`` saved with orbax after step
``FIRST_STEP``, runs ``STEPS`` more steps and writes every step's outputs,
gradients and variables (flattened, ``'<step>/<kind>/<path>'``) to ``OUT.npz``.
"""

from __future__ import annotations

import sys
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mabn_jax as mj

SHAPE = (4, 6, 6, 3)
C = 4
# Short schedules so that every phase runs before and after the checkpoint:
# MABN's ring buffers wrap around, BRN ramps, CBN fills its window.
NORMALIZERS = (
  mj.make_normalizer(
    "mabn", buffer_size=3, warmup_steps=2, renorm_start=4, r_max=1.5, norm_batch_size=2
  ),
  mj.make_normalizer("brn", warmup_steps=1, ramp_steps=3, norm_batch_size=2),
  mj.make_normalizer("cbn", burn_in=2, window=3),
  mj.make_normalizer("bn", norm_batch_size=2),
  mj.make_normalizer("cbn_naive", burn_in=1, window=2),
)


class Net(nn.Module):
  normalizers: Tuple[mj.Normalizer, ...] = NORMALIZERS

  @nn.compact
  def __call__(self, x, train: bool):
    for i, normalizer in enumerate(self.normalizers):
      x = nn.relu(normalizer.conv_norm(C, 3, name=f"block{i}")(x, train=train))
    return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


MODEL = Net()
TX = optax.adam(1e-2)


def batch(t: int):
  rng = np.random.default_rng(100 + t)
  x = rng.normal(size=SHAPE).astype(np.float32) * (1.0 + 0.2 * t)
  y = rng.normal(size=(SHAPE[0], 2)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def init():
  variables = MODEL.init(jax.random.key(0), jnp.zeros(SHAPE), train=True)
  return {"variables": variables, "opt_state": TX.init(variables["params"])}


def _loss(variables, x, y):
  out, mutated = MODEL.apply(variables, x, train=True, mutable=["batch_stats"])
  return jnp.mean(jnp.square(out - y)), (mutated, out)


@jax.jit
def train_step(state, x, y):
  ((_, out), variables), grads = mj.value_and_grad(_loss, has_aux=True)(state["variables"], x, y)
  updates, opt_state = TX.update(grads, state["opt_state"], variables["params"])
  variables = {**variables, "params": optax.apply_updates(variables["params"], updates)}
  return {"variables": variables, "opt_state": opt_state}, out, grads


def flat(tree, prefix: str) -> dict:
  return {
    prefix + jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def run(state, first: int, steps: int) -> dict:
  """Steps ``first + 1 .. first + steps``; returns what each produced."""
  record = {}
  for t in range(first + 1, first + steps + 1):
    state, out, grads = train_step(state, *batch(t))
    record.update(flat(out, f"{t}/out"))
    record.update(flat(grads, f"{t}/grads"))
    record.update(flat(state, f"{t}/state"))
  return record


def save(path: str, state) -> None:
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()


def restore(path: str):
  import orbax.checkpoint as ocp

  target = jax.eval_shape(init)
  return ocp.StandardCheckpointer().restore(path, target)


def main(argv):
  path, first, steps, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
  state = restore(path)
  np.savez(out, **run(state, first, steps))


if __name__ == "__main__":
  main(sys.argv)
