"""Validation of static hyper-parameters, shared by the functional configs."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Tuple

from jax import lax


def is_int_at_least(value: Any, low: int) -> bool:
  """Whether ``value`` is a Python integer (not a bool) ``>= low``."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_fields(where: Optional[str], checks: Iterable[Tuple[str, Any, bool, str]]) -> None:
  """Raises for the first ``(field, value, ok, expected)`` not ``ok``.

  The message names the field, what was expected and the value given; see
  :func:`layer_error` for ``where``.
  """
  for field, value, ok, expected in checks:
    if not ok:
      raise layer_error(where, f"{field} must be {expected}, got {value!r}.")


class UnnamedLayerError(ValueError):
  """An error found inside a computation traced once and shared by many
  layers (a ``jax.jit`` whose cache must not depend on a layer's name).

  It carries the message without the layer's name; the function that
  called the shared computation re-raises it with :meth:`named`.
  """

  def named(self, where: str) -> ValueError:
    """The ``ValueError`` this error stands for, naming ``where``."""
    return ValueError(f"{where}: {self.args[0]}")


def layer_error(where: Optional[str], message: str) -> ValueError:
  """The error for ``message``: a ``ValueError`` naming ``where`` (a layer),
  or, for ``where=None`` (the functional interface), an
  :class:`UnnamedLayerError` that the layer's wrapper names."""
  if where is None:
    return UnnamedLayerError(message)
  return ValueError(f"{where}: {message}")


def check_state_shape(
  where: str,
  name: str,
  value: Any,
  expected: Sequence[int],
  cause: str = "number of channels (or buffer size)",
) -> None:
  """Raises if a stored variable's shape differs from what the input implies."""
  if tuple(value.shape) != tuple(expected):
    raise ValueError(
      f"{where}: stored variable '{name}' has shape {tuple(value.shape)} but the "
      f"input implies {tuple(expected)}; was the layer initialized with a "
      f"different {cause}?"
    )


def require_bound_axis(where: str, axis_name: Optional[str]) -> None:
  """Raises ``ValueError`` naming the layer if ``axis_name`` is not a mapped
  axis of the current trace (the layer runs outside ``pmap``/``shard_map``
  or under another axis name); does nothing for ``axis_name=None``."""
  if axis_name is None:
    return
  try:
    lax.axis_size(axis_name)
  except NameError as error:
    raise ValueError(
      f"{where}: axis_name {axis_name!r} is not bound: a training step with "
      f"synchronized statistics must run under jax.pmap or shard_map with that "
      f"axis name (or use axis_name=None)."
    ) from error
