"""The integer counters of the normalizers' state, stored as float32.

Every counter a normalizer keeps among its running statistics (MABN's, Batch
Renorm's and CBN's ``step``, CBN's ``count``, every layer's
``nonfinite_count``) is a ``()`` **float32** array holding an integer, in the
``'batch_stats'`` collection (linen) or an ``nnx.BatchStat`` (NNX), like the
statistics beside it.

Why float32: Flax's data-parallel training loops average the whole
``'batch_stats'`` tree across devices (``lax.pmean(batch_stats, 'batch')``,
the ImageNet example's ``sync_batch_stats``). ``pmean`` divides a sum, so an
int32 counter would come back float32 and the next step would see new dtypes
(a recompilation, and counters that are no longer integers). A float32
counter keeps its dtype, and the mean of ``n`` equal integers is that integer
exactly while ``n * value <= 2**24`` (every partial sum of equal integers is
then an integer float32 represents exactly): with 8 devices, for the first
2,097,152 steps. A float32 counter alone holds every integer up to ``2**24``
(16,777,216).

Reading: a step counter is read as the nearest integer (:func:`read`), so a
counter that differed between devices before a ``pmean`` (one device skipped
a non-finite step) continues from an integer, and int32 counters saved
before this representation are read the same way; the layers write them back
as float32. ``nonfinite_count`` is read as is (after a ``pmean`` it is the
mean over devices of their skipped steps; :func:`mabn_jax.nonfinite_counts`
rounds it up, so any skipped step shows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COUNTER_DTYPE = jnp.float32
"""The dtype of every counter in a normalizer's state."""

EXACT_LIMIT = 2**24
"""Every integer up to this is exact in a float32 counter."""


def zero() -> jax.Array:
  """A new counter: ``()`` float32 zero."""
  return jnp.zeros((), COUNTER_DTYPE)


def read(value: jax.Array) -> jax.Array:
  """A stored step counter as the ``()`` float32 nearest integer.

  Accepts float32 counters (possibly averaged over devices) and the int32
  counters of older checkpoints alike.
  """
  return jnp.round(jnp.asarray(value, COUNTER_DTYPE))


def as_counter(value: jax.Array) -> jax.Array:
  """``value`` (a count, any numeric dtype) as a float32 counter, unrounded."""
  return jnp.asarray(value, COUNTER_DTYPE)
