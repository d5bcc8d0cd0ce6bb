"""GLUE metrics in plain numpy: accuracy, F1, Matthews correlation, Pearson and Spearman.

Undefined correlations (a constant prediction or label vector) are reported as 0.0 rather than NaN
so that model selection can always compare scores; this matches scikit-learn's convention for MCC.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .errors import DataError
from .tasks import GlueTask, get_task


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1_score(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of class ``positive`` (GLUE's MRPC/QQP F1); 0.0 when it has no support at all."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    denom = np.sum(p == positive) + np.sum(y == positive)
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (multi-class form; the phi coefficient for 2 classes).

    Returns 0.0 when either the predictions or the labels are constant.
    """
    p, y = _pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (encoded[: y.size], encoded[y.size:]), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    cov_yp = correct * total - pred_counts @ true_counts
    cov_pp = total**2 - pred_counts @ pred_counts
    cov_yy = total**2 - true_counts @ true_counts
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation coefficient; 0.0 when either input is constant."""
    a, b = _pair(x, y)
    a = a.astype(np.float64) - a.mean(dtype=np.float64)
    b = b.astype(np.float64) - b.mean(dtype=np.float64)
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else 0.0


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the ranks they span."""
    v = np.asarray(values).reshape(-1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    # A group spanning ranks last-count+1 .. last has mean rank last - (count - 1) / 2.
    group_rank = last_rank - (counts - 1) / 2.0
    return group_rank[inverse].astype(np.float64)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks)."""
    a, b = _pair(x, y)
    return pearson(average_ranks(a), average_ranks(b))


def predictions_from_outputs(task: str | GlueTask, outputs: ArrayLike) -> np.ndarray:
    """Turn model outputs into predictions: argmax of logits, or the score for regression.

    ``outputs`` may already be predicted class ids (a 1-D integer array).
    """
    task = get_task(task)
    out = np.asarray(outputs)
    if task.is_regression:
        if out.ndim == 2 and out.shape[1] != 1:
            raise ValueError(f"task {task.name} is a regression; got outputs of shape {out.shape}")
        return out.reshape(-1).astype(np.float64)
    if out.ndim == 2:
        if out.shape[1] != task.num_labels:
            raise ValueError(
                f"task {task.name} has {task.num_labels} labels; got logits of shape {out.shape}"
            )
        return out.argmax(axis=1)
    if out.ndim == 1 and np.issubdtype(out.dtype, np.integer):
        return out
    raise ValueError(f"expected logits (N, {task.num_labels}) or class ids (N,); got {out.shape}")


def compute_metrics(
    task: str | GlueTask, outputs: ArrayLike, labels: ArrayLike
) -> dict[str, float]:
    """All metrics of ``task`` (``GlueTask.metrics``); select checkpoints on ``task.main_metric``.

    Args:
        outputs: logits ``(N, num_labels)``, class ids ``(N,)``, or scores for STS-B.
        labels: gold label ids (or scores).

    Raises:
        DataError: a label id is outside the task's label set.
    """
    task = get_task(task)
    preds = predictions_from_outputs(task, outputs)
    gold = np.asarray(labels).reshape(-1)
    if not task.is_regression and gold.size and (gold.min() < 0 or gold.max() >= task.num_labels):
        raise DataError(
            f"labels outside the label ids 0..{task.num_labels - 1} of task {task.name}"
        )
    scores: dict[str, float] = {}
    for name in task.metrics:
        if name == "acc":
            scores[name] = accuracy(preds, gold)
        elif name == "f1":
            scores[name] = f1_score(preds, gold)
        elif name == "acc_and_f1":
            scores[name] = (accuracy(preds, gold) + f1_score(preds, gold)) / 2
        elif name == "mcc":
            scores[name] = matthews_corrcoef(preds, gold)
        elif name == "pearson":
            scores[name] = pearson(preds, gold)
        elif name == "spearman":
            scores[name] = spearman(preds, gold)
        elif name == "corr":
            scores[name] = (pearson(preds, gold) + spearman(preds, gold)) / 2
        else:  # pragma: no cover - guarded by the registry
            raise ValueError(f"unknown metric {name!r}")
    return scores
