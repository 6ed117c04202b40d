"""Tests for experiments/models.py: every network with registry normalizers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from experiments import models


def _shapes(model, x_shape):
  return jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, train=True),
    jax.ShapeDtypeStruct(x_shape, jnp.float32),
  )


def _count(tree):
  return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
  "name,params",
  [
    ("resnet20", 0.27e6),
    ("resnet56", 0.85e6),
    ("resnet18_cifar", 11.17e6),
    ("resnet18", 11.69e6),
    ("resnet50", 25.56e6),
  ],
)
def test_resnet_parameter_counts_match_the_published_architectures(name, params):
  num_classes = 1000 if name in ("resnet18", "resnet50") else 10
  model = models.build_model(name, mj.make_normalizer("bn"), num_classes)
  size = 64 if num_classes == 1000 else 32
  variables = _shapes(model, (2, size, size, 3))
  assert abs(_count(variables["params"]) - params) / params < 0.02


@pytest.mark.parametrize("norm", ["bn", "mabn", "none"])
def test_registry_layout_and_centring_follow_the_normalizer(norm):
  model = models.build_model(
    "resnet20", mj.make_normalizer(norm, **({"norm_batch_size": 2} if norm != "none" else {})), 10
  )
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
  out = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False),
    variables,
    jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32),
  )
  assert out.shape == (2, 7)
  with pytest.raises(ValueError, match="unknown model"):
    models.build_model("vgg", mj.make_normalizer("bn"), 10)


def _init(model, x_shape=(4, 8, 8, 3)):
  return model.init(jax.random.PRNGKey(0), jnp.ones(x_shape), train=True)


@pytest.mark.parametrize("norm", ["bn", "mabn"])
@pytest.mark.parametrize(
  "norm_layers,normalized",
  [
    ("all", {1, 2, 3, 4, 5, 6}),
    ("first", {1}),
    ("first_half", {1, 2, 3}),
    ("none", set()),
    ("2,5", {2, 5}),
    ((1, 6), {1, 6}),
  ],
)
def test_norm_layers_normalizes_exactly_the_chosen_convs(norm, norm_layers, normalized):
  model = models.build_model(
    "cnn6", mj.make_normalizer(norm, norm_batch_size=2), 10, width=2, norm_layers=norm_layers
  )
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, train=True),
    jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32),
  )
  params = variables["params"]
  assert set(params) == {f"conv{i}" for i in range(1, 7)} | {"head"}
  assert set(variables.get("batch_stats", {})) == {f"conv{i}" for i in normalized}
  for i in range(1, 7):
    layer = params[f"conv{i}"]
    if i in normalized:
      assert set(layer) == {"conv", "norm"} and "bias" not in layer["conv"]
    else:  # the registry's 'none' conv: a bias, no normalization
      assert set(layer) == {"conv"} and set(layer["conv"]) == {"kernel", "bias"}


class _CNNBefore(nn.Module):
  """CNN6 as it was before ``norm_layers`` (every conv normalized)."""

  normalizer: object
  num_classes: int = 10
  widths: tuple = (32, 32, 64, 64, 128, 128)

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i, width in enumerate(self.widths):
      x = self.normalizer.conv_norm(
        features=width, kernel_size=(3, 3), strides=(1, 1), padding="SAME", name=f"conv{i + 1}"
      )(x, train=train)
      x = nn.relu(x)
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def test_norm_layers_default_is_the_model_of_before():
  norm = mj.make_normalizer("mabn", norm_batch_size=2)
  old = _CNNBefore(norm, 10, widths=(4, 8))  # what build_model('cnn2') returned before
  new = models.build_model("cnn2", norm, 10, width=4)
  assert new.norm_layers == "all"
  a, b = _init(old), _init(new)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  np.testing.assert_array_equal(old.apply(a, x, train=False), new.apply(b, x, train=False))


def test_no_normalized_layer_is_the_none_normalizer():
  plain = _init(models.build_model("cnn2", mj.make_normalizer("none"), 10, width=4))
  unnormalized = _init(
    models.build_model("cnn2", mj.make_normalizer("bn"), 10, width=4, norm_layers="none")
  )
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(unnormalized)
  for x, y in zip(
    jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(unnormalized), strict=True
  ):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("bad", ["some", "0", "3", "1,x", "", 1, (0,)])
def test_bad_norm_layers_raise(bad):
  with pytest.raises(ValueError, match="norm_layers"):
    models.build_model("cnn2", mj.make_normalizer("bn"), 10, width=4, norm_layers=bad)


def test_norm_layers_other_than_all_need_a_cnn():
  with pytest.raises(ValueError, match="norm_layers 'first'.*resnet20"):
    models.build_model("resnet20", mj.make_normalizer("bn"), 10, norm_layers="first")


@pytest.mark.parametrize("norm, centered", [("mabn", True), ("bn", False)])
def test_preact_resnet_convolutions_follow_the_normalizers_centring(norm, centered):
  normalizer = mj.make_normalizer(norm, norm_batch_size=2)
  model = models.build_model("preact_resnet8", normalizer, 10, width=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x, train=True)
  centred = []
  model.apply(
    variables,
    x,
    train=False,
    capture_intermediates=lambda module, _: bool(
      isinstance(module, mj.CenteredConv) and centred.append(module.path)
    ),
  )
  kernels = [
    path
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
    if path[-1].key == "kernel" and leaf.ndim == 4
  ]
  # stem, conv1 and conv2 of three blocks, and the projections of stages 2 and 3
  assert len(kernels) == 9
  assert len(set(centred)) == (9 if centered else 0)
  norms = [k for k in variables["params"]["stage2_block1"] if k.startswith("norm")]
  assert norms == ["norm1", "norm2"]
  assert "final_norm" in variables["params"]
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))


def test_frn_tlu_replaces_the_relu_and_trains_and_residual_outputs_have_no_tlu():
  normalizer = mj.make_normalizer("frn")
  model = models.ResNet(normalizer, (1, 1), num_classes=3, num_filters=4)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=True)
  params = variables["params"]
  block = params["stage2_block1"]
  assert "tau" in params["stem"]["norm"] and "tau" in block["conv1"]["norm"]
  assert "tau" not in block["conv2"]["norm"] and "tau" not in block["proj"]["norm"]
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, train=True) ** 2))(params)
  # With a ReLU after the TLU, tau (initially 0) would get no gradient.
  assert float(jnp.abs(grads["stem"]["norm"]["tau"]).max()) > 0
  assert float(jnp.abs(grads["stage1_block1"]["conv1"]["norm"]["tau"]).max()) > 0
  assert models.has_activation(normalizer)
  assert not models.has_activation(normalizer.with_updates(use_tlu=False))
  assert not models.has_activation(mj.make_normalizer("gn"))
