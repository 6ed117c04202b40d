"""The training contract: gradients plus every statistic a step produces.

Normalizers whose backward pass produces a statistic (MABN's ``Psi``) declare
a zero-valued *tap* variable in the :data:`BACKWARD_STATS` collection. The
cotangent of a tap is the step's increment of one ``'batch_stats'`` variable
of the same layer; which one is given by :data:`TAP_TARGETS` (tap name ->
statistic name; MABN's tap ``psi_increment`` updates ``psi_buffer``). Taps and
statistics have distinct names, so a layer's variables have distinct names
whatever the collection (Flax NNX's ``nnx.bridge`` requires that). CBN with
``backward='averaged'`` has two taps, ``g_increment`` (-> ``g_buffer``) and
``psi_increment`` (-> its own ``psi_buffer``).
:func:`value_and_grad` differentiates the loss with respect to ``'params'``
and the taps together, and adds each tap's cotangent to its statistic.

Variables without the collection (Flax's ``TrainState`` keeps ``params`` and
``batch_stats`` only) get zero taps made by :func:`value_and_grad`. Variables
saved before the tap had its own name hold ``'backward_stats'`` entries named
``psi_buffer``; layers and :func:`value_and_grad` reject them with a message
pointing to :func:`mabn_jax.migrate_variables`, which renames them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Dict, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax import discovery
from mabn_jax.functional import statistics as st
from mabn_jax.functional.affine import result_dtype

BACKWARD_STATS = "backward_stats"
"""Collection holding the zero-valued taps of backward statistics."""

PSI_TAP = "psi_increment"
"""Name of MABN's tap: its cotangent is the step's ``psi_buffer`` increment."""

G_TAP = "g_increment"
"""Name of CBN's second tap (``backward='averaged'``): its cotangent is the
step's ``g_buffer`` increment (``g_B = mean(g)``, the mean of the gradient)."""

TAP_TARGETS = {PSI_TAP: "psi_buffer", G_TAP: "g_buffer"}
"""Tap name -> name of the ``'batch_stats'`` variable (same layer) it updates."""

VariableTree = Union[FrozenDict, Dict[str, Any]]
"""A Flax variable tree, or one of its collections: a ``FrozenDict`` or nested dicts."""

NONFINITE_COUNT = "nonfinite_count"
"""The ``'batch_stats'`` variable (NNX: ``nnx.BatchStat``) of every stateful
normalizer counting the steps it skipped as non-finite: a ``()`` float32
counter (:mod:`mabn_jax.functional.counters`), read by
:func:`mabn_jax.nonfinite_counts`."""

BATCH_MOMENTS = "batch_moments"
"""Collection the normalizers sow their input moments into (precise BN).

Written only when a caller made it mutable (``model.apply(...,
mutable=['batch_moments', ...])``, as :func:`mabn_jax.recompute_batch_stats`
does); it never exists otherwise.
"""

LEGACY_TAP_NAMES = {"psi_buffer": PSI_TAP}
"""Old tap names (taps once shared their statistic's name) -> current names."""


def legacy_tap_message(where: str, path: str) -> str:
  """The error for a tap saved under its old name: what changed, how to fix it."""
  new = LEGACY_TAP_NAMES[path.rsplit("/", 1)[-1]]
  return (
    f"{where}: the variables hold the backward-statistics tap '{path}' of the "
    f"old layout; the tap is now named '{new}' (taps no longer share the name "
    f"of the 'batch_stats' variable they update, so Flax NNX's bridge can hold "
    f"both). Convert variables saved before the rename with "
    f"mabn_jax.migrate_variables(variables)."
  )


def _legacy_tap_paths(taps: VariableTree) -> list:
  return [
    "/".join(path)
    for path in traverse_util.flatten_dict(unfreeze(taps))
    if path[-1] in LEGACY_TAP_NAMES
  ]


def stat_path(tap_path: tuple) -> tuple:
  """Path of the ``'batch_stats'`` variable a tap at ``tap_path`` updates.

  Raises:
    ValueError: for a tap name not in :data:`TAP_TARGETS` (an old-layout
      tap gets the :func:`mabn_jax.migrate_variables` message).
  """
  name = tap_path[-1]
  if name in LEGACY_TAP_NAMES:
    raise ValueError(legacy_tap_message("mabn_jax", "/".join(tap_path)))
  if name not in TAP_TARGETS:
    raise ValueError(
      f"'{BACKWARD_STATS}' collection, tap {'/'.join(tap_path)}: unknown tap name "
      f"{name!r} (known taps: {sorted(TAP_TARGETS)}). Pass the collection as "
      "model.init returned it, or leave it out of the variables: "
      "mabn_jax.value_and_grad then makes the taps from 'batch_stats'."
    )
  return tap_path[:-1] + (TAP_TARGETS[name],)


# The taps claimed by normalization calls in the training step being traced
# (None outside one); see claim_tap.
_STEP_TAPS: contextvars.ContextVar = contextvars.ContextVar("step_taps", default=None)
# Whether the step's taps were made by value_and_grad (the variables had none):
# a layer in inference mode then trains with frozen statistics, as documented.
_MADE_TAPS: contextvars.ContextVar = contextvars.ContextVar("made_taps", default=False)


@contextlib.contextmanager
def training_step(made_taps: bool = False):
  """Context of one traced training step, in which :func:`claim_tap` counts calls.

  :func:`value_and_grad` (and ``mabn_jax.nnx.value_and_grad``,
  ``mabn_jax.recording.value_and_grad``) trace the loss inside it.
  ``made_taps``: the taps were made by :func:`value_and_grad` because the
  variables had none, so a layer in inference mode trains with frozen
  statistics instead of raising (:func:`inference_guard`).
  """
  token, made = _STEP_TAPS.set([]), _MADE_TAPS.set(made_taps)
  try:
    yield
  finally:
    _STEP_TAPS.reset(token)
    _MADE_TAPS.reset(made)


def claim_tap(tap, where: str) -> None:
  """Registers a training call's tap; raises if the tap was already used this step.

  Inside :func:`training_step` every tap is a distinct traced value, so one
  tap reaching two training calls means one layer (one set of variables)
  normalized twice in the step (weight sharing). That cannot be two
  consecutive MABN steps: their forward buffers would advance per call but
  both calls' backward statistics would be summed into one tap cotangent,
  i.e. one ``psi_buffer`` update, and the second step's backward pass needs
  the first one's ``Psi``, which the same backward pass computes later. So
  it is a ``ValueError`` at trace time, naming the layer ``where``. Outside a
  training step (forward-only calls, which are consecutive steps) and for
  ``tap=None`` it does nothing.
  """
  claimed = _STEP_TAPS.get()
  if claimed is None or tap is None:
    return
  if any(tap is other for other in claimed):
    raise ValueError(
      f"{where}: called a second time in training mode within one training "
      "step. Each training call is one normalization step with its own "
      "backward statistic, but the calls share one tap, so the backward-"
      "statistics buffer (MABN's psi_buffer) would advance once while the "
      "forward buffers advance per call. Use one layer "
      "instance per call (e.g. two MABN layers with their own variables)."
    )
  claimed.append(tap)


# Jitted so that the taps of equal shapes share one trace of it.
@jax.jit
def add_increment(stat: jax.Array, increment: jax.Array) -> jax.Array:
  """``stat + increment`` (a tap's cotangent), or ``stat`` if it is not finite.

  A non-finite gradient must not reach a buffer: the statistic keeps its
  value for this step.
  """
  increment = increment.astype(stat.dtype)
  return jnp.where(st.all_finite(increment), stat + increment, stat)


def feed_backward_statistics(batch_stats: VariableTree, taps_cotangent: VariableTree):
  """Adds each tap cotangent to the ``batch_stats`` variable it updates.

  The tap ``LAYER/TAP`` updates ``LAYER/TAP_TARGETS[TAP]`` (see
  :func:`stat_path`).

  Args:
    batch_stats: the ``'batch_stats'`` tree after the forward pass.
    taps_cotangent: gradient of the loss with respect to the
      :data:`BACKWARD_STATS` tree (same shapes and dtypes as the variables
      they update).

  Returns:
    The updated ``batch_stats`` tree (a plain dict).
  """
  stats = traverse_util.flatten_dict(unfreeze(batch_stats))
  for tap, increment in traverse_util.flatten_dict(unfreeze(taps_cotangent)).items():
    path = stat_path(tap)
    if path not in stats:
      raise ValueError(
        f"'{BACKWARD_STATS}' collection: the tap {'/'.join(tap)} has no 'batch_stats' "
        f"variable {'/'.join(path)} to update. Pass the 'backward_stats' and "
        "'batch_stats' collections of one model (as model.init returned them), "
        "and mutable=['batch_stats'] to model.apply in the loss function."
      )
    stats[path] = add_increment(stats[path], increment)
  return traverse_util.unflatten_dict(stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def inference_guard(y: jax.Array, tap: jax.Array, where: str) -> jax.Array:
  """Identity on ``y``; a training step through it is an error.

  A layer in inference mode (``use_running_average=True``) passes its output
  through this guard when its backward-statistics ``tap`` is present. Under
  :func:`value_and_grad` the tap is differentiated, which means the caller
  expects the layer's statistics to update but they will not: that raises at
  trace time. To fine-tune with frozen statistics on purpose, drop the
  :data:`BACKWARD_STATS` collection from the variables passed in.
  """
  del tap, where
  return y


def _inference_guard_fwd(y, tap, where):
  if tap.perturbed and not _MADE_TAPS.get():
    raise ValueError(
      f"{where}: a training step (mabn_jax.value_and_grad) runs this layer with "
      "use_running_average=True, so its statistics would not update. Call "
      "the model with train=True / use_running_average=False, or, to train "
      f"with frozen statistics on purpose, remove the '{BACKWARD_STATS}' "
      "collection from the variables (Flax NNX: take gradients with "
      "nnx.value_and_grad, which leaves the taps alone)."
    )
  return y.value, None


def _inference_guard_bwd(where, res, ct):
  del where, res
  return ct, None


inference_guard.defvjp(_inference_guard_fwd, _inference_guard_bwd, symbolic_zeros=True)


class LayerCall(NamedTuple):
  """One call of a layer's functional method: what the wrapper read.

  Attributes:
    method: the layer's :class:`~mabn_jax.functional.interface.Method`.
    x: the input; state: the layer's state; scale, bias: ``(C,)`` or ``None``.
    taps: ``{tap name: zeros}`` or ``None``; conv: the producing convolution
      (CBN) or ``None``; where: the layer's name for errors.
    dtype: the layer's result dtype (``None``: inferred, as in Flax).
  """

  method: Any
  x: jax.Array
  state: Any
  scale: Any
  bias: Any
  taps: Any
  conv: Any
  where: str
  dtype: Any


def layer_step(
  call: LayerCall,
  use_running_average: bool,
  before_train: Callable[[], None],
  commit: Callable[[Any, Any], None],
) -> jax.Array:
  """A layer's call of its functional method, as every wrapper makes it.

  Inference: ``method.infer`` through :func:`inference_guard` (when the layer
  has taps). Training: every tap claimed (:func:`claim_tap`),
  ``before_train()`` (e.g. sowing the input's moments), ``method.train``,
  then ``commit(new_state, checked)``. Returns the output in the layer's
  result dtype (:func:`~mabn_jax.functional.affine.result_dtype`).
  """
  method, x, state, scale, bias, taps, conv, where, dtype = call
  if use_running_average:
    y = method.infer(x, state, scale=scale, bias=bias)
    if taps:
      y = inference_guard(y, next(iter(taps.values())), where)
  else:
    for tap in (taps or {}).values():
      claim_tap(tap, where)
    before_train()
    y, new_state, checked = method.train(x, state, scale=scale, bias=bias, tap=taps, conv=conv)
    commit(new_state, checked)
  return jnp.asarray(y, result_dtype(x, scale, bias, dtype=dtype))


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """``jax.value_and_grad`` for Flax models whose normalizers keep statistics.

  Args:
    fun: ``fun(variables, *args, **kwargs)`` returning ``(loss, mutated)``, or
      ``(loss, (mutated, aux))`` if ``has_aux``; ``mutated`` is what
      ``model.apply(..., mutable=[...])`` returned (it must contain
      ``'batch_stats'`` when the model has MABN layers). ``variables`` may
      lack the :data:`BACKWARD_STATS` collection (a ``TrainState`` with
      ``params`` and ``batch_stats`` only): its zero taps are then made from
      ``'batch_stats'``, passed to ``fun`` and left out of the result.
    has_aux: whether ``fun`` returns auxiliary data.

  Returns:
    A function of the same arguments returning ``((loss, variables), grads)``,
    or ``(((loss, aux), variables), grads)`` if ``has_aux``. ``grads`` is the
    gradient with respect to ``variables['params']``; ``variables`` is the new
    variable tree: ``'params'`` unchanged, each mutated collection replaced,
    and ``'batch_stats'`` including this step's backward statistics. Pure and
    jit-able; usable inside ``pmap``, ``shard_map`` and ``lax.scan``.
  """

  def wrapped(variables, *args, **kwargs):
    step = differentiate(
      fun, variables, args, kwargs, has_aux=has_aux, name="mabn_jax.value_and_grad"
    )
    return (step.value, step.variables), step.grads

  return wrapped


class Differentiated(NamedTuple):
  """What :func:`differentiate` returns.

  Attributes:
    value: the loss, or ``(loss, aux)``.
    variables: the new variables, in the given container type.
    grads: the gradient with respect to ``'params'``.
    extra_cotangent: the cotangent of ``extra``.
    taps_cotangent: the taps' cotangents (this step's increments, unscaled;
      ``{}`` for a model without taps).
  """

  value: Any
  variables: Any
  grads: Any
  extra_cotangent: Any
  taps_cotangent: Any


def step_taps(variables: dict, name: str) -> Tuple[Any, bool]:
  """``(taps, given)``: the variables' :data:`BACKWARD_STATS` collection, or
  (``given`` False) zero taps made from ``'batch_stats'`` when the variables
  lack it or hold it empty (Flax's ``TrainState`` keeps ``params`` and
  ``batch_stats`` only). Raises for variables the library cannot use, naming
  the collection and the fix."""
  if "params" not in variables:
    raise ValueError(
      f"{name}: the variables have no 'params' collection (found {sorted(variables)})."
    )
  stats = variables.get("batch_stats", {})
  if not variables.get(BACKWARD_STATS):
    return discovery.zero_taps(stats), False
  taps = variables[BACKWARD_STATS]
  legacy = _legacy_tap_paths(taps)
  if legacy:
    raise ValueError(legacy_tap_message(name, f"{BACKWARD_STATS}/{legacy[0]}"))
  given = traverse_util.flatten_dict(unfreeze(taps))
  missing = sorted(
    "/".join(path)
    for path in traverse_util.flatten_dict(discovery.zero_taps(stats))
    if path not in given
  )
  if missing:
    raise ValueError(
      f"{name}: the '{BACKWARD_STATS}' collection lacks the taps {missing} of layers "
      "whose 'batch_stats' hold a backward statistic. Pass the collection as "
      "model.init returned it, or leave it out of the variables entirely: "
      f"{name} then makes every layer's zero taps from 'batch_stats'."
    )
  return taps, True


def differentiate(
  fun: Callable[..., Any],
  variables: VariableTree,
  args: tuple,
  kwargs: dict,
  *,
  has_aux: bool,
  name: str,
  extra: Any = None,
  context: Callable[[Any], Any] = lambda extra: contextlib.nullcontext(),
  loss_scale: Any = None,
) -> Differentiated:
  """The step of :func:`value_and_grad` (and of the tools built on it).

  Differentiates ``fun(variables, *args, **kwargs)`` with respect to
  ``'params'``, the taps and ``extra`` (a tree of arrays the caller's
  ``context(extra)`` hands to the model, e.g. probes), in one backward pass,
  and feeds the taps' cotangents into ``'batch_stats'``.

  ``loss_scale`` (a float32 scalar ``S``, for loss scaling) differentiates
  ``S * loss`` with every tap's target statistic (``psi_buffer``,
  ``g_buffer``) passed to ``fun`` multiplied by ``S`` as well: the backward
  passes are linear in the cotangent and those statistics together (the
  forward passes do not read them), so the backward statistics they compute
  are ``S`` times the unscaled ones, consistent with the scaled cotangents.
  Every cotangent is then divided by ``S``, and the targets are restored
  before the increments are added: grads, increments and backward
  statistics come out unscaled (bit for bit for a power of two ``S`` while
  nothing overflows or underflows).
  """
  frozen = isinstance(variables, FrozenDict)
  variables = unfreeze(variables)
  taps, given = step_taps(variables, name)
  inputs = variables
  if loss_scale is not None and taps and "batch_stats" in variables:
    scaled = _map_targets(variables["batch_stats"], taps, lambda path, v: v * loss_scale)
    inputs = {**variables, "batch_stats": scaled}

  def loss_of(differentiable):
    params, tap_values, extra_values = differentiable
    inner = {**inputs, "params": params}
    inner = {**inner, BACKWARD_STATS: tap_values} if taps else inner
    with context(extra_values):
      out = fun(inner, *args, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
        f"{name}: fun must return (loss, mutated)"
        + (" with mutated = (mutated_collections, aux)" if has_aux else "")
        + f", got {type(out).__name__}."
      )
    return (out[0] if loss_scale is None else loss_scale * out[0]), out

  with training_step(made_taps=not given):
    (_, (loss, rest)), cotangents = jax.value_and_grad(loss_of, has_aux=True)(
      (variables["params"], taps, extra)
    )
  if loss_scale is not None:
    cotangents = jax.tree_util.tree_map(lambda c: unscaled_cotangent(c, loss_scale), cotangents)
  grads, taps_cotangent, extra_cotangent = cotangents
  mutated, aux = rest if has_aux else (rest, None)
  new_variables = {**variables, **unfreeze(mutated)}
  if not given:
    new_variables.pop(BACKWARD_STATS, None)
  if taps:
    restore = loss_scale is not None
    new_variables["batch_stats"] = _fed(variables, mutated, taps, taps_cotangent, name, restore)
  value = (loss, aux) if has_aux else loss
  new_variables = freeze(new_variables) if frozen else new_variables
  return Differentiated(value, new_variables, grads, extra_cotangent, taps_cotangent)


def unscaled_cotangent(cotangent: jax.Array, scale: jax.Array) -> jax.Array:
  """A cotangent of ``scale * loss`` divided by ``scale``, in at least float32."""
  return jnp.asarray(cotangent, jnp.promote_types(cotangent.dtype, jnp.float32)) / scale


def _map_targets(batch_stats: VariableTree, taps: VariableTree, fn: Callable) -> dict:
  """``batch_stats`` with each tap's target (:func:`stat_path`) ``v`` replaced
  by ``fn(path, v)`` cast to ``v``'s dtype; targets not there are skipped."""
  stats: Dict[Tuple, Any] = traverse_util.flatten_dict(unfreeze(batch_stats))
  for tap in traverse_util.flatten_dict(unfreeze(taps)):
    path = stat_path(tap)
    if path in stats:
      stats[path] = jnp.asarray(fn(path, stats[path]), jnp.result_type(stats[path]))
  return traverse_util.unflatten_dict(stats)


def _fed(
  variables: dict, mutated: Any, taps: Any, cotangent: Any, name: str, restore: bool
) -> dict:
  """The step's ``'batch_stats'``: the mutated ones plus the taps' increments;
  with ``restore``, the taps' targets as given first (they went to ``fun``
  scaled by the loss scale; the forward passes leave them unchanged)."""
  if "batch_stats" not in mutated:
    raise ValueError(
      f"{name}: the model has '{BACKWARD_STATS}' taps (backward statistics) but "
      "fun did not return a mutated 'batch_stats' collection to add them to; "
      "call model.apply(..., mutable=['batch_stats']) in fun and return its "
      "mutated collections."
    )
  stats = mutated["batch_stats"]
  if restore:
    given = traverse_util.flatten_dict(unfreeze(variables.get("batch_stats", {})))
    stats = _map_targets(stats, taps, lambda path, v: given.get(path, v))
  return feed_backward_statistics(stats, cotangent)
