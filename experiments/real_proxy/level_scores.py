"""Which feature level decides a trained run's image scores, and which normal images it ranks too high.

Question: a proxy misses its image-AUROC bar on a class; is one level of the method's per-level maps to
blame, and is it one test image or many? For every class of the run's test split this prints the image
AUROC of each level's map alone (upsampled, smoothed and reduced by the run's own protocol, exactly as the
fused map is) and of the fused map, then the highest-scored normal images with their per-level scores
against the lowest defect score of each level.

Usage:
    .venv/bin/python experiments/real_proxy/level_scores.py <run folder> [--classes cookie] [--top 3]

The run folder is a ``train.py`` output (``.hydra/config.yaml`` and ``checkpoints/last.ckpt``). Methods
whose ``anomaly_maps`` returns one map (not a list of levels) get only the fused row. CPU, no labels
written anywhere: it reads the run and prints.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from mcad.metrics.functional import auroc
from mcad.runs import load_run_config, load_trained_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training run folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: <run>/checkpoints/last.ckpt")
    parser.add_argument("--classes", nargs="*", default=None, help="default: every class of the run")
    parser.add_argument("--top", type=int, default=3, help="how many of the highest-scored normal images to list")
    args = parser.parse_args()

    checkpoint = args.checkpoint or args.run / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(f"No checkpoint at {checkpoint}; pass --checkpoint.")
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_run_config(args.run, scratch)
        method, datamodule = load_trained_method(cfg, checkpoint)
        protocol = instantiate(cfg.protocol)
        datamodule.setup("test")
        dataset = datamodule.test_dataset
        assert dataset is not None  # setup("test") builds it

        rows: dict[str, list[tuple[str, int, list[float], float]]] = {}
        with torch.no_grad():
            for i in range(len(dataset)):
                sample = dataset[i]
                name = datamodule.class_names[int(sample["class_id"])]
                if args.classes and name not in args.classes:
                    continue
                maps = method.anomaly_maps(sample["image"].unsqueeze(0)).anomaly_map
                levels = list(maps) if isinstance(maps, list) else []
                per_level = [float(protocol.reduce(protocol.smooth(protocol.upsample(m)))) for m in levels]
                fused = float(protocol.reduce(protocol.smooth(protocol.fuse(maps))))
                rows.setdefault(name, []).append((Path(str(sample["path"])).name, int(sample["label"]), per_level,
                                                  fused))  # fmt: skip

    for name, items in rows.items():
        labels = np.array([label for _, label, _, _ in items])
        n_levels = len(items[0][2])
        print(f"\n{name}: {int(labels.sum())} defective, {int((labels == 0).sum())} normal")
        for k in range(n_levels):
            scores = np.array([per[k] for _, _, per, _ in items])
            lowest = scores[labels == 1].min()
            print(f"  level {k}: image AUROC {100 * auroc(scores, labels):.1f}, lowest defect {lowest:.3f}")
        fused_scores = np.array([fused for _, _, _, fused in items])
        print(f"  fused  : image AUROC {100 * auroc(fused_scores, labels):.1f}, lowest defect "
              f"{fused_scores[labels == 1].min():.3f}")  # fmt: skip
        normal = sorted((item for item in items if item[1] == 0), key=lambda item: -item[3])
        for file, _, per, fused in normal[: args.top]:
            levels_text = " ".join(f"{v:.3f}" for v in per)
            above = int((fused_scores[labels == 1] < fused).sum())
            print(f"  normal {file}: levels [{levels_text}] fused {fused:.3f} (above {above} defects)")


if __name__ == "__main__":
    main()
