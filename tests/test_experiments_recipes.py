"""The named recipes: each resolves to a valid normalizer on every preset."""

from __future__ import annotations

import pytest

import mabn_jax as mj
from experiments import recipes as R
from experiments import train as T


@pytest.mark.parametrize("name", R.recipe_names())
def test_every_recipe_makes_a_valid_normalizer_on_the_cpu_preset(name):
  cfg = R.config(name, T.preset("cifar_cpu"), 2, seed=1)
  assert cfg.seed == 1 and cfg.norm == R.get(name).norm
  kwargs = cfg.normalizer_kwargs(total_steps=2496, steps_per_epoch=312)
  norm = mj.make_normalizer(cfg.norm, **kwargs)
  assert all(isinstance(v, int) for k, v in norm.options.items() if k in T.STEP_OPTIONS)
  assert R.run_name(name, cfg) == f"{name}_b2_s1"


def test_published_recipes_scale_with_the_run():
  cbn = R.config("cbn_published", T.preset("cifar_cpu"), 32, 0)
  assert cbn.normalizer_kwargs(2496, 312)["burn_in"] == 1672  # 67% of 2496
  group = R.config("cbn_published_group", T.preset("cifar_cpu"), 2, 0).normalizer_kwargs(2496, 312)
  assert group == {**cbn.normalizer_kwargs(2496, 312), "group_history": True, "norm_batch_size": 2}
  brn = R.config("brn_published", T.preset("cifar_cpu"), 32, 0).normalizer_kwargs(2496, 312)
  assert (brn["warmup_steps"], brn["ramp_steps"]) == (100, 649)
  fast = R.config("brn_published_fast", T.preset("cifar_cpu"), 32, 0)
  assert fast.normalizer_kwargs(2496, 312)["momentum"] == 0.9
  assert R.config("cbn_nowarmup", T.preset("cifar_cpu"), 32, 0).warmup_epochs == 0.0


def test_unknown_recipe_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown recipe 'cbm'.*cbn_published"):
    R.get("cbm")


def test_mabn_candidate_recipes_resolve_to_exactly_their_options():
  from mabn_jax.functional import mabn as F

  def kwargs(name, b=2):
    return R.config(name, T.preset("cifar_cpu"), b, 0).normalizer_kwargs(2496, 312)

  base = kwargs("mabn")
  assert base == {"norm_batch_size": 2}
  assert kwargs("mabn_sma32") == {**base, "buffer_size": 32}
  assert kwargs("mabn_sma64") == {**base, "buffer_size": 64}
  # renorm_start '20%' of 2496 steps, rounded: 499.
  assert kwargs("mabn_renorm_early") == {**base, "renorm_start": 499}
  assert kwargs("mabn_sma64_renorm_early") == {**base, "buffer_size": 64, "renorm_start": 499}
  assert kwargs("mabn_sma4_renorm_early", b=32) == {
    "norm_batch_size": 32,
    "buffer_size": 4,
    "renorm_start": 499,
  }
  never = kwargs("mabn_no_renorm")
  assert never == {**base, "renorm_start": 2496}
  # r stays 1 through the run's last step (the layer counts steps 1 to 2496).
  assert not bool(F.renormalizes(2496, never["renorm_start"], 100))
  assert bool(F.renormalizes(500, 499, 100))
