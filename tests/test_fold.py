"""Folding: folded and unfolded eval outputs agree to 1e-5 relative (float32)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from mabn_jax.fold import fold

RTOL = 1e-5


def _perturb_tree(tree, key, positive=()):
  """Random non-trivial values (strictly positive for the names in ``positive``)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = []
  for i, (path, leaf) in enumerate(flat):
    name = path[-1].key
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      leaves.append(leaf)
      continue
    noise = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    leaves.append(jnp.exp(0.5 * noise) if name in positive else leaf + 0.5 * noise)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


def _trained(variables, key):
  """Variables as after training: random affine params and running statistics."""
  out = dict(variables)
  out["params"] = _perturb_tree(variables["params"], key)
  if "batch_stats" in variables:
    out["batch_stats"] = _perturb_tree(
      variables["batch_stats"], jax.random.fold_in(key, 1), positive=("var", "chi_ema")
    )
  return out


def _assert_relative(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.max(np.abs(a - b)) / np.max(np.abs(b))
  assert err <= rtol, f"relative error {err:.3g} > {rtol}"


class PlainNet(nn.Module):
  """conv -> norm -> relu, twice, then a dense head; ``folded`` is the twin."""

  kind: str  # 'flax_bn' or 'mabn'
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      if self.folded:
        x = nn.Conv(6, (3, 3), use_bias=True, name=f"conv{i}")(x)
      elif self.kind == "mabn":
        x = mj.CenteredConv(6, (3, 3), use_bias=False, name=f"conv{i}")(x)
        x = mj.MABN(use_running_average=True, name=f"norm{i}")(x)
      else:
        x = nn.Conv(6, (3, 3), use_bias=i == 1, name=f"conv{i}")(x)
        x = nn.BatchNorm(use_running_average=True, name=f"norm{i}")(x)
      x = nn.relu(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("kind", ["flax_bn", "mabn"])
def test_fold_plain_model_by_pairs_matches_unfolded(kind):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  model = PlainNet(kind)
  variables = _trained(model.init(jax.random.key(1), x), jax.random.key(2))
  folded = fold(variables, pairs=[("conv0", "norm0"), ("conv1", "norm1")], centered=kind == "mabn")
  twin = PlainNet(kind, folded=True)
  # The folded tree has exactly the twin's structure.
  expected = jax.tree.map(jnp.shape, twin.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, folded) == expected
  _assert_relative(twin.apply(folded, x), model.apply(variables, x))


def test_fold_plain_centered_subset_and_errors():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  model = PlainNet("mabn")
  variables = _trained(model.init(jax.random.key(1), x), jax.random.key(2))
  folded = fold(
    variables, pairs=[("conv0", "norm0"), ("conv1", "norm1")], centered=["conv0", "conv1"]
  )
  _assert_relative(PlainNet("mabn", folded=True).apply(folded, x), model.apply(variables, x))
  # Without centring the result is wrong: the centring really is folded in.
  wrong = fold(variables, pairs=[("conv0", "norm0"), ("conv1", "norm1")], centered=False)
  out_wrong = PlainNet("mabn", folded=True).apply(wrong, x)
  assert not np.allclose(out_wrong, model.apply(variables, x), rtol=1e-3)
  with pytest.raises(ValueError, match="no entry 'norm7'"):
    fold(variables, pairs=[("conv0", "norm7")])
  with pytest.raises(ValueError, match="exactly one"):
    fold(variables)


class TinyResNet(nn.Module):
  """Registry-built stem, one residual block, a downsampling conv and a head."""

  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = self.normalizer
    x = nn.relu(norm.conv_norm(6, 3, name="stem")(x, train=train))
    y = nn.relu(norm.conv_norm(6, 3, name="block_a")(x, train=train))
    y = norm.conv_norm(6, 3, name="block_b")(y, train=train)
    x = nn.relu(x + y)
    x = nn.relu(norm.conv_norm(8, 3, strides=2, name="down")(x, train=train))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


FOLDABLE = [
  ("bn", {}),
  ("bn", {"norm_batch_size": 2}),
  ("syncbn", {}),
  ("brn", {}),
  ("mabn", {"norm_batch_size": 2}),
  ("mabn", {"centered": False}),
  ("cbn", {}),
  ("cbn_naive", {"centered": True}),
]


@pytest.mark.parametrize("name,kwargs", FOLDABLE, ids=[f"{n}-{sorted(k)}" for n, k in FOLDABLE])
def test_fold_registry_resnet_matches_unfolded_eval(name, kwargs):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  normalizer = mj.make_normalizer(name, **kwargs)
  model = TinyResNet(normalizer)
  variables = _trained(model.init(jax.random.key(1), x, train=False), jax.random.key(2))
  folded, none = mj.fold(variables, normalizer)
  assert none.name == "none"
  folded_model = TinyResNet(none)
  # Exactly the layout of the same model built with the 'none' normalizer.
  assert jax.tree.map(jnp.shape, folded) == jax.tree.map(
    jnp.shape, folded_model.init(jax.random.key(1), x, train=False)
  )
  _assert_relative(
    folded_model.apply(folded, x, train=False), model.apply(variables, x, train=False)
  )


def test_fold_registry_after_training_steps_matches_unfolded_eval():
  """Statistics produced by real training steps (MABN), not only random ones."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  normalizer = mj.make_normalizer("mabn", norm_batch_size=2, warmup_steps=1, buffer_size=2)
  model = TinyResNet(normalizer)
  variables = model.init(jax.random.key(1), x, train=False)

  def loss_fn(v, x):
    out, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.mean(out**2), mutated

  step = jax.jit(mj.value_and_grad(loss_fn))
  for i in range(3):
    (_, variables), _ = step(variables, x * (1 + i))
  folded, none = mj.fold(variables, normalizer)
  _assert_relative(
    TinyResNet(none).apply(folded, x, train=False), model.apply(variables, x, train=False)
  )


def test_fold_leaves_group_layer_instance_norm_in_place():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  for name, kwargs in (("gn", {"num_groups": 2}), ("ln", {}), ("in", {})):
    normalizer = mj.make_normalizer(name, **kwargs)
    variables = TinyResNet(normalizer).init(jax.random.key(1), x)
    out, same = mj.fold(variables, normalizer)
    assert same == normalizer
    jax.tree.map(np.testing.assert_array_equal, out, variables)


def test_fold_registry_rejects_standalone_norm():
  class WithStandalone(nn.Module):
    normalizer: mj.Normalizer

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = self.normalizer.conv_norm(4, 3, name="c")(x, train=train)
      return self.normalizer.norm(name="alone")(x, train=train)

  normalizer = mj.make_normalizer("bn")
  x = jnp.ones((2, 4, 4, 3))
  variables = WithStandalone(normalizer).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="without a preceding conv.*alone"):
    mj.fold(variables, normalizer)
