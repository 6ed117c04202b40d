"""The check of MABN's zero-mean premise follows the data flow to its producers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mabn_jax as mj
from experiments import models

X = jnp.zeros((4, 8, 8, 3))


def _linen(name, model="preact_resnet8", **kwargs):
  normalizer = mj.make_normalizer(name, norm_batch_size=2, **kwargs)
  net = models.build_model(model, normalizer, 10, width=4)
  return net, net.init(jax.random.key(0), X, train=False)


def test_preactivation_network_with_centralized_convolutions_passes():
  net, variables = _linen("mabn")
  assert mj.check_zero_mean_inputs(net, X, variables, train=True) == {}


def test_postactivation_registry_network_passes():
  net, variables = _linen("mabn", model="resnet20")
  assert mj.check_zero_mean_inputs(net, X, variables, train=False) == {}


def test_preactivation_network_with_plain_convolutions_names_every_norm_and_the_fix():
  net, variables = _linen("mabn", centered=False)
  with pytest.raises(ValueError, match="not weight-centralized.*To fix: make every layer"):
    mj.check_zero_mean_inputs(net, X, variables, train=True)
  with pytest.warns(UserWarning, match="MABN assumes zero-mean inputs"):
    findings = mj.check_zero_mean_inputs(net, X, variables, strict=False, train=True)
  # Every norm of the three blocks and the final one; the stem has no norm.
  assert len(findings) == 7
  assert findings["stage1_block1/norm1"] == "'stem' (Conv), which is not weight-centralized"
  assert "not weight-centralized" in findings["final_norm"]


def test_batch_norm_is_not_checked():
  net, variables = _linen("bn")
  assert mj.check_zero_mean_inputs(net, X, variables, train=True) == {}


class _NNXNet(nnx.Module):
  def __init__(self, relu_before_norm: bool, *, rngs):
    self.stem = mj.nnx.CenteredConv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.conv = mj.nnx.CenteredConv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.norm1 = mj.nnx.MABN(4, norm_batch_size=2, rngs=rngs)
    self.norm2 = mj.nnx.MABN(4, norm_batch_size=2, rngs=rngs)
    self.relu_before_norm = relu_before_norm

  def __call__(self, x):
    stream = self.stem(x)
    y = self.conv(nnx.relu(self.norm1(stream)))
    if self.relu_before_norm:
      y = nnx.relu(y)
    # dropout between conv and the add, then a residual sum into the norm
    return self.norm2(stream + self.dropout(y))


def test_nnx_residual_sum_of_centralized_layers_through_dropout_passes():
  model = _NNXNet(False, rngs=nnx.Rngs(0))
  model.train()
  assert mj.check_zero_mean_inputs(model, X) == {}


def test_nnx_relu_before_the_norm_is_named():
  model = _NNXNet(True, rngs=nnx.Rngs(0))
  model.train()
  with pytest.warns(UserWarning, match="'norm2' is fed by `max`"):
    findings = mj.check_zero_mean_inputs(model, X, strict=False)
  assert set(findings) == {"norm2"}
  assert "max" in findings["norm2"]


def test_linen_model_fed_by_its_input_is_named():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return mj.MABN(use_running_average=not train, norm_batch_size=2)(x)

  variables = Net().init(jax.random.key(0), X, train=False)
  with pytest.raises(ValueError, match="'MABN_0' is fed by the model input"):
    mj.check_zero_mean_inputs(Net(), X, variables, train=True)


def test_linen_needs_variables():
  with pytest.raises(ValueError, match="needs its variables"):
    mj.check_zero_mean_inputs(_linen("mabn")[0], X)
