"""AUROC / AP / F1max against sklearn: random scores, heavy ties, constant scores, degenerate classes."""

import warnings

import numpy as np
import pytest
import torch
from metrics_reference import random_maps, random_masks, sk_metrics

from mcad.metrics import (
    UndefinedMetricWarning,
    auroc,
    average_precision,
    binary_metrics,
    f1_max,
    pixel_metrics,
)

TOL = 1e-9  # the engine is exact; docs/evaluation.md only promises 1e-4


def ours(scores, labels):
    return {"AUROC": auroc(scores, labels), "AP": average_precision(scores, labels), "F1max": f1_max(scores, labels)}


def assert_close(got, ref, tol=TOL):
    assert got.keys() == ref.keys()
    for k in ref:
        assert abs(got[k] - ref[k]) <= tol, (k, got[k], ref[k])


def both_classes(rng, n, p=0.3):
    y = (rng.random(n) < p).astype(int)
    y[0], y[1] = 1, 0
    return y


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_scores_match_sklearn(seed, dtype):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5000))
    y = both_classes(rng, n, p=rng.uniform(0.01, 0.9))
    s = (rng.standard_normal(n) * 10 ** rng.uniform(-3, 3) + rng.uniform(-100, 100)).astype(dtype)
    assert_close(ours(s, y), sk_metrics(s, y))


@pytest.mark.parametrize("levels", [2, 3, 10, 100])
def test_heavy_ties_match_sklearn(levels):
    rng = np.random.default_rng(levels)
    y = both_classes(rng, 3000, 0.4)
    s = rng.integers(0, levels, 3000) + 0.5 * y * (rng.random(3000) < 0.5)  # ties within and across classes
    assert_close(ours(s, y), sk_metrics(s, y))


def test_ties_across_classes_count_half():
    s = np.array([1.0, 1.0, 1.0, 2.0])
    y = np.array([1, 0, 0, 1])
    assert auroc(s, y) == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert_close(ours(s, y), sk_metrics(s, y))


def test_signed_zero_is_one_tie():
    s = np.array([-0.0, 0.0, 0.0, -0.0, 1.0])
    y = np.array([1, 0, 1, 0, 0])
    assert_close(ours(s, y), sk_metrics(s, y))


@pytest.mark.parametrize("value", [0.0, -3.5, 7e8])
def test_constant_scores(value):
    y = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    s = np.full(8, value)
    got = ours(s, y)
    assert got["AUROC"] == 0.5
    assert got["AP"] == pytest.approx(2 / 8)
    assert got["F1max"] == pytest.approx(2 * 0.25 / 1.25)
    assert_close(got, sk_metrics(s, y))


@pytest.mark.parametrize("seed", range(4))
def test_single_positive(seed):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(500)
    y = np.zeros(500, dtype=int)
    y[rng.integers(500)] = 1
    assert_close(ours(s, y), sk_metrics(s, y))


def test_single_negative():
    s = np.array([0.3, 0.1, 0.2, 0.5])
    y = np.array([1, 1, 0, 1])
    assert_close(ours(s, y), sk_metrics(s, y))


def test_perfect_and_inverted_ranking():
    s = np.arange(10.0)
    y = (s >= 7).astype(int)
    assert ours(s, y) == {"AUROC": 1.0, "AP": 1.0, "F1max": 1.0}
    assert auroc(-s, y) == 0.0
    assert_close(ours(-s, y), sk_metrics(-s, y))


def test_no_sigmoid_any_real_scores():
    # Scores far outside [0, 1] and with inf; a sigmoid would saturate them into ties.
    rng = np.random.default_rng(0)
    y = both_classes(rng, 2000)
    s = rng.standard_normal(2000) * 50 + 1e4 + 30 * y
    s[:5] = [np.inf, -np.inf, 1e30, -1e30, 0.0]
    ref = sk_metrics(np.nan_to_num(s, posinf=1e300, neginf=-1e300), y)
    assert_close(ours(s, y), ref)
    assert_close(ours(s * 1e-6, y), ref)  # scale invariance
    assert_close(ours(s - 1e4, y), ref, tol=1e-6)  # shift: float rounding may merge a few values


def test_all_normal_returns_nan_with_warning():
    s, y = np.random.default_rng(0).random(50), np.zeros(50, dtype=int)
    for fn, name in ((auroc, "AUROC"), (average_precision, "AP"), (f1_max, "F1max")):
        with pytest.warns(UndefinedMetricWarning, match=name):
            assert np.isnan(fn(s, y))


def test_all_anomalous():
    s, y = np.random.default_rng(0).random(50), np.ones(50, dtype=int)
    with pytest.warns(UndefinedMetricWarning, match="AUROC"):
        assert np.isnan(auroc(s, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert average_precision(s, y) == 1.0
        assert f1_max(s, y) == 1.0


def test_empty_input_is_nan():
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(auroc(np.zeros(0), np.zeros(0)))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="binary"):
        auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="same number"):
        auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))


def test_torch_inputs_and_dtypes():
    rng = np.random.default_rng(3)
    y = both_classes(rng, 1000)
    s = rng.standard_normal(1000).astype(np.float32)
    ref = sk_metrics(s, y)
    assert_close(ours(torch.from_numpy(s), torch.from_numpy(y).bool()), ref)
    assert_close(ours(torch.from_numpy(s).double(), torch.from_numpy(y).to(torch.uint8)), ref)
    # float16/bfloat16 are upcast exactly: compare with sklearn on the rounded values.
    for dt in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(s).to(dt)
        assert_close(ours(t, torch.from_numpy(y)), sk_metrics(t.float().numpy(), y))
    assert isinstance(auroc(s, y), float)


def test_binary_metrics_prefix():
    rng = np.random.default_rng(5)
    y = both_classes(rng, 300)
    s = rng.standard_normal(300)
    got = binary_metrics(s, y, prefix="I-")
    assert_close({k[2:]: v for k, v in got.items()}, sk_metrics(s, y))


@pytest.mark.parametrize("quantise", [False, True])
def test_pixel_metrics_match_sklearn_on_flattened_maps(quantise):
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 12, 48, 48)
    maps = random_maps(rng, masks)
    if quantise:
        maps = np.round(maps * 4) / 4  # heavy ties across normal and anomalous pixels
    got = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks).bool(), with_aupro=False)
    assert_close(got, sk_metrics(maps.ravel(), masks.ravel()))
