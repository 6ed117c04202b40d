"""Hooks: points of the training loop where a caller may act (tests inject faults here).

The loop calls, for a :class:`Hooks` given to
:func:`experiments.loop.loop.train`:

* :meth:`Hooks.after_step` after every training step (the step's checkpoint,
  if one is due, already saved);
* :meth:`Hooks.around_save` as a context manager around every checkpoint
  save (entered before the files are written, left once the save finished).

The defaults do nothing; subclass and override what is needed.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager


class Hooks:
  """Callbacks of the training loop; the base class does nothing."""

  def after_step(self, step: int) -> None:
    """Called after training step ``step`` (1-based) and its bookkeeping."""
    del step

  def around_save(self, step: int) -> ContextManager[None]:
    """A context manager the loop saves step ``step``'s checkpoint within."""
    del step
    return contextlib.nullcontext()


NO_HOOKS = Hooks()
"""The hooks of a run given none."""
