"""Networks written once against a Normalizer build in both APIs.

``normalizer.nnx_conv_norm`` / ``nnx_dense_norm`` / ``nnx_norm`` give NNX
modules with the linen ``conv_norm`` / ``dense_norm`` / ``norm`` layout; from
the same initial values they train exactly like the linen modules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mabn_jax as mj
from test_nnx import _assert_same, _load, _nnx_loss, _train_and_compare

CIN, C = 2, 4
KWARGS = {
  "bn": dict(norm_batch_size=2),
  "brn": dict(warmup_steps=1, ramp_steps=2),
  "gn": dict(num_groups=2),
  "ln": {},
  "in": {},
  "cbn": dict(burn_in=1, window=3),
  "cbn_naive": dict(burn_in=1, window=2),
  "mabn": dict(buffer_size=2, warmup_steps=1, renorm_start=2, norm_batch_size=2),
  "none": {},
}


class LinenBlock(nn.Module):
  normalizer: mj.Normalizer
  kind: str

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.kind == "conv":
      return self.normalizer.conv_norm(C, (3, 3), name="block")(x, train=train)
    if self.kind == "dense":
      return self.normalizer.dense_norm(C, name="block")(x, train=train)
    return self.normalizer.norm(name="block")(x, train=train)


class NNXBlock(nnx.Module):
  def __init__(self, normalizer, kind, rngs):
    if kind == "conv":
      self.block = normalizer.nnx_conv_norm(CIN, C, (3, 3), rngs=rngs)
    elif kind == "dense":
      self.block = normalizer.nnx_dense_norm(CIN, C, rngs=rngs)
    else:
      self.block = normalizer.nnx_norm(CIN, rngs=rngs)

  def __call__(self, x):
    return self.block(x)


CASES = (
  [(name, "conv") for name in KWARGS]
  + [(name, "dense") for name in ("bn", "mabn", "none", "ln")]
  + [(name, "norm") for name in ("bn", "brn", "mabn")]
)


@pytest.mark.parametrize("name,kind", CASES)
def test_registry_nnx_module_trains_like_the_linen_one(name, kind):
  normalizer = mj.make_normalizer(name, **KWARGS[name])
  shape = (4, 5, 5, CIN) if kind == "conv" else (4, CIN)
  linen = LinenBlock(normalizer, kind)
  variables = linen.init(jax.random.key(0), jnp.zeros(shape))
  model = NNXBlock(normalizer, kind, nnx.Rngs(1))
  _load(model, variables)
  _assert_same(model, variables, 0)
  step = mj.nnx.value_and_grad(_nnx_loss, has_aux=True)
  _train_and_compare(f"{name}/{kind}", linen, variables, model, shape, step, steps=4)


def test_registry_nnx_errors():
  with pytest.raises(ValueError, match=r"'cbn'.*no stand-alone norm"):
    mj.make_normalizer("cbn").nnx_norm(C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'cbn'.*convolution only"):
    mj.make_normalizer("cbn").nnx_dense_norm(CIN, C, rngs=nnx.Rngs(0))
  assert mj.make_normalizer("none").nnx_norm(C, rngs=nnx.Rngs(0)) is None
  model = mj.make_normalizer("mabn").nnx_conv_norm(CIN, C, 3, rngs=nnx.Rngs(0))
  assert isinstance(model.conv, mj.nnx.CenteredConv) and isinstance(model.norm, mj.nnx.MABN)
