"""Precise BN: recomputed statistics equal a direct NumPy float64 computation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax as mj
from mabn_jax.precise_bn import recompute_batch_stats

EPS = 1e-5
C1, C2 = 4, 3


class TwoLayer(nn.Module):
  """1x1 conv -> norm -> relu -> 1x1 conv -> norm (the second input depends on the first norm)."""

  norm: str
  norm_batch_size: int | None = None

  def make_norm(self, name):
    if self.norm == "flax_bn":
      return nn.BatchNorm(epsilon=EPS, name=name)
    if self.norm == "bn":
      return mj.BatchNorm(epsilon=EPS, norm_batch_size=self.norm_batch_size, name=name)
    if self.norm == "mabn":
      return mj.MABN(epsilon=EPS, norm_batch_size=self.norm_batch_size, name=name)
    raise ValueError(self.norm)

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(C1, (1, 1), use_bias=False, name="conv1")(x)
    x = self.make_norm("norm1")(x, use_running_average=not train)
    x = nn.relu(x)
    x = nn.Conv(C2, (1, 1), use_bias=False, name="conv2")(x)
    return self.make_norm("norm2")(x, use_running_average=not train)


def _normalize_np(h, kind, groups, scale, bias):
  """The training-mode forward of one layer in float64 (fresh state for MABN)."""
  n = h.shape[0]
  g = h.reshape((groups, n // groups) + h.shape[1:])
  axes = tuple(range(1, g.ndim - 1))
  if kind == "mabn":  # step 1 < warmup: the group's own second moment, r = 1
    chi = np.mean(g * g, axis=axes, keepdims=True)
    out = g / np.sqrt(chi + EPS)
  else:
    mu = np.mean(g, axis=axes, keepdims=True)
    var = np.mean((g - mu) ** 2, axis=axes, keepdims=True)
    out = (g - mu) / np.sqrt(var + EPS)
  return out.reshape(h.shape) * scale + bias


def _reference(variables, batches, kind, groups):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  sums = {name: [0.0, 0.0] for name in ("norm1", "norm2")}
  total = 0
  for x in batches:
    x = np.asarray(x, np.float64)
    h1 = np.einsum("nhwc,cd->nhwd", x, p["conv1"]["kernel"][0, 0])
    a1 = np.maximum(_normalize_np(h1, kind, groups, p["norm1"]["scale"], p["norm1"]["bias"]), 0)
    h2 = np.einsum("nhwc,cd->nhwd", a1, p["conv2"]["kernel"][0, 0])
    for name, h in (("norm1", h1), ("norm2", h2)):
      sums[name][0] = sums[name][0] + h.shape[0] * h.mean(axis=(0, 1, 2))
      sums[name][1] = sums[name][1] + h.shape[0] * (h * h).mean(axis=(0, 1, 2))
    total += x.shape[0]
  return {name: (s[0] / total, s[1] / total) for name, s in sums.items()}


def _randomize(variables, key):
  """Non-trivial scale/bias so the second layer's input depends on them."""
  params = jax.tree_util.tree_map_with_path(
    lambda path, a: (
      a
      + 0.3
      * jax.random.normal(jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % 1000), a.shape)
      if path[-1].key in ("scale", "bias")
      else a
    ),
    variables["params"],
  )
  return {**variables, "params": params}


@pytest.mark.parametrize(
  "kind,norm_batch_size", [("flax_bn", None), ("bn", None), ("bn", 2), ("mabn", None), ("mabn", 2)]
)
def test_recomputed_statistics_equal_numpy_over_batches(kind, norm_batch_size):
  model = TwoLayer(kind, norm_batch_size)
  key = jax.random.key(0)
  batches = [
    1.5 * jax.random.normal(jax.random.fold_in(key, i), (4, 3, 3, 5)) + 0.5 for i in range(3)
  ]
  variables = _randomize(model.init(jax.random.key(1), batches[0], train=False), key)
  groups = 1 if norm_batch_size is None else 4 // norm_batch_size
  new = recompute_batch_stats(model.apply, variables, batches, train=True)
  ref = _reference(variables, batches, "mabn" if kind == "mabn" else "bn", groups)
  for name in ("norm1", "norm2"):
    mean, second = ref[name]
    stats = new["batch_stats"][name]
    if kind == "mabn":
      np.testing.assert_allclose(stats["chi_ema"], second, rtol=2e-5, atol=1e-6)
      # Buffers and step untouched.
      np.testing.assert_array_equal(
        stats["chi_buffer"], variables["batch_stats"][name]["chi_buffer"]
      )
      assert int(stats["step"]) == int(variables["batch_stats"][name]["step"])
    else:
      np.testing.assert_allclose(stats["mean"], mean, rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose(stats["var"], second - mean**2, rtol=1e-4, atol=1e-5)
  # The EMA values really changed and params did not.
  key_stat = "chi_ema" if kind == "mabn" else "var"
  assert not np.allclose(
    new["batch_stats"]["norm2"][key_stat], variables["batch_stats"]["norm2"][key_stat]
  )
  jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])


def test_recompute_rejects_eval_mode_call():
  model = TwoLayer("flax_bn")
  x = jnp.ones((2, 3, 3, 5))
  variables = model.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="no normalizer reported"):
    recompute_batch_stats(model.apply, variables, [x], train=False)


class RegistryTwoLayer(nn.Module):
  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(self.normalizer.conv_norm(C1, 1, name="c1")(x, train=train))
    return self.normalizer.conv_norm(C2, 1, name="c2")(x, train=train)


REGISTRY = [
  ("bn", {"norm_batch_size": 2}, "bn"),
  ("brn", {"r_max": 1.0, "d_max": 0.0}, "bn"),  # BRN at (1, 0) normalizes as BN
  ("cbn", {}, "bn"),  # fresh state: burn-in steps are plain BN
  ("cbn_naive", {"norm_batch_size": 2}, "bn"),
  ("mabn", {"norm_batch_size": 2}, "mabn"),  # centred kernels, warmup statistics
]


@pytest.mark.parametrize("name,kwargs,kind", REGISTRY, ids=[r[0] for r in REGISTRY])
def test_recomputed_statistics_of_registry_models_equal_numpy(name, kwargs, kind):
  normalizer = mj.make_normalizer(name, epsilon=EPS, **kwargs)
  model = RegistryTwoLayer(normalizer)
  key = jax.random.key(3)
  batches = [jax.random.normal(jax.random.fold_in(key, i), (4, 3, 3, 5)) - 0.4 for i in range(2)]
  variables = _randomize(model.init(jax.random.key(1), batches[0], train=False), key)
  new = mj.recompute_batch_stats(model.apply, variables, batches, train=True)
  # Rewrite the registry layout as the plain one the reference reads.
  p = variables["params"]
  centre = mj.functional.centering.center_kernel if normalizer.centered else (lambda k: k)
  plain = {
    "params": {
      "conv1": {"kernel": centre(p["c1"]["conv"]["kernel"])},
      "norm1": p["c1"]["norm"],
      "conv2": {"kernel": centre(p["c2"]["conv"]["kernel"])},
      "norm2": p["c2"]["norm"],
    }
  }
  groups = 4 // kwargs.get("norm_batch_size", 4)
  ref = _reference(plain, batches, kind, groups)
  for layer, ref_name in (("c1", "norm1"), ("c2", "norm2")):
    mean, second = ref[ref_name]
    stats = new["batch_stats"][layer]["norm"]
    if kind == "mabn":
      np.testing.assert_allclose(stats["chi_ema"], second, rtol=2e-5, atol=1e-6)
    else:
      np.testing.assert_allclose(stats["mean"], mean, rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose(stats["var"], second - mean**2, rtol=1e-4, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
