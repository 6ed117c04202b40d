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

Variables saved before the tap had its own name hold ``'backward_stats'``
entries named ``psi_buffer``; layers and :func:`value_and_grad` reject them
with a message pointing to :func:`migrate_variables`, which renames them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Dict, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
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
"""The int32 ``'batch_stats'`` variable (NNX: ``nnx.BatchStat``) of every
stateful normalizer counting the steps it skipped as non-finite."""

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


def migrate_variables(variables: VariableTree):
  """Variables saved with the old tap layout, in the current one.

  Renames every ``'backward_stats'`` tap of the old layout (``psi_buffer``,
  which shared the name of the ``'batch_stats'`` variable it updates) to its
  current name (``psi_increment``, see :data:`LEGACY_TAP_NAMES`). Values are
  unchanged (taps are zeros); every other collection is returned as is.
  Variables already in the current layout come back unchanged, so the call
  is safe on any variables. A ``FrozenDict`` stays frozen.

  Restore an old checkpoint without a target, then migrate::

    variables = mj.migrate_variables(ocp.StandardCheckpointer().restore(path))
  """
  frozen = isinstance(variables, FrozenDict)
  out = {k: v for k, v in unfreeze(variables).items()}
  if BACKWARD_STATS in out:
    flat = traverse_util.flatten_dict(out[BACKWARD_STATS])
    renamed = {}
    for path, value in flat.items():
      name = LEGACY_TAP_NAMES.get(path[-1], path[-1])
      new_path = path[:-1] + (name,)
      if new_path in renamed:
        raise ValueError(
          f"migrate_variables: '{'/'.join(path)}' and another tap both map to "
          f"'{'/'.join(new_path)}'."
        )
      renamed[new_path] = value
    out[BACKWARD_STATS] = traverse_util.unflatten_dict(renamed)
  return freeze(out) if frozen else out


def stat_path(tap_path: tuple) -> tuple:
  """Path of the ``'batch_stats'`` variable a tap at ``tap_path`` updates.

  Raises:
    ValueError: for a tap name not in :data:`TAP_TARGETS` (an old-layout
      tap gets the :func:`migrate_variables` message).
  """
  name = tap_path[-1]
  if name in LEGACY_TAP_NAMES:
    raise ValueError(legacy_tap_message("mabn_jax", "/".join(tap_path)))
  if name not in TAP_TARGETS:
    raise ValueError(
      f"backward-statistics tap {'/'.join(tap_path)}: unknown tap name {name!r} "
      f"(known taps: {sorted(TAP_TARGETS)})."
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
        f"backward-statistics tap {'/'.join(tap)} has no 'batch_stats' "
        f"variable {'/'.join(path)} to update; pass mutable=['batch_stats'] to model.apply "
        "in the loss function."
      )
    stats[path] = add_increment(stats[path], increment)
  return traverse_util.unflatten_dict(stats)


def nonfinite_counts(variables: VariableTree) -> dict:
  """``{layer path: number of skipped non-finite steps}`` for every normalizer.

  Reads the int32 ``nonfinite_count`` variables of ``variables['batch_stats']``
  (host-side; call it outside ``jit``).
  """
  stats = traverse_util.flatten_dict(unfreeze(variables).get("batch_stats", {}))
  return {
    "/".join(path[:-1]): int(np.asarray(value))
    for path, value in stats.items()
    if path[-1] == NONFINITE_COUNT
  }


def check_finite(variables: VariableTree) -> None:
  """Raises ``FloatingPointError`` naming every layer that skipped a step."""
  bad = {path: n for path, n in nonfinite_counts(variables).items() if n}
  if bad:
    raise FloatingPointError(
      "non-finite batch statistics: these layers kept their previous state "
      f"for the given number of steps: {bad}"
    )


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
    value, new_variables, grads, _ = differentiate(
      fun, variables, args, kwargs, has_aux=has_aux, name="mabn_jax.value_and_grad"
    )
    return (value, new_variables), grads

  return wrapped


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
):
  """The step of :func:`value_and_grad` (and of the recording tools built on it).

  Differentiates ``fun(variables, *args, **kwargs)`` with respect to
  ``'params'``, the taps and ``extra`` (a tree of arrays the caller's
  ``context(extra)`` hands to the model, e.g. probes), in one backward pass,
  and feeds the taps' cotangents into ``'batch_stats'``.

  Returns:
    ``(value, new_variables, grads, extra_cotangent)``; ``value`` is the loss
    or ``(loss, aux)``, ``new_variables`` in ``variables``' container type.
  """
  frozen = isinstance(variables, FrozenDict)
  variables = unfreeze(variables)
  given = BACKWARD_STATS in variables
  # Variables without the taps (Flax's TrainState keeps params and batch_stats
  # only): the taps are zeros, made from the statistics they update.
  taps = (
    variables[BACKWARD_STATS] if given else discovery.zero_taps(variables.get("batch_stats", {}))
  )
  if "params" not in variables:
    raise ValueError(
      f"{name}: the variables have no 'params' collection (found {sorted(variables)})."
    )
  legacy = _legacy_tap_paths(taps)
  if legacy:
    raise ValueError(legacy_tap_message(name, f"{BACKWARD_STATS}/{legacy[0]}"))

  def loss_of(differentiable):
    params, tap_values, extra_values = differentiable
    inner = (
      {**variables, "params": params, BACKWARD_STATS: tap_values}
      if taps
      else {**variables, "params": params}
    )
    with context(extra_values):
      out = fun(inner, *args, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
        f"{name}: fun must return (loss, mutated)"
        + (" with mutated = (mutated_collections, aux)" if has_aux else "")
        + f", got {type(out).__name__}."
      )
    return out

  with training_step(made_taps=not given):
    (loss, rest), (grads, taps_cotangent, extra_cotangent) = jax.value_and_grad(
      loss_of, has_aux=True
    )((variables["params"], taps, extra))
  mutated, aux = rest if has_aux else (rest, None)
  new_variables = {**variables, **unfreeze(mutated)}
  if not given:
    new_variables.pop(BACKWARD_STATS, None)
  if taps:
    if "batch_stats" not in mutated:
      raise ValueError(
        f"{name}: the model has backward-statistics taps but fun did not return a "
        "mutated 'batch_stats' collection; call model.apply(..., mutable=['batch_stats'])."
      )
    new_variables["batch_stats"] = feed_backward_statistics(
      new_variables["batch_stats"], taps_cotangent
    )
  value = (loss, aux) if has_aux else loss
  return value, freeze(new_variables) if frozen else new_variables, grads, extra_cotangent


def accumulate_value_and_grad(fun: Callable[..., Any], has_aux: bool = False):
  """:func:`value_and_grad` over micro-batches, for gradient accumulation.

  Semantics: each micro-batch is one normalization step. The micro-batches
  run one after another (a ``lax.scan``) with the same ``'params'``; every
  normalizer normalizes each micro-batch with its own batch statistics and
  updates its state once per micro-batch, so after ``A`` micro-batches its
  step counters have advanced by ``A`` and its buffers hold ``A`` more
  entries, exactly as ``A`` training steps without an optimizer update
  would leave them. The gradient and the loss are the means over the
  micro-batches: apply the optimizer once to them. For BN-type layers the
  gradient equals that of one step on the whole batch with
  ``norm_batch_size`` = the micro-batch size (the running statistics then
  differ: ``A`` EMA updates instead of one).

  Args:
    fun: as for :func:`value_and_grad`, ``fun(variables, *args)``.
    has_aux: whether ``fun`` returns auxiliary data.

  Returns:
    A function ``(variables, *args)`` where every leaf of ``args`` has a
    leading micro-batch axis ``A``, returning ``((loss, variables), grads)``
    (``((loss, aux), variables), grads`` with ``aux`` stacked along ``A`` if
    ``has_aux``): ``loss`` and ``grads`` averaged over the micro-batches,
    ``variables`` after the last one. Keyword arguments are passed to every
    call unchanged. A non-finite micro-batch keeps the normalizer state for
    that micro-batch (see :func:`value_and_grad`) and makes the mean
    gradient non-finite, so an optimizer that skips non-finite steps skips
    the whole accumulated step.
  """
  step = value_and_grad(fun, has_aux=has_aux)

  def wrapped(variables, *args, **kwargs):
    frozen = isinstance(variables, FrozenDict)
    variables = unfreeze(variables)
    params = variables["params"]

    def body(carry, micro_batch):
      current, grad_sum = carry
      (value, current), grads = step({**current, "params": params}, *micro_batch, **kwargs)
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return (current, grad_sum), value

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (new_variables, grad_sum), values = jax.lax.scan(body, (variables, zeros), args)
    count = jax.tree_util.tree_leaves(args)[0].shape[0]
    grads = jax.tree_util.tree_map(lambda g: g / count, grad_sum)
    if has_aux:
      losses, aux = values
      value = (jnp.mean(losses), aux)
    else:
      value = jnp.mean(jnp.asarray(values))
    if frozen:
      new_variables = freeze(new_variables)
    return (value, new_variables), grads

  return wrapped
