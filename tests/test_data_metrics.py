"""Metrics against independent computations on random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rosita_fast.data import (
    accuracy,
    average_ranks,
    compute_metrics,
    f1_score,
    get_task,
    matthews_corrcoef,
    pearson,
    spearman,
    task_names,
)

SEEDS = range(8)


def _loop_counts(p, y, positive=1):
    tp = fp = fn = 0
    for a, b in zip(p.tolist(), y.tolist(), strict=True):
        tp += a == positive and b == positive
        fp += a == positive and b != positive
        fn += a != positive and b == positive
    return tp, fp, fn


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_and_f1_match_counting(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=int(rng.integers(1, 300)))
    p = np.where(rng.random(y.size) < 0.7, y, 1 - y)
    matches = sum(int(a == b) for a, b in zip(p.tolist(), y.tolist(), strict=True))
    assert accuracy(p, y) == pytest.approx(matches / y.size)
    tp, fp, fn = _loop_counts(p, y)
    if tp == 0:
        expected = 0.0
    else:
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        expected = 2 * precision * recall / (precision + recall)
    assert f1_score(p, y) == pytest.approx(expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_mcc_is_the_phi_coefficient(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    p = np.where(rng.random(200) < rng.uniform(0.3, 0.95), y, rng.integers(0, 2, size=200))
    phi = np.corrcoef(p.astype(float), y.astype(float))[0, 1]
    assert matthews_corrcoef(p, y) == pytest.approx(phi, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_mcc_matches_one_hot_covariance(seed):
    # Gorodkin's R_K: summed covariances of the one-hot indicator columns.
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 6))
    y = rng.integers(0, k, size=150)
    p = np.where(rng.random(150) < 0.6, y, rng.integers(0, k, size=150))
    X, Y = np.eye(k)[p], np.eye(k)[y]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    expected = (Xc * Yc).sum() / math.sqrt((Xc * Xc).sum() * (Yc * Yc).sum())
    assert matthews_corrcoef(p, y) == pytest.approx(expected, abs=1e-12)


def test_undefined_correlations_are_zero():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_pearson_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=80)
    y = 0.5 * x + rng.normal(size=80)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def _brute_force_ranks(values):
    v = list(values)
    return np.array([1 + sum(w < a for w in v) + (sum(w == a for w in v) - 1) / 2 for a in v])


@pytest.mark.parametrize("seed", SEEDS)
def test_spearman_is_pearson_of_tie_averaged_ranks(seed):
    rng = np.random.default_rng(seed)
    # Few distinct values, so ties are frequent.
    x = rng.integers(0, 6, size=60).astype(float)
    y = x + rng.integers(-2, 3, size=60)
    assert np.array_equal(average_ranks(x), _brute_force_ranks(x))
    expected = np.corrcoef(_brute_force_ranks(x), _brute_force_ranks(y))[0, 1]
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_is_invariant_to_monotone_transforms():
    x = np.random.default_rng(3).normal(size=50)
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


@pytest.mark.parametrize("task", task_names())
def test_compute_metrics_per_task(task):
    t = get_task(task)
    rng = np.random.default_rng(len(task))
    if t.is_regression:
        labels = rng.uniform(0, 5, size=40)
        outputs = (labels + rng.normal(size=40))[:, None]
        scores = compute_metrics(t, outputs, labels)
        assert scores["pearson"] == pytest.approx(pearson(outputs[:, 0], labels))
        assert scores["corr"] == pytest.approx((scores["pearson"] + scores["spearman"]) / 2)
    else:
        labels = rng.integers(0, t.num_labels, size=40)
        logits = rng.normal(size=(40, t.num_labels))
        scores = compute_metrics(t, logits, labels)
        preds = logits.argmax(1)
        assert scores == compute_metrics(t, preds, labels)
        if "acc" in scores:
            assert scores["acc"] == pytest.approx(np.mean(preds == labels))
    assert set(scores) == set(t.metrics) and t.main_metric in scores


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="3 labels"):
        compute_metrics("mnli", np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="5 predictions but 4 labels"):
        accuracy(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match="zero examples"):
        pearson([], [])
