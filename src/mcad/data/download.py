"""Dataset downloads with SHA-256 verification and safe archive extraction."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from mcad.data.io import DataError

log = logging.getLogger(__name__)


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str | None) -> None:
    """Checks a file's digest; on mismatch deletes the file and raises.

    Raises:
        DataError: The digest differs from ``expected``.
    """
    if expected is None:
        log.warning("No SHA-256 known for %s: integrity not verified.", path)
        return
    actual = sha256sum(path)
    if actual.lower() != expected.lower():
        Path(path).unlink(missing_ok=True)
        raise DataError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file was deleted; "
            "download it again (a partial or tampered download)."
        )


def _inside(target: Path, member_path: str) -> bool:
    resolved = (target / member_path).resolve()
    return resolved == target or target in resolved.parents


def safe_extract(archive: str | Path, target: str | Path) -> None:
    """Extracts a tar or zip archive, refusing entries that would escape ``target``.

    Absolute paths, ``..`` traversal, tar links pointing outside the target, tar device files and any
    zip symlink entry are refused before anything is written.

    Raises:
        DataError: The archive contains an unsafe entry or is not a tar/zip file.
    """
    archive, target = Path(archive), Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                if os.path.isabs(m.name) or not _inside(target, m.name):
                    raise DataError(f"Unsafe path in archive {archive}: {m.name!r}")
                if m.issym() or m.islnk():
                    # symlink targets are relative to the link's folder, hard links to the archive root
                    base = (target / m.name).parent if m.issym() else target
                    if os.path.isabs(m.linkname) or not _inside(target, os.path.relpath(base / m.linkname, target)):
                        raise DataError(f"Unsafe link in archive {archive}: {m.name!r} -> {m.linkname!r}")
                if m.isdev() or m.isfifo():
                    raise DataError(f"Device or FIFO entry in archive {archive}: {m.name!r}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: also strips unsafe modes
                tar.extractall(target, members=members, filter="data")
            else:
                tar.extractall(target, members=members)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = info.filename
                if os.path.isabs(name) or name.startswith(("/", "\\")) or not _inside(target, name):
                    raise DataError(f"Unsafe path in archive {archive}: {name!r}")
                # zipfile writes a symlink entry as a file holding the link text; a dataset has no reason
                # to contain links, so refuse them rather than produce files that look like data.
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"Unsafe link in archive {archive}: {name!r} (zip archives may not hold links)")
            zf.extractall(target)
    else:
        raise DataError(f"{archive} is neither a tar nor a zip archive.")


def download_and_extract(url: str, root: str | Path, sha256: str | None, manual_hint: str) -> None:
    """Downloads ``url`` into ``root``, verifies it and extracts it there.

    Raises:
        DataError: The download failed (the message says where to put the files by hand), the digest
            differs, or the archive is unsafe.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(url.split("?")[0]).name
    partial = archive.with_suffix(archive.suffix + ".part")
    if not archive.exists():
        log.info("Downloading %s -> %s", url, archive)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as fh:
                shutil.copyfileobj(response, fh)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise DataError(f"Download of {url} failed ({err}). Place the data by hand: {manual_hint}") from err
        partial.rename(archive)
    verify_sha256(archive, sha256)
    safe_extract(archive, root)
