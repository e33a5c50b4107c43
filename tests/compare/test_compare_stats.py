"""Statistics against cases with a known answer: vectorised metrics, the paired bootstrap, verdicts, areas, times."""

import math

import numpy as np
import pytest

from deltatune.compare.stats import (
    BootstrapResult,
    area_under_fraction_curve,
    matches,
    mean_and_std,
    metric_rows,
    paired_bootstrap,
    time_to_target,
    verdict,
)
from deltatune.metrics import METRICS


@pytest.mark.parametrize(
    "metric,classes",
    [("accuracy", 3), ("f1", 2), ("f1", 4), ("mcc", 2), ("mcc", 3), ("pearson", None), ("spearman", None)],
)
def test_vectorised_metrics_equal_the_reference_functions(metric, classes):
    rng = np.random.default_rng(0)
    if classes is None:
        labels = rng.normal(size=(40, 25))
        predictions = labels + rng.normal(size=(40, 25))
        predictions[0] = 1.0  # a constant row: correlation defined as 0
    else:
        labels = rng.integers(0, classes, size=(40, 25))
        predictions = np.where(rng.random((40, 25)) < 0.6, labels, rng.integers(0, classes, size=(40, 25)))
        predictions[0] = 0
        labels[1] = 1  # degenerate rows: one predicted class, one gold class
    expected = [METRICS[metric](p, t) for p, t in zip(predictions, labels, strict=True)]
    np.testing.assert_allclose(metric_rows(metric, predictions, labels), expected, atol=1e-12)


def test_bootstrap_interval_of_an_accuracy_difference_matches_the_normal_approximation():
    """For accuracy, the difference is the mean of per-example d_i in {-1, 0, 1}: its 95% interval is
    mean(d) ± 1.96 · sd(d) / sqrt(n), which the bootstrap must reproduce for large n."""
    rng = np.random.default_rng(1)
    n = 3000
    labels = rng.integers(0, 2, size=n)
    method = np.where(rng.random(n) < 0.80, labels, 1 - labels)
    baseline = np.where(rng.random(n) < 0.75, labels, 1 - labels)
    result = paired_bootstrap([method], [baseline], labels, "accuracy", samples=4000, seed=3)
    d = (method == labels).astype(float) - (baseline == labels).astype(float)
    half_width = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert result.difference == pytest.approx(d.mean())
    assert result.low == pytest.approx(d.mean() - half_width, abs=0.004)
    assert result.high == pytest.approx(d.mean() + half_width, abs=0.004)
    assert result.method_value == pytest.approx((method == labels).mean())


def test_pairing_cancels_shared_noise():
    """Two methods that differ on only 30 of 2,000 examples: the paired interval is far narrower than
    the unpaired one (each accuracy alone is uncertain by about ±2 points)."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=2000)
    baseline = np.where(rng.random(2000) < 0.7, labels, 1 - labels)
    method = baseline.copy()
    wrong = np.flatnonzero(baseline != labels)[:30]
    method[wrong] = labels[wrong]  # fixes 30 mistakes
    result = paired_bootstrap([method], [baseline], labels, "accuracy", samples=2000)
    assert result.difference == pytest.approx(30 / 2000)
    assert 0 < result.low < result.difference < result.high < 0.03
    same = paired_bootstrap([baseline], [baseline], labels, "accuracy", samples=500)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    assert verdict(same) == "within 1 point" and matches(same)


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(4)
    labels = rng.normal(size=1500)
    baseline = [labels + rng.normal(0, 0.5, size=1500) for _ in range(3)]
    steady = [labels + rng.normal(0, 0.5, size=1500) for _ in range(3)]
    erratic = [labels + rng.normal(0, noise, size=1500) for noise in (0.2, 0.5, 1.5)]
    narrow = paired_bootstrap(steady, baseline, labels, "pearson", samples=1000)
    wide = paired_bootstrap(erratic, baseline, labels, "pearson", samples=1000)
    assert narrow.num_seeds == 3 and abs(narrow.difference) < 0.01
    assert (wide.high - wide.low) > 3 * (narrow.high - narrow.low)
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(steady, baseline[:2], labels, "pearson")


def result(difference: float, low: float, high: float) -> BootstrapResult:
    return BootstrapResult(difference / 100, low / 100, high / 100, 0.5, 0.5, 100, 1, 1000, 0.95)


def test_verdicts_read_like_a_person_would_say_them():
    assert verdict(result(-3.2, -4.6, -1.9)) == "worse by 3.2 [1.9, 4.6]"
    assert verdict(result(2.0, 0.4, 3.5)) == "better by 2.0 [0.4, 3.5]"
    assert verdict(result(0.2, -0.6, 0.9)) == "within 1 point"
    assert verdict(result(0.6, -0.4, 1.7)) == "within 1 point or better: +0.6 [-0.4, +1.7]"
    assert verdict(result(-1.5, -4.0, 1.1)) == "unclear: -1.5 [-4.0, +1.1]"
    assert verdict(result(-1.5, -2.5, -0.5), margin_points=3) == "within 3 points"
    assert [matches(result(*r)) for r in ((-3.2, -4.6, -1.9), (0.6, -0.4, 1.7), (-1.5, -4.0, 1.1))] == [
        False,
        True,
        False,
    ]


def test_area_under_the_fraction_curve():
    assert area_under_fraction_curve([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    assert area_under_fraction_curve([1.0, 0.1, 0.3], [0.8, 0.8, 0.8]) == pytest.approx(0.8)
    # trapezoids over 0.1..1.0: (0.2·(0.5+0.7) + 0.7·(0.7+0.9)) / 2 / 0.9
    assert area_under_fraction_curve([0.1, 0.3, 1.0], [0.5, 0.7, 0.9]) == pytest.approx((0.12 + 0.56) / 0.9)
    assert area_under_fraction_curve([0.5], [0.7]) == 0.7


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    curve = [
        {"train_time_s": 10.0, "value": 0.5},
        {"train_time_s": 20.0, "value": float("nan")},
        {"train_time_s": 30.0, "value": 0.9},
        {"train_time_s": 40.0, "value": 0.8},
    ]
    assert time_to_target(curve, 0.85) == 30.0
    assert time_to_target(curve, 0.5) == 10.0
    assert time_to_target(curve, 0.95) is None
    assert mean_and_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_and_std([4.0]) == (4.0, 0.0)
