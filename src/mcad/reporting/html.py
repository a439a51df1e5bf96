"""One self-contained HTML page of runs: ``mcad-report PATH... --html`` (a sweep) and ``<run>/report.html``.

For clusters without a W&B server: the page needs no network, no server and no external file. Styles are
inline, curves are inline SVG drawn here, overlay images are embedded as base64 ``data:`` URIs, fonts are
the browser's own. It shows

* the paper table and the per-class table of :mod:`mcad.report` (the same :class:`~mcad.report.Report`
  rows, so every cell reads as in ``report.md``), with the list of failed or missing runs;
* per run: what it is (overrides, method, data, seed, protocol, efficiency figures), its own per-class
  table (pages of several runs), the image ROC curve of every class and, where ``curves.json`` has them,
  the pixel ROC and PRO curves (see :mod:`mcad.evaluation.curves`), and the map overlays of
  ``visualizations/`` (``visualize=true``), downscaled to :data:`MAX_IMAGE_WIDTH` pixels if wider, with the
  captions of ``visualizations/index.csv``.

A page of several runs embeds at most :data:`MAX_IMAGES_PER_RUN` overlays per run by default (the first
of every class, then the second, ...), so a large sweep stays a file a browser opens; the page says how
many were left out.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcad.evaluation.curves import CURVE_KINDS, CURVES_FILE, read_curves
from mcad.reporting.tables import (
    NEVER_STARTED,
    Cell,
    Report,
    Run,
    format_cell,
    load_run,
    report_of_runs,
    row_label,
)
from mcad.runs import FAILED_FILE, RESULTS_FILE
from mcad.utils.files import atomic_write_text

log = logging.getLogger(__name__)

HTML_FILE = "report.html"
MAX_IMAGES_PER_RUN = 12
MAX_IMAGE_WIDTH = 1024
VISUALIZATIONS = "visualizations"
# Solid fills of the table header and of the overlay frames (the browser test finds them by colour).
TABLE_HEAD_COLOUR = "#17324d"
FIGURE_FRAME_COLOUR = "#6a1b9a"
# One colour per class (Tableau 20); classes beyond 20 reuse them with a dashed line.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
_TICK = 'font-size="10" fill="#444"'
_CURVE_TITLES = {"image_roc": "Image ROC", "pixel_roc": "Pixel ROC", "pro": "PRO"}

_CSS = f"""
body {{ font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #1b1b1b;
       background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 18px; margin: 28px 0 8px; }}
h3 {{ font-size: 15px; margin: 18px 0 6px; }}
.meta {{ color: #555; margin: 2px 0; }} code {{ font-size: 12px; background: #f3f3f3; padding: 0 3px; }}
.scroll {{ overflow-x: auto; }}
table.report {{ border-collapse: collapse; margin: 6px 0; font-variant-numeric: tabular-nums; }}
table.report th {{ background: {TABLE_HEAD_COLOUR}; color: #fff; font-weight: 600; padding: 4px 8px;
                  border: 1px solid {TABLE_HEAD_COLOUR}; white-space: nowrap; }}
table.report td {{ padding: 3px 8px; border: 1px solid #d0d0d0; text-align: right; white-space: nowrap; }}
table.report td.label {{ text-align: left; font-weight: 600; }}
table.report tr.group td {{ border-top: 2px solid #888; }}
table.report td.first {{ border-left: 2px solid #888; }} table.report th.first {{ border-left: 2px solid #fff; }}
td.failed {{ color: #b00020; font-weight: 600; }} td.missing {{ color: #a15c00; font-weight: 600; }}
td.partial {{ color: #7a5a00; }}
.legend-text {{ color: #555; font-size: 13px; }}
ul.problems li {{ margin: 2px 0; }}
section.run {{ border-top: 3px solid #ddd; margin-top: 32px; }}
.status-failed {{ color: #b00020; }} .status-missing {{ color: #a15c00; }}
.curves {{ display: flex; flex-wrap: wrap; gap: 18px; }}
.chart-box {{ width: 340px; }} .chart-box h4 {{ margin: 4px 0; font-size: 14px; }}
ul.series {{ list-style: none; padding: 0; margin: 4px 0; font-size: 12px; columns: 2; }}
ul.series li {{ white-space: nowrap; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }}
.overlays {{ display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }}
figure.overlay {{ margin: 0; padding: 4px; border: 3px solid {FIGURE_FRAME_COLOUR}; max-width: 100%;
                  box-sizing: border-box; width: fit-content; }}
figure.overlay img {{ display: block; max-width: 100%; height: auto; }}
figure.overlay figcaption {{ font-size: 12px; color: #333; margin-top: 3px; contain: inline-size; }}
.note {{ color: #666; font-style: italic; }}
details {{ margin: 6px 0; }}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------- tables
_PARTIAL = re.compile(r"\(\d+/\d+\)$")  # format_cell's "(k/n)": only k of n runs of the cell succeeded


def _cell_class(text: str) -> str:
    if text == "FAILED":
        return "failed"
    if text == "MISSING":
        return "missing"
    return "partial" if _PARTIAL.search(text) else ""


def _td(text: str, label: bool = False, first: bool = False) -> str:
    classes = " ".join(c for c in ("label" if label else _cell_class(text), "first" if first else "") if c)
    return f'<td class="{classes}">{_e(text)}</td>' if classes else f"<td>{_e(text)}</td>"


def _summary_table(report: Report) -> str:
    """The paper table: rows of :meth:`Report.summary_rows`, a header row per dataset over its metrics."""
    rows = report.summary_rows()
    head1 = f'<tr><th rowspan="2">{_e(report.row_header)}</th><th rowspan="2">runs</th>'
    head1 += "".join(f'<th colspan="{len(report.metrics)}" class="first">{_e(d)}</th>' for d in report.datasets)
    n = len(report.metrics)
    head2 = "".join(f'<th class="first">{_e(m)}</th>' if i % n == 0 else f"<th>{_e(m)}</th>"
                    for i, m in enumerate(m for _ in report.datasets for m in report.metrics))  # fmt: skip
    head1, head2 = head1 + "</tr>", f"<tr>{head2}</tr>"
    # A dataset's first metric column opens with a heavier rule, so the datasets read as blocks.
    body = "".join("<tr>" + _td(r[0], True) + _td(r[1]) + "".join(_td(c, first=i % n == 0) for i, c in
                   enumerate(r[2:])) + "</tr>" for r in rows[1:])  # fmt: skip
    table = f'<table class="report summary"><thead>{head1}{head2}</thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _per_class_table(rows: list[list[str]]) -> str:
    """A per-class table of :meth:`Report.per_class_rows` (dataset, class, row, metrics)."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in rows[0]) + "</tr>"
    body, previous = [], None
    for r in rows[1:]:
        group = (r[0], r[1]) != previous and previous is not None
        previous = (r[0], r[1])
        cells = "".join(_td(c, i < 3) for i, c in enumerate(r))
        body.append(f'<tr class="group">{cells}</tr>' if group else f"<tr>{cells}</tr>")
    table = f'<table class="report per-class"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _problems(report: Report) -> str:
    items = []
    for run in report.runs:
        if run.status != "ok":
            label = " ".join(run.overrides) or str(run.path)
            items.append(f"<li><b>{_e(run.status.upper())}</b> <code>{_e(label)}</code> ({_e(run.path)}): "
                         f"{_e(run.error)}</li>")  # fmt: skip
    return f'<h3>Failed or missing runs</h3><ul class="problems">{"".join(items)}</ul>' if items else ""


# ----------------------------------------------------------------------------------------- curves
def _svg_chart(kind: str, series: list[tuple[str, str, list[float], list[float]]], x_max: float) -> str:
    """An inline SVG line chart of curves in the unit square (x up to ``x_max``)."""
    width, height, left, right, top, bottom = 340, 290, 44, 12, 10, 40
    pw, ph = width - left - right, height - top - bottom
    x_name, y_name, _ = CURVE_KINDS[kind]

    def px(x: float) -> float:
        return left + min(max(x / x_max, 0.0), 1.0) * pw

    def py(y: float) -> float:
        return top + (1.0 - min(max(y, 0.0), 1.0)) * ph

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(_CURVE_TITLES[kind])}">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']  # fmt: skip
    for i in range(6):
        fx, fy = px(i / 5 * x_max), py(i / 5)
        parts.append(f'<line x1="{fx:.1f}" y1="{top}" x2="{fx:.1f}" y2="{top + ph}" stroke="#eee"/>')
        parts.append(f'<line x1="{left}" y1="{fy:.1f}" x2="{left + pw}" y2="{fy:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{fx:.1f}" y="{top + ph + 14}" {_TICK} text-anchor="middle">{i / 5 * x_max:.3g}</text>')
        parts.append(f'<text x="{left - 4}" y="{fy + 3:.1f}" {_TICK} text-anchor="end">{i / 5:.1f}</text>')
    if kind != "pro":  # chance level of a ROC curve
        dashed = 'stroke="#bbb" stroke-dasharray="4 3"'
        parts.append(f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" {dashed}/>')
    for i, (_, colour, xs, ys) in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        dash = ' stroke-dasharray="5 2"' if i >= len(PALETTE) else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6"{dash} points="{points}"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" font-size="11" text-anchor="middle">{x_name}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2})">{y_name}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _curves_html(run: Run) -> str:
    try:
        record = read_curves(run.path)
    except ValueError as err:
        return f'<p class="note">{_e(err)}</p>'
    if record is None:
        return (f'<p class="note">No {CURVES_FILE} in this run: its ROC / PRO curve points were not recorded '
                "(see mcad.logging.curves.CurveRecorder).</p>")  # fmt: skip
    classes: dict[str, dict[str, Any]] = record.get("classes") or {}
    per_class = (run.results or {}).get("per_class") or {}
    fpr_limit = float(record.get("fpr_limit") or 0.3)
    stride = record.get("pixel_stride")
    boxes = []
    for kind, (_, _, metric) in CURVE_KINDS.items():
        series, legend = [], []
        for i, (cls, curves) in enumerate(classes.items()):
            curve = curves.get(kind)
            if not curve:
                continue
            colour = PALETTE[i % len(PALETTE)]
            series.append((cls, colour, curve["x"], curve["y"]))
            value = (per_class.get(cls) or {}).get(metric)
            shown = f" {metric} {format_cell([float(value)], Cell(ok=1))}" if isinstance(value, int | float) else ""
            legend.append(f'<li><span class="swatch" style="background:{colour}"></span>{_e(cls)}{_e(shown)}</li>')
        if not series:
            continue
        title = _CURVE_TITLES[kind] + (f" (FPR ≤ {fpr_limit:g})" if kind == "pro" else "")
        if kind != "image_roc" and stride and int(stride) > 1:
            title += f", every {int(stride)}th pixel row / column"
        x_max = fpr_limit if kind == "pro" else 1.0
        boxes.append(f'<div class="chart-box"><h4>{_e(title)}</h4>{_svg_chart(kind, series, x_max)}'
                     f'<ul class="series">{"".join(legend)}</ul></div>')  # fmt: skip
    if not boxes:
        return f'<p class="note">{CURVES_FILE} holds no curve (no class had both normal and anomalous samples).</p>'
    return f'<div class="curves">{"".join(boxes)}</div>'


# ----------------------------------------------------------------------------------------- overlays
def _captions(folder: Path) -> dict[str, str]:
    """Captions by relative file name from ``index.csv`` (written by the visualiser)."""
    index = folder / "index.csv"
    if not index.is_file():
        return {}
    out = {}
    try:
        for row in csv.DictReader(index.read_text().splitlines()):
            kind = "anomalous" if str(row.get("label")) == "1" else "normal"
            text = f"{row.get('class')} · {row.get('defect_type')} · {kind} · score {row.get('score')}"
            if row.get("threshold"):
                text += f" · threshold {row.get('threshold')}"
            out[str(row.get("file"))] = f"{text} · {Path(str(row.get('path'))).name}"
    except (OSError, csv.Error) as err:
        log.warning("Unreadable %s (%s): overlays are captioned by file name.", index, err)
    return out


def _pick(files: list[Path], limit: int | None) -> list[Path]:
    """Up to ``limit`` files, round-robin over the class folders (each class's first image first)."""
    if limit is None or len(files) <= limit:
        return files
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    picked: list[Path] = []
    depth = 0
    while len(picked) < limit:
        for group in groups.values():
            if depth < len(group) and len(picked) < limit:
                picked.append(group[depth])
        depth += 1
    order = {f: i for i, f in enumerate(files)}
    return sorted(picked, key=order.__getitem__)


def _image_uri(path: Path, max_width: int) -> tuple[str, int, int, str]:
    """``(data URI, width, height, note)`` of a PNG, downscaled (area filter) if wider than ``max_width``."""
    import cv2
    import numpy as np

    raw = path.read_bytes()
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path} is not a readable image")
    h, w = image.shape[:2]
    note = ""
    if w > max_width:
        nh = max(1, round(h * max_width / w))
        image = cv2.resize(image, (max_width, nh), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", image)
        if not ok:
            raise ValueError(f"Could not re-encode {path}")
        raw, note = buf.tobytes(), f" (downscaled from {w}×{h})"
        w, h = max_width, nh
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii"), w, h, note


def _overlays_html(run: Run, limit: int | None, max_width: int) -> str:
    folder = run.path / VISUALIZATIONS
    files = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not files:
        return f'<p class="note">No map overlays in {VISUALIZATIONS}/ (run with visualize=true to get them).</p>'
    captions = _captions(folder)
    shown = _pick(files, limit)
    figures = []
    for path in shown:
        rel = path.relative_to(folder).as_posix()
        caption = captions.get(rel, rel)
        try:
            uri, w, h, note = _image_uri(path, max_width)
        except (OSError, ValueError) as err:
            figures.append(f'<p class="note">{_e(rel)}: {_e(err)}</p>')
            continue
        figures.append(f'<figure class="overlay"><img src="{uri}" width="{w}" height="{h}" alt="{_e(rel)}">'
                       f'<figcaption title="{_e(rel)}">{_e(caption + note)}</figcaption></figure>')  # fmt: skip
    more = len(files) - len(shown)
    tail = f'<p class="note">{more} more overlays in {_e(folder)} are not embedded.</p>' if more else ""
    return f'<div class="overlays">{"".join(figures)}</div>{tail}'


# ----------------------------------------------------------------------------------------- runs
def _display_path(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` when below it (the page's own run folder in full)."""
    if root is not None:
        try:
            relative = path.resolve().relative_to(root.resolve())
            if relative.parts:
                return str(relative)
        except ValueError:
            pass
    return str(path)


def _run_title(run: Run, report: Report) -> str:
    parts = [row_label(run, report.keys), run.dataset or "?"]
    seed = run.override_map().get("seed", (run.results or {}).get("seed"))
    if seed is not None:
        parts.append(f"seed {seed}")
    return " · ".join(str(p) for p in parts)


def _figure(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _run_section(run: Run, number: int, report: Report, root: Path | None, limit: int | None, max_width: int,
                 own_table: bool) -> str:  # fmt: skip
    title = _run_title(run, report)
    status = "" if run.status == "ok" else f' <span class="status-{run.status}">{run.status.upper()}</span>'
    out = [f'<section class="run" id="run-{number}"><h2>{number}. {_e(title)}{status}</h2>',
           f'<p class="meta">folder <code>{_e(_display_path(run.path, root))}</code></p>']  # fmt: skip
    if run.overrides:
        out.append(f'<p class="meta">overrides <code>{_e(" ".join(run.overrides))}</code></p>')
    results = run.results
    if results is None:
        out.append(f'<p class="note">{_e(run.error)}</p></section>')
        return "".join(out)
    facts = [(k, results.get(k)) for k in ("method", "data", "backbone", "seed")]
    facts.append(("protocol", (results.get("protocol") or {}).get("name")))
    text = " · ".join(f"{k} <b>{_e(v)}</b>" for k, v in facts if v is not None)
    out.append(f'<p class="meta">{text}</p>')
    figures = {k: v for k, v in (results.get("efficiency") or {}).items() if v is not None and not isinstance(v, dict)}
    if figures:
        rows = "".join(f'<tr><td class="label">{_e(k)}</td><td>{_e(_figure(v))}</td></tr>' for k, v in figures.items())
        out.append(f'<details><summary>efficiency ({len(figures)} figures)</summary>'
                   f'<table class="report efficiency"><tbody>{rows}</tbody></table></details>')  # fmt: skip
    if own_table:
        own = report_of_runs([run], metrics=report.metrics)
        out.append("<h3>Per class</h3>" + _per_class_table(own.per_class_rows()))
    out.append("<h3>Curves</h3>" + _curves_html(run))
    out.append("<h3>Map overlays</h3>" + _overlays_html(run, limit, max_width))
    out.append("</section>")
    return "".join(out)


# ----------------------------------------------------------------------------------------- page
def render_html(
    report: Report,
    title: str | None = None,
    max_images: int | None = None,
    max_image_width: int = MAX_IMAGE_WIDTH,
    root: str | Path | None = None,
) -> str:
    """The whole page of a report as one string (nothing is written).

    Args:
        report: The runs and tables (:func:`mcad.report.build_report`).
        title: Page title (default: ``mcad report`` and the number of runs).
        max_images: Overlays embedded per run; ``None``: all for a single run, :data:`MAX_IMAGES_PER_RUN`
            for several; 0: none.
        max_image_width: Wider overlays are downscaled to this width.
        root: Folder that run paths are shown relative to.
    """
    sections = sections_of(report)
    single = len(sections) == 1
    limit = max_images if max_images is not None else (None if single else MAX_IMAGES_PER_RUN)
    root = Path(root) if root is not None else None
    counts = {s: sum(r.status == s for r in report.runs) for s in ("ok", "failed", "missing")}
    title = title or f"mcad report: {len(report.runs)} run{'s' if len(report.runs) != 1 else ''}"
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f'<p class="meta">{_e(summary)} · written {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}'
           + (f" from <code>{_e(root)}</code>" if root is not None else "") + "</p>",
           '<h2 id="table">Results</h2>', _summary_table(report),
           '<p class="legend-text">Mean ± sample std over seeds, in %. (k/n): only k of the n runs of the cell '
           "succeeded; FAILED / MISSING: none did.</p>",
           _problems(report),
           '<h2 id="per-class">Per class</h2>', _per_class_table(report.per_class_rows())]  # fmt: skip
    if len(sections) > 1:
        links = "".join(f'<li><a href="#run-{i}">{_e(_run_title(r, report))}</a>'
                        + ("" if r.status == "ok" else f" ({_e(r.status)})") + "</li>"
                        for i, r in enumerate(sections, 1))  # fmt: skip
        out.append(f'<h2 id="runs">Runs</h2><ol class="toc">{links}</ol>')
    for i, run in enumerate(sections, 1):
        out.append(_run_section(run, i, report, root, limit, max_image_width, own_table=not single))
    out.append("</body></html>\n")
    return "\n".join(out)


def write_html(report: Report, path: str | Path, **kwargs: Any) -> Path:
    """Renders the page (:func:`render_html`, same keyword arguments) and writes it atomically to ``path``."""
    path = Path(path)
    page = render_html(report, **kwargs)  # before opening the file: a failure leaves nothing behind
    atomic_write_text(path, page)
    return path


def write_run_html(run_dir: str | Path, max_images: int | None = None,
                   max_image_width: int = MAX_IMAGE_WIDTH) -> Path:  # fmt: skip
    """Writes ``<run_dir>/report.html``: the page of one run (tables, curves, all its overlays).

    Called by the training entry point once ``results.json`` (and ``curves.json``) are written; also works
    on any finished or failed run folder.

    Args:
        run_dir: The run directory.
        max_images: Overlays embedded (default: all).
        max_image_width: Wider overlays are downscaled to this width.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: ``run_dir`` has neither ``results.json`` nor ``failed.json``.
    """
    run_dir = Path(run_dir)
    if not ((run_dir / RESULTS_FILE).is_file() or (run_dir / FAILED_FILE).is_file()):
        raise FileNotFoundError(f"No run under {run_dir}: it has neither {RESULTS_FILE} nor {FAILED_FILE}.")
    run = load_run(run_dir)
    report = report_of_runs([run])
    title = f"mcad run: {_run_title(run, report)}"
    return write_html(report, run_dir / HTML_FILE, title=title, max_images=max_images,
                      max_image_width=max_image_width, root=run_dir)  # fmt: skip


def sections_of(report: Report) -> Sequence[Run]:
    """The runs that get a section of their own (all but the never-started jobs of a sweep)."""
    return [r for r in report.runs if r.error != NEVER_STARTED]
