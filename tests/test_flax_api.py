"""The layers take Flax's BatchNorm API in full (linen and NNX).

Every constructor and call argument of ``flax.linen.BatchNorm`` and
``nnx.BatchNorm`` exists on the layers with Flax's meaning: where Flax's
layer runs, ours gives the same bits (outputs and statistics).
"""

from __future__ import annotations

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes

import mabn_jax as mj

C = 3
LINEN = {
  "bn": lambda **kw: mj.BatchNorm(**kw),
  "brn": lambda **kw: mj.BatchRenorm(**kw),
  "mabn": lambda **kw: mj.MABN(**kw),
  "frozen_bn": lambda **kw: mj.FrozenBatchNorm(**kw),
}
NNX = {
  "bn": mj.nnx.BatchNorm,
  "brn": mj.nnx.BatchRenorm,
  "mabn": mj.nnx.MABN,
  "frozen_bn": mj.nnx.FrozenBatchNorm,
}


def _x(shape=(8, 4, C), seed=0, offset=3.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * 2.0 + offset, dtype)


def _init_linen(module, x):
  return module.init(jax.random.key(0), x, use_running_average=False)


def _train_linen(module, variables, x, **kwargs):
  return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"], **kwargs)


def _assert_equal_trees(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


# Signatures.


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_layers_have_every_field_and_call_argument_of_flax_batchnorm(name):
  ours = LINEN[name]()
  fields = {f.name for f in dataclasses.fields(ours)}
  assert {f.name for f in dataclasses.fields(nn.BatchNorm)} - {"parent", "name"} <= fields
  flax_call = inspect.signature(nn.BatchNorm.__call__).parameters
  our_call = inspect.signature(type(ours).__call__).parameters
  assert set(flax_call) <= set(our_call)
  assert our_call["mask"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_layers_have_every_argument_of_nnx_batchnorm(name):
  flax_init = inspect.signature(nnx.BatchNorm.__init__).parameters
  our_init = inspect.signature(NNX[name].__init__).parameters
  assert set(flax_init) <= set(our_init), set(flax_init) - set(our_init)
  flax_call = inspect.signature(nnx.BatchNorm.__call__).parameters
  assert set(flax_call) <= set(inspect.signature(NNX[name].__call__).parameters)
  assert set(inspect.signature(nnx.BatchNorm.set_view).parameters) <= set(
    inspect.signature(NNX[name].set_view).parameters
  )


def test_cross_iteration_layers_take_mask_none_and_nnx_view():
  assert "mask" in inspect.signature(mj.nnx.CrossIterationConvNorm.__call__).parameters
  assert (
    "use_running_average" in inspect.signature(mj.nnx.CrossIterationConvNorm.set_view).parameters
  )


# Statistics options: mask, use_fast_variance, force_float32_reductions.


def test_linen_mask_restricts_the_statistics_exactly_as_flax():
  x = _x()
  mask = jnp.asarray(np.random.default_rng(1).random((8, 4, 1)) > 0.4)
  x = jnp.where(mask, x, jnp.nan)  # masked positions must not reach the statistics
  v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x, mask=mask)
  y_flax, s_flax = _train_linen(nn.BatchNorm(), v, x, mask=mask)
  y_ours, s_ours = _train_linen(mj.BatchNorm(), v, x, mask=mask)
  np.testing.assert_array_equal(y_ours, y_flax)
  _assert_equal_trees(s_ours, s_flax)
  assert np.all(np.isfinite(s_ours["batch_stats"]["mean"]))


def test_nnx_mask_restricts_the_statistics_exactly_as_flax():
  x, mask = _x(), jnp.asarray(np.random.default_rng(2).random((8, 4, 1)) > 0.5)
  theirs = nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  ours = mj.nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours(x, mask=mask), theirs(x, mask=mask))
  np.testing.assert_array_equal(ours.mean[...], theirs.mean[...])
  np.testing.assert_array_equal(ours.var[...], theirs.var[...])


def test_batch_renorm_mask_of_whole_samples_equals_the_step_on_those_samples():
  x = _x(seed=3)
  rows = np.array([True, False, True, True, False, True, False, True])
  module = mj.BatchRenorm()
  v = _init_linen(module, x)
  _, masked = _train_linen(module, v, x, mask=jnp.asarray(rows)[:, None, None])
  _, subset = _train_linen(module, v, x[rows])
  for name in ("mean", "var", "step"):
    np.testing.assert_allclose(
      masked["batch_stats"][name], subset["batch_stats"][name], rtol=1e-6, atol=1e-6
    )
  ref = mj.nnx.BatchRenorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  ref(x, mask=jnp.asarray(rows)[:, None, None])
  np.testing.assert_allclose(ref.mean[...], masked["batch_stats"]["mean"], rtol=1e-6)


def test_mask_none_works_on_every_layer_and_a_mask_is_rejected_where_it_does_not_apply():
  x = _x((8, C))
  for name, make in LINEN.items():
    module = make()
    v = _init_linen(module, x)
    _train_linen(module, v, x, mask=None)
    if name == "mabn":
      with pytest.raises(ValueError, match=r"MABN.*mask is not supported"):
        _train_linen(module, v, x, mask=jnp.ones((8, 1), bool))
  layer = mj.nnx.MABN(C, use_running_average=False, rngs=nnx.Rngs(0))
  layer(x, mask=None)
  with pytest.raises(ValueError, match=r"MABN\(num_features=3\).*mask is not supported"):
    layer(x, mask=jnp.ones((8, 1), bool))


@pytest.mark.parametrize("fast", [True, False])
def test_use_fast_variance_equals_flax_in_linen_and_nnx(fast):
  x = _x(offset=300.0)  # a large mean: the one-pass variance loses digits
  v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  y_flax, s_flax = _train_linen(nn.BatchNorm(use_fast_variance=fast), v, x)
  y_ours, s_ours = _train_linen(mj.BatchNorm(use_fast_variance=fast), v, x)
  np.testing.assert_array_equal(y_ours, y_flax)
  _assert_equal_trees(s_ours, s_flax)
  theirs = nnx.BatchNorm(C, use_fast_variance=fast, rngs=nnx.Rngs(0))
  ours = mj.nnx.BatchNorm(C, use_fast_variance=fast, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours(x), theirs(x))
  np.testing.assert_array_equal(ours.var[...], theirs.var[...])


def test_two_pass_variance_differs_from_the_one_pass_one_at_a_large_mean():
  x = _x(offset=3000.0)
  v = _init_linen(mj.BatchNorm(), x)
  one = _train_linen(mj.BatchNorm(), v, x)[1]["batch_stats"]["var"]
  two = _train_linen(mj.BatchNorm(use_fast_variance=False), v, x)[1]["batch_stats"]["var"]
  exact = 0.99 + 0.01 * np.var(np.asarray(x, np.float64), axis=(0, 1))
  assert np.abs(two - exact).max() <= np.abs(one - exact).max()


def test_force_float32_reductions_false_equals_flax_and_keeps_statistics_in_param_dtype():
  x = _x(dtype=jnp.float16)
  kw = dict(force_float32_reductions=False, param_dtype=jnp.float16)
  v = nn.BatchNorm(use_running_average=False, **kw).init(jax.random.key(0), x)
  ours_v = mj.BatchNorm(use_running_average=False, **kw).init(jax.random.key(0), x)
  _assert_equal_trees(ours_v, v)
  assert ours_v["batch_stats"]["mean"].dtype == jnp.float16
  y_flax, s_flax = _train_linen(nn.BatchNorm(**kw), v, x)
  y_ours, s_ours = _train_linen(mj.BatchNorm(**kw), v, x)
  np.testing.assert_array_equal(y_ours, y_flax)
  _assert_equal_trees(s_ours, s_flax)
  layer = mj.nnx.BatchNorm(C, rngs=nnx.Rngs(0), **kw)
  assert layer.mean[...].dtype == jnp.float16


@pytest.mark.parametrize(
  "option", [dict(use_fast_variance=False), dict(force_float32_reductions=False)]
)
def test_flax_options_a_method_does_not_use_are_rejected_when_changed(option):
  x = _x((8, C))
  with pytest.raises(ValueError, match=f"MABN.*{next(iter(option))}"):
    mj.MABN(use_running_average=False, **option).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=f"MABN.*{next(iter(option))}"):
    mj.nnx.MABN(C, rngs=nnx.Rngs(0), **option)


# Complex inputs, rank-1 inputs and tuple axes.


def test_complex_inputs_keep_complex_statistics_as_flax():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(8, 4, C)) + 1j * rng.normal(size=(8, 4, C)) + 2, jnp.complex64)
  v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  y_flax, s_flax = _train_linen(nn.BatchNorm(dtype=jnp.complex64), v, x)
  y_ours, s_ours = _train_linen(mj.BatchNorm(dtype=jnp.complex64), v, x)
  np.testing.assert_array_equal(y_ours, y_flax)
  _assert_equal_trees(s_ours, s_flax)
  assert s_ours["batch_stats"]["mean"].dtype == jnp.complex64
  assert s_ours["batch_stats"]["var"].dtype == jnp.float32
  # The variance is that of |x - mean|: the output has unit variance.
  np.testing.assert_allclose(np.var(np.asarray(y_ours), axis=(0, 1)), 1.0, rtol=1e-4)
  y_eval = mj.BatchNorm(use_running_average=True).apply({**v, **s_ours}, x)
  np.testing.assert_array_equal(
    y_eval, nn.BatchNorm(use_running_average=True).apply({**v, **s_flax}, x)
  )
  theirs = nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  ours = mj.nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours(x), theirs(x))
  np.testing.assert_array_equal(ours.mean[...], theirs.mean[...])


def test_complex_inputs_are_rejected_by_methods_without_them():
  x = jnp.ones((8, C), jnp.complex64)
  with pytest.raises(ValueError, match=r"MABN.*complex inputs"):
    mj.MABN(use_running_average=False).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"BatchRenorm.*complex inputs"):
    mj.nnx.BatchRenorm(C, use_running_average=False, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize(
  "shape, axis",
  [((C,), -1), ((4, 5, C), (1, 2)), ((4, 5, C), (-1,)), ((5, 4, C), 0), ((6, 5, 4, C), (1, 3))],
)
def test_rank_one_inputs_and_tuple_axes_equal_flax(shape, axis):
  x = _x(shape, seed=5)
  v = nn.BatchNorm(use_running_average=False, axis=axis).init(jax.random.key(0), x)
  ours_v = mj.BatchNorm(use_running_average=False, axis=axis).init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, ours_v) == jax.tree_util.tree_map(jnp.shape, v)
  for step in range(2):
    xs = x * (1.0 + step)
    y_flax, s_flax = _train_linen(nn.BatchNorm(axis=axis), v, xs)
    y_ours, s_ours = _train_linen(mj.BatchNorm(axis=axis), v, xs)
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_ours, s_flax)
    v = {**v, **s_flax}
  y_eval = mj.BatchNorm(use_running_average=True, axis=axis).apply(v, x)
  np.testing.assert_allclose(
    y_eval, nn.BatchNorm(use_running_average=True, axis=axis).apply(v, x), rtol=1e-6, atol=1e-6
  )
  axes = (axis,) if isinstance(axis, int) else axis
  features = int(np.prod([shape[a] for a in axes]))
  ours = mj.nnx.BatchNorm(features, axis=axis, rngs=nnx.Rngs(0))
  if len(axes) == 1:
    theirs = nnx.BatchNorm(features, axis=axis, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours(x), theirs(x))
    np.testing.assert_array_equal(ours.var[...], theirs.var[...])
  else:  # nnx.BatchNorm cannot update (C,) statistics from several axes; linen can
    y_linen, s_linen = _train_linen(
      mj.BatchNorm(axis=axis), _init_linen(mj.BatchNorm(axis=axis), x), x
    )
    np.testing.assert_array_equal(ours(x), y_linen)
    np.testing.assert_array_equal(ours.var[...], s_linen["batch_stats"]["var"].reshape(-1))


def test_a_batch_axis_feature_with_normalization_groups_is_an_error_naming_the_layer():
  with pytest.raises(ValueError, match=r"BatchNorm.*includes the batch axis 0.*norm_batch_size=2"):
    mj.BatchNorm(use_running_average=False, axis=(0, 2), norm_batch_size=2).init(
      jax.random.key(0), _x((4, 5, C))
    )


def test_nnx_tuple_axis_checks_the_number_of_features():
  with pytest.raises(ValueError, match=r"expected 7 features on axis \(1, 2\).*got 15"):
    mj.nnx.BatchNorm(7, axis=(1, 2), rngs=nnx.Rngs(0))(_x((4, 5, C)))


# NNX: promote_dtype, metadata, view, tabulate, tree-mode grad, StateAxes.


def test_nnx_promote_dtype_gives_nnx_batchnorm_bits_and_none_the_linen_rule():
  x = _x((8, C), dtype=jnp.float32)
  kw = dict(dtype=jnp.float16, use_running_average=False, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(C, **kw)
  ours = mj.nnx.BatchNorm(C, promote_dtype=dtypes.promote_dtype, **kw)
  np.testing.assert_array_equal(ours(x), theirs(x))
  np.testing.assert_array_equal(ours.var[...], theirs.var[...])
  theirs.eval(), ours.eval()
  np.testing.assert_array_equal(ours(x), theirs(x))
  plain = mj.nnx.BatchNorm(C, **{**kw, "rngs": nnx.Rngs(0)})
  v = mj.BatchNorm(dtype=jnp.float16).init(jax.random.key(0), x, use_running_average=False)
  y_linen, _ = _train_linen(mj.BatchNorm(dtype=jnp.float16), v, x)
  np.testing.assert_array_equal(plain(x), y_linen)


def test_nnx_scale_and_bias_metadata_reach_the_params():
  layer = mj.nnx.MABN(C, scale_metadata={"tag": "s"}, bias_metadata={"tag": "b"}, rngs=nnx.Rngs(0))
  assert layer.scale.get_metadata()["tag"] == "s"
  assert layer.bias.get_metadata()["tag"] == "b"


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.bn = mj.nnx.BatchNorm(C, rngs=rngs)
    self.mabn = mj.nnx.MABN(C, rngs=rngs)
    self.cbn = mj.nnx.CrossIterationConvNorm(C, C, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.mabn(self.bn(x))


def test_nnx_view_sets_the_mode_and_view_info_lists_the_layers():
  block = _Block(nnx.Rngs(0))
  view = nnx.view(block, use_running_average=True)
  assert view.bn.use_running_average and view.mabn.use_running_average
  assert view.cbn.use_running_average
  assert block.bn.use_running_average is False  # the original is untouched
  info = nnx.view_info(block)
  for name in ("BatchNorm:", "MABN:", "CrossIterationConvNorm:"):
    assert name in info
  assert "use_running_average" in info


def _methods(classes):
  """What every method name of ``classes`` resolves to."""
  return {
    (c, name): getattr(c, name)
    for c in classes
    for name in dir(c)
    if inspect.isfunction(getattr(c, name))
  }


def test_nnx_tabulate_lists_the_layers_and_leaves_no_class_patched():
  block = _Block(nnx.Rngs(0))
  classes = (mj.nnx.BatchNorm, mj.nnx.MABN, type(block))
  before = _methods(classes)
  table = nnx.tabulate(block, _x((8, C)), console_kwargs=dict(width=250, force_terminal=False))
  assert _methods(classes) == before
  assert "BatchNorm" in table and "MABN" in table
  assert "functional" not in table and "initial_state" not in table


def test_linen_tabulate_lists_no_helper_method_and_computes_flops():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = mj.BatchNorm(use_running_average=False)(x)
      return mj.MABN(use_running_average=False)(x)

  table = Net().tabulate(
    jax.random.key(0), _x((8, C)), compute_flops=True, console_kwargs=dict(width=250)
  )
  rows = [line for line in table.splitlines() if "BatchNorm" in line or "MABN" in line]
  assert len(rows) == 2, table
  for helper in ("functional", "config", "make_config", "sow", "resolve"):
    assert helper not in table
  assert "flops" in table


def test_nnx_tree_mode_grad_over_a_whole_model_with_batchnorm():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(2, C, rngs=rngs)
      self.bn = mj.nnx.BatchNorm(C, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(x))

  model = Net(nnx.Rngs(0))
  x = _x((4, 2))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), graph=False)(model)
  assert np.abs(np.asarray(grads.linear.kernel[...])).max() > 0
  # The statistics' written values carry no gradient.
  np.testing.assert_array_equal(grads.bn.mean[...], 0.0)


@pytest.mark.parametrize("counted", [False, True])
def test_nnx_hand_built_state_axes_vmap_an_ensemble(counted):
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return mj.nnx.BatchNorm(C, use_running_average=False, count_nonfinite=counted, rngs=rngs)

  ensemble = make(nnx.Rngs(0))
  axes = nnx.StateAxes({nnx.Param: 0, nnx.BatchStat: 0})

  @nnx.vmap(in_axes=(axes, None), out_axes=0)
  def forward(model, x):
    return model(x)

  y = forward(ensemble, _x((8, C)))
  assert y.shape == (3, 8, C)
  assert ensemble.mean[...].shape == (3, C)
  assert hasattr(ensemble, "nonfinite_count") == counted


def test_statistic_writes_carry_no_gradient_in_linen_and_nnx():
  x = _x((8, C))
  module = mj.BatchNorm()
  v = module.init(jax.random.key(0), x, use_running_average=False)
  g = jax.grad(lambda x: jnp.sum(_train_linen(module, v, x)[1]["batch_stats"]["mean"]))(x)
  np.testing.assert_array_equal(g, 0.0)
  layer = mj.nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))

  def written(layer, x):
    layer(x)
    return jnp.sum(layer.mean[...])

  np.testing.assert_array_equal(nnx.grad(written, argnums=1)(layer, x), 0.0)
  assert np.abs(np.asarray(layer.mean[...])).min() > 0  # the write happened


def test_nnx_training_with_mutable_array_variables():
  with nnx.var_defaults(hijax=True):
    model = mj.nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  x = _x((8, C))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    layer = nnx.merge(graphdef, params, rest)
    return jnp.sum(layer(x) ** 2)

  jax.jit(jax.grad(loss))(nnx.with_vars(params, hijax=False))
  assert np.abs(np.asarray(model.mean[...])).min() > 0  # the step updated the statistics


# Variables saved from Flax's BatchNorm.


def test_flax_batchnorm_variables_apply_in_eval_and_train_keeping_their_structure():
  x = _x()
  v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  _, trained = _train_linen(nn.BatchNorm(), v, x)
  v = {**v, **trained}
  for module in (mj.BatchNorm(), mj.BatchNorm(count_nonfinite=True), mj.FrozenBatchNorm()):
    np.testing.assert_array_equal(
      module.apply(v, x, use_running_average=True),
      nn.BatchNorm().apply(v, x, use_running_average=True),
    )
  y_ours, s_ours = _train_linen(mj.BatchNorm(count_nonfinite=True), v, x * 2)
  y_flax, s_flax = _train_linen(nn.BatchNorm(), v, x * 2)
  np.testing.assert_array_equal(y_ours, y_flax)
  _assert_equal_trees(s_ours, s_flax)  # no counter added: Flax's structure
  _, s_nan = _train_linen(mj.BatchNorm(), v, x.at[0, 0, 0].set(jnp.nan))
  _assert_equal_trees(s_nan, {"batch_stats": v["batch_stats"]})  # the step is skipped


def test_nnx_batchnorm_state_loads_into_ours():
  x = _x()
  theirs = nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0))
  theirs(x)
  ours = mj.nnx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(1))
  nnx.update(ours, nnx.state(theirs))
  theirs.eval(), ours.eval()
  np.testing.assert_array_equal(ours(x), theirs(x))


def test_precise_bn_sets_statistics_of_several_feature_axes_in_their_shape():
  x = _x((6, 5, C), seed=7)
  module = mj.BatchNorm(axis=(1, 2))
  v = _init_linen(module, x)
  new = mj.recompute_batch_stats(module.apply, v, [x], use_running_average=False)
  assert new["batch_stats"]["var"].shape == (5, C)
  np.testing.assert_allclose(new["batch_stats"]["mean"], np.mean(x, axis=0), rtol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"], np.var(x, axis=0), rtol=1e-4)
