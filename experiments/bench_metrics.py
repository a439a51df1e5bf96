"""Benchmark of the 7-metric suite on an MVTec-AD-sized synthetic test set.

Question: how long does mcad's exact metric engine take, and how much memory does it need, for the full
suite (I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO per class) on 1,725 maps of 256x256, and
does every value match the exact reference (sklearn; plain sort-and-sweep AUPRO) to 1e-4?

Usage:
    .venv/bin/python experiments/bench_metrics.py [--no-reference] [--accumulator] [--size 256] [--seed 0]
    .venv/bin/python experiments/bench_metrics.py --realiad [--spill-dir DIR]

The case: the 15 MVTec AD classes with their real test counts (1,725 images, 1,258 anomalous); anomalous
images get 1-3 elliptic defect regions; maps = smooth Gaussian noise + blurred defect signal of random
strength, affinely mapped to [0, 1] (so that anomalib's sigmoid-on-[0,1]-violation does not interfere
with the comparison). Image score = max of the map.

If ``anomalib`` is importable (optional, not a dependency), its pixel AUROC, AUPR, F1Max and AUPRO are
timed per class on the same arrays in the same process.

``--accumulator`` also runs the torchmetrics accumulator (batches of 32, then compute) in a fresh process that
regenerates the same maps batch by batch, so its peak RSS is the accumulator's own (imports included).

``--realiad`` runs the Real-IAD-scale case instead: 30 classes, 60,000 maps of 256x256 (3.9 G pixels, 19.7 GB
as float32 maps + uint8 masks), generated batch by batch and fed to the accumulator (never all in memory); it
reports wall time and peak RSS, and recomputes 3 classes in memory with ``compute_metrics`` (the exact engine)
to check the accumulator's values. The spill files need ~20 GB free in ``--spill-dir`` (default: TMPDIR).
"""

from __future__ import annotations

import argparse
import multiprocessing
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
    """Process peak RSS in GB (1e9 bytes).

    Linux: VmHWM of /proc/self/status, the peak of this process's own memory. ru_maxrss is not used there:
    it survives exec, so a spawned child would report at least its parent's RSS at the time of the spawn.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def draw(rng: np.random.Generator, size: int, defective: bool) -> tuple[np.ndarray, np.ndarray]:
    """One raw (unnormalised) map and its mask: smooth noise, plus 1-3 blurred elliptic defects if defective."""
    noise = rng.standard_normal((size, size), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), 2.0) * 4.0  # smooth, unit-ish variance
    mask = np.zeros((size, size), dtype=np.uint8)
    if defective:
        signal = np.zeros((size, size), dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):
            region = np.zeros((size, size), dtype=np.uint8)
            center = (int(rng.integers(16, size - 16)), int(rng.integers(16, size - 16)))
            axes = (int(rng.integers(3, size // 8)), int(rng.integers(3, size // 8)))
            cv2.ellipse(region, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            mask |= region
            signal += region * np.float32(rng.uniform(0.3, 3.0))
        noise += cv2.GaussianBlur(signal, (0, 0), 3.0)
    return noise, mask


def normalise(maps: np.ndarray, lo: np.float32, hi: np.float32) -> None:
    """Affine map to [0, 1] in place (elementwise: the same values whether applied per batch or at once)."""
    maps -= lo
    maps *= np.float32(1.0 / (hi - lo))
    np.clip(maps, 0.0, 1.0, out=maps)


def generate(size: int, seed: int):
    """Maps/masks written image by image into preallocated arrays (no dataset-sized temporaries).

    Returns:
        maps, masks, labels, class_ids and the (lo, hi) range used to normalise the maps.
    """
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
            labels[i] = j >= good
            maps[i], masks[i] = draw(rng, size, j >= good)
            i += 1
    lo, hi = maps.min(), maps.max()
    normalise(maps, lo, hi)
    return maps, masks, labels, class_ids, (lo, hi)


def mvtec_batches(size: int, seed: int, lo: np.float32, hi: np.float32, batch: int = 32):
    """The maps of :func:`generate`, bit for bit, as batches ``(maps, masks, labels, class_ids)``."""
    rng = np.random.default_rng(seed)
    rows = [(c, j >= good) for c, (good, bad) in enumerate(MVTEC.values()) for j in range(good + bad)]
    for b in range(0, len(rows), batch):
        part = rows[b : b + batch]
        maps = np.empty((len(part), size, size), dtype=np.float32)
        masks = np.empty((len(part), size, size), dtype=np.uint8)
        for k, (_, defective) in enumerate(part):
            maps[k], masks[k] = draw(rng, size, defective)
        normalise(maps, lo, hi)
        yield maps, masks, np.array([d for _, d in part], dtype=np.int64), np.array([c for c, _ in part])


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


def feed(acc, maps, masks, labels, class_ids, first_index: int) -> float:
    """One accumulator update (image score = max of the map); returns its wall time."""
    t0 = time.perf_counter()
    acc.update(
        torch.from_numpy(maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)),
        torch.from_numpy(labels),
        torch.from_numpy(class_ids),
        torch.arange(first_index, first_index + len(maps)),
        torch.from_numpy(maps),
        torch.from_numpy(masks),
    )
    return time.perf_counter() - t0


def accumulator_case(size: int, seed: int, lo: np.float32, hi: np.float32, spill_dir: str | None) -> dict:
    """The MVTec-sized case through the accumulator (run in a fresh process by ``main``)."""
    from mcad.evaluation.accumulator import AnomalyMetricAccumulator

    rss_imports = rss_gb()
    acc = AnomalyMetricAccumulator(list(MVTEC), spill_dir=spill_dir)
    update_s, n = 0.0, 0
    for maps, masks, labels, class_ids in mvtec_batches(size, seed, lo, hi):
        update_s += feed(acc, maps, masks, labels, class_ids, n)
        n += len(maps)
    t0 = time.perf_counter()
    result = acc.compute()
    compute_s = time.perf_counter() - t0
    out = {
        "result": result,
        "update_s": update_s,
        "compute_s": compute_s,
        "peak_gb": peak_rss_gb(),
        "rss_imports_gb": rss_imports,
        "budget": acc.memory_budget,
        "disk_gb": acc.bytes_on_disk / 1e9,
    }
    acc.reset()
    return out


REALIAD_CLASSES = 30
REALIAD_MAPS = 60_000


def realiad_counts(seed: int, total: int = REALIAD_MAPS) -> list[tuple[int, int]]:
    """(good, defective) per class: total/30 +- 10 % images each, the last class the remainder (1,109 of the
    default 60,000), 30-60 % defective."""
    rng = np.random.default_rng([seed, 1000])
    mean = total // REALIAD_CLASSES
    n = mean + rng.integers(-(mean // 10), mean // 10 + 1, REALIAD_CLASSES)
    n[-1] += total - n.sum()
    bad = np.round(n * rng.uniform(0.3, 0.6, REALIAD_CLASSES)).astype(int)
    return [(int(t - d), int(d)) for t, d in zip(n, bad)]


def realiad_class(size: int, seed: int, c: int, good: int, bad: int, batch: int = 32):
    """Batches ``(maps, masks, labels)`` of class ``c`` (own random stream: any class can be regenerated alone)."""
    rng = np.random.default_rng([seed, c])
    for b in range(0, good + bad, batch):
        k = min(batch, good + bad - b)
        maps = np.empty((k, size, size), dtype=np.float32)
        masks = np.empty((k, size, size), dtype=np.uint8)
        labels = (np.arange(b, b + k) >= good).astype(np.int64)
        for j in range(k):
            maps[j], masks[j] = draw(rng, size, bool(labels[j]))
        yield maps, masks, labels


def realiad_case(args: argparse.Namespace) -> None:
    """Real-IAD-scale evaluation in bounded memory, checked against the in-memory engine on 3 classes."""
    from mcad.evaluation.accumulator import AnomalyMetricAccumulator

    counts = realiad_counts(args.seed, args.realiad_maps)
    names = [f"class{c:02d}" for c in range(REALIAD_CLASSES)]
    n_maps = sum(g + d for g, d in counts)
    n_pix = n_maps * args.size**2
    print(
        f"Real-IAD-scale case: {REALIAD_CLASSES} classes, {n_maps} maps {args.size}x{args.size} "
        f"({n_pix / 1e9:.2f} G pixels, {sum(d for _, d in counts)} defective; "
        f"{n_pix * 5 / 1e9:.1f} GB as float32 maps + uint8 masks); RSS after imports {rss_gb():.2f} GB"
    )
    acc = AnomalyMetricAccumulator(names, spill_dir=args.spill_dir)
    t0 = time.perf_counter()
    update_s, n = 0.0, 0
    for c, (good, bad) in enumerate(counts):
        for maps, masks, labels in realiad_class(args.size, args.seed, c, good, bad):
            update_s += feed(acc, maps, masks, labels, np.full(len(maps), c), n)
            n += len(maps)
    feed_s = time.perf_counter() - t0
    disk_gb, budget = acc.bytes_on_disk / 1e9, acc.memory_budget
    t0 = time.perf_counter()
    result = acc.compute()
    compute_s = time.perf_counter() - t0
    acc.reset()
    peak = peak_rss_gb()
    print(
        f"accumulator: generation + update {feed_s:.1f} s (of which update {update_s:.1f} s), compute "
        f"{compute_s:.1f} s (30 classes, exact); in-memory budget {budget / 2**20:.0f} MiB, spilled to disk "
        f"{disk_gb:.2f} GB; process peak RSS {peak:.2f} GB"
    )
    print(
        f"{'mean':<12}"
        + "".join(f"{result['mean'][k]:>10.5f}" for k in METRIC_NAMES)
        + f"   mAD {result['mean']['mAD']:.5f}"
    )

    # Check: three classes recomputed in memory with the exact engine (compute_metrics on whole arrays).
    t0 = time.perf_counter()
    checked, worst = {}, (0.0, "", "")
    for c in (0, REALIAD_CLASSES // 2, REALIAD_CLASSES - 1):
        good, bad = counts[c]
        maps = np.empty((good + bad, args.size, args.size), dtype=np.float32)
        masks = np.empty((good + bad, args.size, args.size), dtype=np.uint8)
        labels = np.empty(good + bad, dtype=np.int64)
        i = 0
        for m, g, lab in realiad_class(args.size, args.seed, c, good, bad):
            maps[i : i + len(m)], masks[i : i + len(m)], labels[i : i + len(m)] = m, g, lab
            i += len(m)
        scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
        ref = compute_metrics(scores, labels, np.zeros(len(maps), dtype=np.int64), [names[c]], maps, masks)
        del maps, masks
        checked[names[c]] = ref["per_class"][names[c]]
        worst = max(worst, max_diff({names[c]: result["per_class"][names[c]]}, checked, METRIC_NAMES))
    print_table("checked classes (in-memory exact engine):", checked, METRIC_NAMES)
    print(
        f"max |accumulator - in-memory engine| over {len(checked) * len(METRIC_NAMES)} values = {worst[0]:.2e}; "
        f"check took {time.perf_counter() - t0:.1f} s, process peak RSS incl. the check {peak_rss_gb():.2f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="time the suite this many times, report the best")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) exact reference")
    parser.add_argument("--accumulator", action="store_true", help="also time the torchmetrics accumulator")
    parser.add_argument("--realiad", action="store_true", help="run the Real-IAD-scale case (60,000 maps) only")
    parser.add_argument("--realiad-maps", type=int, default=REALIAD_MAPS, help="maps of the Real-IAD case")
    parser.add_argument("--spill-dir", default=None, help="directory of the accumulator's spill files")
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}, "
        f"cpus {psutil.cpu_count()}"
    )
    if args.realiad:
        realiad_case(args)
        return
    t0 = time.perf_counter()
    maps, masks, labels, class_ids, (lo, hi) = generate(args.size, args.seed)
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
        # A fresh process, so that its peak RSS is the accumulator's (and not this process's dataset arrays).
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            acc = pool.apply(accumulator_case, (args.size, args.seed, lo, hi, args.spill_dir))
        print(
            f"\naccumulator (fresh process, maps regenerated, batches of 32): update {acc['update_s']:.2f} s, "
            f"compute {acc['compute_s']:.2f} s, process peak RSS {acc['peak_gb']:.2f} GB (RSS after imports "
            f"{acc['rss_imports_gb']:.2f} GB); in-memory budget {acc['budget'] / 2**20:.0f} MiB, spilled to disk "
            f"{acc['disk_gb']:.2f} GB; identical to compute_metrics: {acc['result'] == ours}"
        )

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
