"""Named training recipes: a normalizer, its options and training-loop overrides.

A recipe is what a user would choose to train with: ``python -m experiments.sweep
recipes --recipes bn,cbn_published,... --batch_sizes 2,32`` runs each at each
normalization batch. Step-count options may be relative to the run (``'67%'``
of the training steps, ``'2ep'``, ``'first_decay'``; see
:func:`experiments.loop.config.resolve_steps`), so one recipe fits every preset.

Published recipes, as their papers give them (scaled to the run's length):

* ``cbn_published``: Yao et al.'s detection config: window 4 (buffer 3), CBN
  switched on after a burn-in of 8 of 12 epochs, i.e. at the first learning-
  rate decay; on a cosine schedule, after the same share (67%) of training.
  The published gradient (only the current batch's moments carry gradient).
  ``cbn_published_group`` is the same with one history per normalization
  group (``group_history``): each group of the simulated small batch pools
  its own past steps, as each device does in the authors' code, instead of
  the step's earlier groups (spec section 2's simulated setting).
* ``brn_published``: Ioffe (2017): plain BN (``r_max = 1``, ``d_max = 0``)
  for the first 5k steps, then the limits relaxed until ``r_max = 3`` (at
  40k steps) and ``d_max = 5`` (at 25k) of about 130k: plain BN for the
  first 4% of training and one linear ramp of both limits to 30% of it.
  ``brn_published_fast`` adds faster running averages (momentum 0.9, Flax
  convention: 0.1 on the new value) for this short schedule, where the
  weights move much more per step than in a 130k-step run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

from experiments.loop.config import Config


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A normalizer (registry name and options) and overrides of the run's config."""

  norm: str
  norm_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""


# The published CBN's options, spelled out (the library's defaults differ).
PUBLISHED = {"backward": "published", "running_stats": "batch"}

RECIPES: Dict[str, Recipe] = {
  "bn": Recipe("bn", description="BN"),
  "gn": Recipe("gn", description="GroupNorm (batch-independent)"),
  "ws_gn": Recipe(
    "ws_gn", description="weight-standardized convolutions + GroupNorm (batch-independent)"
  ),
  "frn": Recipe("frn", description="filter response normalization + TLU (batch-independent)"),
  "mabn": Recipe("mabn", description="MABN (library defaults)"),
  "mabn_sma32": Recipe(
    "mabn",
    {"buffer_size": 32},
    description="MABN with simple moving averages over 32 normalization groups (default 16)",
  ),
  "mabn_sma64": Recipe(
    "mabn",
    {"buffer_size": 64},
    description="MABN with simple moving averages over 64 normalization groups (default 16)",
  ),
  "mabn_sma64_renorm_early": Recipe(
    "mabn",
    {"buffer_size": 64, "renorm_start": "20%"},
    description="MABN with SMAs over 64 groups, renormalizing from 20% of training",
  ),
  "mabn_sma4_renorm_early": Recipe(
    "mabn",
    {"buffer_size": 4, "renorm_start": "20%"},
    description="MABN with SMAs over 4 groups, renormalizing from 20% of training "
    "(at b = 32, one group a step: the 4 steps that "
    "mabn_sma64_renorm_early spans at b = 2)",
  ),
  "mabn_renorm_early": Recipe(
    "mabn",
    {"renorm_start": "20%"},
    description="MABN renormalizing toward the EMA from 20% of training (default: step 1,000)",
  ),
  "mabn_no_renorm": Recipe(
    "mabn",
    {"renorm_start": "100%"},
    description="MABN without renormalization (r = 1 throughout; "
    "the EMA is used at inference only)",
  ),
  "mabn_uncentred": Recipe(
    "mabn",
    {"centered": False},
    description="MABN after plain convolutions (no weight centralization: "
    "its inputs' channel means are not driven to zero)",
  ),
  "brn": Recipe(
    "brn",
    description="Batch Renorm, library defaults (BN for 100 steps, ramp over 1,000, momentum 0.99)",
  ),
  "brn_published": Recipe(
    "brn",
    {"warmup_steps": "4%", "ramp_steps": "26%"},
    description="Batch Renorm, Ioffe's schedule (BN for 4% of training, limits ramped "
    "to (3, 5) by 30%), momentum 0.99",
  ),
  "brn_published_fast": Recipe(
    "brn",
    {"warmup_steps": "4%", "ramp_steps": "26%", "momentum": 0.9},
    description="Batch Renorm, Ioffe's schedule, running averages at momentum 0.9",
  ),
  "cbn": Recipe("cbn", PUBLISHED, description="CBN as published, window 4, burn-in 100 steps"),
  "cbn_nowarmup": Recipe(
    "cbn",
    PUBLISHED,
    overrides={"warmup_epochs": 0.0},
    description="CBN as published, burn-in 100, no learning-rate warm-up",
  ),
  "cbn_late": Recipe(
    "cbn",
    {**PUBLISHED, "burn_in": "5%"},
    description="CBN switched on after the warm-up (burn-in 5% of training)",
  ),
  "cbn_published": Recipe(
    "cbn",
    {**PUBLISHED, "burn_in": "67%"},
    description="CBN, the authors' recipe: window 4, burn-in until 67% of training "
    "(their first lr decay at epoch 8 of 12), published gradient",
  ),
  "cbn_published_group": Recipe(
    "cbn",
    {**PUBLISHED, "burn_in": "67%", "group_history": True},
    description="CBN, the authors' recipe, with one history per normalization group "
    "(one small batch per device, as in their code)",
  ),
  "cbn_naive": Recipe(
    "cbn_naive", PUBLISHED, description="naive CBN (no compensation), burn-in 100"
  ),
  "cbn_exact": Recipe(
    "cbn",
    {"backward": "exact", "running_stats": "batch"},
    description="CBN with the exact gradient of its forward (ours)",
  ),
  "cbn_batch": Recipe(
    "cbn",
    {"backward": "batch", "running_stats": "batch"},
    description="CBN with BN's backward on the pooled moments (ours)",
  ),
  "cbn_exact_pooled": Recipe(
    "cbn",
    {"backward": "exact", "running_stats": "pooled"},
    description="CBN, exact gradient, inference statistics averaged from the pooled ones (ours)",
  ),
  "cbn_exact_pooled_fast": Recipe(
    "cbn",
    {
      "backward": "exact",
      "running_stats": "pooled",
      "derivative_stride": 2,
      "derivative_dtype": "bfloat16",
    },
    description="cbn_exact_pooled with the cheaper derivatives: every 2nd position, "
    "bfloat16 buffers",
  ),
  "cbn_exact_pooled_w8": Recipe(
    "cbn",
    {"backward": "exact", "running_stats": "pooled", "window": 8},
    description="CBN, exact gradient, pooled inference statistics, window 8 (ours)",
  ),
  "cbn_batch_pooled": Recipe(
    "cbn",
    {"backward": "batch", "running_stats": "pooled"},
    description="CBN, BN's backward, pooled inference statistics (ours)",
  ),
  "cbn_averaged_pooled": Recipe(
    "cbn",
    {"backward": "averaged", "running_stats": "pooled"},
    description="CBN, BN's backward with the backward "
    "statistics averaged over the window "
    "(MABN-style), pooled inference statistics "
    "(ours)",
  ),
  "cbn_group": Recipe(
    "cbn",
    {**PUBLISHED, "group_history": True},
    description="CBN with a history per normalization group "
    "(one small batch per device), published gradient",
  ),
  "cbn_group_exact": Recipe(
    "cbn",
    {"group_history": True, "backward": "exact", "running_stats": "pooled"},
    description="CBN, history per group, exact gradient, pooled inference statistics (ours)",
  ),
  "cbn_exact_late": Recipe(
    "cbn",
    {"backward": "exact", "running_stats": "batch", "burn_in": "5%"},
    description="CBN, exact gradient, burn-in 5% (ours)",
  ),
  "cbn_batch_late": Recipe(
    "cbn",
    {"backward": "batch", "running_stats": "batch", "burn_in": "5%"},
    description="CBN, BN's backward, burn-in 5% (ours)",
  ),
}


def recipe_names():
  return tuple(RECIPES)


def get(name: str) -> Recipe:
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
  return RECIPES[name]


def config(name: str, base: Config, norm_batch_size, seed: int) -> Config:
  """The run of recipe ``name`` on ``base`` at normalization batch ``norm_batch_size``."""
  r = get(name)
  return dataclasses.replace(
    base,
    norm=r.norm,
    norm_kwargs=dict(r.norm_kwargs),
    norm_batch_size=norm_batch_size,
    seed=seed,
    **dict(r.overrides),
  )


def run_name(name: str, cfg: Config) -> str:
  return f"{name}_b{cfg.norm_batch_size or cfg.device_batch()}_s{cfg.seed}"
