"""``mcad-report PATH...``: the paper-style table of a sweep (or of several run directories).

Collects the runs under the given paths and writes ``report.md`` / ``report.csv`` (mean ± std over seeds per
row and dataset) and ``report_per_class.md`` / ``.csv``; ``--wandb`` uploads both tables, ``--html`` writes one
self-contained ``report.html``. Collection, aggregation and the file formats are :mod:`mcad.reporting.tables`;
the page is :mod:`mcad.reporting.html`. This module is only the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mcad.evaluation.results import METRIC_COLUMNS
from mcad.reporting.html import MAX_IMAGES_PER_RUN, render_html
from mcad.reporting.tables import build_report
from mcad.utils.files import atomic_write_text


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``mcad-report``."""
    parser = argparse.ArgumentParser(prog="mcad-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="multirun directories and/or run directories")
    parser.add_argument("-o", "--output", help="folder for the report files (default: the first path)")
    parser.add_argument("--rows", help="comma-separated override keys defining the rows (default: swept keys)")
    parser.add_argument("--metrics", help=f"comma-separated metric columns (default: {','.join(METRIC_COLUMNS)})")
    parser.add_argument("--wandb", action="store_true", help="also upload the tables to W&B (WANDB_MODE applies)")
    parser.add_argument("--wandb-project", default="mcad", help="W&B project of --wandb (default: mcad)")
    parser.add_argument("--wandb-name", default=None, help="W&B run name of --wandb")
    html_help = "also write one self-contained report.html: tables, curves and overlays of every run"
    parser.add_argument("--html", action="store_true", help=html_help)
    parser.add_argument("--html-out", metavar="FILE", help="path of the page (implies --html; default: report.html)")
    images_help = f"overlays per run (default: all for one run, {MAX_IMAGES_PER_RUN} each for several; 0: none)"
    parser.add_argument("--html-max-images", type=int, metavar="N", default=None, help=images_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [k.strip() for k in args.rows.split(",")] if args.rows else None
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    report = build_report(args.paths, rows, metrics)
    first = Path(args.paths[0])
    output = Path(args.output) if args.output else (first if first.is_dir() else first.parent)
    page = None
    if args.html or args.html_out:
        # Rendered before anything is written: a page that cannot be built leaves no files behind.
        page = render_html(report, max_images=args.html_max_images, root=first)
    paths = report.write(output)
    if page is not None:
        paths["html"] = Path(args.html_out) if args.html_out else output / "report.html"
        atomic_write_text(paths["html"], page)
    print(report.markdown())
    print(f"Written: {', '.join(str(p) for p in paths.values())}")
    if args.wandb:
        report.to_wandb(args.wandb_project, name=args.wandb_name, group=str(first), directory=str(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
