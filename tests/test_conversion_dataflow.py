"""Conversion that keeps the model: NNX producers from the data flow, compensation,
calibration.

NNX models are written as Flax's MNIST example writes its CNN (attributes
named freely, dropout between a convolution and its norm) and as a residual
block; producers of the norms are found from one traced call.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mabn_jax as mj
from mabn_jax.conversion import convert_batch_norm
from mabn_jax.functional.centering import center_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_conversion import Net, _bn_checkpoint  # noqa: E402

SHAPE = (8, 12, 12, 1)


class CNN(nnx.Module):
  """Two conv/dropout/BN blocks, average pooling, two linear layers (MNIST style)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.dropout1 = nnx.Dropout(0.2, rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), use_bias=False, rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
    self.linear1 = nnx.Linear(16 * 3 * 3, 32, rngs=rngs)
    self.batch_norm3 = nnx.BatchNorm(32, rngs=rngs)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x))))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nnx.relu(self.batch_norm2(self.conv2(x).astype(jnp.float32)))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.batch_norm3(self.linear1(x)))
    return self.linear2(x)


def _inputs(count, seed=0):
  return [jax.random.normal(jax.random.key(seed + i), SHAPE) + 0.3 for i in range(count)]


def _trained(model, batches):
  """BN statistics of ``model`` set to the population of ``batches`` and
  non-trivial affine parameters (a trained model's inference)."""
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  for i, norm in enumerate(norms):
    key = jax.random.key(50 + i)
    norm.scale[...] = 1.0 + 0.3 * jax.random.normal(key, norm.scale.shape)
    norm.bias[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, 1), norm.bias.shape)
    norm.momentum = 0.0  # one training call sets the statistics of its batch
  model.set_attributes(deterministic=True, use_running_average=False)
  model(jnp.concatenate(batches))
  model.eval()
  return model


def _centre_kernels(model):
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.Conv, nnx.Linear)) and module is not getattr(model, "linear2", None):
      module.kernel[...] = center_kernel(module.kernel[...])


def test_nnx_conversion_centres_the_producers_found_through_dropout_casts_and_reshapes():
  model = CNN(rngs=nnx.Rngs(0))
  conv1_kernel = model.conv1.kernel[...]
  assert mj.nnx.convert_batch_norm(model, "mabn", x=_inputs(1)[0], buffer_size=4) is model
  for name in ("batch_norm1", "batch_norm2", "batch_norm3"):
    assert isinstance(getattr(model, name), mj.nnx.MABN), name
  assert isinstance(model.conv1, mj.nnx.CenteredConv)
  assert isinstance(model.conv2, mj.nnx.CenteredConv)
  assert isinstance(model.linear1, mj.nnx.CenteredDense)
  assert type(model.linear2) is nnx.Linear  # feeds no norm: unchanged
  np.testing.assert_array_equal(model.conv1.kernel[...], conv1_kernel)  # weights kept
  assert model.batch_norm1.buffer_size == 4


def test_nnx_conversion_keeps_the_eval_output_for_zero_mean_kernels_when_compensated():
  batches = _inputs(3)
  model = CNN(rngs=nnx.Rngs(0))
  _centre_kernels(model)
  _trained(model, batches)
  model.eval()
  x = _inputs(1, seed=9)[0]
  expected = model(x)
  mj.nnx.convert_batch_norm(model, "mabn", x=x, compensate=True)
  np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)
  model.train()  # and it trains with the NNX training contract
  loss, _ = mj.nnx.value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))(model, x)
  assert np.isfinite(float(loss))


def _norm_io(model, x):
  """``[(input, output)]`` of the CNN's three norms in one call."""
  out = []
  z = model.dropout1(model.conv1(x))
  out.append((z, model.batch_norm1(z)))
  x = nnx.avg_pool(nnx.relu(out[-1][1]), window_shape=(2, 2), strides=(2, 2))
  z = model.conv2(x)
  out.append((z, model.batch_norm2(z)))
  x = nnx.avg_pool(nnx.relu(out[-1][1]), window_shape=(2, 2), strides=(2, 2))
  z = model.linear1(x.reshape(x.shape[0], -1))
  out.append((z, model.batch_norm3(z)))
  return out


def test_nnx_calibration_sets_each_layer_from_its_measured_input_in_call_order():
  batches = _inputs(4)
  model = CNN(rngs=nnx.Rngs(0))
  _trained(model, batches)
  beta = [
    np.asarray(n.bias[...]) for n in (model.batch_norm1, model.batch_norm2, model.batch_norm3)
  ]
  mj.nnx.convert_batch_norm(model, "mabn", x=batches[0], calibration_batches=batches)
  assert model.batch_norm1.use_running_average  # the mode is restored (eval here)
  io = _norm_io(model, jnp.concatenate(batches))
  norms = (model.batch_norm1, model.batch_norm2, model.batch_norm3)
  for (z, y), norm, b in zip(io, norms, beta, strict=True):
    axes = tuple(range(z.ndim - 1))
    # chi is the second moment of the layer's actual (converted) input ...
    np.testing.assert_allclose(norm.chi_ema[...], jnp.mean(z**2, axis=axes), rtol=2e-4)
    np.testing.assert_allclose(norm.chi_buffer[...][0], norm.chi_ema[...], rtol=1e-6)
    # ... and the kept map gives BN's output mean (beta) on the calibration data,
    # each layer measured after the layers before it were calibrated.
    np.testing.assert_allclose(jnp.mean(y, axis=axes), b, atol=2e-4)


def test_nnx_conversion_of_a_residual_block_centres_only_the_convolution_branch():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(4, rngs=rngs)
      self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(4, rngs=rngs)
      self.bn_out = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
      return self.bn_out(x + y)

  x = jnp.ones((2, 5, 5, 4))
  model = Block(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'bn_out' \(BatchNorm\) is fed by `add` of 2 values"):
    mj.nnx.convert_batch_norm(model, "mabn", x=x)
  assert type(model.bn1) is nnx.BatchNorm  # nothing converted on error

  class ResidualBlock(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(4, rngs=rngs)
      self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))

  model = ResidualBlock(nnx.Rngs(0))
  mj.nnx.convert_batch_norm(model, "mabn", x=x)
  assert isinstance(model.conv1, mj.nnx.CenteredConv) and isinstance(model.bn1, mj.nnx.MABN)
  assert isinstance(model.conv2, mj.nnx.CenteredConv) and isinstance(model.bn2, mj.nnx.MABN)
  model.eval()
  assert model(x).shape == x.shape


@pytest.mark.parametrize(
  "body, cause",
  [
    (lambda m, x: m.bn(x), "fed directly by the model input"),
    (lambda m, x: m.bn(m.dense(x)), "LinearGeneral, which has no weight-centralized twin"),
    (lambda m, x: m.bn(nnx.relu(m.conv(x))), "`max`"),
    (lambda m, x: m.bn(m.conv(x) + 1.0), "`add`"),
    (lambda m, x: (lambda h: m.bn(h) + h)(m.conv(x)), "its input also feeds other computations"),
    (
      lambda m, x: (lambda h: m.bn(h.reshape(2, 16, 3)).reshape(h.shape) * h)(m.conv(x)),
      "before `reshape`",
    ),
  ],
)
def test_nnx_conversion_names_the_norm_whose_producer_cannot_be_centred(body, cause):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
      self.dense = nnx.LinearGeneral(3, 3, rngs=rngs)
      self.bn = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      return body(self, x)

  with pytest.raises(ValueError, match=r"normalizer 'bn' \(BatchNorm\)") as error:
    mj.nnx.convert_batch_norm(Model(nnx.Rngs(0)), "mabn", x=jnp.ones((2, 4, 4, 3)))
  assert cause in str(error.value)


def test_nnx_conversion_to_a_non_centred_target_needs_no_example_input():
  model = CNN(rngs=nnx.Rngs(0))
  conv = model.conv1
  mj.convert_batch_norm(model, name="brn")
  assert isinstance(model.batch_norm3, mj.nnx.BatchRenorm) and model.conv1 is conv


def test_compensation_is_exact_for_zero_mean_kernels_with_nonzero_bn_means():
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  bn = _bn_checkpoint(x, zero_mean=False)  # centred kernels, random means
  target = Net(mabn=True).init(jax.random.key(3), x)
  expected = Net().apply(bn, x)
  compensated = convert_batch_norm(bn, target=target, compensate=True)
  np.testing.assert_allclose(Net(mabn=True).apply(compensated, x), expected, rtol=1e-4, atol=1e-5)
  copied = convert_batch_norm(bn, target=target)  # default without data: copy
  assert not np.allclose(Net(mabn=True).apply(copied, x), expected, atol=1e-3)
  gamma = np.asarray(bn["params"]["BatchNorm_1"]["scale"], np.float64)
  mean, var = (np.asarray(bn["batch_stats"]["BatchNorm_1"][k], np.float64) for k in ("mean", "var"))
  slope = gamma / np.sqrt(var + 1e-5)  # BN's mean moves into the bias, scale rescaled
  np.testing.assert_allclose(
    compensated["params"]["MABN_1"]["scale"], slope * np.sqrt(var + mean**2 + 1e-5), rtol=1e-5
  )
