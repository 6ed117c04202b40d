"""The one functional interface of every batch-statistics normalizer.

A normalizer is a frozen, hashable :class:`Method`: its static configuration
(``config``, and layout fields such as MABN's ``buffer_size``) and one set of
pure functions of one shape::

  method = mabn.Method(mabn.MABNConfig(norm_batch_size=2), buffer_size=16)
  state = method.init(num_features)
  y, new_state, checked = method.train(x, state, scale=gamma, bias=beta, tap=taps)
  y = method.infer(x, state, scale=gamma, bias=beta)

The hooks the tools use:

* :meth:`Method.inference_affine`: the per-channel map ``x * s + t`` that
  inference applies before ``gamma``/``beta`` (folding into a convolution);
* :meth:`Method.from_moments`: the state whose inference statistics are the
  given population moments (precise BN);
* :meth:`Method.from_batch_norm`: the state that continues from BatchNorm's
  running ``mean``/``var`` (converting a BN checkpoint).

Errors are raised without a layer name, as
:class:`~mabn_jax.functional._checks.UnnamedLayerError`; a wrapper that knows
the layer's name runs the calls inside :func:`named_errors`. Adding a
normalizer means one module with its state, config and :class:`Method`
subclass; the linen and NNX layers and the tools need no edits.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, ClassVar, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from mabn_jax.functional import statistics as st
from mabn_jax.functional._checks import UnnamedLayerError


class ConvContext(NamedTuple):
  """What a normalizer that depends on its producer (CBN) needs of it.

  Attributes:
    x: the convolution's input ``(N, *spatial, cin)``.
    kernel: the effective kernel ``(*kernel_size, cin, C)`` (centred when the
      convolution is weight-centralized).
    spec: the convolution's geometry (a ``ConvSpec``).
    bias: the convolution's ``(C,)`` bias, or ``None``.
  """

  x: jax.Array
  kernel: jax.Array
  spec: Any
  bias: Optional[jax.Array] = None


class TrainOutput(NamedTuple):
  """What :meth:`Method.train` returns.

  Attributes:
    y: the output, ``x``'s shape, the affine map applied, in the promotion of
      the statistics' dtype (float32 or wider) with ``scale``'s and
      ``bias``'s (cast it to the layer's result dtype outside).
    state: the state after the step (fields updated by a tap's cotangent come
      back unchanged).
    checked: what a layer tests for finiteness before committing ``state``
      (``None``: all of ``state``; see
      :func:`~mabn_jax.functional.statistics.commit_if_finite`).
  """

  y: jax.Array
  state: Any
  checked: Any = None


@contextlib.contextmanager
def named_errors(where: str) -> Iterator[None]:
  """Re-raises the core's unnamed errors as ``ValueError`` naming ``where``."""
  try:
    yield
  except UnnamedLayerError as error:
    raise error.named(where) from None


_METHOD_CLASSES: list = []


def method_classes() -> Tuple[type, ...]:
  """Every :class:`Method` subclass defined so far, in definition order."""
  return tuple(_METHOD_CLASSES)


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
  """A batch-statistics normalizer: its static configuration and its functions.

  Subclasses set :attr:`config_class` and :attr:`state_class`, may add layout
  fields (every field but ``config`` is read by the layers from their
  attribute of the same name), and implement the functions below.

  Attributes:
    config: the static hyper-parameters (an instance of ``config_class``).
  """

  config: Any

  config_class: ClassVar[type]
  """The dataclass of :attr:`config`; the layers read its fields by name."""
  state_class: ClassVar[type]
  """The ``NamedTuple`` of the state; its non-empty fields are the layer's
  ``'batch_stats'`` variables (linen) or ``nnx.BatchStat`` attributes (NNX)."""
  tap_targets: ClassVar[Mapping[str, str]] = {}
  """Tap name -> the state field its cotangent increments (backward statistics)."""
  needs_conv: ClassVar[bool] = False
  """Whether :meth:`train` needs the producing convolution (``conv=``)."""
  records_from_state: ClassVar[bool] = False
  subtracts_mean: ClassVar[bool] = True
  """Whether the normalization subtracts a mean; one that does not (MABN)
  assumes zero-mean inputs, from weight-centralized producers
  (:func:`mabn_jax.check_zero_mean_inputs`)."""
  """Whether the recording tools read a step's statistics from the state
  (:meth:`step_statistics`) instead of probing BN's four statistics."""
  supports_mask: ClassVar[bool] = False
  """Whether :meth:`train` takes ``mask=`` (a boolean array broadcastable to
  ``x``: only its True positions enter the batch statistics, as in
  ``flax.linen.BatchNorm``); see :func:`with_mask`."""
  supports_complex: ClassVar[bool] = False
  """Whether complex inputs are normalized (as Flax does: complex mean, the
  variance from ``|x|^2``); the layers reject them otherwise."""
  signature_fields: ClassVar[Tuple[str, ...]] = ()
  """State fields that identify the method in stored variables (the method
  with the most of them present wins; see :func:`method_classes`)."""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    _METHOD_CLASSES.append(cls)

  def validate(self) -> None:
    """Raises an unnamed error for an out-of-range static value."""
    self.config.validate(None)

  def mismatch_cause(self) -> str:
    """What may have changed when a stored state's shape differs (errors)."""
    return "number of channels (or buffer size)"

  def feature_axis(self, ndim: int) -> int:
    """The non-negative feature axis of an input of rank ``ndim``."""
    return st.canonical_axis(getattr(self.config, "axis", -1), ndim, None)

  @abc.abstractmethod
  def init(
    self,
    num_features: int,
    *,
    kernel_shape: Optional[Tuple[int, ...]] = None,
    groups: Optional[int] = None,
  ) -> Any:
    """The state a new layer of ``num_features`` channels starts from.

    ``kernel_shape`` (the producing convolution's kernel) and ``groups`` (the
    normalization groups of a training batch) are for methods whose state
    depends on them (CBN); others ignore them.
    """

  def init_for(self, x: jax.Array, conv: Optional[ConvContext] = None) -> Any:
    """:meth:`init` for the input ``x`` (and producer ``conv``) of a call."""
    del conv
    return self.init(x.shape[self.feature_axis(x.ndim)])

  def taps(self, state: Any) -> Dict[str, jax.Array]:
    """The zero taps of ``state``: one per :attr:`tap_targets` entry whose
    target field is not empty, shaped and float32 like it."""
    taps = {}
    for tap, target in self.tap_targets.items():
      value = getattr(state, target)
      if value.size:
        taps[tap] = jnp.zeros(value.shape, jnp.float32)
    return taps

  @abc.abstractmethod
  def train(self, x, state, *, scale=None, bias=None, tap=None, conv=None) -> TrainOutput:
    """One training step on ``x`` ``(N, ..., C)``: the output and the new state.

    Args:
      x: the activations (a ``jax.Array``, any float dtype); for CBN the
        convolution's output, bias included.
      state: the current state (a :attr:`state_class`).
      scale: ``(C,)`` gamma, or ``None``.
      bias: ``(C,)`` beta, or ``None``.
      tap: ``{tap name: zeros}`` (see :meth:`taps`), differentiated by the
        training loop, or ``None`` when no gradient is taken.
      conv: the producing convolution, a :class:`ConvContext`
        (:attr:`needs_conv` methods), else ``None``.
    """

  @abc.abstractmethod
  def infer(self, x, state, *, scale=None, bias=None) -> jax.Array:
    """Inference on ``x`` with the running statistics of ``state`` and the
    optional ``(C,)`` ``scale``/``bias``; touches no state. Returns ``x``'s
    shape in the promoted dtype (at least float32), not cast."""

  @abc.abstractmethod
  def inference_affine(self, state: Any) -> Tuple[Any, Any]:
    """``(s, t)``, ``(C,)`` each: inference normalizes ``x`` to ``x * s + t``
    (then ``gamma``, ``beta``). Written with array operators only, so float64
    NumPy statistics give float64 results."""

  @abc.abstractmethod
  def from_moments(self, state: Any, mean: Any, second_moment: Any) -> Any:
    """``state`` with its inference statistics set from the population moments
    ``E[x]`` and ``E[x^2]`` (``(C,)`` each) of the layer's input."""

  def step_statistics(self, old_state: Any, new_state: Any, groups: int) -> Dict[str, Any]:
    """``{name: (G, C)}``: the statistics a training step used, read from the
    states before and after it. Only :attr:`records_from_state` methods
    have it; the recording tools probe the others' four BN statistics."""
    raise TypeError(
      f"{type(self).__name__} does not record its statistics from its state "
      "(records_from_state is False); the recording tools probe them instead."
    )

  @abc.abstractmethod
  def from_batch_norm(self, state: Any, mean: Any, var: Any) -> Any:
    """``state`` continued from BatchNorm's running ``mean`` and ``var``."""


@dataclasses.dataclass(frozen=True)
class Masked:
  """A :class:`Method` whose training statistics are restricted to ``mask``:
  ``infer`` and ``train`` as the method's, ``train`` with ``mask=mask``
  (what the layers hand to :func:`mabn_jax.training.layer_step`)."""

  method: Method
  mask: Any

  def infer(self, x, state, **kwargs):
    return self.method.infer(x, state, **kwargs)

  def train(self, x, state, **kwargs) -> TrainOutput:
    train: Any = self.method.train  # a supports_mask method's train takes mask=
    return train(x, state, mask=self.mask, **kwargs)


def with_mask(method: Method, mask: Optional[jax.Array]) -> Any:
  """``method``, or a :class:`Masked` one for a ``mask`` that is not ``None``.

  Raises an unnamed error (see :func:`named_errors`) if ``method`` does not
  support masks (:attr:`Method.supports_mask`).
  """
  if mask is None:
    return method
  if not method.supports_mask:
    raise UnnamedLayerError(
      "mask is not supported: this method's statistics are not masked batch "
      "moments (BatchNorm, BatchRenorm and FrozenBatchNorm take a mask); pass mask=None."
    )
  return Masked(method, mask)


FLAX_OPTIONS = {"use_fast_variance": True, "force_float32_reductions": True}
"""``flax.linen.BatchNorm``'s options that only some methods' configs have,
with their defaults (a layer rejects another value for a method without them)."""


def check_call(method: Method, x: Any, options: Mapping[str, Any]) -> None:
  """Raises an unnamed error for a call the method cannot make as asked: a
  complex ``x`` (unless :attr:`Method.supports_complex`) or a non-default
  :data:`FLAX_OPTIONS` value (``options``: the layer's) for a method whose
  config has no such field."""
  fields = {f.name for f in dataclasses.fields(method.config_class)}
  for name, default in FLAX_OPTIONS.items():
    if name not in fields and name in options and options[name] != default:
      raise UnnamedLayerError(
        f"{name}={options[name]!r} is not supported by {type(method).__qualname__} of "
        f"{type(method).__module__} (its statistics do not use it); leave it at {default!r}."
      )
  if jnp.iscomplexobj(x) and not method.supports_complex:
    raise UnnamedLayerError(
      f"complex inputs (dtype {jnp.result_type(x)}) are not supported by this method; "
      "BatchNorm and FrozenBatchNorm normalize them as Flax does."
    )


def stored_state(method: Method, state: Any, param_dtype: Any) -> Any:
  """``state`` as a layer stores it: its float fields in ``param_dtype`` when
  the method's config has ``force_float32_reductions=False`` (as Flax keeps
  its statistics then), else unchanged (float32)."""
  if getattr(method.config, "force_float32_reductions", True):
    return state
  return state._replace(
    **{
      name: value.astype(param_dtype)
      for name, value in state._asdict().items()
      if jnp.issubdtype(value.dtype, jnp.floating)
    }
  )
