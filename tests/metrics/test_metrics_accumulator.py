"""The torchmetrics accumulator and compute_metrics against per-class references."""

import math
import warnings

import numpy as np
import pytest
import torch
from metrics_reference import aupro_reference, random_maps, random_masks, sk_metrics

from mcad.evaluation.accumulator import METRIC_NAMES, AnomalyMetricAccumulator, compute_metrics
from mcad.metrics import UndefinedMetricWarning

CLASSES = ["bottle", "cable", "screw", "unused"]


def make_dataset(seed=0, n=40, size=32, n_classes=3):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n, size, size, empty_fraction=0.35)
    maps = random_maps(rng, masks, signal=1.0)
    labels = (masks.reshape(n, -1).max(1) > 0).astype(np.int64)
    class_ids = np.arange(n) % n_classes
    scores = maps.reshape(n, -1).max(1).astype(np.float64) * 100 - 20  # unbounded image scores
    return scores, labels, class_ids, maps, masks


def reference_table(scores, labels, class_ids, maps, masks, names=CLASSES):
    table = {}
    for c, name in enumerate(names):
        rows = np.flatnonzero(class_ids == c)
        if rows.size == 0:
            continue
        img = sk_metrics(scores[rows], labels[rows])
        pix = sk_metrics(maps[rows].ravel(), masks[rows].ravel())
        row = {**{f"I-{k}": v for k, v in img.items()}, **{f"P-{k}": v for k, v in pix.items()}}
        row["AUPRO"] = aupro_reference(maps[rows], masks[rows])
        table[name] = row
    return table


def feed(acc, data, order, batch=7):
    scores, labels, class_ids, maps, masks = data
    for b in range(0, len(order), batch):
        i = order[b : b + batch]
        acc.update(
            torch.from_numpy(scores[i]),
            torch.from_numpy(labels[i]),
            torch.from_numpy(class_ids[i]),
            torch.from_numpy(i),
            torch.from_numpy(maps[i]),
            torch.from_numpy(masks[i]).bool(),
        )


def test_matches_reference_per_class_and_means():
    data = make_dataset()
    acc = AnomalyMetricAccumulator(CLASSES)
    feed(acc, data, np.arange(len(data[0])))
    out = acc.compute()
    ref = reference_table(*data)
    assert list(out["per_class"]) == ["bottle", "cable", "screw"]  # "unused" has no samples: omitted
    for name, row in ref.items():
        for k in METRIC_NAMES:
            assert out["per_class"][name][k] == pytest.approx(row[k], abs=1e-9), (name, k)
        assert out["per_class"][name]["mAD"] == pytest.approx(np.mean([row[k] for k in METRIC_NAMES]))
    for k in METRIC_NAMES:
        assert out["mean"][k] == pytest.approx(np.mean([r[k] for r in ref.values()]), abs=1e-9)
    assert out["mean"]["mAD"] == pytest.approx(np.mean([out["mean"][k] for k in METRIC_NAMES]))
    assert all(isinstance(v, float) for v in out["mean"].values())


def test_order_and_batching_invariant_bitwise():
    data = make_dataset(seed=1)
    n = len(data[0])
    a = AnomalyMetricAccumulator(CLASSES)
    feed(a, data, np.arange(n), batch=5)
    b = AnomalyMetricAccumulator(CLASSES)
    feed(b, data, np.random.default_rng(0).permutation(n), batch=11)
    assert a.compute() == b.compute()


def test_duplicated_indices_are_dropped():
    data = make_dataset(seed=2)
    n = len(data[0])
    a = AnomalyMetricAccumulator(CLASSES)
    feed(a, data, np.arange(n))
    b = AnomalyMetricAccumulator(CLASSES)
    feed(b, data, np.concatenate([np.arange(n), [0, 5, 5, n - 1]]))  # sampler-style padding
    assert a.compute() == b.compute()


def test_conflicting_duplicates_raise():
    data = make_dataset(seed=2)
    scores, labels, class_ids, maps, masks = data
    acc = AnomalyMetricAccumulator(CLASSES)
    feed(acc, data, np.arange(len(scores)))
    acc.update(
        torch.tensor([0.0]),
        torch.tensor([1 - labels[0]]),
        torch.tensor([class_ids[0]]),
        torch.tensor([0]),
        torch.from_numpy(maps[:1]),
        torch.from_numpy(masks[:1]),
    )
    with pytest.raises(ValueError, match="test index"):
        acc.compute()


def test_no_sigmoid_batchwise_score_ranges():
    # One batch with scores inside [0, 1], the others far outside: a per-batch sigmoid would corrupt ranks.
    data = list(make_dataset(seed=3))
    scores = data[0]
    scores[:7] = np.linspace(0.1, 0.9, 7)
    scores[7:] = scores[7:] * 1e3
    data[3] = data[3].copy()
    data[3][:7] = np.clip(data[3][:7], 0, 1) * 0.5
    data[3][7:] *= 1e3
    acc = AnomalyMetricAccumulator(CLASSES)
    feed(acc, data, np.arange(len(scores)), batch=7)
    out = acc.compute()
    ref = reference_table(*data)
    for name, row in ref.items():
        for k in METRIC_NAMES:
            assert out["per_class"][name][k] == pytest.approx(row[k], abs=1e-9)


def test_float16_storage_is_exact_for_rounded_maps():
    data = make_dataset(seed=4)
    acc = AnomalyMetricAccumulator(CLASSES, map_dtype=torch.float16)
    feed(acc, data, np.arange(len(data[0])))
    assert acc.bytes_in_memory == len(data[0]) * 32 * 32 * (2 + 1)  # float16 maps, uint8 masks
    out = acc.compute()
    rounded = list(data)
    rounded[3] = data[3].astype(np.float16).astype(np.float32)
    ref = reference_table(*rounded)
    for name, row in ref.items():
        for k in METRIC_NAMES:
            assert out["per_class"][name][k] == pytest.approx(row[k], abs=1e-9)


def test_float16_overflow_warns():
    acc = AnomalyMetricAccumulator(CLASSES, map_dtype=torch.float16)
    with pytest.warns(UserWarning, match="float16"):
        acc.update(
            torch.zeros(1),
            torch.ones(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.full((1, 4, 4), 1e6),
            torch.ones(1, 4, 4, dtype=torch.bool),
        )


def test_storage_dtypes_and_copies():
    acc = AnomalyMetricAccumulator(CLASSES)
    big = torch.rand(4, 2, 8, 8)
    args = (torch.rand(4), torch.tensor([0, 1, 1, 0]), torch.zeros(4, dtype=torch.long), torch.arange(4))
    acc.update(*args, big[:, 0], (big[:, 1] > 0.5))
    assert acc.bytes_in_memory == 4 * 8 * 8 * (4 + 1)  # float32 maps + uint8 masks, nothing else
    assert acc.image_scores[0].dtype == torch.float64
    ref = AnomalyMetricAccumulator(CLASSES)
    ref.update(*args, big[:, 0].clone(), (big[:, 1] > 0.5))
    big.zero_()  # the accumulator holds its own copy, not a view of the caller's buffer
    assert acc.compute() == ref.compute()


def test_image_metrics_only():
    scores, labels, class_ids, _, _ = make_dataset(seed=5)
    acc = AnomalyMetricAccumulator(CLASSES, pixel_metrics=False)
    acc.update(
        torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(class_ids), torch.arange(len(scores))
    )
    out = acc.compute()
    assert set(out["mean"]) == {"I-AUROC", "I-AP", "I-F1max"}
    rows = class_ids == 0
    assert out["per_class"]["bottle"]["I-AUROC"] == pytest.approx(sk_metrics(scores[rows], labels[rows])["AUROC"])


def test_class_without_anomalies_gives_nan_and_named_warning():
    scores, labels, class_ids, maps, masks = make_dataset(seed=6)
    normal = labels == 0
    scores, labels, class_ids, maps, masks = (x[normal] for x in (scores, labels, class_ids, maps, masks))
    class_ids = np.zeros_like(class_ids)
    class_ids[:3] = 1
    labels[:3] = 1
    masks[:3, :4, :4] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compute_metrics(scores, labels, class_ids, CLASSES, maps, masks, indices=np.arange(len(scores)))
    messages = [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert any(m.startswith("class 'bottle': I-AUROC") for m in messages)
    assert any(m.startswith("class 'bottle': AUPRO") for m in messages)
    assert any(m.startswith("class 'cable': I-AUROC is undefined without negative") for m in messages)
    assert math.isnan(out["per_class"]["bottle"]["I-AUROC"])
    assert math.isnan(out["per_class"]["bottle"]["AUPRO"])
    assert math.isnan(out["mean"]["mAD"])  # NaN propagates to the mean, it is not silently skipped
    assert not math.isnan(out["per_class"]["cable"]["P-AUROC"])


def test_reset_and_validation():
    data = make_dataset(seed=7)
    acc = AnomalyMetricAccumulator(CLASSES)
    feed(acc, data, np.arange(10))
    acc.reset()
    assert acc.bytes_in_memory == 0 and acc.indices == []
    z = torch.zeros(2, dtype=torch.long)
    maps = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match="binarise"):
        acc.update(torch.rand(2), z, z, torch.arange(2), maps, torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="0 and 1"):
        acc.update(torch.rand(2), z, z, torch.arange(2), maps, torch.full((2, 8, 8), 2))
    with pytest.raises(ValueError, match="class_ids"):
        acc.update(torch.rand(2), z, z + 9, torch.arange(2), maps, maps > 0.5)
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.rand(2), z + 3, z, torch.arange(2), maps, maps > 0.5)
    with pytest.raises(ValueError, match="required"):
        acc.update(torch.rand(2), z, z, torch.arange(2))
    acc.update(torch.rand(2), z, z, torch.arange(2), maps, maps > 0.5)
    with pytest.raises(ValueError, match="resolution"):
        acc.update(torch.rand(2), z, z, torch.arange(2, 4), torch.rand(2, 4, 4), torch.rand(2, 4, 4) > 0.5)
    with pytest.raises(ValueError, match="unique"):
        AnomalyMetricAccumulator(["a", "a"])


def test_forward_only_accumulates():
    data = make_dataset(seed=8)
    scores, labels, class_ids, maps, masks = data
    acc = AnomalyMetricAccumulator(CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-batch compute (and no undefined-metric warnings)
        assert (
            acc(
                torch.from_numpy(scores[:2]),
                torch.from_numpy(labels[:2]),
                torch.from_numpy(class_ids[:2]),
                torch.arange(2),
                torch.from_numpy(maps[:2]),
                torch.from_numpy(masks[:2]),
            )
            is None
        )
    assert len(acc.indices) == 1


def test_compute_metrics_accepts_chunk_lists():
    scores, labels, class_ids, maps, masks = make_dataset(seed=9)
    whole = compute_metrics(scores, labels, class_ids, CLASSES, maps, masks)
    cuts = [0, 3, 17, 30, len(scores)]
    chunks = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    parts = compute_metrics(
        [torch.from_numpy(scores[s]) for s in chunks],
        [labels[s] for s in chunks],
        [class_ids[s] for s in chunks],
        CLASSES,
        [torch.from_numpy(maps[s]) for s in chunks],
        [masks[s] for s in chunks],
        indices=[np.arange(len(scores))[s] for s in chunks],
    )
    assert parts == whole
