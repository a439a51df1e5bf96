"""Helpers of the workflow tests: tiny synthetic runs, entry-point configs, an offline W&B run reader.

(A module of its own: test modules cannot import from a conftest reliably.)
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra

from helpers import REPO_ROOT as REPO
from helpers import TINY, compose_config, compose_entry

__all__ = ["REPO", "TINY", "compose_config", "compose_entry", "read_offline_run", "run_cli"]


def run_cli(monkeypatch: Any, argv: list[str]) -> None:
    """``python train.py <argv>`` in this process (Hydra's real command-line path, launchers included)."""
    import sys

    import mcad.train

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    mcad.train.main()


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
