"""Validation of static hyper-parameters, shared by the functional configs."""

from __future__ import annotations

from typing import Any, Iterable, Tuple


def is_int_at_least(value: Any, low: int) -> bool:
  """Whether ``value`` is a Python integer (not a bool) ``>= low``."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_fields(where: str, checks: Iterable[Tuple[str, Any, bool, str]]) -> None:
  """Raises ``ValueError`` for the first ``(field, value, ok, expected)`` not ``ok``.

  The message names ``where`` (a layer path), the field, what was expected
  and the value given.
  """
  for field, value, ok, expected in checks:
    if not ok:
      raise ValueError(f"{where}: {field} must be {expected}, got {value!r}.")


class UnnamedLayerError(ValueError):
  """An error found inside a computation traced once and shared by many
  layers (a ``jax.jit`` whose cache must not depend on a layer's name).

  It carries the message without the layer's name; the function that
  called the shared computation re-raises it with :meth:`named`.
  """

  def named(self, where: str) -> ValueError:
    """The ``ValueError`` this error stands for, naming ``where``."""
    return ValueError(f"{where}: {self.args[0]}")

