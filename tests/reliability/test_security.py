"""Security: verified downloads and safe extraction, plain-data loading of checkpoints, weights and caches, no code
evaluation from configs or data, and API keys only from the environment."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from reliability_helpers import REPO_ROOT, TINY, assert_no_results, make_folder_dataset, run_train

from mcad.config.validate import ConfigError
from mcad.data.datasets import FORMATS, Download
from mcad.data.download import safe_extract
from mcad.data.io import DataError
from mcad.train import train
from mcad.utils.checkpoints import CheckpointError


class _Exploit:
    """Unpickling this runs code: it writes the file PWNED in the current folder."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


# ------------------------------------------------------------------------------------------------ downloads


def _mvtec_run(root: Path, *extra: str) -> list[str]:
    base = [o for o in TINY if not o.startswith(("data.options", "data.classes", "protocol.eval_size"))]
    return [
        *base, "data=mvtec", f"data.root={root}", "data.download=true", "data.classes=[bottle]", "data.num_workers=0",
        "data.pin_memory=false", "data.image_size=32", *extra,
    ]  # fmt: skip


def _tar_of(folder: Path, archive: Path, extra: list[tuple[str, bytes]] = ()) -> str:
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=".")
        for name, payload in extra:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture
def mvtec_archive(tmp_path, monkeypatch):
    """A one-class MVTec-layout tar served from a file:// URL in place of the official one."""
    make_folder_dataset(tmp_path / "src", classes=("bottle",))
    archive = tmp_path / "served" / "mvtec_anomaly_detection.tar"
    archive.parent.mkdir()
    official = FORMATS["mvtec"]
    served = dataclasses.replace(official, download=Download(archive.as_uri(), official.download.sha256))
    monkeypatch.setitem(FORMATS, "mvtec", served)
    return archive


def test_download_with_a_wrong_sha256_is_deleted_and_nothing_is_extracted(make_config, tmp_path, mvtec_archive):
    _tar_of(tmp_path / "src", mvtec_archive)
    root = tmp_path / "mvtec"
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"SHA-256 mismatch.*deleted") as info:
        train(make_config(_mvtec_run(root, f"+data.sha256={'0' * 64}"), run))
    assert "mvtec_anomaly_detection.tar" in str(info.value)
    assert not (root / "mvtec_anomaly_detection.tar").exists()  # the unverified file is gone
    assert not (root / "bottle").exists()
    assert_no_results(run)


def test_verified_download_is_extracted_and_used(make_config, tmp_path, mvtec_archive):
    digest = _tar_of(tmp_path / "src", mvtec_archive)
    root = tmp_path / "mvtec"
    results = train(make_config(_mvtec_run(root, f"+data.sha256={digest}", "trainer.max_epochs=1"), tmp_path / "run"))
    assert (root / "bottle" / "train" / "good" / "000.png").is_file()
    assert set(results["per_class"]) == {"bottle"}


@pytest.mark.parametrize("name", ["../escaped.txt", "/tmp/mcad-escaped-absolute.txt"])
def test_download_with_a_traversal_entry_is_refused_before_writing(make_config, tmp_path, mvtec_archive, name):
    # A correctly hashed archive (the attacker controls the server, or the digest was given by them).
    digest = _tar_of(tmp_path / "src", mvtec_archive, extra=[(name, b"owned")])
    root = tmp_path / "mvtec"
    with pytest.raises(DataError, match="Unsafe path"):
        train(make_config(_mvtec_run(root, f"+data.sha256={digest}"), tmp_path / "run"))
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/mcad-escaped-absolute.txt").exists()
    assert not (root / "bottle").exists()  # refused before anything was written


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, payload)
    return path


@pytest.mark.parametrize(
    "entry",
    [
        ("../escaped.txt", b"x", None),
        ("/tmp/mcad-escaped-zip.txt", b"x", None),
        ("d/../../escaped.txt", b"x", None),
        ("d/link", b"../../outside", 0o120777),  # a symlink entry pointing outside
        ("d/abs_link", b"/etc/passwd", 0o120777),
    ],
)
def test_crafted_zip_entries_are_refused(tmp_path, entry):
    archive = _zip(tmp_path / "evil.zip", [("d/ok.txt", b"ok", None), entry])
    target = tmp_path / "out"
    with pytest.raises(DataError, match="Unsafe"):
        safe_extract(archive, target)
    assert not (target / "d" / "ok.txt").exists()
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/mcad-escaped-zip.txt").exists()


@pytest.mark.parametrize(
    "kind, name, link",
    [("symlink", "d/link", "../../outside"), ("symlink", "d/abs", "/etc"), ("hardlink", "d/hard", "../x")],
)
def test_crafted_tar_links_are_refused(tmp_path, kind, name, link):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = link
        tar.addfile(info)
    with pytest.raises(DataError, match="Unsafe link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "d").exists()


# ------------------------------------------------------------------------------------------------ pickles


def _evil_files(folder: Path) -> dict[str, Path]:
    """A raw pickle and a torch.save zip checkpoint, both running code when unpickled without weights_only."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": _Exploit(), "epoch": 0}))
    zipped = folder / "zipped.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "payload": _Exploit()}, zipped)
    return {"raw": raw, "zipped": zipped}


@pytest.mark.parametrize("fmt", ["raw", "zipped"])
@pytest.mark.parametrize("mode", ["evaluate", "resume"])
def test_crafted_checkpoint_is_refused_without_running_code(make_config, tmp_path, monkeypatch, fmt, mode):
    monkeypatch.chdir(tmp_path)
    evil = _evil_files(tmp_path / "evil")[fmt]
    extra = ["train=false"] if mode == "evaluate" else []
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"Refusing to load .*weights_only=True") as info:
        train(make_config([*TINY, *extra, f"ckpt_path={evil}"], run))
    assert str(evil) in str(info.value)
    assert not (tmp_path / "PWNED").exists()
    assert_no_results(run)


def test_crafted_backbone_weights_are_refused_without_running_code(make_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = _evil_files(tmp_path / "evil")["raw"]
    run = tmp_path / "run"
    overrides = [*TINY, "backbone.weights_source=null", "backbone.pretrained=false", f"backbone.weights_path={evil}"]
    with pytest.raises(InstantiationException, match=r"Refusing to load .*raw\.ckpt.*weights_only") as info:
        train(make_config(overrides, run))  # Hydra names the backbone target and wraps the CheckpointError
    assert isinstance(info.value.__cause__, CheckpointError)
    assert not (tmp_path / "PWNED").exists()
    assert_no_results(run)


def test_poisoned_decoded_cache_entries_are_never_unpickled(make_config, tmp_path, monkeypatch):
    # The decoded-image cache is a folder of .npy files: one replaced by a pickled object array must be
    # ignored (re-decoded), not loaded.
    monkeypatch.chdir(tmp_path)
    data = make_folder_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    overrides = [
        "method=rd", "backbone=tf_efficientnet_lite0", "data=folder", f"data.root={data}", "data.image_size=32",
        "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=1", "count_flops=false", "print_table=false",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip

    def run(name: str) -> dict:
        cfg = make_config(overrides, tmp_path / name)
        cfg.paths.cache_dir = str(cache)  # a private cache: this test poisons it
        return train(cfg)

    first = run("run1")
    entries = sorted((cache / "decoded").glob("*.npy"))
    assert entries
    for entry in entries:
        np.save(entry, np.array([_Exploit()], dtype=object), allow_pickle=True)
    second = run("run2")
    assert not (tmp_path / "PWNED").exists()
    assert second["per_class"] == first["per_class"]


# ------------------------------------------------------------------------------------------------ eval / exec

# OmegaConf resolvers that only read (no code evaluation).
SAFE_RESOLVERS = {"hydra", "now", "oc.env", "oc.select", "oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            yield node, owner, name, kwargs


def test_no_code_evaluation_or_unsafe_deserialisation_in_the_sources():
    problems = []
    for path in sorted((REPO_ROOT / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, owner, name, kwargs in _calls(tree):
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            if isinstance(node.func, ast.Name) and name in {"eval", "exec", "compile", "__import__"}:
                problems.append(f"{where}: {name}()")
            if owner in {"pickle", "cPickle", "dill", "marshal", "shelve"} and name in {"load", "loads", "open"}:
                problems.append(f"{where}: {owner}.{name}()")
            if owner == "yaml" and name in {"load", "unsafe_load", "full_load"}:
                problems.append(f"{where}: yaml.{name}()")
            if owner == "torch" and name == "load":
                weights_only = kwargs.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name == "load" and owner in {"np", "numpy"}:
                allow = kwargs.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append(f"{where}: np.load with allow_pickle")
            if name == "register_new_resolver":
                problems.append(f"{where}: custom OmegaConf resolver (check it evaluates no code)")
    assert not problems, "\n".join(problems)


def test_configs_use_no_code_evaluating_resolvers():
    import mcad.train  # noqa: F401 - everything the entry point registers

    used = set()
    for path in (REPO_ROOT / "conf").rglob("*.yaml"):
        used |= set(re.findall(r"\$\{([\w.]+):", path.read_text()))
    assert used <= SAFE_RESOLVERS, used - SAFE_RESOLVERS
    assert not any(OmegaConf.has_resolver(name) for name in ("eval", "python", "exec"))


# ------------------------------------------------------------------------------------------------ API keys


def test_credentials_in_the_config_are_refused(make_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="logger.wandb.api_key.*environment"):
        train(make_config([*TINY, "logger=wandb", "+logger.wandb.api_key=abc123"], run))
    assert_no_results(run)


@pytest.mark.slow
def test_wandb_key_from_the_environment_is_never_written(tmp_path, cache_dir):
    secret = "mcad-test-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:32]
    run = tmp_path / "run"
    done = run_train(
        [*TINY, "logger=wandb", "trainer.max_epochs=1"],
        run,
        cache_dir,
        WANDB_API_KEY=secret,
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path / "wandb-dir"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert secret not in done.stdout + done.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "results.json" for p in files) and any(p.parent.name == ".hydra" for p in files)
    assert any("wandb" in p.parts for p in files)  # the offline run was written (config, metadata, logs)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
