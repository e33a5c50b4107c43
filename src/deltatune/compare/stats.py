"""Statistics for honest comparisons: seed spread, paired bootstrap intervals, verdicts, curve areas, time-to-target.

The paired bootstrap (Efron & Tibshirani 1993; Koehn 2004 for NLP) asks how much a difference
between two methods could move if the dev set had been another sample of the same size: resample
dev examples with replacement, score *both* methods on the *same* resample, and take the spread
of the difference. Pairing matters: most of the noise of a small dev set (which examples happen
to be easy) is shared by both methods and cancels in the difference.

With several seeds, each resample also draws seeds with replacement, the same seeds for both
methods (seed k trains both on the same data subset and batch order), and averages the metric
over the drawn seeds: the "multi-bootstrap" of Sellam et al. 2022 (MultiBERTs, arXiv:2106.16163).
The interval then covers both dev-set noise and seed-to-seed variation of the seed-averaged
difference. The metric is averaged over seeds, not the predictions (ensembling seeds would
measure a model nobody trains). With one seed it is the ordinary paired bootstrap.

Differences are reported in points: metric × 100 (accuracy 0.912 → 91.2; Pearson r 0.85 → 85).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deltatune.metrics import METRICS, REGRESSION_METRICS

_CHUNK = 256
"""Bootstrap replicates scored at once (bounds memory at CHUNK × dev size)."""


@dataclass(frozen=True)
class BootstrapResult:
    difference: float
    """Seed-averaged metric of the method minus the baseline's, on the full dev set (metric units)."""
    low: float
    high: float
    """The percentile interval of the difference at `confidence`."""
    method_value: float
    baseline_value: float
    num_examples: int
    num_seeds: int
    samples: int
    confidence: float

    def points(self) -> tuple[float, float, float]:
        return 100 * self.difference, 100 * self.low, 100 * self.high


def predictions_from_outputs(outputs: np.ndarray, metric: str) -> np.ndarray:
    """Raw dev outputs (n × classes logits, or n × 1 scores) as what the metric compares to the labels."""
    outputs = np.asarray(outputs)
    if outputs.ndim == 2 and outputs.shape[1] == 1 or metric in REGRESSION_METRICS:
        return outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64)
    return outputs.argmax(axis=-1)


def metric_rows(metric: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`metric` for each row of (replicates × n) arrays, vectorised for the metrics tasks pick as primary.

    Equal to `deltatune.metrics.METRICS[metric]` row by row (the tests check it); other metrics fall
    back to calling that function per row.
    """
    if metric == "accuracy":
        return (predictions == labels).mean(axis=1)
    if metric == "pearson":
        x = predictions - predictions.mean(axis=1, keepdims=True)
        y = labels - labels.mean(axis=1, keepdims=True)
        denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
        numerator = (x * y).sum(axis=1)
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    if metric in ("mcc", "f1"):
        return _confusion_metric_rows(metric, predictions.astype(np.int64), labels.astype(np.int64))
    function = METRICS[metric]
    return np.array([function(p, t) for p, t in zip(predictions, labels, strict=True)], dtype=np.float64)


def _confusion_metric_rows(metric: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rows, _ = predictions.shape
    classes = int(max(predictions.max(), labels.max())) + 1
    codes = labels * classes + predictions + (np.arange(rows) * classes * classes)[:, None]
    confusion = np.bincount(codes.ravel(), minlength=rows * classes * classes).reshape(rows, classes, classes)
    confusion = confusion.astype(np.float64)  # [row, true, predicted]
    true_totals, predicted_totals = confusion.sum(axis=2), confusion.sum(axis=1)
    diagonal = np.diagonal(confusion, axis1=1, axis2=2)
    if metric == "mcc":
        n = confusion.sum(axis=(1, 2))
        correct = diagonal.sum(axis=1)
        numerator = correct * n - (true_totals * predicted_totals).sum(axis=1)
        denominator = np.sqrt(n**2 - (predicted_totals**2).sum(axis=1)) * np.sqrt(n**2 - (true_totals**2).sum(axis=1))
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    # f1 as in deltatune.metrics: binary F1 of class 1 when only classes 0/1 occur, else macro over gold classes
    false_positives = predicted_totals - diagonal
    false_negatives = true_totals - diagonal
    denominators = 2 * diagonal + false_positives + false_negatives
    per_class = np.divide(2 * diagonal, denominators, out=np.zeros_like(diagonal), where=denominators > 0)
    present = (true_totals > 0) | (predicted_totals > 0)
    binary = ~present[:, 2:].any(axis=1) if classes > 2 else np.ones(rows, dtype=bool)
    gold = true_totals > 0
    macro = (per_class * gold).sum(axis=1) / np.maximum(gold.sum(axis=1), 1)
    return np.where(binary, per_class[:, 1] if classes > 1 else 0.0, macro)


def paired_bootstrap(
    method_predictions: Sequence[np.ndarray],
    baseline_predictions: Sequence[np.ndarray],
    labels: np.ndarray,
    metric: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Interval of (method − baseline) in `metric`; the i-th predictions of both lists come from the same seed."""
    if len(method_predictions) != len(baseline_predictions) or not method_predictions:
        raise ValueError("paired_bootstrap needs the same (non-zero) number of seeds for both methods")
    labels = np.asarray(labels)
    method = np.stack([np.asarray(p) for p in method_predictions])
    baseline = np.stack([np.asarray(p) for p in baseline_predictions])
    seeds, n = method.shape
    if baseline.shape != method.shape or labels.shape != (n,):
        raise ValueError(f"shapes differ: method {method.shape}, baseline {baseline.shape}, labels {labels.shape}")
    everything = np.arange(n)[None, :]
    method_value = float(
        np.mean([metric_rows(metric, method[s][everything], labels[everything])[0] for s in range(seeds)])
    )
    baseline_value = float(
        np.mean([metric_rows(metric, baseline[s][everything], labels[everything])[0] for s in range(seeds)])
    )
    rng = np.random.default_rng(seed)
    differences = np.empty(samples)
    for start in range(0, samples, _CHUNK):
        count = min(_CHUNK, samples - start)
        indices = rng.integers(0, n, size=(count, n))
        drawn_seeds = rng.integers(0, seeds, size=(count, seeds)) if seeds > 1 else np.zeros((count, 1), int)
        resampled_labels = labels[indices]
        method_scores = np.stack([metric_rows(metric, method[s][indices], resampled_labels) for s in range(seeds)])
        baseline_scores = np.stack([metric_rows(metric, baseline[s][indices], resampled_labels) for s in range(seeds)])
        replicate = np.arange(count)[:, None]
        differences[start : start + count] = method_scores[drawn_seeds, replicate].mean(axis=1) - baseline_scores[
            drawn_seeds, replicate
        ].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return BootstrapResult(
        method_value - baseline_value,
        float(low),
        float(high),
        method_value,
        baseline_value,
        n,
        seeds,
        samples,
        confidence,
    )


def matches(result: BootstrapResult, margin_points: float = 1.0) -> bool:
    """Not worse than the baseline by more than the margin, at the interval's confidence (non-inferiority)."""
    return 100 * result.low >= -margin_points - 1e-9


def verdict(result: BootstrapResult, margin_points: float = 1.0) -> str:
    """A short verdict from the interval of the difference, in points.

    'within 1 point' (the whole interval inside ± margin), 'worse by 3.2 [1.9, 4.6]' (entirely below 0),
    'better by 2.0 [0.4, 3.5]' (entirely above 0), 'within 1 point or better: +0.6 [-0.4, +1.7]' (not
    worse by more than the margin, maybe better), else 'unclear: -1.5 [-4.0, +1.1]'. `matches` is true
    exactly for the first, third and fourth.
    """
    difference, low, high = result.points()
    margin = margin_points + 1e-9
    unit = "point" if margin_points == 1 else "points"
    if low >= -margin and high <= margin:
        return f"within {margin_points:g} {unit}"
    if high < 0:
        return f"worse by {-difference:.1f} [{-high:.1f}, {-low:.1f}]"
    if low > 0:
        return f"better by {difference:.1f} [{low:.1f}, {high:.1f}]"
    if low >= -margin:
        return f"within {margin_points:g} {unit} or better: {difference:+.1f} [{low:+.1f}, {high:+.1f}]"
    return f"unclear: {difference:+.1f} [{low:+.1f}, {high:+.1f}]"


def mean_and_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); missing and NaN values are left out."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return float("nan"), float("nan")
    mean = sum(present) / len(present)
    if len(present) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))


def area_under_fraction_curve(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under metric-against-data-fraction, divided by the fraction range.

    The result is in metric units: the average metric over the range of data amounts tried, so one
    number says how well a method does across data amounts (a single fraction gives its value).
    """
    pairs = sorted(zip(fractions, values, strict=True))
    if not pairs:
        return float("nan")
    if len(pairs) == 1:
        return float(pairs[0][1])
    xs = np.array([p[0] for p in pairs], dtype=np.float64)
    ys = np.array([p[1] for p in pairs], dtype=np.float64)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / (xs[-1] - xs[0]))


def time_to_target(curve: Sequence[dict], target: float) -> float | None:
    """Training seconds at the first dev evaluation reaching `target`; None if it never does.

    `curve` is a learning curve (points with 'train_time_s' and 'value', in evaluation order). The
    clock is the trainer's training time, which leaves evaluation out, so a method is not charged
    for how often it was evaluated.
    """
    for point in curve:
        value = point.get("value")
        if value is not None and not math.isnan(value) and value >= target:
            return float(point["train_time_s"])
    return None


__all__ = [
    "BootstrapResult",
    "paired_bootstrap",
    "verdict",
    "matches",
    "mean_and_std",
    "metric_rows",
    "predictions_from_outputs",
    "area_under_fraction_curve",
    "time_to_target",
]
