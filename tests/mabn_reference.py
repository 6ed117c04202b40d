"""An independent NumPy float64 reference of MABN (spec, section 2).

Written from the spec's formulas, one normalization group at a time, with
explicit histories instead of shift buffers, so that it shares no code with
the library.
"""

from __future__ import annotations

import numpy as np


class MABNReference:
  """MABN forward and stabilized backward for a ``(N, ..., C)`` input."""

  def __init__(
    self,
    channels,
    buffer_size=16,
    warmup=100,
    renorm_start=1000,
    r_max=5.0,
    momentum=0.98,
    eps=1e-5,
    norm_batch_size=None,
    average_forward=True,
    average_backward=True,
    moving_average="sma",
  ):
    self.m = buffer_size
    self.warmup = warmup
    self.renorm_start = renorm_start
    self.r_max = r_max
    self.momentum = momentum
    self.eps = eps
    self.b = norm_batch_size
    self.average_forward = average_forward
    self.average_backward = average_backward
    self.moving_average = moving_average
    self.chi_history = [np.zeros(channels)] * buffer_size
    self.psi_history = [np.zeros(channels)] * buffer_size
    self.chi_ema = np.ones(channels)
    self.step = 0

  def _averages(self, history, current):
    """(what group j sees for each j, the values appended to the history)."""
    if self.moving_average == "sma":
      values = history + current
      return [
        np.mean(values[len(history) + j + 1 - self.m : len(history) + j + 1], axis=0)
        for j in range(len(current))
      ], current
    decay = 1 - 2 / (self.m + 1)
    average = current[0] if self.step == 1 else history[-1]
    averages = []
    for value in current:
      average = decay * average + (1 - decay) * value
      averages.append(average)
    return averages, averages

  def train_step(self, x, gy, gamma, beta):
    """Returns ``(y, gx, ggamma, gbeta)`` for loss ``sum(y * gy)``."""
    x = np.asarray(x, np.float64)
    gy = np.asarray(gy, np.float64)
    n = x.shape[0]
    b = n if self.b is None else self.b
    groups = n // b
    reduce_axes = tuple(range(x.ndim - 1))
    self.step += 1
    t = self.step
    use_sma = t > self.m and t >= self.warmup
    renorm = t > max(self.renorm_start, self.warmup)

    chi_batch = [np.mean(x[j * b : (j + 1) * b] ** 2, axis=reduce_axes) for j in range(groups)]
    chi_average, chi_pushed = self._averages(self.chi_history, chi_batch)
    chi_used, r = [], []
    for j in range(groups):
      chi = chi_average[j] if use_sma and self.average_forward else chi_batch[j]
      chi_used.append(chi)
      ratio = np.sqrt(chi + self.eps) / np.sqrt(self.chi_ema + self.eps)
      r.append(np.clip(ratio, 1 / self.r_max, self.r_max) if renorm else np.ones_like(chi))

    y = np.empty_like(x)
    xhat = np.empty_like(x)
    g = np.empty_like(x)
    psi_batch = []
    for j in range(groups):
      sl = slice(j * b, (j + 1) * b)
      xhat[sl] = x[sl] / np.sqrt(chi_used[j] + self.eps)
      y[sl] = gamma * r[j] * xhat[sl] + beta
      g[sl] = r[j] * gamma * gy[sl]
      psi_batch.append(np.mean(xhat[sl] * g[sl], axis=reduce_axes))
    gx = np.empty_like(x)
    ggamma = np.zeros_like(gamma)
    psi_average, psi_pushed = self._averages(self.psi_history, psi_batch)
    for j in range(groups):
      sl = slice(j * b, (j + 1) * b)
      psi = psi_average[j] if use_sma and self.average_backward else psi_batch[j]
      gx[sl] = (g[sl] - xhat[sl] * psi) / np.sqrt(chi_used[j] + self.eps)
      ggamma += np.sum(gy[sl] * r[j] * xhat[sl], axis=reduce_axes)
    gbeta = np.sum(gy, axis=reduce_axes)

    self.chi_ema = self.momentum * self.chi_ema + (1 - self.momentum) * np.mean(chi_used, axis=0)
    self.chi_history = self.chi_history + list(chi_pushed)
    self.psi_history = self.psi_history + list(psi_pushed)
    return y, gx, ggamma, gbeta

  def state(self):
    return dict(
      chi_ema=self.chi_ema,
      chi_buffer=np.stack(self.chi_history[-self.m :]),
      psi_buffer=np.stack(self.psi_history[-self.m :]),
      step=self.step,
    )

  def inference(self, x, gamma, beta):
    return gamma * np.asarray(x, np.float64) / np.sqrt(self.chi_ema + self.eps) + beta
