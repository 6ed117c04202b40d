"""Small helpers shared by the command lines and reports of the experiments."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def ints(text) -> List[int]:
  """``'2,4'`` -> ``[2, 4]`` (empty items skipped)."""
  return [int(t) for t in str(text).split(",") if t.strip()]


def names(text) -> List[str]:
  """``'bn, mabn'`` -> ``['bn', 'mabn']`` (stripped, empty items skipped)."""
  return [t.strip() for t in str(text).split(",") if t.strip()]


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
  """``(mean, std, n)`` of the values that are not ``None`` (sample std, 0 for
  one value; ``(None, None, 0)`` for none)."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if len(v) == 0:
    return None, None, 0
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)
