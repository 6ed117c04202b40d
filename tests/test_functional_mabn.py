"""Tests of the Flax-free MABN API in mabn_jax.functional.mabn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mabn_jax.functional import mabn
from mabn_reference import MABNReference


def test_functional_training_loop_matches_the_reference():
  config = mabn.MABNConfig(warmup_steps=2, renorm_start=3, r_max=1.5, norm_batch_size=2)
  state = mabn.init_state(num_features=4, buffer_size=2)
  ref = MABNReference(4, 2, 2, 3, 1.5, 0.98, 1e-5, 2)
  rng = np.random.default_rng(0)

  @jax.jit
  def step(x, gy, state):
    def loss(x, tap):
      out, new_state = mabn.normalize_train(x, state, tap, config)
      return jnp.sum(out * gy), (out, new_state)

    (_, (out, new_state)), (gx, dpsi) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x, jnp.zeros_like(state.psi_buffer)
    )
    return out, gx, new_state._replace(psi_buffer=new_state.psi_buffer + dpsi)

  for t in range(6):
    x = rng.normal(size=(4, 3, 4)) * (1 + t)
    gy = rng.normal(size=(4, 3, 4))
    out, gx, state = step(jnp.asarray(x, jnp.float32), jnp.asarray(gy, jnp.float32), state)
    y_ref, gx_ref, _, _ = ref.train_step(x, gy, np.ones(4), np.zeros(4))
    np.testing.assert_allclose(out, y_ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(gx, gx_ref, rtol=2e-4, atol=2e-5)
  for name, value in ref.state().items():
    np.testing.assert_allclose(getattr(state, name), value, rtol=2e-4, atol=2e-5)


def test_inference_scale_folds_into_a_per_channel_affine_map():
  chi = jnp.asarray([0.5, 2.0, 4.0])
  x = jnp.ones((2, 3))
  np.testing.assert_allclose(
    mabn.normalize_inference(x, chi, 1e-5), x * mabn.inference_scale(chi, 1e-5), rtol=1e-6
  )
  np.testing.assert_allclose(mabn.inference_scale(chi, 0.0) ** -2, chi, rtol=1e-6)


def test_schedule_predicates_follow_the_published_rules():
  steps = jnp.arange(1, 30)
  sma = np.asarray(mabn.uses_moving_averages(steps, 16, 10))
  assert not sma[:16].any() and sma[16:].all()  # from step max(m + 1, warmup) = 17
  sma = np.asarray(mabn.uses_moving_averages(steps, 4, 20))
  assert not sma[:19].any() and sma[19:].all()  # from step 20
  renorm = np.asarray(mabn.renormalizes(steps, 12, 5))
  assert not renorm[:12].any() and renorm[12:].all()  # after step 12


@pytest.mark.parametrize("moving_average", ["sma", "ema"])
@pytest.mark.parametrize("average_forward", [True, False])
@pytest.mark.parametrize("steps_before", [0, 5])  # warmup (batch chi) and the SMA phase
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_every_group_chi_reaches_the_new_chi_ema_that_the_commit_checks(
  moving_average, average_forward, steps_before, value
):
  # The layers test only newest_entries(state) for finiteness: a non-finite
  # input in any one group must make it non-finite, in every phase.
  groups, size, channels = 4, 2, 3
  config = mabn.MABNConfig(
    norm_batch_size=2,
    warmup_steps=3,
    moving_average=moving_average,
    average_forward=average_forward,
  )
  rng = np.random.default_rng(0)
  state = mabn.init_state(channels, buffer_size=size)
  for _ in range(steps_before):
    x = jnp.asarray(rng.normal(size=(2 * groups, channels)), jnp.float32)
    _, state = mabn.normalize_train(x, state, config=config)
  x = jnp.asarray(rng.normal(size=(2 * groups, channels)), jnp.float32)
  _, clean = mabn.normalize_train(x, state, config=config)
  assert bool(jnp.all(jnp.isfinite(mabn.newest_entries(clean).chi_ema)))
  for group in range(groups):
    bad = x.at[2 * group, 1].set(value)
    _, new = mabn.normalize_train(bad, state, config=config)
    checked = mabn.newest_entries(new)
    assert checked.chi_buffer.shape == (0, channels) and checked.psi_buffer.shape == (0, channels)
    assert not bool(jnp.isfinite(checked.chi_ema[1])), group
    np.testing.assert_array_equal(checked.chi_ema[::2], clean.chi_ema[::2])


def test_normalizers_of_equal_shapes_share_one_trace_of_the_training_step():
  # Tracing cost grows with the distinct (shape, config) pairs of a network,
  # not with its number of MABN layers; the layer names stay per call.
  x = jnp.ones((4, 3, 3, 5))
  state = mabn.init_state(5)
  tap = jnp.zeros_like(state.psi_buffer)

  def two_layers(x, tap1, tap2, state1, state2):
    y, new1 = mabn.normalize_train(x, state1, tap1, where="first")
    z, new2 = mabn.normalize_train(2.0 * y, state2, tap2, where="second")
    return jnp.sum(z), (new1, new2)

  jaxpr = jax.make_jaxpr(two_layers)(x, tap, tap, state, state)
  steps = [e for e in jaxpr.eqns if e.params.get("name") == "_train_step"]
  assert len(steps) == 2
  assert steps[0].params["jaxpr"] is steps[1].params["jaxpr"]
  with pytest.raises(ValueError, match=r"^first: the MABN backward statistic is not being fed"):
    jax.grad(lambda x: two_layers(x, tap, tap, state, state)[0])(x)
