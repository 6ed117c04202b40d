"""One layer of a BatchNorm-to-other-normalizer conversion (shared by linen and NNX).

A trained BN layer maps its input ``z`` (a convolution's output) at
inference to ``y = a * z + c`` per channel, with ``a = gamma / sqrt(var +
eps)`` and ``c = beta - a * mean`` (its method's ``inference_affine``). The
converted layer starts from a state given by BN's ``mean``/``var``
(``Method.from_batch_norm``; for MABN ``chi = var + mean^2``), or by the
moments ``E[z']``, ``E[z'^2]`` of its actual input ``z'`` measured on
calibration batches (``docs/normalization.md``, "Converting a BatchNorm
model").

*Compensation* (:func:`kept_affine`) then sets the converted layer's ``scale``
and ``bias`` so that its inference map is BN's: ``y' = a * z' + c`` (without
data) or ``y' = a * (z' - E[z']) + beta`` (with data). For MABN, whose
inference divides by ``sqrt(chi + eps)`` and subtracts no mean, this folds
BN's mean subtraction into the bias: ``scale' = a * sqrt(chi + eps)``,
``bias' = c``. Without data it is exact when ``z' = z``, i.e. when the
producing convolution's kernel already has zero mean per output channel;
centring a kernel with mean ``m_c`` removes ``m_c * S(x)`` from channel
``c``, where ``S(x)`` (the input's sum over the receptive field and input
channels) depends on the data: its mean is restored by calibration, its
fluctuation around the mean cannot be by a per-channel affine map.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from mabn_jax import discovery
from mabn_jax.training import NONFINITE_COUNT


class Source(NamedTuple):
  """A trained BN layer: its method (``MeanVarMethod``), running ``mean`` and
  ``var`` and affine ``scale``/``bias`` (``(C,)`` each; ``None`` when the
  layer has none), float64 NumPy."""

  method: Any
  mean: np.ndarray
  var: np.ndarray
  scale: Optional[np.ndarray]
  bias: Optional[np.ndarray]


def source(method: Any, mean: Any, var: Any, scale: Any = None, bias: Any = None) -> Source:
  """A :class:`Source` from arrays of any dtype."""
  as64 = lambda a: None if a is None else np.asarray(a, np.float64)
  return Source(
    method, np.asarray(mean, np.float64), np.asarray(var, np.float64), as64(scale), as64(bias)
  )


def _affine(src: Source) -> Tuple[np.ndarray, np.ndarray]:
  """BN's inference map ``(a, c)``: ``y = a * z + c``."""
  state = discovery.stored_state({"mean": src.mean, "var": src.var})
  s, t = src.method.inference_affine(state)
  gamma = np.ones_like(src.mean) if src.scale is None else src.scale
  beta = np.zeros_like(src.mean) if src.bias is None else src.bias
  return gamma * np.asarray(s), gamma * np.asarray(t) + beta


def converted_state(
  method: Any, template: Mapping, src: Source, step: int, moments: Optional[Tuple[Any, Any]] = None
) -> dict:
  """One layer's state for ``method``, from BN's statistics or measured moments.

  ``template`` is the layer's state as declared (names, shapes, dtypes);
  :meth:`~mabn_jax.functional.interface.Method.from_batch_norm` fills it from
  ``src.mean``/``src.var``, or from ``E[z']`` and ``E[z'^2] - E[z']^2`` when
  ``moments = (E[z'], E[z'^2])``; then ``step`` (if the state has one) and a
  zero ``nonfinite_count``. Arrays in the template's dtypes.
  """
  if moments is None:
    mean, var = src.mean, src.var
  else:
    mean = np.asarray(moments[0], np.float64)
    var = np.maximum(np.asarray(moments[1], np.float64) - mean * mean, 0.0)
  state = method.from_batch_norm(discovery.stored_state(dict(template)), mean, var)
  values = state._asdict()
  if "step" in template:
    values["step"] = step
  if NONFINITE_COUNT in template:
    values[NONFINITE_COUNT] = 0
  return {name: jnp.asarray(values[name], template[name].dtype) for name in template}


def kept_affine(
  method: Any, state: Mapping, src: Source, moments: Optional[Tuple[Any, Any]] = None
) -> Tuple[np.ndarray, np.ndarray]:
  """``(scale, bias)`` float64 ``(C,)`` of the converted layer (``method``,
  ``state``) whose inference map is BN's (``src``) on its new input.

  Without ``moments``: ``a * z' + c``; with ``moments = (E[z'], E[z'^2])``:
  ``a * (z' - E[z']) + c + a * mean``, BN's map with its running mean
  replaced by the measured one (see the module docstring).
  """
  a, c = _affine(src)
  if moments is not None:
    c = c + a * (src.mean - np.asarray(moments[0], np.float64))
  s, t = method.inference_affine(discovery.stored_state(dict(state)))
  s = np.asarray(s, np.float64)
  t = np.asarray(t, np.float64)
  scale = a / s
  return scale, c - scale * t


def check_affine(where: str, has_scale: bool, has_bias: bool) -> None:
  """Raises if a compensated layer has no ``scale`` or ``bias`` to hold it."""
  if not (has_scale and has_bias):
    raise ValueError(
      f"convert_batch_norm: the converted layer {where} has no "
      f"{'scale' if not has_scale else 'bias'} parameter, so BN's inference map "
      "cannot be kept; create it with use_scale=True and use_bias=True, or "
      "pass compensate=False."
    )
