"""Statistics recorder: training is unchanged, recorded values equal a direct computation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mabn_jax as mj
from mabn_jax import recording

EPS = 1e-5
B, NB = 4, 2  # SGD batch, normalization batch


class Net(nn.Module):
  kind: str  # 'flax_bn', 'bn' or 'mabn'
  first_norm: bool = False  # normalize the input directly (for the direct check)

  def norm(self, x, train, name):
    if self.kind == "flax_bn":
      return nn.BatchNorm(use_running_average=not train, epsilon=EPS, name=name)(x)
    if self.kind == "bn":
      return mj.BatchNorm(use_running_average=not train, norm_batch_size=NB, name=name)(x)
    return mj.MABN(
      use_running_average=not train,
      norm_batch_size=NB,
      buffer_size=3,
      warmup_steps=2,
      renorm_start=1000,
      name=name,
    )(x)

  @nn.compact
  def __call__(self, x, train: bool):
    if self.first_norm:
      x = self.norm(x, train, "norm0")
    conv = mj.CenteredConv if self.kind == "mabn" else nn.Conv
    x = conv(4, (3, 3), use_bias=False, name="conv1")(x)
    x = nn.relu(self.norm(x, train, "norm1"))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _data(steps):
  key = jax.random.key(0)
  xs = jax.random.normal(key, (steps, B, 5, 5, 3)) * 2.0 + 0.3
  ys = jax.random.randint(jax.random.fold_in(key, 1), (steps, B), 0, 3)
  return xs, ys


def _train(model, record, steps=4):
  xs, ys = _data(steps)
  variables = model.init(jax.random.key(1), xs[0], train=False)
  tx = optax.sgd(0.1, momentum=0.9)
  opt = tx.init(variables["params"])

  def loss_fn(v, x, y):
    logits, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

  grad_fn = (recording.value_and_grad if record else mj.value_and_grad)(loss_fn)

  @jax.jit
  def step(variables, opt, x, y):
    out = grad_fn(variables, x, y)
    ((loss, new_vars), grads), stats = out if record else (out, {})
    updates, opt = tx.update(grads, opt, variables["params"])
    new_vars = {**new_vars, "params": optax.apply_updates(variables["params"], updates)}
    return new_vars, opt, loss, stats

  losses, history, states = [], [], [variables]
  for t in range(steps):
    variables, opt, loss, stats = step(variables, opt, xs[t], ys[t])
    losses.append(np.asarray(loss))
    history.append(jax.device_get(stats))
    states.append(variables)
  return np.stack(losses), history, states


@pytest.mark.parametrize("kind", ["flax_bn", "bn", "mabn"])
def test_recording_leaves_training_bitwise_identical(kind):
  model = Net(kind)
  plain, _, plain_states = _train(model, record=False)
  recorded, history, rec_states = _train(model, record=True)
  np.testing.assert_array_equal(recorded, plain)
  jax.tree.map(np.testing.assert_array_equal, rec_states[-1], plain_states[-1])
  # Same variable layout: nothing added by recording.
  assert jax.tree.structure(rec_states[-1]) == jax.tree.structure(plain_states[-1])
  groups = 1 if kind == "flax_bn" else B // NB
  names = recording.MABN_STATISTICS if kind == "mabn" else recording.BN_STATISTICS
  assert set(history[0]) == {"norm1"}
  for name in names:
    assert history[0]["norm1"][name].shape == (groups, 4)
  assert np.all(np.isfinite(np.stack([h["norm1"][names[-1]] for h in history])))


def _output_grad(variables, kind, y0, labels):
  """d loss / d y0 for the network after norm0 (norm0's output ``y0`` as its input)."""
  rest = Net(kind)
  drop = lambda tree: {k: v for k, v in tree.items() if k != "norm0"}
  base = {name: drop(tree) for name, tree in variables.items()}
  taps = base.pop(mj.BACKWARD_STATS, None)

  def loss_of(differentiable):
    y, tap_values = differentiable
    v = base if taps is None else {**base, mj.BACKWARD_STATS: tap_values}
    logits, _ = rest.apply(v, y, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad = jax.grad(loss_of)((jnp.asarray(y0, jnp.float32), taps))[0]
  return np.asarray(grad, np.float64)


def test_recorded_bn_statistics_equal_direct_computation():
  model = Net("bn", first_norm=True)
  xs, ys = _data(1)
  _, history, states = _train(model, record=True, steps=1)
  variables = states[0]
  x = np.asarray(xs[0], np.float64)
  groups = x.reshape(B // NB, NB, 5, 5, 3)
  mu = groups.mean(axis=(1, 2, 3))
  var = ((groups - mu[:, None, None, None]) ** 2).mean(axis=(1, 2, 3))
  xhat = (groups - mu[:, None, None, None]) / np.sqrt(var[:, None, None, None] + EPS)
  gamma = np.asarray(variables["params"]["norm0"]["scale"], np.float64)
  beta = np.asarray(variables["params"]["norm0"]["bias"], np.float64)
  y0 = (xhat * gamma + beta).reshape(x.shape)
  g_y = _output_grad(variables, "bn", y0, ys[0])
  g = (g_y * gamma).reshape(groups.shape)
  rec = history[0]["norm0"]
  np.testing.assert_allclose(rec["mu"], mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rec["var"], var, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rec["g"], g.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(rec["psi"], (xhat * g).mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-7)
  assert np.abs(rec["psi"]).max() > 1e-6  # a real signal, not zeros


def test_recorded_mabn_moving_averages_equal_direct_computation():
  steps = 4  # buffer 3, warmup 2: steps 1-3 use batch values, step 4 the SMAs
  model = Net("mabn", first_norm=True)
  xs, ys = _data(steps)
  _, history, states = _train(model, record=True, steps=steps)
  chi_rows, psi_rows = [], []
  for t in range(steps):
    x = np.asarray(xs[t], np.float64).reshape(B // NB, NB, 5, 5, 3)
    chi_batch = (x * x).mean(axis=(1, 2, 3))
    rec = history[t]["norm0"]
    np.testing.assert_allclose(rec["chi_batch"], chi_batch, rtol=1e-5)
    used_chi, used_psi = [], []
    for j in range(B // NB):
      chi_rows.append(chi_batch[j])
      psi_rows.append(np.asarray(rec["psi_batch"][j], np.float64))
      sma = t + 1 > 3 and t + 1 >= 2
      used_chi.append(np.mean(chi_rows[-3:], axis=0) if sma else chi_batch[j])
      used_psi.append(np.mean(psi_rows[-3:], axis=0) if sma else psi_rows[-1])
    np.testing.assert_allclose(rec["chi_used"], np.stack(used_chi), rtol=1e-5)
    np.testing.assert_allclose(rec["psi_used"], np.stack(used_psi), rtol=1e-5, atol=1e-8)
    # psi_batch is mean(xhat * g), g = gamma * g_y (r = 1), xhat = x / sqrt(chi_used + eps).
    variables = states[t]
    gamma = np.asarray(variables["params"]["norm0"]["scale"], np.float64)
    beta = np.asarray(variables["params"]["norm0"]["bias"], np.float64)
    xhat = x / np.sqrt(np.stack(used_chi)[:, None, None, None] + EPS)
    y0 = (xhat * gamma + beta).reshape(xs[t].shape)
    g_y = _output_grad(variables, "mabn", y0, ys[t])
    g = (g_y * gamma).reshape(x.shape)
    np.testing.assert_allclose(
      rec["psi_batch"], (xhat * g).mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-7
    )
