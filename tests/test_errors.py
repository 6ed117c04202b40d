"""Bad input gets a clear error: layer path, expected and given value, at trace time.

Every check runs under ``jax.eval_shape``, which only traces: an error raised
there depends on shapes and static configuration alone, never on values.
Covers mj.MABN, mj.BatchNorm, mj.BatchRenorm, mj.CrossIterationConvNorm and
every registry name.
"""

from __future__ import annotations

import dataclasses
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import mabn_jax as mj
from mabn_jax.functional import mabn as F_mabn

C = 4
SHAPE = (4, 5, 5, C)  # (N, H, W, C)
KEY = jax.random.key(0)

# The layers, built with small, valid settings; each takes extra fields.
LAYERS = {
  "MABN": lambda **kw: mj.MABN(**{"buffer_size": 2, "warmup_steps": 1, **kw}),
  "BatchNorm": lambda **kw: mj.BatchNorm(**kw),
  "BatchRenorm": lambda **kw: mj.BatchRenorm(**kw),
  "CBN": lambda **kw: mj.CrossIterationConvNorm(
    **{"features": C, "kernel_size": (3, 3), "burn_in": 1, "window": 2, **kw}
  ),
}
BATCH_STAT_NAMES = ("bn", "syncbn", "brn", "mabn", "cbn", "cbn_naive", "frozen_bn")
PER_SAMPLE_NAMES = ("gn", "ln", "in", "ws_gn", "frn", "none")


class Net(nn.Module):
  """A layer as the child 'layer', so error messages carry a nested path."""

  layer: nn.Module

  @nn.compact
  def __call__(self, x, train: bool):
    return self.layer(x, use_running_average=not train)


class RegistryNet(nn.Module):
  normalizer: mj.Normalizer

  @nn.compact
  def __call__(self, x, train: bool):
    return self.normalizer.conv_norm(C, 3, name="block")(x, train=train)


def _init_shape(model, shape, train=True):
  """Traces ``model.init`` (no computation): raises the trace-time errors."""
  return jax.eval_shape(lambda x: model.init(KEY, x, train=train), jnp.zeros(shape))


def _apply_shape(model, variables, shape):
  return jax.eval_shape(
    lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, jnp.zeros(shape)
  )


def _raises(fn, *fragments, error=ValueError):
  """Calls ``fn``; asserts it raises ``error`` whose message has every fragment."""
  with pytest.raises(error) as info:
    fn()
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def test_every_layer_and_registry_name_is_covered():
  assert set(mj.normalizer_names()) == set(BATCH_STAT_NAMES) | set(PER_SAMPLE_NAMES)
  assert hasattr(mj, "CrossIterationConvNorm")


@pytest.mark.parametrize("kind", LAYERS)
def test_wrong_rank_names_layer_expected_and_given_rank(kind):
  model = Net(LAYERS[kind]())
  if kind == "CBN":  # a 2-D conv: rank 4 expected
    _raises(lambda: _init_shape(model, (4, 5, C)), "'layer", "rank 4", "(4, 5, 4)")
  else:
    # A rank-1 input is one sample (as in flax.linen.BatchNorm); rank 0 has no features.
    _raises(lambda: _init_shape(model, ()), "'layer'", "rank >= 1", "got rank 0")


@pytest.mark.parametrize("kind", ["MABN", "BatchNorm", "BatchRenorm"])
def test_channel_count_differing_from_initialization_names_both_shapes(kind):
  model = Net(LAYERS[kind]())
  variables = _init_shape(model, SHAPE)
  _raises(
    lambda: _apply_shape(model, variables, SHAPE[:-1] + (C + 2,)),
    f"{kind} 'layer'",
    f"({C},)",
    f"({C + 2},)",
  )


@pytest.mark.parametrize("name", mj.normalizer_names())
def test_conv_input_channels_differing_from_initialization_name_the_conv(name):
  # The conv's kernel is checked first (by Flax): path '/block/conv' and both shapes.
  kw = {"num_groups": 2} if name in ("gn", "ws_gn") else {}
  model = RegistryNet(mj.make_normalizer(name, **kw))
  variables = _init_shape(model, SHAPE)
  wrong = SHAPE[:-1] + (C + 2,)
  fn = lambda: jax.eval_shape(
    lambda v, x: model.apply(v, x, train=True, mutable=True), variables, jnp.zeros(wrong)
  )
  _raises(
    fn,
    "/block/conv",
    f"(3, 3, {C + 2}, {C})",
    f"(3, 3, {C}, {C})",
    error=flax.errors.ScopeParamShapeError,
  )


def test_cbn_output_channels_are_fixed_by_features_so_state_shape_is_checked():
  # CBN's own channel count is ``features``; its stored state is checked
  # against the kernel it was initialized with (here a state with 2 channels).
  model = Net(LAYERS["CBN"]())
  variables = _init_shape(model, SHAPE)
  stats = flax.core.unfreeze(variables["batch_stats"])
  stats["layer"]["norm"]["mean"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  _raises(
    lambda: _apply_shape(model, {**variables, "batch_stats": stats}, SHAPE),
    "'layer",
    "'mean'",
    "(2,)",
    f"({C},)",
  )


@pytest.mark.parametrize("kind", ["MABN", "BatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("axis", [4, -5, 0])
def test_axis_out_of_range_or_batch_axis_with_groups_is_rejected(kind, axis):
  # The batch axis may be a feature axis (as in Flax) unless it is split into groups.
  model = Net(LAYERS[kind](axis=axis, norm_batch_size=2))
  expected = "includes the batch axis 0" if axis == 0 else "[-4, 3]"
  _raises(lambda: _init_shape(model, SHAPE), "'layer'", f"axis {axis}", expected)


def test_cbn_has_no_axis_field_it_is_channels_last_like_flax_conv():
  fields = {f.name for f in dataclasses.fields(mj.CrossIterationConvNorm)}
  assert "axis" not in fields


@pytest.mark.parametrize("kind", LAYERS)
def test_batch_not_divisible_by_norm_batch_size_names_both_numbers(kind):
  model = Net(LAYERS[kind](norm_batch_size=3))
  variables = _init_shape(model, SHAPE)  # initialization takes any batch
  _raises(
    lambda: _apply_shape(model, variables, SHAPE),
    "'layer",
    "batch of 4 samples",
    "not a multiple",
    "norm_batch_size=3",
  )


@pytest.mark.parametrize("kind", LAYERS)
def test_batch_smaller_than_one_group_names_both_numbers(kind):
  model = Net(LAYERS[kind](norm_batch_size=8))
  variables = _init_shape(model, SHAPE)  # initialization takes any batch
  _raises(
    lambda: _apply_shape(model, variables, SHAPE),
    "'layer",
    "batch of 4 samples",
    "smaller than one",
    "norm_batch_size=8",
  )


@pytest.mark.parametrize("name", BATCH_STAT_NAMES)
def test_registry_group_size_errors_name_the_block(name):
  unmapped = {"axis_name": None} if name == "syncbn" else {}  # applied outside pmap
  model = RegistryNet(mj.make_normalizer(name, norm_batch_size=3, **unmapped))
  variables = _init_shape(model, SHAPE)  # initialization takes any batch
  _raises(lambda: _apply_shape(model, variables, SHAPE), "'block", "norm_batch_size=3")


@pytest.mark.parametrize("name", PER_SAMPLE_NAMES)
def test_registry_names_without_groups_reject_norm_batch_size(name):
  _raises(
    lambda: mj.make_normalizer(name, norm_batch_size=2), repr(name), "norm_batch_size", "valid ones"
  )


BAD_CONFIGS = [
  ("MABN", "buffer_size", 0, "an integer >= 1"),
  ("MABN", "momentum", 1.0, "in [0, 1)"),
  ("MABN", "momentum", -0.1, "in [0, 1)"),
  ("MABN", "epsilon", 0.0, "> 0"),
  ("MABN", "r_max", 0.5, ">= 1"),
  ("MABN", "warmup_steps", -1, "an integer >= 0"),
  ("MABN", "renorm_start", -1, "an integer >= 0"),
  ("BatchNorm", "momentum", 1.5, "in [0, 1]"),
  ("BatchNorm", "epsilon", -1e-3, ">= 0"),
  ("BatchRenorm", "momentum", -0.5, "in [0, 1]"),
  ("BatchRenorm", "epsilon", -1e-3, ">= 0"),
  ("BatchRenorm", "r_max", 0.5, ">= 1"),
  ("BatchRenorm", "d_max", -1.0, ">= 0"),
  ("BatchRenorm", "warmup_steps", -1, "an integer >= 0"),
  ("BatchRenorm", "ramp_steps", -1, "an integer >= 0"),
  ("CBN", "window", 0, "an integer >= 1"),
  ("CBN", "burn_in", -1, "an integer >= 0"),
  ("CBN", "momentum", 1.0, "in [0, 1)"),
  ("CBN", "epsilon", 0.0, "> 0"),
] + [(kind, "norm_batch_size", 0, "positive integer") for kind in LAYERS]


@pytest.mark.parametrize("kind,field,value,expected", BAD_CONFIGS)
def test_out_of_range_configuration_names_field_range_and_value(kind, field, value, expected):
  model = Net(LAYERS[kind](**{field: value}))
  _raises(lambda: _init_shape(model, SHAPE), "'layer", field, expected, repr(value))


REGISTRY_BAD = [
  ("mabn", "buffer_size", 0),
  ("mabn", "r_max", 0.5),
  ("mabn", "warmup_steps", -1),
  ("bn", "momentum", 2.0),
  ("syncbn", "epsilon", -1.0),
  ("brn", "r_max", 0.1),
  ("brn", "warmup_steps", -2),
  ("cbn", "window", 0),
  ("cbn_naive", "burn_in", -1),
]


@pytest.mark.parametrize("name,field,value", REGISTRY_BAD)
def test_registry_out_of_range_values_fail_at_trace_time_naming_the_block(name, field, value):
  model = RegistryNet(mj.make_normalizer(name, **{field: value}))
  _raises(lambda: _init_shape(model, SHAPE), "block", field, repr(value))


def test_unknown_registry_name_lists_the_valid_names():
  message = _raises(lambda: mj.make_normalizer("batchnorm"), "'batchnorm'")
  for name in mj.normalizer_names():
    assert re.search(rf"\b{name}\b", message)


# --- a training call through a layer in inference mode ---------------------


def _loss(model, train):
  def loss_fn(variables, x):
    y, mutated = model.apply(variables, x, train=train, mutable=["batch_stats"])
    return jnp.mean(jnp.square(y)), mutated

  return loss_fn


def test_mabn_training_step_in_inference_mode_is_a_trace_time_error():
  model = Net(LAYERS["MABN"]())
  variables = model.init(KEY, jnp.zeros(SHAPE), train=True)
  step = mj.value_and_grad(_loss(model, train=False))
  _raises(
    lambda: jax.eval_shape(step, variables, jnp.zeros(SHAPE)),
    "MABN 'layer'",
    "use_running_average=True",
    "statistics would not update",
  )


@pytest.mark.parametrize("kind", ["BatchNorm", "BatchRenorm", "CBN"])
def test_bn_like_training_step_in_inference_mode_trains_with_frozen_statistics(kind):
  """Documented behaviour: BN-like layers have no tap, so no guard.

  A step through them with ``use_running_average=True`` is fine-tuning with
  frozen statistics (common practice): the state, including the step
  counters, stays bit-for-bit unchanged and the gradients are those of the
  inference affine map.
  """
  model = Net(LAYERS[kind]())
  x = jax.random.normal(jax.random.key(1), SHAPE)
  variables = model.init(KEY, x, train=True)
  (_, new), grads = jax.jit(mj.value_and_grad(_loss(model, train=False)))(variables, x)
  for a, b in zip(
    jax.tree_util.tree_leaves(variables["batch_stats"]),
    jax.tree_util.tree_leaves(new["batch_stats"]),
    strict=True,
  ):
    assert (a == b).all()
  plain = jax.grad(lambda p: _loss(model, False)({**variables, "params": p}, x)[0])(
    variables["params"]
  )
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain), strict=True):
    assert jnp.allclose(a, b, rtol=1e-6, atol=1e-7)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("name", mj.normalizer_names())
def test_registry_training_step_with_train_false(name):
  """'mabn' raises (trace time); every other entry keeps its state unchanged."""
  kw = {"num_groups": 2} if name in ("gn", "ws_gn") else {}
  model = RegistryNet(mj.make_normalizer(name, **kw))
  if name == "syncbn":  # needs its mapped axis: trace under vmap
    wrap = lambda f: jax.vmap(f, in_axes=(None, 0), axis_name="batch")
    xs = jnp.ones((2,) + SHAPE)
  else:
    wrap = lambda f: f
    xs = jnp.ones(SHAPE)
  variables = model.init(KEY, jnp.ones(SHAPE), train=True)
  step = wrap(mj.value_and_grad(_loss(model, train=False)))
  if name == "mabn":
    _raises(
      lambda: jax.eval_shape(step, variables, xs), "MABN 'block/norm'", "use_running_average=True"
    )
    return
  (_, new), _ = step(variables, xs)
  before = jax.tree_util.tree_leaves(variables.get("batch_stats", {}))
  after = jax.tree_util.tree_leaves(new.get("batch_stats", {}))
  assert len(before) == len(after)
  for a, b in zip(before, after, strict=True):
    assert (jnp.broadcast_to(a, b.shape) == b).all()


# --- the MABN backward statistic must be fed ---------------------------------


def test_mabn_gradient_without_feeding_backward_statistic_names_layer_and_fix():
  # jax.grad on the params alone (the conv kernel before MABN is one of them):
  # the backward_stats tap is not differentiated, so Psi would be dropped.
  model = RegistryNet(mj.make_normalizer("mabn"))
  variables = _init_shape(model, SHAPE)

  def plain_loss(params, variables, x):
    y, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y)

  _raises(
    lambda: jax.eval_shape(jax.grad(plain_loss), variables["params"], variables, jnp.zeros(SHAPE)),
    "MABN 'block/norm'",
    "backward statistic is not being fed",
    "value_and_grad",
  )


def test_functional_mabn_without_tap_cannot_be_differentiated():
  state = F_mabn.init_state(C, buffer_size=2)
  loss = lambda x: jnp.sum(F_mabn.normalize_train(x, state, None)[0])
  _raises(
    lambda: jax.eval_shape(jax.grad(loss), jnp.zeros(SHAPE)),
    "MABN",
    "backward statistic is not being fed",
  )


def test_mabn_training_step_with_variables_missing_the_taps_makes_them():
  # E.g. variables restored from a checkpoint of only 'params'/'batch_stats',
  # or Flax's TrainState: value_and_grad makes the zero taps itself.
  model = RegistryNet(mj.make_normalizer("mabn"))
  variables = dict(_init_shape(model, SHAPE))
  del variables[mj.BACKWARD_STATS]
  step = mj.value_and_grad(_loss(model, train=True))
  (_, new_variables), _ = jax.eval_shape(step, variables, jnp.zeros(SHAPE))
  assert set(new_variables) == set(variables)

  # A model that passes its own variables without the taps is still told why.
  def own_loss(v, x):
    without_taps = {k: value for k, value in v.items() if k != mj.BACKWARD_STATS}
    return _loss(model, train=True)(without_taps, x)

  _raises(
    lambda: jax.eval_shape(mj.value_and_grad(own_loss), variables, jnp.zeros(SHAPE)),
    "MABN 'block/norm'",
    "backward statistic is not being fed",
    "lack the 'backward_stats' collection",
  )


@pytest.mark.parametrize("name", ["syncbn", "bn", "brn", "mabn", "cbn"])
def test_unbound_axis_name_in_a_training_step_names_the_layer(name):
  kw = {} if name == "syncbn" else {"axis_name": "batch"}
  model = RegistryNet(mj.make_normalizer(name, **kw))
  variables = model.init(KEY, jnp.ones(SHAPE), train=True)  # init needs no mapped axis
  _raises(
    lambda: jax.eval_shape(mj.value_and_grad(_loss(model, True)), variables, jnp.ones(SHAPE)),
    "'block",
    "axis_name 'batch' is not bound",
    "pmap",
  )
  # Inference uses the running statistics: no mapped axis needed.
  out = model.apply(
    {k: v for k, v in variables.items() if k != mj.BACKWARD_STATS}, jnp.ones(SHAPE), train=False
  )
  assert out.shape[0] == SHAPE[0]
