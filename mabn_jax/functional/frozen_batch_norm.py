"""Frozen batch normalization: BN's inference map in training too.

The running ``mean``/``var`` and the affine ``scale``/``bias`` stay as they
are: training normalizes with the running statistics, passes no gradient to
``scale``/``bias`` and leaves the state unchanged (detectron2's
``FrozenBatchNorm2d``: fine-tuning from a BN checkpoint at batches too small
for batch statistics). The state is :class:`~mabn_jax.functional.batch_norm.
BatchNormState`, so a BN checkpoint loads as it is.
"""

from __future__ import annotations

import dataclasses

from jax import lax

from mabn_jax.functional import batch_norm as bn
from mabn_jax.functional import interface


@dataclasses.dataclass(frozen=True)
class Method(bn.MeanVarMethod):
  """Frozen BN (a :class:`~mabn_jax.functional.batch_norm.BatchNormConfig`;
  only ``axis`` and ``epsilon`` matter)."""

  config: bn.BatchNormConfig = bn.BatchNormConfig()
  config_class = bn.BatchNormConfig
  state_class = bn.BatchNormState

  def init(self, num_features, *, kernel_shape=None, groups=None):
    del kernel_shape, groups
    return bn.init_state(num_features)

  supports_complex = True

  def train(self, x, state, *, scale=None, bias=None, tap=None, conv=None, mask=None):
    del tap, conv, mask  # no batch statistics: a mask changes nothing
    self.validate()
    frozen = lambda value: None if value is None else lax.stop_gradient(value)
    y = self.infer(x, lax.stop_gradient(state), scale=frozen(scale), bias=frozen(bias))
    return interface.TrainOutput(y, state)
