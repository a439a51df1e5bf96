"""The self-contained HTML report: curve points as data, the page's content, and the page in a real browser.

Fixture runs are fabricated (results.json written by the real writer, curves.json from real score arrays,
overlays drawn by the real renderer); one test trains a real tiny run with the curve recorder.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mcad.evaluation.results import write_results
from mcad.logging.curves import (
    CURVES_FILE,
    CurveRecorder,
    class_curve_points,
    read_curves,
    write_curves,
)
from mcad.logging.render import panel, write_png
from mcad.metrics import aupro, auroc, pro_points, roc_points
from mcad.report import main
from mcad.reporting.html import (
    FIGURE_FRAME_COLOUR,
    MAX_IMAGE_WIDTH,
    PALETTE,
    TABLE_HEAD_COLOUR,
    write_run_html,
)
from mcad.reporting.tables import build_report
from mcad.runs import record_failure

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")
CLASSES = ("stripes", "disk")


# ----------------------------------------------------------------------------------------- fixtures
def _overlay(path: Path, rng: np.random.Generator, size: int = 64) -> None:
    """A four-tile overlay of a noisy image with one square defect, drawn by the visualiser's renderer."""
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 3 : size // 2, size // 3 : size // 2] = 1
    amap = (rng.random((size, size)) * 0.5 + mask * 0.6).astype(np.float32)
    write_png(path, panel(image, mask, amap, 0.0, 1.1, 0.8, caption="fixture"))


def _curve_data(rng: np.random.Generator, strength: float, n: int = 40):
    """Scores, labels, 16x16 maps and masks of ``n`` test images per class."""
    names = np.repeat(CLASSES, n)
    labels = np.tile(np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(np.uint8), len(CLASSES))
    scores = rng.normal(size=names.size) + strength * labels
    masks = np.zeros((names.size, 16, 16), np.uint8)
    masks[labels == 1, 4:9, 5:11] = 1
    maps = (rng.random(masks.shape) + strength / 3 * masks).astype(np.float32)
    return names, scores, labels, maps, masks


def _fake_run(job: Path, overrides: list[str], value: float, seed: int = 0, curves: bool = True,
              overlays: int = 2, overlay_size: int = 64) -> Path:  # fmt: skip
    """A finished run folder: .hydra/overrides.yaml, results files, curves.json, visualizations/."""
    rng = np.random.default_rng(seed)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    given = dict(o.split("=", 1) for o in overrides)
    per_class = {cls: {m: value - 0.1 * i for m in METRICS} for i, cls in enumerate(CLASSES)}
    mean = {m: sum(v[m] for v in per_class.values()) / len(per_class) for m in METRICS}
    write_results(job, {
        "method": given.get("method", "rd"), "data": given.get("data", "synthetic"), "seed": int(given.get("seed", 0)),
        "protocol": {"name": "mcad"}, "per_class": per_class, "mean": mean,
        "efficiency": {"params_total": 1234567, "test_images_per_second": 12.5},
    })  # fmt: skip
    if curves:
        names, scores, labels, maps, masks = _curve_data(rng, 2 * value)
        write_curves(job, class_curve_points(names, scores, labels, maps, masks), fpr_limit=0.3, pixel_stride=1)
    rows = [["file", "class", "path", "label", "defect_type", "score", "threshold"]]
    for cls in CLASSES:
        for rank in range(overlays):
            rel = f"{cls}/{rank:02d}_anomalous_crack_{rank:03d}.png"
            _overlay(job / "visualizations" / rel, rng, overlay_size)
            rows.append([rel, cls, f"{cls}/test/crack/{rank:03d}.png", 1, "crack", f"{0.5 + rank:.6g}", "0.8"])
    if overlays:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        (job / "visualizations" / "index.csv").write_text(buf.getvalue())
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 methods x 2 seeds on one dataset, plus one failed job."""
    root = tmp_path / "multirun"
    num = 0
    for method, base in (("rd", 0.9), ("crr", 0.8)):
        for seed in (0, 1):
            _fake_run(root / str(num), [f"method={method}", "data=synthetic", f"seed={seed}"], base + 0.02 * seed,
                      seed=num)  # fmt: skip
            num += 1
    failed = root / str(num)
    (failed / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["method=crr", "data=synthetic", "seed=2"]), failed / ".hydra" / "overrides.yaml")
    record_failure(failed, RuntimeError("CUDA out of memory"))
    return root


class _Page(HTMLParser):
    """Tags, attributes, body rows of every table (``td`` texts) and the page text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append((dict(attrs).get("class") or "", []))
        elif tag == "tr":
            self._row = []
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[-1][1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, cls: str) -> list[list[str]]:
        return next(rows for classes, rows in self.tables if cls in classes.split())


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _images(page: _Page) -> list[np.ndarray]:
    out = []
    for tag, attrs in page.tags:
        if tag == "img":
            src = attrs["src"] or ""
            assert src.startswith("data:image/png;base64,"), src[:40]
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
            out.append(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR))
    return out


# ----------------------------------------------------------------------------------------- curve points
def test_curve_points_are_vertices_of_the_exact_curves():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=3000).round(1)  # many ties
    labels = rng.random(3000) < 0.3
    fpr, tpr = roc_points(scores, labels, max_points=None)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and (np.diff(fpr) >= 0).all()
    thin_fpr, thin_tpr = roc_points(scores, labels)  # default: at most 200 points
    assert 2 <= thin_fpr.size <= 200 and (thin_fpr[0], thin_tpr[-1]) == (0.0, 1.0)
    full = set(zip(fpr.tolist(), tpr.tolist()))
    assert set(zip(thin_fpr.tolist(), thin_tpr.tolist())) <= full  # thinning only drops vertices
    constant = roc_points(np.zeros(10), np.r_[np.zeros(5), np.ones(5)])
    assert constant[0].tolist() == [0.0, 0.0, 1.0, 1.0] and constant[1].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert roc_points(np.arange(4.0), np.zeros(4)) is None
    names, _, _, maps, masks = _curve_data(rng, 0.7)
    maps = maps.round(2)
    for limit in (0.3, 0.05, 1.0):
        x, y = pro_points(maps, masks, limit, max_points=None)
        assert x[-1] == pytest.approx(limit) and np.trapezoid(y, x) / limit == pytest.approx(aupro(maps, masks, limit))
    assert pro_points(maps, np.zeros_like(masks)) is None


def test_write_curves_round_trip_and_refuses_bad_points(tmp_path):
    names, scores, labels, maps, masks = _curve_data(np.random.default_rng(1), 1.0, n=400)
    points = class_curve_points(names, scores, labels, maps, masks, fpr_limit=0.3)
    assert list(points) == list(CLASSES) and set(points["disk"]) == {"image_roc", "pixel_roc", "pro"}
    path = write_curves(tmp_path, points, fpr_limit=0.3, pixel_stride=1)
    assert path == tmp_path / CURVES_FILE
    record = read_curves(tmp_path)
    assert record["fpr_limit"] == 0.3 and record["pixel_stride"] == 1
    for cls in CLASSES:
        for kind, curve in record["classes"][cls].items():
            assert len(curve["x"]) == len(curve["y"]) <= 200, kind
        roc = record["classes"][cls]["image_roc"]
        x, y = np.asarray(roc["x"]), np.asarray(roc["y"])
        sel = names == cls
        assert np.trapezoid(y, x) == pytest.approx(auroc(scores[sel], labels[sel]), abs=0.02)
    long = {"a": {"image_roc": (np.linspace(0, 1, 5000), np.linspace(0, 1, 5000) ** 0.5)}}
    record = json.loads(write_curves(tmp_path / "long", long).read_text())
    assert len(record["classes"]["a"]["image_roc"]["x"]) <= 200
    unknown, ragged, nan = ([0, 1], [0, 1]), ([0, 1], [0]), ([0, float("nan")], [0, 1])
    for bad in ({"a": {"roc": unknown}}, {"a": {"pro": ragged}}, {"a": {"pro": nan}}):
        with pytest.raises(ValueError):
            write_curves(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()
    assert read_curves(tmp_path / "nothing") is None


class _Trainer:
    world_size, is_global_zero = 1, True


def test_curve_recorder_reads_any_methods_test_outputs(tmp_path):
    names, scores, labels, maps, masks = _curve_data(np.random.default_rng(2), 1.0)
    recorder = CurveRecorder(pixel_stride=1, output_dir=str(tmp_path))
    trainer, module = _Trainer(), torch.nn.Module()
    recorder.on_test_epoch_start(trainer, module)
    order = np.random.default_rng(3).permutation(names.size)
    # Batches in shuffled order, the last one repeated (as a distributed sampler pads): the recorder must
    # come back to the test set in index order, each image once.
    batches = [*np.array_split(order, 7), order[-5:]]
    for i, sel in enumerate(batches):
        outputs = {"score": torch.from_numpy(scores[sel]), "anomaly_map": torch.from_numpy(maps[sel]),
                   "gt_mask": torch.from_numpy(masks[sel])}  # fmt: skip
        batch = {"label": torch.from_numpy(labels[sel]), "class_name": list(names[sel]), "index": torch.from_numpy(sel)}
        recorder.on_test_batch_end(trainer, module, outputs, batch, i)
    recorder.on_test_epoch_end(trainer, module)
    recorder.on_test_end(trainer, module)
    expected = class_curve_points(names, scores, labels, maps, masks, fpr_limit=0.3)
    assert recorder.points == expected
    assert read_curves(tmp_path)["classes"]["disk"]["pro"]["x"] == list(expected["disk"]["pro"][0])


# ----------------------------------------------------------------------------------------- the page
def test_sweep_page_is_self_contained_with_the_report_tables(sweep):
    assert main([str(sweep), "--html"]) == 0
    path = sweep / "report.html"
    text = path.read_text(encoding="utf-8")
    page = _parse(path)
    assert "http://" not in text and "https://" not in text
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, name, value)
    report = build_report([sweep])
    markdown = (sweep / "report.md").read_text()
    summary = page.table("summary")
    assert summary == report.summary_rows()[1:]
    for row in summary:  # every cell exactly as report.md prints it
        assert "| " + " | ".join(row) + " |" in markdown
    assert page.table("per-class") == report.per_class_rows()[1:]
    assert "86.0 ± 1.4" in text and "76.0 ± 1.4 (2/3)" in text  # rd; crr: 2 of its 3 runs succeeded
    assert "RuntimeError: CUDA out of memory" in text
    # One section per run with its image ROC, pixel ROC and PRO chart and its overlays (4 runs x 4).
    assert sum(tag == "section" and "run" in (a.get("class") or "") for tag, a in page.tags) == 5
    assert sum(tag == "svg" for tag, _ in page.tags) == 4 * 3
    assert sum(tag == "polyline" for tag, _ in page.tags) == 4 * 3 * len(CLASSES)
    images = _images(page)
    assert len(images) == 4 * 2 * len(CLASSES)
    assert all(img is not None and img.shape[1] == 4 * 64 for img in images)
    assert "stripes · crack · anomalous · score 0.5 · threshold 0.8 · 000.png" in text


def test_html_out_limits_and_the_notes_for_missing_parts(tmp_path):
    root = tmp_path / "runs"
    _fake_run(root / "a", ["method=rd", "seed=0"], 0.9, curves=False, overlays=0)
    _fake_run(root / "b", ["method=rd", "seed=1"], 0.9, overlays=3)
    out = tmp_path / "pages" / "sweep.html"
    assert main([str(root), "--html-out", str(out), "--html-max-images", "4", "-o", str(tmp_path / "tables")]) == 0
    text = out.read_text(encoding="utf-8")
    assert "No curves.json in this run" in text and "No map overlays in visualizations/" in text
    page = _parse(out)
    assert len(_images(page)) == 4 and "2 more overlays" in text
    # The first images of every class come first.
    alts = [a["alt"] for tag, a in page.tags if tag == "img"]
    assert alts == ["disk/00_anomalous_crack_000.png", "disk/01_anomalous_crack_001.png",
                    "stripes/00_anomalous_crack_000.png", "stripes/01_anomalous_crack_001.png"]  # fmt: skip
    assert (tmp_path / "tables" / "report.md").is_file() and not (tmp_path / "tables" / "report.html").exists()


def test_run_page_embeds_every_overlay_downscaled(tmp_path):
    run = _fake_run(tmp_path / "run", ["method=rd"], 0.9, overlays=3, overlay_size=320)  # panels 1280 px wide
    path = write_run_html(run)
    assert path == run / "report.html"
    page = _parse(path)
    images = _images(page)
    assert len(images) == 3 * len(CLASSES)
    assert all(img.shape[1] == MAX_IMAGE_WIDTH for img in images)
    assert "downscaled from 1280×" in path.read_text(encoding="utf-8")
    assert page.table("summary")[0][0] == "rd" and sum(tag == "svg" for tag, _ in page.tags) == 3


def test_no_runs_is_a_clear_error_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No run directory"):
        main([str(empty), "--html"])
    with pytest.raises(FileNotFoundError, match="neither results.json nor failed.json"):
        write_run_html(empty)
    assert list(empty.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="No such run"):
        main([str(tmp_path / "nope"), "--html-out", str(tmp_path / "x.html")])
    assert not (tmp_path / "x.html").exists()


# ----------------------------------------------------------------------------------------- in a browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 3200) -> np.ndarray:
    """Renders ``page`` with headless Chromium (offline, fresh profile) and returns the RGB screenshot."""
    binary = _chromium()
    assert binary is not None
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--screenshot={out}", page.resolve().as_uri()]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=profile)
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]
    return cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)


def _largest_box(shot: np.ndarray, colour: str) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of the largest connected set of pixels of exactly ``colour``."""
    mask = (np.abs(shot.astype(np.int16) - _rgb(colour)).max(axis=2) == 0).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    assert n > 1, f"no pixel of {colour} in the screenshot"
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, _ = stats[best]
    return int(x), int(y), int(w), int(h)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_page_renders_tables_curves_and_overlays_in_chromium(sweep, tmp_path):
    assert main([str(sweep), "--html"]) == 0
    shot = screenshot(sweep / "report.html", tmp_path / "page.png")
    # The paper table: its header is a solid block of the header colour with white text on it, and
    # dark text in the rows below it.
    x, y, w, h = _largest_box(shot, TABLE_HEAD_COLOUR)
    assert w > 400 and h > 30, (x, y, w, h)
    header = shot[y : y + h, x : x + w]
    assert (header.min(axis=2) > 200).sum() > 100  # white header text
    body = shot[y + h : y + h + 60, x : x + w]
    assert (body.max(axis=2) < 90).sum() > 200  # the rows' values
    # An overlay: inside its frame, the image's many colours (noise image, JET heat map, red/green marks).
    fx, fy, fw, fh = _largest_box(shot, FIGURE_FRAME_COLOUR)
    assert fw >= 4 * 64 and fh >= 64, (fx, fy, fw, fh)
    inner = shot[fy + 7 : fy + 7 + 64, fx + 7 : fx + 7 + 4 * 64]
    assert inner.std() > 40 and len(np.unique(inner.reshape(-1, 3), axis=0)) > 1000
    # The curves: the first class's legend swatch and line colour are drawn.
    assert (np.abs(shot.astype(np.int16) - _rgb(PALETTE[0])).max(axis=2) == 0).sum() >= 144


# ----------------------------------------------------------------------------------------- a real run
def test_real_tiny_run_records_curves_and_gets_its_page(tmp_path, cache_dir):
    from workflow_helpers import TINY, compose_config

    from mcad.train import train

    run = tmp_path / "run"
    # the default callbacks record the curves and train writes the page (curves.json, report.html)
    results = train(compose_config(["method=rd", *TINY, "visualize=true"], run, cache_dir))
    assert (run / "report.html").is_file()
    record = read_curves(run)
    assert list(record["classes"]) == ["stripes", "disk"] and record["pixel_stride"] == 4
    for cls, curves in record["classes"].items():
        assert set(curves) == {"image_roc", "pixel_roc", "pro"}
        x, y = curves["image_roc"]["x"], curves["image_roc"]["y"]  # 4 test images: every vertex kept
        assert np.trapezoid(y, x) == pytest.approx(results["per_class"][cls]["I-AUROC"], abs=1e-12)
    page = _parse(write_run_html(run))
    pngs = sorted((run / "visualizations").rglob("*.png"))
    assert pngs and len(_images(page)) == len(pngs)
    assert sum(tag == "svg" for tag, _ in page.tags) == 3
