"""Tests of the shared moment and moving-average helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mabn_jax.functional import statistics as st


@pytest.mark.parametrize("groups", [1, 2, 6])  # 1: the plain-sum path
def test_window_means_average_the_m_most_recent_values_including_each_row(groups):
  rng = np.random.default_rng(groups)
  buffer = rng.normal(size=(4, 3))
  rows = rng.normal(size=(groups, 3))
  got = st.window_means(jnp.asarray(buffer, jnp.float32), jnp.asarray(rows, jnp.float32))
  sequence = np.concatenate([buffer, rows])
  expected = np.stack([sequence[j + 1 : j + 5].mean(0) for j in range(groups)])
  assert got.shape == (groups, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_push_keeps_the_newest_rows_last():
  buffer = jnp.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(st.push(buffer, jnp.full((1, 2), 9.0)), [[2, 3], [4, 5], [9, 9]])
  np.testing.assert_array_equal(
    st.push(buffer, jnp.arange(8.0).reshape(4, 2) + 10), [[12, 13], [14, 15], [16, 17]]
  )


def test_group_mean_reduces_each_group_of_consecutive_samples():
  x = np.random.default_rng(1).normal(size=(6, 2, 2, 3))
  got = st.group_mean(jnp.asarray(x, jnp.float32), 3, 3)
  expected = x.reshape(3, 2, 2, 2, 3).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  back = st.broadcast_groups(got, jnp.asarray(x), 3)
  np.testing.assert_allclose(back[2:4], np.broadcast_to(expected[1], (2, 2, 2, 3)), rtol=1e-6)


def test_num_groups_errors_name_both_numbers():
  assert st.num_groups(8, None) == 1
  assert st.num_groups(8, 2) == 4
  with pytest.raises(ValueError, match=r"7 samples.*norm_batch_size=2"):
    st.num_groups(7, 2)
  with pytest.raises(ValueError, match=r"1 samples is smaller.*norm_batch_size=2"):
    st.num_groups(1, 2)
  with pytest.raises(ValueError, match=r"positive integer"):
    st.num_groups(4, 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bad", [None, jnp.nan, jnp.inf, -jnp.inf])
def test_all_finite_is_all_isfinite_at_the_extremes_of_the_dtype(dtype, bad):
  # sum(x * 0) == 0 must not overflow at the largest finite values, nor miss
  # a single NaN/Inf among them, in eager mode and compiled.
  big = float(jnp.finfo(dtype).max)
  values = jnp.array([big, -big, big, 0.0, float(jnp.finfo(dtype).tiny)] * 8, dtype)
  if bad is not None:
    values = values.at[17].set(bad)
  tree = {"x": values, "count": jnp.array(3)}
  expected = bad is None
  assert bool(st.all_finite(tree)) is expected
  assert bool(jax.jit(st.all_finite)(tree)) is expected
  assert bool(jax.jit(st.all_finite)(values.reshape(5, 8))) is expected


@pytest.mark.parametrize("size", [40, st.LARGE_LEAF, st.LARGE_LEAF + 1])
@pytest.mark.parametrize("bad", [None, jnp.nan, jnp.inf, -jnp.inf])
def test_all_finite_decides_the_same_for_small_and_large_leaves(size, bad):
  # Up to LARGE_LEAF elements the float form, above it the boolean one; both
  # at the largest finite values and with one bad element at the far end.
  big = float(jnp.finfo(jnp.float32).max)
  values = jnp.where(jnp.arange(size) % 2 == 0, big, -big).astype(jnp.float32)
  if bad is not None:
    values = values.at[size - 1].set(bad)
  assert bool(jax.jit(st.all_finite)({"x": values})) is (bad is None)


def test_keep_if_finite_keeps_old_state_on_nan():
  old = {"a": jnp.ones(2), "n": jnp.array(3)}
  new = {"a": jnp.array([1.0, jnp.nan]), "n": jnp.array(4)}
  kept, finite = st.keep_if_finite(new, old)
  assert not bool(finite)
  np.testing.assert_array_equal(kept["a"], [1, 1])
  assert int(kept["n"]) == 3


@pytest.mark.parametrize("added", [1, 3, 5])
def test_push_unless_is_the_push_or_the_kept_buffer(added):
  buffer = jnp.arange(6.0).reshape(3, 2)
  rows = jnp.arange(2.0 * added).reshape(added, 2) + 10
  np.testing.assert_array_equal(
    st.push_unless(buffer, rows, jnp.array(False)), st.push(buffer, rows)
  )
  np.testing.assert_array_equal(st.push_unless(buffer, rows, jnp.array(True)), buffer)


def test_keep_if_finite_decides_on_the_checked_values():
  old = {"a": jnp.ones(2)}
  new = {"a": jnp.array([2.0, jnp.nan])}
  kept, finite = st.keep_if_finite(new, old, checked={"a": new["a"][:1]})
  assert bool(finite)
  np.testing.assert_array_equal(kept["a"], new["a"])
  kept, finite = st.keep_if_finite(old, new, checked={"a": jnp.array([jnp.inf])})
  assert not bool(finite)
  np.testing.assert_array_equal(kept["a"], new["a"])
