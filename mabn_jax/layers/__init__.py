"""Flax linen layers: declarations over :mod:`mabn_jax.functional` (see :mod:`.base`)."""

from mabn_jax.layers.batch_norm import BatchNorm as BatchNorm
from mabn_jax.layers.batch_renorm import BatchRenorm as BatchRenorm
from mabn_jax.layers.centered import CenteredConv as CenteredConv
from mabn_jax.layers.centered import CenteredDense as CenteredDense
from mabn_jax.layers.cross_iteration import CrossIterationConvNorm as CrossIterationConvNorm
from mabn_jax.layers.filter_response import FilterResponseNorm as FilterResponseNorm
from mabn_jax.layers.frozen_batch_norm import FrozenBatchNorm as FrozenBatchNorm
from mabn_jax.layers.mabn import MABN as MABN
from mabn_jax.layers.standardized import StandardizedConv as StandardizedConv
