"""Running a model whose source hard-codes nn.BatchNorm/nn.Conv with MABN (mj.substitute).

The model is a small ResNet written as Flax's ImageNet example writes its
ResNet (``partial(nn.BatchNorm, ...)`` and ``partial(nn.Conv, use_bias=False)``
in the module's source); it is trained a few steps with BN, then run with
MABN without editing the class.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mabn_jax as mj
from mabn_jax.functional.centering import center_kernel


class ResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: Sequence[int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int] = (1, 1)
  num_classes: int = 4
  num_filters: int = 8

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False, dtype=jnp.float32)
    norm = partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32
    )
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        filters = self.num_filters * 2**i
        x = ResNetBlock(filters, conv=conv, norm=norm, act=nn.relu, strides=strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


SHAPE = (8, 8, 8, 3)


def _batch(i):
  x = jax.random.normal(jax.random.key(100 + i), SHAPE) + 0.5
  return x, jax.random.randint(jax.random.key(200 + i), (SHAPE[0],), 0, 4)


def _bn_trained(steps=3):
  model = ResNet()
  variables = model.init(jax.random.key(0), _batch(0)[0], train=False)
  tx = optax.sgd(0.1, momentum=0.9)
  opt = tx.init(variables["params"])

  @jax.jit
  def step(variables, opt, x, y):
    def loss(params):
      logits, mutated = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

    (_, mutated), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    updates, opt = tx.update(grads, opt, variables["params"])
    return {**mutated, "params": optax.apply_updates(variables["params"], updates)}, opt

  for i in range(steps):
    variables, opt = step(variables, opt, *_batch(i))
  # Population statistics of the final weights (precise BN), so that the BN
  # model's inference is a fair reference after only a few steps.
  batches = [_batch(30 + i)[0] for i in range(4)]
  return model, mj.recompute_batch_stats(model.apply, variables, batches, train=True)


def _centred_kernels(variables):
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: center_kernel(a) if p[-1].key == "kernel" and a.ndim == 4 else a,
    variables["params"],
  )
  return {**variables, "params": params}


def test_substitute_runs_hard_coded_batch_norm_and_conv_as_mabn_and_centered_conv():
  model = ResNet()
  x = _batch(0)[0]
  swap = mj.substitute("mabn", norm_batch_size=2, buffer_size=4, warmup_steps=2)
  with swap:
    variables = model.init(jax.random.key(0), x, train=False)
  plain = model.init(jax.random.key(0), x, train=False)
  # Same paths and parameter shapes as the BN model; MABN state where BN had mean/var.
  assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, plain["params"])
  stats = variables["batch_stats"]["ResNetBlock_0"]["BatchNorm_0"]
  assert set(stats) >= {"chi_ema", "chi_buffer", "psi_buffer", "step"}
  assert stats["chi_buffer"].shape == (4, 8)
  # The convolutions are centred: the output is unchanged by centring the stored
  # kernels beforehand (centring is idempotent; a plain nn.Conv would differ).
  centred = _centred_kernels(variables)
  with swap:
    out = model.apply(variables, x, train=False)
    out_centred = model.apply(centred, x, train=False)
  np.testing.assert_allclose(out, out_centred, rtol=1e-5, atol=1e-6)
  # Outside the context the class is unchanged: plain BN again.
  assert "mean" in model.init(jax.random.key(0), x, train=False)["batch_stats"]["bn_init"]


def test_bn_trained_resnet_converted_through_substitute_keeps_its_eval_output():
  model, bn_vars = _bn_trained()
  bn_vars = _centred_kernels(bn_vars)  # zero-mean kernels: the conversion is exact
  x = _batch(7)[0]
  expected = model.apply(bn_vars, x, train=False)
  swap = mj.substitute("mabn", norm_batch_size=2, buffer_size=4, warmup_steps=2)
  with swap:
    template = model.init(jax.random.key(1), x, train=False)
  converted = mj.convert_batch_norm(bn_vars, target=template, compensate=True)
  got = swap.wrap(model.apply)(converted, x, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(expected).max()) > 1e-2

  # Fine-tuning runs with the training contract, inside the context.
  def loss_fn(v, x, y):
    logits, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

  (loss, after), grads = jax.jit(mj.value_and_grad(swap.wrap(loss_fn)))(converted, *_batch(8))
  assert np.isfinite(float(loss))
  assert (
    int(after["batch_stats"]["bn_init"]["step"])
    == int(converted["batch_stats"]["bn_init"]["step"]) + 1
  )
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_calibrated_conversion_through_substitute_matches_bn_better_than_uncalibrated():
  model, bn_vars = _bn_trained()  # kernels not centred: the conversion changes the model
  batches = [_batch(10 + i)[0] for i in range(3)]
  x = _batch(20)[0]
  expected = np.asarray(model.apply(bn_vars, x, train=False))
  swap = mj.substitute("mabn", norm_batch_size=2, buffer_size=4, warmup_steps=2)
  with swap:
    template = model.init(jax.random.key(1), x, train=False)
  apply = swap.wrap(model.apply)

  def error(variables):
    got = np.asarray(apply(variables, x, train=False))
    return np.linalg.norm(got - expected) / np.linalg.norm(expected)

  plain = mj.convert_batch_norm(bn_vars, target=template, compensate=False)
  calibrated = mj.convert_batch_norm(
    bn_vars,
    target=template,
    calibration_batches=batches,
    apply_fn=apply,
    call_kwargs={"train": False},
  )
  assert error(calibrated) < 0.75 * error(plain)


def test_substitute_rejects_a_normalizer_that_needs_the_convolution():
  with pytest.raises(ValueError, match="cannot replace"):
    mj.substitute("cbn")


def test_centring_changes_the_output_of_uncentred_kernels():
  model = ResNet()
  x = _batch(0)[0]
  variables = model.init(jax.random.key(0), x, train=False)
  swap = mj.substitute("mabn", norm_batch_size=2, centre=lambda conv: conv.name == "conv_init")
  with swap:
    template = model.init(jax.random.key(0), x, train=False)
  variables = mj.convert_batch_norm(variables, target=template)
  centred = _centred_kernels(variables)
  out = swap.wrap(model.apply)(variables, x, train=False)
  # Only conv_init is centred: centring the other stored kernels changes the output.
  assert not np.allclose(out, swap.wrap(model.apply)(centred, x, train=False), atol=1e-4)
