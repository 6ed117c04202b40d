"""Segmentation metrics from a confusion matrix accumulated over a split.

``cm[t, p]`` counts pixels of true class ``t`` predicted as ``p``; pixels
labelled :data:`experiments.tasks.segmentation.data.IGNORE` (or any label outside
``0..K-1``) are not counted. Summed over batches, the matrix gives the
split's metrics exactly (not a mean of per-batch metrics).

* pixel accuracy: ``trace(cm) / sum(cm)``.
* IoU of class ``c``: ``cm[c, c] / (sum_p cm[c, p] + sum_t cm[t, c] - cm[c, c])``,
  true positives over the union of the pixels labelled ``c`` and those
  predicted ``c``.
* mean IoU: the mean of the IoUs of the classes *present in that union*
  (union > 0: in the ground truth or in the predictions); classes neither
  labelled nor predicted anywhere in the split are left out, not counted as
  1 or 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int) -> jax.Array:
  """int32 ``(K, K)`` counts of ``(label, prediction)`` pairs.

  Args:
    labels: int ``(...)`` true labels; values outside ``0..K-1`` are ignored.
    preds: int, the same shape, predictions in ``0..K-1``.
    num_classes: ``K``.
  """
  labels = labels.reshape(-1).astype(jnp.int32)
  preds = preds.reshape(-1).astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + preds, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes**2)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def class_iou(cm: np.ndarray) -> np.ndarray:
  """float64 ``(K,)`` IoU per class; NaN where the union is empty."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
  """Mean IoU over the classes with a non-empty union (0.0 for an empty matrix)."""
  iou = class_iou(cm)
  present = ~np.isnan(iou)
  return float(iou[present].mean()) if present.any() else 0.0


def pixel_accuracy(cm: np.ndarray) -> float:
  """Share of counted pixels predicted correctly (0.0 for an empty matrix)."""
  cm = np.asarray(cm, np.float64)
  total = cm.sum()
  return float(np.trace(cm) / total) if total else 0.0
