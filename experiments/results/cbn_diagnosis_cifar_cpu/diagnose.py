"""CBN at normalization batch 2 on the CPU preset: which part fails?

Short runs (6,400 training images, 2 epochs = 400 steps of SGD batch 32, no
burn-in) of the ``cifar_cpu`` preset. Run from the repository root:

  python experiments/results/cbn_diagnosis_cifar_cpu/diagnose.py bn_b2,cbn_b2,...

Variants (normalizer, its keyword arguments, normalization batch):
  bn_b2            BN
  cbn_w1_b2        CBN with window 1 (must behave as BN)
  cbn_b2           CBN, window 4
  cbn_naive_b2     naive CBN, window 4
  cbn_b32          CBN, window 4, normalization batch = SGD batch
  cbn_b2_fullgrad  diagnostic only, not a method of the library: CBN whose
                   window entries from the *same step* (the earlier groups of
                   the batch, which share the current kernel) carry gradient;
                   entries of earlier steps stay constants.
"""

import json
import os
import sys

sys.path.insert(0, os.getcwd())

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from experiments import train as T  # noqa: E402
from mabn_jax.functional import cross_iteration as F  # noqa: E402

VARIANTS = {
  "bn_b2": ("bn", {}, 2),
  "cbn_w1_b2": ("cbn", {"window": 1, "burn_in": 0}, 2),
  "cbn_b2": ("cbn", {"burn_in": 0}, 2),
  "cbn_naive_b2": ("cbn_naive", {"burn_in": 0}, 2),
  "cbn_b32": ("cbn", {"burn_in": 0}, 32),
  "cbn_b2_fullgrad": ("cbn", {"burn_in": 0}, 2),
}


def pooled_moments_with_same_step_gradient(mu, nu, past_mu, past_nu, past_filled):
  """F.pooled_moments, but this step's groups enter the windows with gradient."""
  groups, past = mu.shape[0], past_mu.shape[0]
  seq_mu = jnp.concatenate([lax.stop_gradient(past_mu), mu], axis=0)
  seq_nu = jnp.concatenate([lax.stop_gradient(past_nu), nu], axis=0)
  filled = jnp.concatenate([past_filled, jnp.ones((groups,), bool)])
  index = jnp.arange(groups)[:, None] + jnp.arange(past)[None, :]
  win_mu, win_nu = seq_mu[index], seq_nu[index]
  keep = filled[index][..., None] & (
    lax.stop_gradient(win_nu) >= jnp.square(lax.stop_gradient(win_mu))
  )
  keep = keep.astype(mu.dtype)
  count = 1.0 + jnp.sum(keep, axis=1)
  return (
    (mu + jnp.sum(keep * win_mu, axis=1)) / count,
    (nu + jnp.sum(keep * win_nu, axis=1)) / count,
  )


def main(names):
  here = os.path.dirname(os.path.abspath(__file__))
  original = F.pooled_moments
  for name in names:
    norm, kwargs, b = VARIANTS[name]
    F.pooled_moments = (
      pooled_moments_with_same_step_gradient if name.endswith("_fullgrad") else original
    )
    cfg = T.preset(
      "cifar_cpu",
      norm=norm,
      norm_kwargs=kwargs,
      norm_batch_size=b,
      epochs=2,
      train_subset=6400,
      workdir=f"/tmp/cbn_diagnosis/{name}",
      progress=False,
      eval_every=1,
      log_every=25,
      resume=False,
    )
    s = T.train(cfg)
    row = {
      "variant": name,
      "norm": norm,
      "norm_kwargs": kwargs,
      "norm_batch_size": b,
      "test_top1_curve": s["test_top1_curve"],
      "train_loss_curve": s["train_loss_curve"],
      "wall_time_s": s["wall_time_s"],
    }
    print(json.dumps({k: row[k] for k in ("variant", "test_top1_curve")}), flush=True)
    with open(os.path.join(here, f"{name}.json"), "w") as f:
      json.dump(row, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1].split(",") if len(sys.argv) > 1 else list(VARIANTS))
