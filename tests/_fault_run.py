"""``python -m experiments.train`` with a fault injected, for tests/test_experiments_faults.py.

``python tests/_fault_run.py FAULT ARG...`` runs the command line of
:mod:`experiments.train` on ``ARG...`` with :class:`FaultHooks` (``FAULT``):
``step:N`` SIGKILLs the run after training step ``N``; ``save:N`` while
saving step ``N``'s checkpoint, after its files are written and before orbax
finalizes it (renames its temporary directory).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import sys

from experiments.loop.cli import main
from experiments.loop.hooks import Hooks


def _kill_self():
  os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def killing_finalize(step: int):
  """Within: orbax's finalization of the checkpoint directory named ``step``
  SIGKILLs this process first (its files written, the directory not renamed)."""
  from orbax.checkpoint._src.path import atomicity

  cls = atomicity.AtomicRenameTemporaryPath
  finalize = cls.finalize

  def kill_if_armed(path):
    if path._final_path.name == str(step):
      _kill_self()

  # A coroutine in recent orbax-checkpoint releases, a function in 0.11.17.
  if inspect.iscoroutinefunction(finalize):

    async def patched(self, *args, **kwargs):
      kill_if_armed(self)
      return await finalize(self, *args, **kwargs)
  else:

    def patched(self, *args, **kwargs):
      kill_if_armed(self)
      return finalize(self, *args, **kwargs)

  cls.finalize = patched
  try:
    yield
  finally:
    cls.finalize = finalize


class FaultHooks(Hooks):
  """Kills the run after a step (``step:N``) or in a checkpoint save (``save:N``)."""

  def __init__(self, fault: str):
    kind, _, at = fault.partition(":")
    if kind not in ("step", "save"):
      raise ValueError(f"fault {fault!r}: expected step:N or save:N")
    self.kind, self.at = kind, int(at)

  def after_step(self, step: int) -> None:
    if self.kind == "step" and step == self.at:
      _kill_self()

  def around_save(self, step: int):
    if self.kind == "save" and step == self.at:
      return killing_finalize(step)
    return contextlib.nullcontext()


if __name__ == "__main__":
  sys.exit(main(sys.argv[2:], hooks=FaultHooks(sys.argv[1])))
