"""Per-layer training diagnostics: what a normalizer does to its convolution.

For every ``conv_norm`` layer of a registry model (``params[L]['conv']['kernel']``)
one training step gives:

* ``kernel_norm``: ``||W||`` of the raw kernel (what the optimizer and the
  weight decay act on);
* ``grad_cos``: ``<g, W> / (||g|| ||W||)``, the cosine between the loss
  gradient ``g`` (before weight decay) and the kernel. A normalizer whose
  forward is invariant to the scale of each output channel's kernel (BN) has
  a gradient orthogonal to ``W`` (cosine 0); a gradient with a component along
  ``W`` changes ``||W||``, which the forward barely feels but which sets the
  effective learning rate ``lr / ||W||^2`` of every other direction;
* ``mu_over_sigma``: the channel mean of ``|mu_c| / sigma_c`` of the
  normalizer's input (the conv output) in the batch, from the moments the
  layer sows for precise BN (collection ``'batch_moments'``, see
  :func:`mabn_jax.layers.base.sow_moments`).

``grad_cos`` and ``kernel_norm`` are also given per output channel averaged
(``grad_cos_channel``: the mean over channels of the cosine of each channel's
kernel slice), since the scale invariance is per channel.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

MOMENTS = "batch_moments"


def _kernels(tree: Mapping) -> Dict[str, Any]:
  flat = traverse_util.flatten_dict(unfreeze(tree))
  return {
    "/".join(k[:-2]): v
    for k, v in flat.items()
    if len(k) >= 3 and k[-1] == "kernel" and k[-2] == "conv"
  }


def _moments(moments: Mapping) -> Dict[str, Any]:
  flat = traverse_util.flatten_dict(unfreeze(moments))
  out: Dict[str, Dict[str, Any]] = {}
  for k, v in flat.items():
    if len(k) >= 3 and k[-2] == "norm":
      value = v[-1] if isinstance(v, tuple) else v  # the step's (last) sown value
      out.setdefault("/".join(k[:-2]), {})[k[-1]] = value
  return out


def layer_diagnostics(
  params: Mapping, grads: Mapping, moments: Mapping = None, eps: float = 1e-12
) -> Dict[str, Dict[str, jnp.ndarray]]:
  """``{layer: {name: float32 scalar}}`` for every conv+norm layer.

  Args:
    params: the step's ``'params'`` (before the update).
    grads: the loss gradient with respect to ``params`` (same tree).
    moments: the ``'batch_moments'`` collection of the step's forward pass
      (``{L: {'norm': {'mean': ((C,),), 'second_moment': ((C,),)}}}``), or
      None (no ``mu_over_sigma``).
  """
  kernels, gradients = _kernels(params), _kernels(grads)
  stats = _moments(moments) if moments is not None else {}
  out = {}
  for layer, w in kernels.items():
    g = gradients[layer].astype(jnp.float32)
    w = w.astype(jnp.float32)
    wc, gc = w.reshape(-1, w.shape[-1]), g.reshape(-1, g.shape[-1])
    dot_c = jnp.sum(wc * gc, 0)
    wn_c, gn_c = jnp.linalg.norm(wc, axis=0), jnp.linalg.norm(gc, axis=0)
    entry = {
      "kernel_norm": jnp.linalg.norm(w),
      "grad_cos": jnp.sum(w * g) / (jnp.linalg.norm(w) * jnp.linalg.norm(g) + eps),
      "grad_cos_channel": jnp.mean(dot_c / (wn_c * gn_c + eps)),
    }
    if layer in stats and {"mean", "second_moment"} <= set(stats[layer]):
      mean, second = stats[layer]["mean"], stats[layer]["second_moment"]
      sigma = jnp.sqrt(jnp.maximum(second - jnp.square(mean), 0.0) + eps)
      entry["mu_over_sigma"] = jnp.mean(jnp.abs(mean) / sigma)
    out[layer] = entry
  return out
