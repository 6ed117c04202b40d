"""Weight-standardized GroupNorm ('ws_gn') and filter response normalization ('frn').

Each layer against a float64 NumPy reference written here (outputs, and
gradients against central finite differences of that reference), the NNX
twins against the linen layers bit for bit, the registry entries in both
APIs, their errors, and what the inference tools do with them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mabn_jax as mj
from mabn_jax.fold import Folded
from mabn_jax.functional import standardization as WS

RNG = np.random.default_rng(0)


# --- float64 references -------------------------------------------------------


def ws_reference(kernel, eps=1e-5):
  """big_vision's StdConv: (w - mean) / (std + eps) over all axes but the last."""
  w = np.asarray(kernel, np.float64)
  axes = tuple(range(w.ndim - 1))
  centred = w - w.mean(axis=axes, keepdims=True)
  return centred / (np.sqrt((centred**2).mean(axis=axes, keepdims=True)) + eps)


def conv_reference(x, kernel):
  """A 'VALID' stride-1 2-D convolution, NHWC x HWIO, by explicit sums."""
  x, w = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw = w.shape[:2]
  n, h, wd, _ = x.shape
  out = np.zeros((n, h - kh + 1, wd - kw + 1, w.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      out += np.einsum("nhwc,co->nhwo", x[:, a : a + h - kh + 1, b : b + wd - kw + 1], w[a, b])
  return out


def frn_reference(x, scale, bias, tau, eps=1e-6, learned=None):
  """Singh & Krishnan's FRN + TLU in float64."""
  x = np.asarray(x, np.float64)
  if learned is not None:
    eps = eps + abs(float(learned))
  nu2 = (x**2).mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
  y = np.asarray(scale, np.float64) * x / np.sqrt(nu2 + eps) + np.asarray(bias, np.float64)
  return y if tau is None else np.maximum(y, np.asarray(tau, np.float64))


def finite_difference(f, value, index, h=1e-6):
  """Central difference of the scalar ``f`` at ``value`` along entry ``index``."""
  up, down = np.array(value, np.float64), np.array(value, np.float64)
  up[index] += h
  down[index] -= h
  return (f(up) - f(down)) / (2 * h)


def _some_indices(shape, count, seed):
  rng = np.random.default_rng(seed)
  return [tuple(int(rng.integers(0, d)) for d in shape) for _ in range(count)]


# --- weight standardization -------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (1, 1, 6, 3), (7, 2)])
def test_standardized_kernel_matches_the_float64_reference(shape):
  kernel = RNG.normal(0.3, 2.0, shape).astype(np.float32)
  out = WS.standardize_kernel(jnp.asarray(kernel))
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ws_reference(kernel), rtol=2e-6, atol=2e-6)
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(np.asarray(out).mean(axis=axes), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out, np.float64).std(axis=axes), 1.0, atol=1e-4)


def test_standardized_conv_output_and_gradients_match_the_float64_reference():
  x = RNG.normal(size=(2, 6, 5, 3)).astype(np.float32)
  layer = mj.StandardizedConv(4, (3, 3), padding="VALID", use_bias=False)
  kernel = RNG.normal(0.1, 0.5, (3, 3, 3, 4)).astype(np.float32)
  weights = RNG.normal(size=(2, 4, 3, 4))

  def loss64(kernel, x):
    return float(np.sum(np.sin(conv_reference(x, ws_reference(kernel))) * weights))

  def loss(kernel, x):
    y = layer.apply({"params": {"kernel": kernel}}, x)
    return jnp.sum(jnp.sin(y) * weights)

  y = layer.apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x))
  np.testing.assert_allclose(y, conv_reference(x, ws_reference(kernel)), rtol=1e-5, atol=1e-5)
  g_kernel, g_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(kernel), jnp.asarray(x))
  for index in _some_indices(kernel.shape, 8, seed=1):
    expected = finite_difference(lambda k: loss64(k, x), kernel, index)
    np.testing.assert_allclose(g_kernel[index], expected, rtol=2e-3, atol=2e-4)
  for index in _some_indices(x.shape, 6, seed=2):
    expected = finite_difference(lambda v: loss64(kernel, v), x, index)
    np.testing.assert_allclose(g_x[index], expected, rtol=2e-3, atol=2e-4)


def test_a_kernel_of_equal_weights_standardizes_to_zeros_with_a_finite_gradient():
  kernel = jnp.ones((3, 3, 2, 2)).at[..., 1].set(RNG.normal(size=(3, 3, 2)))
  out = WS.standardize_kernel(kernel)
  np.testing.assert_array_equal(out[..., 0], 0.0)
  grad = jax.grad(lambda k: jnp.sum(WS.standardize_kernel(k) * jnp.arange(36.0).reshape(k.shape)))
  assert bool(jnp.all(jnp.isfinite(grad(kernel))))


def test_standardization_is_computed_in_param_dtype_before_the_cast_to_dtype():
  x = jnp.asarray(RNG.normal(size=(2, 5, 5, 3)), jnp.bfloat16)
  layer = mj.StandardizedConv(4, (3, 3), dtype=jnp.bfloat16, use_bias=False)
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  y = layer.apply(variables, x)
  standardized = WS.standardize_kernel(variables["params"]["kernel"]).astype(jnp.bfloat16)
  expected = nn.Conv(4, (3, 3), dtype=jnp.bfloat16, use_bias=False).apply(
    {"params": {"kernel": standardized}}, x
  )
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))


def _copy_conv(module, variables):
  module.kernel[...] = variables["params"]["kernel"]
  if "bias" in variables["params"]:
    module.bias[...] = variables["params"]["bias"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_standardized_conv_equals_the_linen_layer_bit_for_bit(dtype):
  x = jnp.asarray(RNG.normal(size=(2, 7, 7, 3)), dtype)
  linen = mj.StandardizedConv(5, (3, 3), strides=2, dtype=dtype, epsilon=1e-3)
  variables = linen.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # a non-zero bias too
  module = mj.nnx.StandardizedConv(3, 5, (3, 3), 2, dtype=dtype, epsilon=1e-3, rngs=nnx.Rngs(0))
  _copy_conv(module, variables)
  np.testing.assert_array_equal(
    np.asarray(module(x), np.float32), np.asarray(linen.apply(variables, x), np.float32)
  )


def test_standardized_conv_errors_name_the_layer_and_the_cause():
  x = jnp.ones((1, 4, 4, 1))
  with pytest.raises(ValueError, match=r"StandardizedConv 'c'.*\(1, 1, 1, 3\).*1 weight per"):
    mj.StandardizedConv(3, (1, 1), name="c").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"nnx.StandardizedConv\(1 -> 3\).*1 weight per"):
    mj.nnx.StandardizedConv(1, 3, (1, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="StandardizedConv.*mask is not supported"):
    mj.StandardizedConv(2, (3, 3), mask=jnp.ones((3, 3, 1, 2))).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="nnx.StandardizedConv.*mask is not supported"):
    mj.nnx.StandardizedConv(1, 2, (3, 3), mask=jnp.ones((3, 3, 1, 2)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="StandardizedConv.*epsilon must be positive, got 0.0"):
    mj.StandardizedConv(2, (3, 3), epsilon=0.0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="nnx.StandardizedConv.*epsilon must be positive"):
    mj.nnx.StandardizedConv(1, 2, (3, 3), epsilon=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="nnx.StandardizedConv.*promote_dtype override"):
    mj.nnx.StandardizedConv(1, 2, (3, 3), promote_dtype=lambda a, **k: a, rngs=nnx.Rngs(0))


# --- filter response normalization ------------------------------------------


def _frn_params(c, learned=False):
  params = {
    "scale": jnp.asarray(RNG.uniform(0.5, 2.0, c), jnp.float32),
    "bias": jnp.asarray(RNG.normal(size=c), jnp.float32),
    "tau": jnp.asarray(RNG.normal(0.0, 0.5, c), jnp.float32),
  }
  if learned:
    params["learned_epsilon"] = jnp.asarray(-0.05, jnp.float32)  # |.| is used
  return params


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 7, 4), (2, 3, 2, 2, 3)])
def test_frn_output_and_gradients_match_the_float64_reference(shape, learned):
  c = shape[-1]
  x = RNG.normal(0.2, 1.5, shape).astype(np.float32)
  layer = mj.FilterResponseNorm(learn_epsilon=learned, epsilon=1e-3)
  params = _frn_params(c, learned)
  reference = lambda p, x: frn_reference(
    x, p["scale"], p["bias"], p["tau"], 1e-3, p.get("learned_epsilon")
  )
  weights = RNG.normal(size=shape)
  y = layer.apply({"params": params}, jnp.asarray(x))
  assert y.shape == shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, reference(params, x), rtol=1e-5, atol=1e-5)
  assert np.any(np.asarray(y) == np.asarray(params["tau"]))  # the TLU is active somewhere

  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x) * weights)
  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
  np64 = {k: np.asarray(v, np.float64) for k, v in params.items()}

  def loss64(name, value):
    return float(np.sum(reference({**np64, name: value}, x) * weights))

  for name, value in np64.items():
    for index in _some_indices(value.shape, min(3, max(1, value.size)), seed=len(name)):
      expected = finite_difference(lambda v, n=name: loss64(n, v), value, index)
      np.testing.assert_allclose(g_params[name][index], expected, rtol=2e-3, atol=2e-3)
  for index in _some_indices(shape, 6, seed=3):
    expected = finite_difference(lambda v: float(np.sum(reference(np64, v) * weights)), x, index)
    np.testing.assert_allclose(g_x[index], expected, rtol=2e-3, atol=2e-3)


def test_frn_without_tlu_is_plain_frn_and_its_variables_are_params_only():
  x = jnp.asarray(RNG.normal(size=(2, 5, 5, 3)), jnp.float32)
  layer = mj.FilterResponseNorm(use_tlu=False)
  variables = layer.init(jax.random.key(0), x)
  assert set(variables) == {"params"} and set(variables["params"]) == {"scale", "bias"}
  np.testing.assert_allclose(
    layer.apply(variables, x), frn_reference(x, 1.0, 0.0, None), rtol=1e-5, atol=1e-6
  )
  default = mj.FilterResponseNorm().init(jax.random.key(0), x)
  np.testing.assert_array_equal(default["params"]["tau"], np.zeros(3))
  learned = mj.FilterResponseNorm(learn_epsilon=True).init(jax.random.key(0), x)
  np.testing.assert_allclose(learned["params"]["learned_epsilon"], 1e-4)
  assert learned["params"]["learned_epsilon"].shape == ()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("learned", [False, True])
def test_nnx_frn_equals_the_linen_layer_bit_for_bit(learned, dtype):
  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 4)), dtype)
  params = _frn_params(4, learned)
  linen = mj.FilterResponseNorm(learn_epsilon=learned, dtype=dtype)
  module = mj.nnx.FilterResponseNorm(4, learn_epsilon=learned, dtype=dtype, rngs=nnx.Rngs(0))
  for name, value in params.items():
    getattr(module, name)[...] = value
  expected = linen.apply({"params": params}, x)
  assert module(x).dtype == expected.dtype == dtype
  np.testing.assert_array_equal(np.asarray(module(x), np.float32), np.asarray(expected, np.float32))
  assert not nnx.state(module, nnx.BatchStat)  # no statistics


def test_frn_errors_name_the_layer_and_the_cause():
  with pytest.raises(ValueError, match=r"FilterResponseNorm 'n'.*\(4, 6\) has no spatial axis"):
    mj.FilterResponseNorm(name="n").init(jax.random.key(0), jnp.ones((4, 6)))
  module = mj.nnx.FilterResponseNorm(6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx.FilterResponseNorm\(num_features=6\).*no spatial"):
    module(jnp.ones((4, 6)))
  with pytest.raises(ValueError, match=r"has 5 channels.*built for 6"):
    module(jnp.ones((2, 3, 3, 5)))
  with pytest.raises(ValueError, match="FilterResponseNorm.*epsilon must be positive, got 0.0"):
    mj.FilterResponseNorm(epsilon=0.0).init(jax.random.key(0), jnp.ones((1, 2, 2, 3)))
  with pytest.raises(ValueError, match="nnx.FilterResponseNorm.*epsilon must be positive"):
    mj.nnx.FilterResponseNorm(3, epsilon=-1.0, rngs=nnx.Rngs(0))


# --- the registry entries ---------------------------------------------------

KWARGS = {"ws_gn": dict(num_groups=2), "frn": dict(learn_epsilon=True)}


def _block(name, **extra):
  return mj.make_normalizer(name, **{**KWARGS[name], **extra}).conv_norm(4, 3, name="block")


def _expected_linen(name, variables, x):
  """The entry's conv and norm built by hand from their public classes."""
  params = variables["params"]["block"]
  if name == "ws_gn":
    conv, norm = mj.StandardizedConv(4, (3, 3), use_bias=False), nn.GroupNorm(num_groups=2)
  else:
    conv, norm = nn.Conv(4, (3, 3), use_bias=False), mj.FilterResponseNorm(learn_epsilon=True)
  z = conv.apply({"params": params["conv"]}, x)
  return norm.apply({"params": params["norm"]}, z)


@pytest.mark.parametrize("name", ["ws_gn", "frn"])
def test_registry_entry_is_its_conv_and_norm_and_the_same_in_both_apis(name):
  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return _block(name)(x, train=train)

  variables = Net().init(jax.random.key(0), x, train=True)
  assert set(variables) == {"params"}  # no statistics
  y_train, y_eval = (Net().apply(variables, x, train=t) for t in (True, False))
  np.testing.assert_array_equal(y_train, y_eval)
  np.testing.assert_array_equal(y_train, _expected_linen(name, variables, x))

  normalizer = mj.make_normalizer(name, **KWARGS[name])
  module = normalizer.nnx_conv_norm(3, 4, 3, rngs=nnx.Rngs(0))
  expected_conv = mj.nnx.StandardizedConv if name == "ws_gn" else nnx.Conv
  expected_norm = nnx.GroupNorm if name == "ws_gn" else mj.nnx.FilterResponseNorm
  assert type(module.conv) is expected_conv and type(module.norm) is expected_norm
  params = variables["params"]["block"]
  module.conv.kernel[...] = params["conv"]["kernel"]
  for key, value in params["norm"].items():
    getattr(module.norm, key)[...] = value
  for mode in (module.train, module.eval):
    mode()
    np.testing.assert_array_equal(module(x), y_train)


def test_registry_errors_for_options_the_entries_do_not_take():
  with pytest.raises(ValueError, match=r"'ws_gn'.*StandardizedConv.*'centered' does not apply"):
    mj.make_normalizer("ws_gn", centered=True)
  with pytest.raises(ValueError, match=r"'ws_gn'.*unknown keyword argument\(s\) norm_batch_size"):
    mj.make_normalizer("ws_gn", norm_batch_size=2)
  with pytest.raises(ValueError, match=r"'frn'.*unknown keyword.*momentum; valid ones:.*use_tlu"):
    mj.make_normalizer("frn", momentum=0.9)
  with pytest.raises(ValueError, match="'frn'.*normalizes over spatial axes.*conv_norm"):
    mj.make_normalizer("frn").dense_norm(4)
  with pytest.raises(ValueError, match="'frn'.*no spatial axis.*conv_norm"):
    mj.make_normalizer("frn").nnx_dense_norm(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="FilterResponseNorm.*no spatial axis"):
    norm = mj.make_normalizer("frn").norm(name="n")
    norm.init(jax.random.key(0), jnp.ones((2, 4)), train=True)


def test_ws_gn_dense_norm_is_a_plain_dense_layer_and_group_norm():
  x = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
  block = mj.make_normalizer("ws_gn", num_groups=2).dense_norm(4)
  variables = block.init(jax.random.key(0), x, train=True)
  p = variables["params"]
  z = nn.Dense(4, use_bias=False).apply({"params": p["dense"]}, x)
  expected = nn.GroupNorm(num_groups=2).apply({"params": p["norm"]}, z)
  np.testing.assert_array_equal(block.apply(variables, x, train=True), expected)


# --- the inference tools ----------------------------------------------------


@pytest.mark.parametrize("name", ["gn", "ws_gn", "frn"])
def test_fold_leaves_per_sample_normalizers_in_place_in_both_apis(name):
  normalizer = mj.make_normalizer(name, **KWARGS.get(name, {"num_groups": 2}))
  x = jnp.asarray(RNG.normal(size=(2, 5, 5, 3)), jnp.float32)
  block = normalizer.conv_norm(4, 3, name="block")
  variables = block.init(jax.random.key(0), x, train=True)
  folded, same = mj.fold(variables, normalizer)
  assert same == normalizer
  jax.tree.map(np.testing.assert_array_equal, folded, variables)
  module = normalizer.nnx_conv_norm(3, 4, 3, rngs=nnx.Rngs(0))
  module.eval()
  before = module(x)
  assert mj.fold(module) is module and not isinstance(module.norm, Folded)
  np.testing.assert_array_equal(module(x), before)
  assert module.conv.bias is None  # nothing was merged into the conv


def test_precomputed_standardized_kernels_give_the_same_inference_as_gn():
  normalizer = mj.make_normalizer("ws_gn", num_groups=2)

  class Net(nn.Module):
    norm: mj.Normalizer

    @nn.compact
    def __call__(self, x, train):
      x = nn.relu(self.norm.conv_norm(4, 3, name="a")(x, train=train))
      return self.norm.dense_norm(4, name="head")(x.mean(axis=(1, 2)), train=train)

  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)
  variables = Net(normalizer).init(jax.random.key(0), x, train=True)
  stored, gn = mj.precompute_standardized_kernels(variables, normalizer)
  assert gn == mj.make_normalizer("gn", num_groups=2)
  np.testing.assert_allclose(
    Net(gn).apply(stored, x, train=False),
    Net(normalizer).apply(variables, x, train=False),
    rtol=1e-6,
    atol=1e-6,
  )
  np.testing.assert_array_equal(  # the dense layer is not standardized
    stored["params"]["head"]["dense"]["kernel"], variables["params"]["head"]["dense"]["kernel"]
  )
  with pytest.raises(ValueError, match="expected the 'ws_gn' normalizer.*'gn'"):
    mj.precompute_standardized_kernels(stored, gn)


class OneBlock(nn.Module):
  norm: mj.Normalizer

  @nn.compact
  def __call__(self, x, train):
    return self.norm.conv_norm(4, 3, name="block")(x, train=train)


def _bn_trained(x):
  """A 'bn' conv_norm block with moved running statistics."""
  bn = mj.make_normalizer("bn", momentum=0.5)
  block = OneBlock(bn)
  variables = block.init(jax.random.key(0), x, train=True)
  for _ in range(3):
    _, updates = block.apply(variables, x * 2.0 + 1.0, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  return bn, block, variables


def test_bn_converts_to_frozen_bn_which_folds_in_both_apis():
  x = jnp.asarray(RNG.normal(size=(4, 6, 6, 3)), jnp.float32)
  bn, block, variables = _bn_trained(x)
  expected = block.apply(variables, x, train=False)
  converted, frozen = mj.convert_batch_norm(variables, bn, name="frozen_bn")
  assert frozen.name == "frozen_bn" and mj.BACKWARD_STATS not in converted
  stats = converted["batch_stats"]["block"]["norm"]
  np.testing.assert_array_equal(stats["mean"], variables["batch_stats"]["block"]["norm"]["mean"])
  y_train, _ = OneBlock(frozen).apply(converted, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y_train, expected, rtol=1e-5, atol=1e-5)
  folded, none = mj.fold(converted, frozen)
  np.testing.assert_allclose(
    OneBlock(none).apply(folded, x, train=False), expected, rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="'gn' is not a batch-statistics normalizer"):
    mj.convert_batch_norm(variables, bn, name="gn")

  module = bn.nnx_conv_norm(3, 4, 3, rngs=nnx.Rngs(0))
  module.conv.kernel[...] = variables["params"]["block"]["conv"]["kernel"]
  for key, value in variables["batch_stats"]["block"]["norm"].items():
    if key != "nonfinite_count":
      getattr(module.norm, key)[...] = value
  module.eval()
  assert mj.convert_batch_norm(module, name="frozen_bn") is module
  assert type(module.norm) is mj.nnx.FrozenBatchNorm
  module.train()  # frozen: training normalizes with the converted statistics
  np.testing.assert_allclose(module(x), expected, rtol=1e-5, atol=1e-5)
  module.eval()
  mj.fold(module)
  np.testing.assert_allclose(module(x), expected, rtol=1e-5, atol=1e-5)
