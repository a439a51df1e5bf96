"""Dataset formats: one declarative :class:`~mcad.data.datasets.base.DatasetFormat` record per module.

``FORMATS`` maps every ``data.format`` value to its record; a new format is a new module registered here
plus a ``conf/data/<name>.yaml``.
"""

from __future__ import annotations

from mcad.data.datasets.base import DatasetFormat, Download
from mcad.data.datasets.btad import BTAD
from mcad.data.datasets.mpdd import MPDD
from mcad.data.datasets.mvtec import FOLDER, MVTEC
from mcad.data.datasets.mvtec_ad2 import MVTEC_AD2
from mcad.data.datasets.realiad import REALIAD
from mcad.data.datasets.synthetic import SYNTHETIC
from mcad.data.datasets.visa import VISA

FORMATS: dict[str, DatasetFormat] = {
    fmt.name: fmt for fmt in (MVTEC, VISA, FOLDER, SYNTHETIC, REALIAD, BTAD, MPDD, MVTEC_AD2)
}

__all__ = ["FORMATS", "DatasetFormat", "Download"]
