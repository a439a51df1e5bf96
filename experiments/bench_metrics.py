"""Benchmark of the 7-metric suite on an MVTec-AD-sized synthetic test set.

Question: how long does mcad's exact metric engine take, and how much memory does it need, for the full
suite (I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO per class) on 1,725 maps of 256x256, and
does every value match the exact reference (sklearn; plain sort-and-sweep AUPRO) to 1e-4?

Usage:
    .venv/bin/python experiments/bench_metrics.py [--no-reference] [--accumulator] [--size 256] [--seed 0]

The case: the 15 MVTec AD classes with their real test counts (1,725 images, 1,258 anomalous); anomalous
images get 1-3 elliptic defect regions; maps = smooth Gaussian noise + blurred defect signal of random
strength, affinely mapped to [0, 1] (so that anomalib's sigmoid-on-[0,1]-violation does not interfere
with the comparison). Image score = max of the map.

If ``anomalib`` is importable (optional, not a dependency), its pixel AUROC, AUPR, F1Max and AUPRO are
timed per class on the same arrays in the same process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch

# Only what the suite needs is imported up front, so that the peak RSS is the suite's (torchmetrics alone adds
# ~0.23 GB of RSS at import; the accumulator is imported later, only with --accumulator).
from mcad.metrics import METRIC_NAMES, compute_metrics, pixel_metrics

# name: (good, defective) test images in MVTec AD
MVTEC = {
    "bottle": (20, 63),
    "cable": (58, 92),
    "capsule": (23, 109),
    "carpet": (28, 89),
    "grid": (21, 57),
    "hazelnut": (40, 70),
    "leather": (32, 92),
    "metal_nut": (22, 93),
    "pill": (26, 141),
    "screw": (41, 119),
    "tile": (33, 84),
    "toothbrush": (12, 30),
    "transistor": (60, 40),
    "wood": (19, 60),
    "zipper": (32, 119),
}


def peak_rss_gb() -> float:
    """Process peak RSS in GB (1e9 bytes); ru_maxrss is in KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def generate(size: int, seed: int):
    """Maps/masks written image by image into preallocated arrays (no dataset-sized temporaries)."""
    rng = np.random.default_rng(seed)
    n = sum(g + d for g, d in MVTEC.values())
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    class_ids = np.zeros(n, dtype=np.int64)
    i = 0
    for c, (good, bad) in enumerate(MVTEC.values()):
        for j in range(good + bad):
            class_ids[i] = c
            noise = rng.standard_normal((size, size), dtype=np.float32)
            noise = cv2.GaussianBlur(noise, (0, 0), 2.0) * 4.0  # smooth, unit-ish variance
            if j >= good:
                labels[i] = 1
                signal = np.zeros((size, size), dtype=np.float32)
                for _ in range(int(rng.integers(1, 4))):
                    region = np.zeros((size, size), dtype=np.uint8)
                    center = (int(rng.integers(16, size - 16)), int(rng.integers(16, size - 16)))
                    axes = (int(rng.integers(3, size // 8)), int(rng.integers(3, size // 8)))
                    cv2.ellipse(region, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
                    masks[i] |= region
                    signal += region * np.float32(rng.uniform(0.3, 3.0))
                noise += cv2.GaussianBlur(signal, (0, 0), 3.0)
            maps[i] = noise
            i += 1
    lo, hi = maps.min(), maps.max()
    maps -= lo
    maps *= np.float32(1.0 / (hi - lo))
    np.clip(maps, 0.0, 1.0, out=maps)
    return maps, masks, labels, class_ids


def run_suite(maps, masks, scores, labels, class_ids):
    return compute_metrics(
        torch.from_numpy(scores),
        torch.from_numpy(labels),
        torch.from_numpy(class_ids),
        list(MVTEC),
        anomaly_maps=torch.from_numpy(maps),
        gt_masks=torch.from_numpy(masks),
        indices=torch.arange(len(scores)),
    )


def reference_suite(maps, masks, scores, labels, class_ids):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "metrics"))
    from metrics_reference import aupro_reference, sk_metrics

    out = {}
    for c, name in enumerate(MVTEC):
        rows = np.flatnonzero(class_ids == c)
        img = sk_metrics(scores[rows], labels[rows])
        pix = sk_metrics(maps[rows].ravel(), masks[rows].ravel())
        out[name] = {
            **{f"I-{k}": v for k, v in img.items()},
            **{f"P-{k}": v for k, v in pix.items()},
            "AUPRO": aupro_reference(maps[rows], masks[rows]),
        }
    return out


def anomalib_suite(maps, masks, class_ids):
    from anomalib.metrics.aupr import _AUPR
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.auroc import _AUROC
    from anomalib.metrics.f1_score import _F1Max

    out = {}
    for c, name in enumerate(MVTEC):
        rows = np.flatnonzero(class_ids == c)
        preds = torch.from_numpy(maps[rows])
        target = torch.from_numpy(masks[rows]).long()
        row = {}
        for key, cls in (("P-AUROC", _AUROC), ("P-AP", _AUPR), ("P-F1max", _F1Max), ("AUPRO", _AUPRO)):
            metric = cls()
            for b in range(0, len(rows), 32):  # batch-wise updates, as in an evaluation loop
                p, t = preds[b : b + 32], target[b : b + 32]
                metric.update(p.flatten() if key != "AUPRO" else p, t.flatten() if key != "AUPRO" else t)
            row[key] = float(metric.compute())
            del metric
        out[name] = row
    return out


def print_table(title, table, names):
    print(f"\n{title}")
    print(f"{'class':<12}" + "".join(f"{k:>10}" for k in names))
    for cname, row in table.items():
        print(f"{cname:<12}" + "".join(f"{row[k]:>10.5f}" for k in names))


def max_diff(a, b, names):
    diffs = [(abs(a[c][k] - b[c][k]), c, k) for c in a for k in names]
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="time the suite this many times, report the best")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) exact reference")
    parser.add_argument("--accumulator", action="store_true", help="also time the torchmetrics accumulator")
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}, "
        f"cpus {psutil.cpu_count()}"
    )
    t0 = time.perf_counter()
    maps, masks, labels, class_ids = generate(args.size, args.seed)
    scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
    n_pix = maps.size
    print(
        f"data: {len(maps)} maps {args.size}x{args.size} ({n_pix / 1e6:.1f} M pixels, "
        f"{(masks.reshape(len(masks), -1).max(1) > 0).sum()} with defects, "
        f"{masks.mean() * 100:.2f}% defect pixels), generated in {time.perf_counter() - t0:.1f} s; "
        f"arrays {(maps.nbytes + masks.nbytes) / 1e9:.2f} GB"
    )
    rss_before = rss_gb()
    peak_before = peak_rss_gb()

    walls = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ours = run_suite(maps, masks, scores, labels, class_ids)
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    peak = peak_rss_gb()
    print(
        f"\nmcad 7-metric suite (15 classes): wall {wall:.2f} s (best of {args.repeat}: "
        f"{', '.join(f'{w:.2f}' for w in walls)}), process peak RSS {peak:.2f} GB "
        f"(RSS before the suite {rss_before:.2f} GB incl. imports + data, peak before {peak_before:.2f} GB; "
        f"suite working memory <= {peak - rss_before:.2f} GB)"
    )
    print_table("values (mcad):", ours["per_class"], METRIC_NAMES)
    print(
        f"{'mean':<12}"
        + "".join(f"{ours['mean'][k]:>10.5f}" for k in METRIC_NAMES)
        + f"   mAD {ours['mean']['mAD']:.5f}"
    )

    # float16 storage: effect of rounding the maps (the accumulator's opt-in map_dtype) on pixel metrics.
    d16 = 0.0
    for c in range(len(MVTEC)):
        rows = np.flatnonzero(class_ids == c)
        m16 = maps[rows].astype(np.float16).astype(np.float32)
        p16 = pixel_metrics(m16, masks[rows], prefix="P-")
        name = list(MVTEC)[c]
        d16 = max(d16, *(abs(p16[k] - ours["per_class"][name][k]) for k in METRIC_NAMES[3:]))
    print(f"\nfloat16 map storage: max |metric(float16 maps) - metric(float32 maps)| = {d16:.2e}")

    if args.accumulator:
        from mcad.evaluation.accumulator import AnomalyMetricAccumulator

        acc = AnomalyMetricAccumulator(list(MVTEC))
        t0 = time.perf_counter()
        for b in range(0, len(maps), 32):
            sl = slice(b, b + 32)
            acc.update(
                torch.from_numpy(scores[sl]),
                torch.from_numpy(labels[sl]),
                torch.from_numpy(class_ids[sl]),
                torch.arange(b, min(b + 32, len(maps))),
                torch.from_numpy(maps[sl]),
                torch.from_numpy(masks[sl]),
            )
        t1 = time.perf_counter()
        res = acc.compute()
        t2 = time.perf_counter()
        same = res == ours
        print(
            f"\naccumulator: update {t1 - t0:.2f} s (copies the maps), compute {t2 - t1:.2f} s, "
            f"process peak RSS {peak_rss_gb():.2f} GB, identical to compute_metrics: {same}"
        )
        del acc, res

    try:
        import anomalib  # noqa: F401

        have_anomalib = True
    except ImportError:
        have_anomalib = False
        print("\nanomalib: not importable, comparison skipped")
    if have_anomalib:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = anomalib_suite(maps, masks, class_ids)
        except Exception as err:  # optional comparison: an API change must not hide our own results
            print(f"\nanomalib {anomalib.__version__}: comparison failed: {err!r}")
        else:
            wall_a = time.perf_counter() - t0
            print(
                f"\nanomalib {anomalib.__version__} pixel AUROC+AUPR+F1Max+AUPRO (per class, batches of 32): "
                f"wall {wall_a:.2f} s, process peak RSS {peak_rss_gb():.2f} GB; "
                f"ratio anomalib / mcad full 7-metric suite = {wall_a / wall:.1f}x"
            )
            for key in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"):
                diff, cname, _ = max_diff(theirs, ours["per_class"], (key,))
                note = " (anomalib's AUPR is the trapezoidal area, not step-wise AP)" if key == "P-AP" else ""
                print(f"  largest |anomalib - mcad| {key}: {diff:.2e} ({cname}){note}")

    if not args.no_reference:
        t0 = time.perf_counter()
        ref = reference_suite(maps, masks, scores, labels, class_ids)
        diff, cname, key = max_diff(ref, ours["per_class"], METRIC_NAMES)
        print(
            f"\nexact reference (sklearn + sort-and-sweep AUPRO) took {time.perf_counter() - t0:.1f} s; "
            f"max |mcad - reference| over all {len(ref) * len(METRIC_NAMES)} values = {diff:.2e} "
            f"({cname} {key})"
        )


if __name__ == "__main__":
    main()
