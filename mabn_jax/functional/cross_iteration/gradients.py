"""The gradients CBN's training step offers (``CBNConfig.backward``).

The forward and the forward state are the same for every gradient; they
differ in what the backward pass treats as constant
(``docs/normalization.md``, section 4, "Gradient options"):

* ``'published'`` (the authors' layer): only the current group's ``mu``,
  ``nu`` carry gradient, so the gradient through the pooled moments is
  ``1/n`` of BN's for a window of ``n`` entries.
* ``'exact'``: the derivative of the forward as computed: the Taylor term
  ``d . W`` of every compensated entry carries its kernel gradient, and the
  entries of earlier groups of the same step (simulated small batch) carry
  theirs to ``x`` and ``W``. Buffered offsets stay constants.
* ``'batch'``: BN's backward with the pooled moments, differentiated as if
  they were the current group's own (``mu_bar = mu + stop_gradient(mu_bar -
  mu)``, the same for ``nu``).
* ``'averaged'``: ``'batch'``'s backward with its backward statistics
  ``g_B = mean(g)``, ``Psi_B = mean(g * xhat)`` replaced by their averages
  over the window the forward pools (:mod:`.averaged`); it keeps
  ``g_buffer``/``psi_buffer``, fed through taps.

Each is a :class:`Gradient` in :data:`GRADIENTS`, whose fields say what
differs.
"""

from __future__ import annotations

import dataclasses

from jax import lax

from mabn_jax.functional.cross_iteration.averaged import _averaged_normalize, _centred_scaled


@dataclasses.dataclass(frozen=True)
class Gradient:
  """One gradient of CBN's training step: what its backward pass differentiates.

  Attributes:
    name: the ``CBNConfig.backward`` value.
    differentiates_window: the window's entries carry gradient: the Taylor
      term of the compensated past entries to the kernel, the earlier groups
      of the same step to ``x`` and the kernel (``'exact'``). Otherwise a
      group's own moments are its only terms with gradient.
    pooled_as_own: the pooled moments are differentiated as if they were the
      group's own moments (``'batch'``).
    averages_backward_statistics: the backward pass is BN's with its
      backward statistics averaged over the window, a custom VJP; the state
      keeps ``g_buffer``/``psi_buffer``, fed through taps (``'averaged'``).
  """

  name: str
  differentiates_window: bool = False
  pooled_as_own: bool = False
  averages_backward_statistics: bool = False

  def pooled(self, mu, nu, mu_win, nu_win):
    """``(mu_bar, nu_bar)``, ``(G, C)``: the pooled moments ``mu_win``,
    ``nu_win`` differentiated as this gradient says (``mu``, ``nu``: the
    group's own)."""
    if self.pooled_as_own:
      return mu + lax.stop_gradient(mu_win - mu), nu + lax.stop_gradient(nu_win - nu)
    return mu_win, nu_win

  def normalize(self, y, mu_bar, inv_std, tap, state, past_filled, burning, groups, config):
    """``(y - mu_bar) * inv_std`` with ``(G, C)`` statistics, ``y``'s shape and
    dtype, its backward pass as this gradient says.

    ``tap``, ``state``, ``past_filled``, ``burning`` are read only by
    ``'averaged'`` (with a window of more than one entry; with one it is
    BN's backward, what ``'batch'`` differentiates).
    """
    if self.averages_backward_statistics and config.window > 1:
      return _averaged_normalize(
        y,
        tap[0],
        tap[1],
        lax.stop_gradient(mu_bar),
        lax.stop_gradient(inv_std),
        state.g_buffer,
        state.psi_buffer,
        past_filled,
        burning,
        groups,
        config,
      )
    return _centred_scaled(y, mu_bar, inv_std)


GRADIENTS = {
  gradient.name: gradient
  for gradient in (
    Gradient("published"),
    Gradient("exact", differentiates_window=True),
    Gradient("batch", pooled_as_own=True),
    Gradient("averaged", averages_backward_statistics=True),
  )
}
"""``{CBNConfig.backward: Gradient}``."""

BACKWARDS = tuple(GRADIENTS)
"""The gradients :class:`~mabn_jax.functional.cross_iteration.CBNConfig` offers
(``backward``)."""
