"""Helpers of the workflow tests: tiny synthetic runs, entry-point configs, an offline W&B run reader.

(A module of its own: test modules cannot import from a conftest reliably.)
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mcad.config import config_dir

REPO = Path(__file__).resolve().parents[2]

# The smallest runs that still exercise everything: 2 classes x (8 train, 2 + 2 test) images at 64 px,
# a randomly initialised Lite0 (no weights needed), one epoch, evaluation at 64 px.
TINY = [
    "data=synthetic",
    "data.image_size=64",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "data.classes=[stripes,disk]",
    "data.options.num_train=8",
    "data.options.num_test_good=2",
    "data.options.num_test_defect=2",
    "data.options.image_size=64",
    "protocol.eval_size=64",
    "backbone=tf_efficientnet_lite0",
    "backbone.pretrained=false",
    "backbone.weights_source=null",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "print_table=false",
    "count_flops=false",
]


def run_cli(monkeypatch: Any, argv: list[str]) -> None:
    """``python train.py <argv>`` in this process (Hydra's real command-line path, launchers included)."""
    import sys

    import mcad.train

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    mcad.train.main()


def compose_entry(config_name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Composes an entry point's config as its command line would, with Hydra's context set."""
    GlobalHydra.instance().clear()
    extra = [f"hydra.run.dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*overrides, *extra], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def compose_train(overrides: list[str], output_dir: Path, cache: Path) -> DictConfig:
    """``train.yaml`` with paths in tmp folders (as the root conftest's ``make_config``)."""
    cfg = compose_entry("train", overrides, output_dir)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache)
    return cfg


# ------------------------------------------------------------------------------------------ W&B offline
def _wandb_records(path: Path):
    """Raw records of a ``.wandb`` file (W&B's LevelDB-log-style format: 32 KiB blocks, 7-byte headers)."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Summary, history keys, group, tags and config keys of an offline W&B run folder.

    W&B's service writes the file asynchronously: it is read again until its exit record is there.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in _wandb_records(files[0]):
            rec = pb.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out: dict[str, Any] = {"summary": {}, "history_keys": set(), "group": None, "tags": [], "config_keys": set()}
    out["complete"] = any(r.WhichOneof("record_type") == "exit" for r in records)
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"] = rec.run.run_group, list(rec.run.tags)
            out["config_keys"] |= {item.key for item in rec.run.config.update}
        elif kind == "config":
            out["config_keys"] |= {item.key for item in rec.config.update}
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = item.value_json
        elif kind == "history":
            out["history_keys"] |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    return out
