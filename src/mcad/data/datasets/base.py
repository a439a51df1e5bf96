"""The declarative description of a dataset format: classes, listing, official split, how to obtain it.

Each format (``mvtec``, ``visa``, ``folder``, ``synthetic``, ...) is one :class:`DatasetFormat` record in
its own module, registered in :data:`mcad.data.datasets.FORMATS`; the data module only ever talks to the
record, so adding a dataset means adding a module and a ``conf/data/<name>.yaml``, not editing if-chains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcad.data.download import download_and_extract
from mcad.data.io import DataError
from mcad.data.records import SampleRecord

__all__ = ["DatasetFormat", "Download", "RecordLister"]

#: ``list_records(root, classes, split, options) -> records`` of one split (``train`` or ``test``).
RecordLister = Callable[[Path, Sequence[str], str, Mapping[str, Any]], list[SampleRecord]]
#: ``generate(cache_dir, classes, options) -> root`` for formats produced locally (procedural data).
Generator = Callable[[Path, Sequence[str], Mapping[str, Any]], Path]


@dataclass(frozen=True)
class Download:
    """A public archive: where it is and its SHA-256 (``None`` when the publisher gives none)."""

    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetFormat:
    """How one dataset format is found, listed and obtained.

    Attributes:
        name: The ``data.format`` value.
        list_records: Lists the samples of a split (see :data:`RecordLister`); raises :class:`DataError`
            naming the path when the layout is wrong.
        classes: The official class list; ``None`` = discovered from the root by ``discover``.
        discover: Lists the classes found under a root (formats without a fixed list).
        marker: Path relative to the root that exists once the data is in place, checked before listing: a
            format string over the options and ``class`` (the first class of the run), e.g.
            ``"{class}/train/good"`` or ``"{split_csv}"``.
        download: A public archive, used with ``data.download=true``.
        manual: What to download and where to put it, for the error when the data is missing.
        licence: The dataset's licence (recorded in the README's data table).
        options: Format-specific options and their defaults (``data.options``).
        generate: Produces the data locally (procedural formats; ``root`` is then unused).
    """

    name: str
    list_records: RecordLister
    classes: tuple[str, ...] | None = None
    discover: Callable[[Path], list[str]] | None = None
    marker: str | None = None
    download: Download | None = None
    manual: str = ""
    licence: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    generate: Generator | None = None

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The format's option defaults updated with ``given``.

        Raises:
            DataError: ``given`` holds a key the format does not know.
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise DataError(f"data.options {unknown} are not options of data.format={self.name} (known: {known}).")
        return {**self.options, **given}

    def locate(
        self, root: str | Path | None, options: Mapping[str, Any], cache_dir: Path, classes: Sequence[str] | None,
        download: bool = False, sha256: str | None = None,
    ) -> Path:  # fmt: skip
        """The dataset's root folder: generated, found, or downloaded when allowed.

        Raises:
            DataError: The data is not in place (the message says where to put what) and no download was
                allowed or possible.
        """
        if self.generate is not None:
            return self.generate(cache_dir / "datasets", list(classes or self.classes or ()), options)
        if not root:
            raise DataError(f"data.root is required for data.format={self.name} (e.g. data.root=/data/{self.name}).")
        folder = Path(root).expanduser()
        if self.marker is None:
            return folder
        first = (list(classes or ()) or list(self.classes or ()) or [""])[0]
        missing = folder / self.marker.format(**options, **{"class": first})
        if missing.exists():
            return folder
        if not download or self.download is None:
            how = " Or set data.download=true." if self.download is not None else ""
            raise DataError(f"{self.name} data not found under {folder} (no {missing}). {self.manual}{how}")
        download_and_extract(self.download.url, folder, sha256 or self.download.sha256, self.manual)
        if not missing.exists():
            raise DataError(
                f"The {self.name} archive was extracted into {folder} but {missing} is missing. {self.manual}"
            )
        return folder

    def class_names(self, root: Path, requested: Sequence[str] | None) -> list[str]:
        """``requested`` (checked against the official list), else the official or discovered classes.

        Raises:
            DataError: A requested class is not one of the format's classes.
        """
        if requested:
            if self.classes is not None:
                unknown = [c for c in requested if c not in self.classes]
                if unknown:
                    raise DataError(
                        f"data.classes {unknown} are not {self.name} classes (known: {', '.join(self.classes)})."
                    )
            return list(requested)
        if self.classes is not None:
            return list(self.classes)
        if self.discover is None:
            raise DataError(f"data.format={self.name} has no class list: set data.classes=[...].")
        return self.discover(root)
