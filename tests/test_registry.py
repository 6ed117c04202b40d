"""Tests of the normalizer registry (mabn_jax.registry)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from mabn_jax.functional.centering import center_kernel

NAMES = (
  "bn",
  "syncbn",
  "brn",
  "gn",
  "ln",
  "in",
  "cbn",
  "cbn_naive",
  "mabn",
  "frozen_bn",
  "ws_gn",
  "frn",
  "none",
)
# Small settings so every entry runs on a 4-channel map.
KWARGS = {
  "gn": dict(num_groups=2),
  "ws_gn": dict(num_groups=2),
  "brn": dict(warmup_steps=0, ramp_steps=1),
  "cbn": dict(window=2, burn_in=1),
  "cbn_naive": dict(window=2, burn_in=1),
  "mabn": dict(buffer_size=1, warmup_steps=0),
}  # Step 2 leaves warmup.
STATEFUL = ("bn", "syncbn", "brn", "cbn", "cbn_naive", "mabn")
# BatchNorm keeps flax.linen.BatchNorm's variables: no nonfinite_count by default.
COUNTED = ("brn", "cbn", "cbn_naive", "mabn")


def _x(shape=(4, 5, 5, 3), seed=0):
  return 1.0 + jax.random.normal(jax.random.key(seed), shape)


class Net(nn.Module):
  """A model written once: two conv+norm blocks, a dense+norm head."""

  norm: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(self.norm.conv_norm(4, (3, 3), name="conv1")(x, train=train))
    x = self.norm.conv_norm(4, 3, strides=2, name="conv2")(x, train=train)
    x = x.mean(axis=(1, 2))
    if self.norm.name not in ("cbn", "cbn_naive", "frn"):  # frn: no spatial axis left
      x = self.norm.norm(name="norm_final")(x, train=train)
    return x


def _run(name, x, **extra):
  """(variables after two training steps, train output, eval output)."""
  norm = mj.make_normalizer(name, **{**KWARGS.get(name, {}), **extra})
  model = Net(norm)
  variables = model.init(jax.random.key(1), x, train=True)
  mutable = ["batch_stats", mj.BACKWARD_STATS]
  weights = jax.random.normal(jax.random.key(2), (x.shape[0], 4))

  def loss(v, x):
    y, updates = model.apply(v, x, train=True, mutable=mutable)
    return jnp.sum(jnp.sin(3.0 * y) * weights), (updates, y)

  step = jax.jit(mj.value_and_grad(loss, has_aux=True))
  for _ in range(2):
    ((_, y_train), variables), grads = step(variables, x)
    chex.assert_trees_all_equal_structs(grads, variables["params"])
    assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads))
  y_eval = model.apply(variables, x, train=False)
  return variables, y_train, y_eval


@pytest.mark.parametrize("name", [n for n in NAMES if n != "syncbn"])
def test_every_name_builds_trains_and_evaluates_with_the_agreed_layout(name):
  x = _x()
  variables, y_train, y_eval = _run(name, x)
  assert y_train.shape == y_eval.shape == (4, 4)
  assert np.all(np.isfinite(y_train)) and np.all(np.isfinite(y_eval))
  conv1 = variables["params"]["conv1"]
  assert conv1["conv"]["kernel"].shape == (3, 3, 3, 4)
  assert variables["params"]["conv2"]["conv"]["kernel"].shape == (3, 3, 4, 4)
  if name == "none":
    assert set(conv1) == {"conv"} and conv1["conv"]["bias"].shape == (4,)
    assert "batch_stats" not in variables
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-6)  # No normalization state.
    return
  assert "bias" not in conv1["conv"]
  assert conv1["norm"]["scale"].shape == (4,) and conv1["norm"]["bias"].shape == (4,)
  if name in STATEFUL:
    stats = variables["batch_stats"]["conv1"]["norm"]
    assert ("nonfinite_count" in stats) == (name in COUNTED)
    # Training moved the running statistics away from their initial values.
    moved = [
      k
      for k in stats
      if k in ("mean", "var", "chi_ema")
      and not np.allclose(stats[k], 0.0)
      and not np.allclose(stats[k], 1.0)
    ]
    assert moved, stats.keys()
    # Eval uses running statistics: it differs from the training output.
    assert not np.allclose(y_train, y_eval, atol=1e-3)
  elif name == "frozen_bn":  # fixed statistics: training normalizes as eval does
    stats = variables["batch_stats"]["conv1"]["norm"]
    np.testing.assert_array_equal(stats["mean"], 0.0)
    np.testing.assert_array_equal(stats["var"], 1.0)
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)
  else:
    assert "batch_stats" not in variables or "conv1" not in variables["batch_stats"]
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)


def test_bn_entry_equals_flax_conv_and_mj_batchnorm():
  x = _x(seed=2)
  block = mj.make_normalizer("bn", momentum=0.9).conv_norm(4, (3, 3), name="c")
  variables = block.init(jax.random.key(0), x, train=True)
  y, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
  params = variables["params"]
  z = nn.Conv(4, (3, 3), use_bias=False).apply({"params": params["conv"]}, x)
  y_ref, stats_ref = mj.BatchNorm(momentum=0.9).apply(
    {"params": params["norm"], "batch_stats": variables["batch_stats"]["norm"]},
    z,
    use_running_average=False,
    mutable=["batch_stats"],
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(updates["batch_stats"]["norm"], stats_ref["batch_stats"])


def test_mabn_conv_is_centered_and_stores_raw_kernel():
  x = _x(seed=3)
  block = mj.make_normalizer("mabn", warmup_steps=0).conv_norm(4, (3, 3))
  variables = block.init(jax.random.key(0), x, train=True)
  kernel = variables["params"]["conv"]["kernel"]
  assert not np.allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)  # raw weight
  z = nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": center_kernel(kernel)}}, x)
  y = block.apply(variables, x, train=False)
  y_ref = mj.MABN().apply(
    {"params": variables["params"]["norm"], "batch_stats": variables["batch_stats"]["norm"]},
    z,
    use_running_average=True,
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  assert mj.make_normalizer("bn", centered=True).centered
  assert not mj.make_normalizer("bn").centered


def test_syncbn_under_pmap_equals_bn_on_the_concatenated_batch():
  devices = 4
  x = _x((8, 4, 4, 3), seed=4)
  sync = mj.make_normalizer("syncbn").conv_norm(4, (3, 3), name="c")
  plain = mj.make_normalizer("bn").conv_norm(4, (3, 3), name="c")
  variables = plain.init(jax.random.key(0), x, train=True)
  y_p, s_p = jax.pmap(
    lambda x: sync.apply(variables, x, train=True, mutable=["batch_stats"]),
    axis_name="batch",
    devices=jax.devices()[:devices],
  )(x.reshape((devices, 2) + x.shape[1:]))
  y_1, s_1 = plain.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y_p.reshape(y_1.shape), y_1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    s_p["batch_stats"]["norm"]["var"][0], s_1["batch_stats"]["norm"]["var"], rtol=1e-5
  )


def test_norm_puts_variables_directly_under_its_name_and_dense_norm_works():
  x = _x((4, 6), seed=5)
  norm = mj.make_normalizer("brn", r_max=2.0)
  v = norm.norm(name="n").init(jax.random.key(0), x, train=True)
  assert set(v["params"]) == {"scale", "bias"}
  assert set(v["batch_stats"]) >= {"mean", "var", "step"}
  identity = mj.make_normalizer("none").norm()
  np.testing.assert_array_equal(identity.apply({}, x, train=True), x)
  dense = mj.make_normalizer("mabn").dense_norm(5)
  dv = dense.init(jax.random.key(0), x, train=True)
  assert dv["params"]["dense"]["kernel"].shape == (6, 5)
  assert set(dv["params"]["norm"]) == {"scale", "bias"}


def test_cbn_has_no_stand_alone_norm():
  for name in ("cbn", "cbn_naive"):
    with pytest.raises(ValueError, match="conv_norm"):
      mj.make_normalizer(name).norm()
    with pytest.raises(ValueError, match="conv_norm"):
      mj.make_normalizer(name).dense_norm(4)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as info:
    mj.make_normalizer("batchnorm")
  for name in NAMES:
    assert repr(name) in str(info.value) or name in str(info.value)
  assert mj.normalizer_names() == NAMES


@pytest.mark.parametrize(
  "name, bad, expected",
  [
    ("bn", "buffer_size", "norm_batch_size"),
    ("brn", "renorm_start", "d_max"),
    ("mabn", "d_max", "buffer_size"),
    ("gn", "momentum", "num_groups"),
    ("none", "momentum", "centered"),
    ("cbn", "buffer_size", "window"),
  ],
)
def test_wrong_kwarg_lists_valid_ones(name, bad, expected):
  with pytest.raises(
    ValueError, match=rf"unknown keyword argument\(s\) {bad}; valid ones: .*{expected}"
  ):
    mj.make_normalizer(name, **{bad: 1})


def test_normalizer_is_hashable_sorted_and_updatable():
  a = mj.make_normalizer("mabn", norm_batch_size=2, buffer_size=4)
  b = mj.make_normalizer("mabn", buffer_size=4, norm_batch_size=2)
  assert a == b and hash(a) == hash(b)
  assert a.kwargs == (("buffer_size", 4), ("norm_batch_size", 2))
  c = a.with_updates(norm_batch_size=4)
  assert c.options == {"buffer_size": 4, "norm_batch_size": 4} and a.options["norm_batch_size"] == 2
  assert mj.make_normalizer("syncbn").options == {"axis_name": "batch"}
  groups = mj.make_normalizer("syncbn", axis_index_groups=[[0, 1]]).options["axis_index_groups"]
  assert groups == ((0, 1),)
  with pytest.raises(ValueError, match="valid ones"):
    a.with_updates(nope=1)
  jax.jit(lambda x, n: x, static_argnums=1)(1.0, a)  # usable as a static argument


@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "cbn"])
def test_state_layout_is_the_same_whichever_mode_initialized_it(name):
  norm = mj.make_normalizer(name)
  block = norm.conv_norm(features=4, kernel_size=(3, 3), name="block")
  x = jnp.ones((2, 5, 5, 3))
  shapes = [
    jax.tree_util.tree_map(jnp.shape, block.init(jax.random.key(0), x, train=train))
    for train in (True, False)
  ]
  assert shapes[0] == shapes[1]
  assert ("nonfinite_count" in shapes[0]["batch_stats"]["norm"]) == (name in COUNTED)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "cbn", "frozen_bn"])
def test_initialization_at_batch_one_with_normalization_groups_of_two(name):
  normalizer = mj.make_normalizer(name, norm_batch_size=2, **KWARGS.get(name, {}))
  block = normalizer.conv_norm(4, (3, 3), name="c")
  variables = block.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)), train=True)
  x = jax.random.normal(jax.random.key(1), (4, 5, 5, 3))
  y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
  assert y.shape == (4, 5, 5, 4) and bool(jnp.all(jnp.isfinite(y)))
  with pytest.raises(ValueError, match="smaller than one normalization group"):
    block.apply(variables, x[:1], train=True, mutable=["batch_stats"])
