"""The NNX training contract: mj.nnx.value_and_grad under nnx.jit (graph and
tree mode) and pmap (axis_name), with nnx.Optimizer, against the float64 MABN
reference, and its errors (plain nnx.grad, a shared layer, inference mode,
wrong shapes)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mabn_jax as mj
from mabn_reference import MABNReference

C = 5


class Net(nnx.Module):
  """CenteredDense -> MABN -> Linear, the README's shape of a network."""

  def __init__(self, *, rngs, **mabn_kwargs):
    self.dense = mj.nnx.CenteredDense(3, C, use_bias=False, rngs=rngs)
    self.norm = mj.nnx.MABN(C, **mabn_kwargs, rngs=rngs)
    self.head = nnx.Linear(C, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.dense(x))))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _data(t, n=8):
  rng = np.random.default_rng(t)
  return (
    jnp.asarray(rng.normal(size=(n, 3)) * (1 + 0.3 * t), jnp.float32),
    jnp.asarray(rng.normal(size=(n, 1)), jnp.float32),
  )


KW = dict(buffer_size=3, warmup_steps=2, renorm_start=4, r_max=1.5, norm_batch_size=2)


def _train(graph: bool, jit: bool, steps=6):
  model = Net(rngs=nnx.Rngs(0), **KW)
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

  def train_step(model, optimizer, x, y):
    loss, grads = mj.nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  if jit:
    train_step = nnx.jit(train_step, graph=graph)
  losses = [float(train_step(model, optimizer, *_data(t))) for t in range(steps)]
  return model, optimizer, losses


def _values(tree):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(tree))}


def test_jit_graph_mode_and_tree_mode_equal_eager_training():
  eager, _, eager_losses = _train(graph=True, jit=False)
  for graph in (True, False):
    model, _, losses = _train(graph=graph, jit=True)
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
    chex.assert_trees_all_close(_values(model), _values(eager), rtol=1e-5, atol=1e-6)
  assert int(model.norm.step[...]) == 6
  assert np.abs(_values(model)[("norm", "psi_buffer")]).max() > 0
  np.testing.assert_array_equal(model.norm.psi_increment[...], 0.0)


def test_grads_are_the_param_state_that_nnx_optimizer_takes():
  model = Net(rngs=nnx.Rngs(0), **KW)
  loss, grads = mj.nnx.value_and_grad(_loss)(model, *_data(0))
  params = nnx.state(model, nnx.Param)
  chex.assert_trees_all_equal_structs(
    jax.tree.map(jnp.shape, grads), jax.tree.map(jnp.shape, params)
  )
  assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(grads))

  def with_aux(model, x, y):
    loss = _loss(model, x, y)
    return loss, {"twice": 2 * loss}

  (loss_aux, aux), _ = mj.nnx.value_and_grad(with_aux, has_aux=True)(
    Net(rngs=nnx.Rngs(0), **KW), *_data(0)
  )
  np.testing.assert_allclose(aux["twice"], 2 * loss_aux, rtol=1e-6)
  np.testing.assert_allclose(loss_aux, loss, rtol=1e-6)


class Probe(nnx.Module):
  """MABN after a zero 'input' parameter, so that grads include d loss / d x."""

  def __init__(self, shape, norm_batch_size):
    self.input = nnx.Param(jnp.zeros(shape))
    self.norm = mj.nnx.MABN(
      C,
      buffer_size=3,
      warmup_steps=4,
      renorm_start=6,
      r_max=1.3,
      momentum=0.9,
      norm_batch_size=norm_batch_size,
      rngs=nnx.Rngs(0),
    )

  def __call__(self, x):
    return self.norm(x + self.input[...])


@pytest.mark.parametrize("norm_batch_size", [None, 2])
def test_nnx_mabn_matches_float64_reference_in_every_schedule_phase(norm_batch_size):
  shape, steps = (4, 3, 3, C), 10
  model = Probe(shape, norm_batch_size)
  gamma, beta = np.linspace(0.5, 1.5, C), np.linspace(-0.2, 0.2, C)
  model.norm.scale[...] = jnp.asarray(gamma, jnp.float32)
  model.norm.bias[...] = jnp.asarray(beta, jnp.float32)
  ref = MABNReference(C, 3, 4, 6, 1.3, 0.9, 1e-5, norm_batch_size)
  step = nnx.jit(
    mj.nnx.value_and_grad(lambda m, x, gy: (lambda y: (jnp.sum(y * gy), y))(m(x)), has_aux=True)
  )
  rng = np.random.default_rng(0)
  tol = dict(rtol=2e-4, atol=2e-5)
  for t in range(steps):
    x, gy = rng.normal(size=shape) * (1.0 + 0.4 * t), rng.normal(size=shape)
    (_, y), grads = step(model, jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32))
    y_ref, gx_ref, gg_ref, gb_ref = ref.train_step(x, gy, gamma, beta)
    np.testing.assert_allclose(y, y_ref, **tol, err_msg=f"y at step {t + 1}")
    np.testing.assert_allclose(grads["input"][...], gx_ref, **tol, err_msg=f"gx at {t + 1}")
    np.testing.assert_allclose(grads["norm"]["scale"][...], gg_ref, **tol)
    np.testing.assert_allclose(grads["norm"]["bias"][...], gb_ref, **tol)
    for name, value in ref.state().items():
      np.testing.assert_allclose(
        getattr(model.norm, name)[...], value, **tol, err_msg=f"{name} at step {t + 1}"
      )


def test_plain_nnx_grad_through_training_mabn_raises_naming_value_and_grad():
  model = Net(rngs=nnx.Rngs(0), **KW)
  with pytest.raises(ValueError, match=r"MABN.*not being fed.*mabn_jax.nnx.value_and_grad"):
    nnx.grad(_loss)(model, *_data(0))


def test_mabn_called_twice_in_one_step_raises_naming_the_layer():
  class Shared(nnx.Module):
    def __init__(self):
      self.norm = mj.nnx.MABN(C, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.norm(x) + self.norm(2 * x)

  with pytest.raises(
    ValueError,
    match=r"mabn_jax.nnx.MABN\(num_features=5\).*second "
    r"time in training mode.*one layer instance per call",
  ):
    mj.nnx.value_and_grad(lambda m, x: jnp.sum(m(x)))(Shared(), jnp.ones((4, C)))


def test_bridged_mabn_called_twice_in_one_step_raises():
  bridged = nnx.bridge.ToNNX(mj.MABN(use_running_average=False), rngs=nnx.Rngs(0))
  bridged = bridged.lazy_init(jnp.ones((4, C)))

  def loss(model, x):
    return jnp.sum(model(x, mutable=["batch_stats"]) + model(2 * x, mutable=["batch_stats"]))

  with pytest.raises(ValueError, match=r"MABN.*second time in training mode"):
    mj.nnx.value_and_grad(loss)(bridged, jnp.ones((4, C)))


def test_training_step_in_eval_mode_raises_and_nnx_grad_fine_tunes_frozen():
  model = Net(rngs=nnx.Rngs(0), **KW)
  model.eval()
  with pytest.raises(ValueError, match=r"MABN.*use_running_average=True.*nnx.value_and_grad"):
    mj.nnx.value_and_grad(_loss)(model, *_data(0))
  before = _values(nnx.state(model, nnx.BatchStat))
  grads = nnx.grad(_loss)(model, *_data(0))
  chex.assert_trees_all_equal(_values(nnx.state(model, nnx.BatchStat)), before)
  assert float(jnp.abs(grads["norm"]["bias"][...]).sum()) > 0


def test_wrong_feature_count_and_bad_configuration_name_the_layer():
  norm = mj.nnx.MABN(C, rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"MABN\(num_features=5\): expected 5 features on "
    r"axis 1.*got 7",
  ):
    norm(jnp.ones((4, 7)))
  with pytest.raises(ValueError, match=r"MABN\(num_features=5\): buffer_size must be"):
    mj.nnx.MABN(C, buffer_size=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"BatchRenorm\(num_features=5\): r_max must be >= 1"):
    mj.nnx.BatchRenorm(C, r_max=0.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"batch of 3 samples is not a multiple"):
    mj.nnx.BatchNorm(C, norm_batch_size=2, rngs=nnx.Rngs(0))(jnp.ones((3, C)))
  with pytest.raises(ValueError, match=r"CrossIterationConvNorm.*num_groups"):
    mj.nnx.CrossIterationConvNorm(
      2, C, (3, 3), group_history=True, norm_batch_size=1, rngs=nnx.Rngs(0)
    )
  with pytest.raises(ValueError, match=r"CenteredConv.*mask is not supported"):
    mj.nnx.CenteredConv(2, C, (3, 3), mask=jnp.ones((3, 3, 2, C)), rngs=nnx.Rngs(0))


def test_nonfinite_batch_keeps_the_state_and_counts_it():
  # 4 groups, 3 buffer rows: the non-finite group 0 is pushed out of the
  # buffers at once, and still no statistic moves.
  model = Net(rngs=nnx.Rngs(0), **KW)
  mj.nnx.value_and_grad(_loss)(model, *_data(0))
  before = _values(nnx.state(model.norm, nnx.BatchStat))
  x, y = _data(1)
  mj.nnx.value_and_grad(_loss)(model, x.at[0, 0].set(jnp.nan), y)
  after = _values(nnx.state(model.norm, nnx.BatchStat))
  assert int(after[("nonfinite_count",)]) == 1
  for path, value in before.items():
    if path != ("nonfinite_count",):
      np.testing.assert_array_equal(after[path], value, err_msg=str(path))


@pytest.mark.parametrize("layer", ["mabn", "bn"])
def test_pmap_with_axis_name_keeps_replicas_identical_and_equals_linen(layer):
  import flax.linen as nn
  from flax import traverse_util

  devices, cin = 4, 2
  make_norm = {
    "mabn": (lambda **kw: mj.MABN(**kw), lambda **kw: mj.nnx.MABN(C, **kw)),
    "bn": (lambda **kw: mj.BatchNorm(**kw), lambda **kw: mj.nnx.BatchNorm(C, **kw)),
  }
  kwargs = dict(
    axis_name="batch", **(dict(buffer_size=2, warmup_steps=1) if layer == "mabn" else {})
  )

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = mj.CenteredDense(C, use_bias=False, name="dense")(x)
      return make_norm[layer][0](use_running_average=False, name="norm", **kwargs)(y)

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.dense = mj.nnx.CenteredDense(cin, C, use_bias=False, rngs=rngs)
      self.norm = make_norm[layer][1](rngs=rngs, **kwargs)

    def __call__(self, x):
      return self.norm(self.dense(x))

  linen = Linen()
  variables = linen.init(jax.random.key(0), jnp.zeros((2, cin)))
  model = NNX(nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  for (_, *path), value in traverse_util.flatten_dict(dict(variables)).items():
    flat[tuple(path)][...] = value
  graphdef, state = nnx.split(model)

  def nnx_step(state, x):
    m = nnx.merge(graphdef, state)
    _, grads = mj.nnx.value_and_grad(lambda m, x: jnp.sum(m(x) ** 3))(m, x)
    return nnx.state(m), jax.lax.pmean(grads, "batch")

  def linen_step(v, x):
    def loss(v):
      y, mutated = linen.apply(v, x, mutable=["batch_stats"])
      return jnp.sum(y**3), mutated

    (_, v), grads = mj.value_and_grad(loss)(v)
    return v, jax.lax.pmean(grads, "batch")

  replicate = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (devices,) + a.shape), tree)
  state, variables = replicate(state), replicate(variables)
  rng = np.random.default_rng(0)
  for _ in range(3):
    xs = jnp.asarray(rng.normal(size=(devices, 2, cin)), jnp.float32)
    state, grads = jax.pmap(nnx_step, axis_name="batch")(state, xs)
    variables, linen_grads = jax.pmap(linen_step, axis_name="batch")(variables, xs)
  stats = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}
  for (_, *path), value in traverse_util.flatten_dict(dict(variables)).items():
    np.testing.assert_array_equal(stats[tuple(path)], value, err_msg=str(path))
    np.testing.assert_array_equal(value, np.broadcast_to(value[0], value.shape))
  grads = dict(nnx.to_flat_state(grads))
  for path, value in traverse_util.flatten_dict(dict(linen_grads)).items():
    np.testing.assert_array_equal(grads[path][...], value, err_msg=str(path))
