import hashlib
import io
import tarfile
import zipfile

import pytest

from mcad.data.download import safe_extract, verify_sha256
from mcad.data.io import DataError


def test_sha256_mismatch_deletes_the_file(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"payload")
    verify_sha256(path, hashlib.sha256(b"payload").hexdigest())
    assert path.exists()
    with pytest.raises(DataError, match="SHA-256 mismatch.*deleted"):
        verify_sha256(path, "0" * 64)
    assert not path.exists()


def _tar(path, entries):
    with tarfile.open(path, "w") as tar:
        for name, kind, target in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, target
                tar.addfile(info)


@pytest.mark.parametrize(
    "entries",
    [
        [("../evil.txt", "file", None)],
        [("/tmp/evil.txt", "file", None)],
        [("ok/link", "symlink", "../../outside")],
        [("ok/link", "symlink", "/etc/passwd")],
        [("ok/hard", "hardlink", "../outside")],
    ],
)
def test_unsafe_tar_entries_are_refused_before_writing(tmp_path, entries):
    archive = tmp_path / "evil.tar"
    _tar(archive, [("ok/file.txt", "file", None), *entries])
    target = tmp_path / "out"
    with pytest.raises(DataError, match="Unsafe"):
        safe_extract(archive, target)
    assert not (target / "ok" / "file.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_safe_archives_extract(tmp_path):
    archive = tmp_path / "good.tar"
    _tar(archive, [("d/file.txt", "file", None), ("d/link", "symlink", "file.txt")])
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "file.txt").read_bytes() == b"abc"
    zpath = tmp_path / "good.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("z/inner.txt", "hi")
    safe_extract(zpath, tmp_path / "zout")
    assert (tmp_path / "zout" / "z" / "inner.txt").read_text() == "hi"


def test_zip_traversal_is_refused(tmp_path):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DataError, match="Unsafe"):
        safe_extract(zpath, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
