"""Accuracy, F1, Matthews correlation, Pearson and Spearman, in plain numpy.

Classification metrics take predicted and gold class indices; correlation metrics take predicted
and gold scores. All return a float in the usual units (not percent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else float("nan")


def _f1_for(positive, predictions, labels) -> float:
    tp = np.sum((predictions == positive) & (labels == positive))
    fp = np.sum((predictions == positive) & (labels != positive))
    fn = np.sum((predictions != positive) & (labels == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def f1(predictions, labels) -> float:
    """Binary F1 of class 1 when there are two classes, else macro-averaged F1 over the gold classes."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(np.unique(labels), np.unique(predictions))
    if set(classes.tolist()) <= {0, 1}:
        return _f1_for(1, predictions, labels)
    return float(np.mean([_f1_for(c, predictions, labels) for c in np.unique(labels)]))


def mcc(predictions, labels) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004); 0 when undefined."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(labels, predictions)
    index = {c: i for i, c in enumerate(classes.tolist())}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for p, t in zip(predictions.tolist(), labels.tolist(), strict=True):
        confusion[index[t], index[p]] += 1
    n = confusion.sum()
    correct = np.trace(confusion)
    true_totals, predicted_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * n - true_totals @ predicted_totals
    denominator = np.sqrt(n**2 - predicted_totals @ predicted_totals) * np.sqrt(n**2 - true_totals @ true_totals)
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks, ties sharing the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0
        start = end + 1
    return ranks


def spearman(predictions, labels) -> float:
    return pearson(_ranks(np.asarray(predictions, dtype=np.float64)), _ranks(np.asarray(labels, dtype=np.float64)))


METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}

REGRESSION_METRICS = frozenset({"pearson", "spearman"})


def compute_metrics(names, predictions, labels) -> dict[str, float]:
    return {name: METRICS[name](predictions, labels) for name in names}
