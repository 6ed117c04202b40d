"""Tests for experiments/models.py: every network with registry normalizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from experiments import models


def _shapes(model, x_shape):
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=True),
                        jax.ShapeDtypeStruct(x_shape, jnp.float32))


def _count(tree):
  return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,params", [
    ("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet18_cifar", 11.17e6),
    ("resnet18", 11.69e6), ("resnet50", 25.56e6)])
def test_resnet_parameter_counts_match_the_published_architectures(name, params):
  num_classes = 1000 if name in ("resnet18", "resnet50") else 10
  model = models.build_model(name, mj.make_normalizer("bn"), num_classes)
  size = 64 if num_classes == 1000 else 32
  variables = _shapes(model, (2, size, size, 3))
  assert abs(_count(variables["params"]) - params) / params < 0.02


@pytest.mark.parametrize("norm", ["bn", "mabn", "none"])
def test_registry_layout_and_centring_follow_the_normalizer(norm):
  model = models.build_model("resnet20", mj.make_normalizer(norm, **(
      {"norm_batch_size": 2} if norm != "none" else {})), 10)
  variables = _shapes(model, (4, 16, 16, 3))
  stem = variables["params"]["stem"]
  assert stem["conv"]["kernel"].shape == (3, 3, 3, 16)
  block = variables["params"]["stage2_block1"]
  assert set(block) == {"conv1", "conv2", "proj"}
  if norm == "none":
    assert "norm" not in stem and "bias" in stem["conv"]
    assert "batch_stats" not in variables
  else:
    assert stem["norm"]["scale"].shape == (16,)
    assert "stem" in variables["batch_stats"]
  if norm == "mabn":
    assert mj.BACKWARD_STATS in variables


def test_mabn_model_uses_weight_centralized_convolutions():
  norm = mj.make_normalizer("mabn", norm_batch_size=2)
  model = models.build_model("cnn2", norm, 3, width=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=True)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  # Adding a per-output-channel constant to a raw kernel must not change the
  # output: the conv sees W - mean(W).
  shifted = dict(params)
  conv1 = dict(shifted["conv1"])
  conv1["conv"] = {"kernel": conv1["conv"]["kernel"] + 3.0}
  shifted["conv1"] = conv1
  y0 = model.apply({**variables, "params": params}, x, train=False)
  y1 = model.apply({**variables, "params": shifted}, x, train=False)
  np.testing.assert_allclose(y0, y1, atol=1e-4)


def test_cnn6_logits_shape_and_unknown_model():
  model = models.build_model("cnn6", mj.make_normalizer("gn", num_groups=4), 7, width=4)
  variables = _shapes(model, (2, 16, 16, 1))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32))
  assert out.shape == (2, 7)
  with pytest.raises(ValueError, match="unknown model"):
    models.build_model("vgg", mj.make_normalizer("bn"), 10)
