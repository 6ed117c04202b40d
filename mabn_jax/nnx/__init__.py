"""Flax NNX modules: thin wrappers over :mod:`mabn_jax.functional`.

``MABN``, ``BatchNorm``, ``BatchRenorm``, ``CrossIterationConvNorm``,
``CenteredConv``, ``CenteredDense``, ``StandardizedConv`` and
``FilterResponseNorm`` have ``nnx.BatchNorm``/``nnx.Conv``
style signatures and the same math as the linen layers of :mod:`mabn_jax`
(both call the functional core). Parameters are ``nnx.Param``, statistics
``nnx.BatchStat`` attributes with the linen names, MABN's tap a
:class:`BackwardStat`. Train with :func:`value_and_grad`::

  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = mj.nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss
"""

from mabn_jax.nnx.batch_norm import BatchNorm
from mabn_jax.nnx.batch_renorm import BatchRenorm
from mabn_jax.nnx.centered import CenteredConv, CenteredDense
from mabn_jax.nnx.cross_iteration import CrossIterationConvNorm
from mabn_jax.nnx.filter_response import FilterResponseNorm
from mabn_jax.nnx.frozen_batch_norm import FrozenBatchNorm
from mabn_jax.nnx.loops import dynamic_scale_value_and_grad
from mabn_jax.nnx.mabn import MABN
from mabn_jax.nnx.standardized import StandardizedConv
from mabn_jax.nnx.training import DIFFERENTIATED, feed_backward_statistics, value_and_grad
from mabn_jax.nnx.variables import BackwardStat, BatchMoments, is_tap
from mabn_jax.nnx_conversion import convert_batch_norm

__all__ = [
  "BackwardStat",
  "BatchMoments",
  "BatchNorm",
  "BatchRenorm",
  "CenteredConv",
  "CenteredDense",
  "CrossIterationConvNorm",
  "DIFFERENTIATED",
  "FilterResponseNorm",
  "FrozenBatchNorm",
  "MABN",
  "StandardizedConv",
  "convert_batch_norm",
  "dynamic_scale_value_and_grad",
  "feed_backward_statistics",
  "is_tap",
  "value_and_grad",
]
