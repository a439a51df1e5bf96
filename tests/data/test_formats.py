"""The Real-IAD, BTAD, MPDD and MVTec AD 2 formats on miniatures of their official layouts.

Each builder writes a few tiny images with the official folder and file names (notes: Real-IAD
``<object>_0004_NG_BX_C1_<timestamp>.jpg`` with the JSON schema of the official repository, BTAD's per-class
.bmp / .png mix, MPDD's ``000_mask.png``, MVTec AD 2's ``000_regular.png`` lighting variants). Counts in the
assertions are counted by hand from the builders.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcad.data.datamodule import MultiClassDataModule
from mcad.data.datasets import FORMATS, Download
from mcad.data.datasets.btad import btad_records
from mcad.data.datasets.mvtec_ad2 import mvtec_ad2_records
from mcad.data.datasets.realiad import REALIAD_CLASSES, realiad_records, view_of
from mcad.data.download import sha256sum
from mcad.data.io import DataError

SIZE = (40, 30)  # width, height: not square, as the raw Real-IAD / BTAD images


def _image(path: Path, value: int = 120, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, empty: bool = False, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    if not empty:
        mask[5:15, 10:25] = 255
    Image.fromarray(mask).save(path)


# ----------------------------------------------------------------------------------------------- Real-IAD
# Two objects; audiojack's NG files carry the real data's double underscore (audiojack__0004_NG_...).
REALIAD_MINI = {"audiojack": ("BX", "20231021130235"), "plastic_nut": ("AK", "20231004133152")}


def _realiad_entry(category: str, code: str, image: str, mask: str | None) -> dict:
    return {"category": category, "anomaly_class": code, "image_path": image, "mask_path": mask}


def make_realiad(root: Path, placement: str = "flat", resolution: str = "1024") -> Path:
    """A Real-IAD miniature: per object 2 normal training samples and, in the test split, 1 normal sample
    and 1 defective one, 5 views each; the defect is visible (mask) in views C1 and C2 only.

    Per object: ``realiad_jsons`` train 10 / test 10 (2 anomalous); ``realiad_jsons_sv`` (view C1) train 2 /
    test 2 (1 anomalous). ``placement``: ``flat`` = JSON folders beside the image folder (official README),
    ``nested`` = under ``realiad_jsons/`` (Dinomaly / CRR / anomalib).
    """
    images = root / f"realiad_{resolution}"
    json_parent = root if placement == "flat" else root / "realiad_jsons"
    for obj, (code, ts) in REALIAD_MINI.items():
        sets: dict[str, dict[str, list]] = {"realiad_jsons": {"train": [], "test": []},
                                            "realiad_jsons_sv": {"train": [], "test": []}}  # fmt: skip
        ng_name = f"{obj}__" if obj == "audiojack" else f"{obj}_"

        def add(split: str, rel: str, entry_code: str, mask_rel: str | None, view: int, obj=obj, sets=sets) -> None:
            entry = _realiad_entry(obj, entry_code, rel, mask_rel)
            sets["realiad_jsons"][split].append(entry)
            if view == 1:  # the single-view set keeps camera C1
                sets["realiad_jsons_sv"][split].append(entry)

        for split, sample in (("train", 1), ("train", 2), ("test", 3)):
            for view in range(1, 6):
                rel = f"OK/S{sample:04d}/{obj}_{sample:04d}_OK_C{view}_{ts}.jpg"
                _image(images / obj / rel, 100 + view)
                add(split, rel, "OK", None, view)
        for view in range(1, 6):
            stem = f"NG/{code}/S0004/{ng_name}0004_NG_{code}_C{view}_{ts}"
            _image(images / obj / f"{stem}.jpg", 160 + view)
            if view <= 2:  # visible: anomalous with its mask
                _mask(images / obj / f"{stem}.png")
                add("test", f"{stem}.jpg", code, f"{stem}.png", view)
            else:  # the defect is not visible from this camera: labelled OK, no mask
                add("test", f"{stem}.jpg", "OK", None, view)
        for name, splits in sets.items():
            path = json_parent / name / f"{obj}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"meta": {"prefix": f"{obj}/", "normal_class": "OK"}, **splits}))
    return root


@pytest.mark.parametrize("placement", ["flat", "nested"])
def test_realiad_lists_the_official_split_with_labels_masks_and_codes(tmp_path, placement):
    root = make_realiad(tmp_path / "Real-IAD", placement)
    classes = list(REALIAD_MINI)
    train = realiad_records(root, classes, "train")
    test = realiad_records(root, classes, "test")
    assert len(train) == 20 and all(r.label == 0 and r.mask_path is None for r in train)
    assert len(test) == 20 and sum(r.label for r in test) == 4
    assert Counter((r.class_name, r.defect_type, r.label) for r in test) == {
        ("audiojack", "OK", 0): 8, ("audiojack", "BX", 1): 2, ("plastic_nut", "OK", 0): 8, ("plastic_nut", "AK", 1): 2,
    }  # fmt: skip
    for rec in test:
        assert Path(rec.image_path).is_file() and rec.image_path.startswith(str(root / "realiad_1024" / rec.class_name))
        if rec.label:
            assert rec.mask_path == rec.image_path[:-4] + ".png" and Path(rec.mask_path).is_file()
            assert view_of(rec.image_path) in ("C1", "C2")
        else:
            assert rec.mask_path is None  # normal views, also those under NG/ folders
    assert sum("/NG/" in r.image_path and r.label == 0 for r in test) == 6  # invisible-defect views
    assert "audiojack__0004_NG_BX_C1" in next(r.image_path for r in test if r.label)


def test_realiad_single_view_split_views_filter_and_resolution_option(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD")
    sv_train = realiad_records(root, ["audiojack", "plastic_nut"], "train", jsons="realiad_jsons_sv")
    sv_test = realiad_records(root, ["audiojack", "plastic_nut"], "test", jsons="realiad_jsons_sv")
    assert (len(sv_train), len(sv_test), sum(r.label for r in sv_test)) == (4, 4, 2)
    assert {view_of(r.image_path) for r in sv_train + sv_test} == {"C1"}
    c3 = realiad_records(root, ["audiojack"], "test", views=["C3", "c4"])
    assert len(c3) == 4 and {view_of(r.image_path) for r in c3} == {"C3", "C4"} and not any(r.label for r in c3)
    shutil.copytree(root / "realiad_1024", root / "realiad_256")
    low = realiad_records(root, ["audiojack"], "test", resolution=256)
    assert all("/realiad_256/audiojack/" in r.image_path for r in low)
    assert all("/realiad_256/" in r.mask_path for r in low if r.label)


def test_realiad_wrong_layouts_fail_naming_the_paths(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD")
    (root / "realiad_jsons" / "plastic_nut.json").unlink()
    with pytest.raises(DataError) as err:
        realiad_records(root, ["plastic_nut"], "test")
    # both placements are named
    assert str(root / "realiad_jsons" / "plastic_nut.json") in str(err.value)
    assert str(root / "realiad_jsons" / "realiad_jsons" / "plastic_nut.json") in str(err.value)
    with pytest.raises(DataError, match=r"image folder not found: .*Real-IAD/realiad_512/audiojack\."):
        realiad_records(root, ["audiojack"], "test", resolution=512)
    with pytest.raises(DataError, match="resolution must be one of 256, 512, 1024, raw"):
        realiad_records(root, ["audiojack"], "test", resolution=2048)
    with pytest.raises(DataError, match="data.options.jsons must be one of"):
        realiad_records(root, ["audiojack"], "test", jsons="realiad_json")
    with pytest.raises(DataError, match="not Real-IAD views"):
        realiad_records(root, ["audiojack"], "test", views=["C6"])
    split_file = root / "realiad_jsons" / "audiojack.json"
    info = json.loads(split_file.read_text())
    broken = {**info, "test": [{**info["test"][-1], "anomaly_class": "BX"}]}  # an NG view without a mask
    split_file.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"audiojack\.json.*no mask_path"):
        realiad_records(root, ["audiojack"], "test")
    split_file.write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(DataError, match=r"audiojack\.json must be an object with 'meta'"):
        realiad_records(root, ["audiojack"], "train")
    split_file.write_text(json.dumps({**info, "train": [{"image_path": "x.jpg"}]}))
    with pytest.raises(DataError, match=r"train\[0\] must hold the keys category"):
        realiad_records(root, ["audiojack"], "train")


def test_realiad_datamodule_end_to_end_and_start_up_errors(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD", "nested")
    common = dict(format="realiad", root=str(root), image_size=32, batch_size=4, eval_batch_size=20, num_workers=0,
                  cache_dir=str(tmp_path / "cache"), mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    dm = MultiClassDataModule(name="realiad", classes=["audiojack", "plastic_nut"], **common)
    dm.setup()
    assert dm.class_names == ["audiojack", "plastic_nut"]
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (20, 20)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (20, 3, 32, 32) and batch["mask"].shape == (20, 1, 32, 32)
    anomalous = batch["label"] == 1
    assert anomalous.sum() == 4 and (batch["mask"][anomalous].amax(dim=(1, 2, 3)) > 0.5).all()
    assert (batch["mask"][~anomalous] == 0).all()
    assert set(batch["defect_type"]) == {"OK", "BX", "AK"}
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["image"].shape == (4, 3, 32, 32) and (train_batch["label"] == 0).all()
    # All 30 official classes by default: the first one missing from the miniature is named.
    assert len(FORMATS["realiad"].classes) == 30 and FORMATS["realiad"].classes[:2] == ("audiojack", "bottle_cap")
    with pytest.raises(DataError, match=r"realiad_1024/bottle_cap"):
        MultiClassDataModule(**common).setup()
    # The resolution folder is checked before anything else (the marker), naming the path.
    with pytest.raises(DataError, match=r"no .*realiad_512/audiojack\)"):
        MultiClassDataModule(classes=["audiojack"], options={"resolution": 512}, **common).setup()
    with pytest.raises(DataError, match="not options of data.format=realiad"):
        MultiClassDataModule(options={"resolution_": 512}, **common)


# ----------------------------------------------------------------------------------------------- BTAD
# Per class: (image extension, mask extension), as in the original archive.
BTAD_EXTENSIONS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}


def make_btad(root: Path) -> Path:
    """A BTAD miniature: per class 3 training images, 1 normal and 2 anomalous test images; class 03's
    second mask is all zero (as 03/ko/0028-0037 in the real data)."""
    for name, (ext, mask_ext) in BTAD_EXTENSIONS.items():
        for i in range(3):
            _image(root / name / "train" / "ok" / f"{i:04d}{ext}", 90 + i)
        _image(root / name / "test" / "ok" / f"0000{ext}", 95)
        for i in range(2):
            _image(root / name / "test" / "ko" / f"{i:04d}{ext}", 180 + i)
            _mask(root / name / "ground_truth" / "ko" / f"{i:04d}{mask_ext}", empty=name == "03" and i == 1)
    return root


def test_btad_matches_masks_by_stem_whatever_the_extension(tmp_path):
    root = make_btad(tmp_path / "btad")
    train = btad_records(root, ["01", "02", "03"], "train")
    test = btad_records(root, ["01", "02", "03"], "test")
    assert len(train) == 9 and all(r.label == 0 and r.mask_path is None for r in train)
    assert Counter((r.class_name, r.defect_type, r.label) for r in test) == {
        (c, kind, label): n for c in BTAD_EXTENSIONS for kind, label, n in (("good", 0, 1), ("ko", 1, 2))
    }
    for rec in test:
        image_ext, mask_ext = BTAD_EXTENSIONS[rec.class_name]
        assert rec.image_path.endswith(image_ext)
        if rec.label:
            assert Path(rec.mask_path).stem == Path(rec.image_path).stem and rec.mask_path.endswith(mask_ext)
            assert "/ground_truth/ko/" in rec.mask_path
    # A converted .png beside the original .bmp: the .png is taken, still one record per image.
    _mask(root / "03" / "ground_truth" / "ko" / "0000.png")
    again = [r for r in btad_records(root, ["03"], "test") if r.label]
    assert [Path(r.mask_path).name for r in again] == ["0000.png", "0001.bmp"]


def test_btad_wrong_layouts_fail_naming_the_paths(tmp_path):
    root = make_btad(tmp_path / "btad")
    (root / "02" / "ground_truth" / "ko" / "0001.png").unlink()
    missing = r"No mask for anomalous test image .*02/test/ko/0001\.png.*ground_truth/ko/0001"
    with pytest.raises(DataError, match=missing):
        btad_records(root, ["02"], "test")
    shutil.rmtree(root / "01" / "train" / "ok")
    with pytest.raises(DataError, match=r"btad/01 has no train/ok"):
        btad_records(root, ["01"], "train")
    dm = MultiClassDataModule(format="btad", root=str(tmp_path / "elsewhere"), num_workers=0, mean=[0.5] * 3,
                              std=[0.5] * 3, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(DataError, match=r"elsewhere/01/train/ok, .*elsewhere/BTech_Dataset_transformed/01/train/ok"):
        dm.setup()


def test_btad_datamodule_reads_the_archive_folder_and_downloads_it(tmp_path, monkeypatch):
    # The archive's own top folder, as btad.zip unpacks.
    make_btad(tmp_path / "src" / "BTech_Dataset_transformed")
    archive = tmp_path / "btad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    served = dataclasses.replace(FORMATS["btad"], download=Download(archive.as_uri(), sha256sum(archive)))
    monkeypatch.setitem(FORMATS, "btad", served)
    root = tmp_path / "data"
    dm = MultiClassDataModule(format="btad", root=str(root), download=True, classes=[1, 3], image_size=32,
                              batch_size=2, eval_batch_size=6, num_workers=0, cache_dir=str(tmp_path / "cache"),
                              mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    dm.setup()
    assert dm.class_names == ["01", "03"]  # integers from Python are zero-padded
    assert all("/BTech_Dataset_transformed/" in r.image_path for r in dm.test_dataset.records)
    batch = next(iter(dm.test_dataloader()))
    assert batch["mask"].shape == (6, 1, 32, 32) and batch["label"].tolist() == [1, 1, 0, 1, 1, 0]  # ko/ before ok/
    peaks = batch["mask"].amax(dim=(1, 2, 3)).tolist()
    assert peaks == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]  # the all-zero mask of 03/ko/0001.bmp stays anomalous
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------- MPDD
MPDD_DEFECTS = {"bracket_black": ("hole", "scratches"), "metal_plate": ("major_rust", "scratches", "total_rust")}


def make_mpdd(root: Path) -> Path:
    """An MPDD miniature: two classes, 2 training and 1 normal test image each, 1 image per defect type."""
    for name, defects in MPDD_DEFECTS.items():
        for i in range(2):
            _image(root / name / "train" / "good" / f"{i:03d}.png", 80 + i)
        _image(root / name / "test" / "good" / "000.png", 85)
        for defect in defects:
            _image(root / name / "test" / defect / "000.png", 170)
            _mask(root / name / "ground_truth" / defect / "000_mask.png")
    return root


def test_mpdd_reads_the_mvtec_layout_and_fails_naming_a_broken_class(tmp_path):
    root = make_mpdd(tmp_path / "mpdd")
    dm = MultiClassDataModule(format="mpdd", root=str(root), classes=list(MPDD_DEFECTS), image_size=32,
                              batch_size=2, eval_batch_size=7, num_workers=0, cache_dir=str(tmp_path / "cache"),
                              mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    dm.setup()
    assert len(dm.train_dataset) == 4
    test = dm.test_dataset.records
    assert Counter((r.class_name, r.defect_type) for r in test) == {
        ("bracket_black", "good"): 1, ("bracket_black", "hole"): 1, ("bracket_black", "scratches"): 1,
        ("metal_plate", "good"): 1, ("metal_plate", "major_rust"): 1, ("metal_plate", "scratches"): 1,
        ("metal_plate", "total_rust"): 1,
    }  # fmt: skip
    assert all(r.mask_path.endswith("/000_mask.png") for r in test if r.label)
    batch = next(iter(dm.test_dataloader()))
    assert batch["mask"].shape == (7, 1, 32, 32) and batch["label"].sum() == 5
    assert FORMATS["mpdd"].classes == ("bracket_black", "bracket_brown", "bracket_white", "connector",
                                       "metal_plate", "tubes")  # fmt: skip
    shutil.rmtree(root / "metal_plate" / "train")
    with pytest.raises(DataError, match=r"mpdd/metal_plate has no train/good"):
        MultiClassDataModule(format="mpdd", root=str(root), classes=list(MPDD_DEFECTS), num_workers=0,
                             cache_dir=str(tmp_path / "cache"), mean=[0.5] * 3, std=[0.5] * 3).setup()  # fmt: skip


# ----------------------------------------------------------------------------------------------- MVTec AD 2
def make_mvtec_ad2(root: Path, classes: tuple[str, ...] = ("can", "vial")) -> Path:
    """An MVTec AD 2 miniature: per class 2 training, 1 validation, 2 normal and 2 anomalous public test
    images (lighting variants), 1 image in each private split."""
    for name in classes:
        tp = root / name / "test_public"
        for i in range(2):
            _image(root / name / "train" / "good" / f"{i:03d}_regular.png", 70 + i)
        _image(root / name / "validation" / "good" / "000_regular.png", 72)
        _image(tp / "good" / "000_regular.png", 73)
        _image(tp / "good" / "000_overexposed.png", 74)
        for variant in ("regular", "shift_1"):
            _image(tp / "bad" / f"000_{variant}.png", 190)
            _mask(tp / "ground_truth" / "bad" / f"000_{variant}_mask.png")
        _image(root / name / "test_private" / "000_regular.png", 75)
        _image(root / name / "test_private_mixed" / "000_regular.png", 76)
    return root


def test_mvtec_ad2_public_test_split_and_datamodule(tmp_path):
    root = make_mvtec_ad2(tmp_path / "mvtec_ad2")
    assert len(mvtec_ad2_records(root, ["can", "vial"], "train")) == 4
    test = mvtec_ad2_records(root, ["can", "vial"], "test")
    assert Counter((r.class_name, r.defect_type, r.label) for r in test) == {
        ("can", "good", 0): 2, ("can", "bad", 1): 2, ("vial", "good", 0): 2, ("vial", "bad", 1): 2,
    }  # fmt: skip
    assert sorted(Path(r.mask_path).name for r in test if r.class_name == "can" and r.label) == [
        "000_regular_mask.png", "000_shift_1_mask.png",
    ]  # fmt: skip
    assert not any("validation" in r.image_path or "private" in r.image_path for r in test)
    dm = MultiClassDataModule(format="mvtec_ad2", root=str(root), classes=["can", "vial"], image_size=32,
                              batch_size=2, eval_batch_size=8, num_workers=0, cache_dir=str(tmp_path / "cache"),
                              mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["mask"].shape == (8, 1, 32, 32) and batch["label"].tolist() == [1, 1, 0, 0] * 2
    assert len(FORMATS["mvtec_ad2"].classes) == 8


@pytest.mark.parametrize(
    "test_split, message",
    [
        ("validation", r"only normal images.*undefined.*calibration=.*can/validation/good"),
        ("test_private", r"no ground truth.*mcad-predict .*input=.*can/test_private output"),
        ("test_private_mixed", r"no ground truth.*input=.*can/test_private_mixed output"),
        ("test", r"test_split must be one of test_public, validation"),
    ],
)
def test_mvtec_ad2_splits_without_ground_truth_are_refused_with_what_to_do(tmp_path, test_split, message):
    root = make_mvtec_ad2(tmp_path / "mvtec_ad2", ("can",))
    assert len(mvtec_ad2_records(root, ["can"], "train", test_split)) == 2  # training is unaffected
    dm = MultiClassDataModule(format="mvtec_ad2", root=str(root), classes=["can"], num_workers=0,
                              options={"test_split": test_split}, cache_dir=str(tmp_path / "cache"),
                              mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    with pytest.raises(DataError, match=message):
        dm.setup()


def test_mvtec_ad2_missing_mask_or_folder_is_named(tmp_path):
    root = make_mvtec_ad2(tmp_path / "mvtec_ad2", ("can",))
    (root / "can" / "test_public" / "ground_truth" / "bad" / "000_shift_1_mask.png").unlink()
    with pytest.raises(DataError, match=r"test_public/bad/000_shift_1\.png.*ground_truth/bad/000_shift_1_mask\.png"):
        mvtec_ad2_records(root, ["can"], "test")
    shutil.rmtree(root / "can" / "test_public")
    with pytest.raises(DataError, match=r"mvtec_ad2/can has no test_public/ folder"):
        mvtec_ad2_records(root, ["can"], "test")


# ----------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize(
    "name, classes, sha256",
    [("realiad", 30, False), ("btad", 3, True), ("mpdd", 6, False), ("mvtec_ad2", 8, True)],
)
def test_every_new_format_is_registered_with_its_obtaining_facts(name, classes, sha256):
    fmt = FORMATS[name]
    assert len(fmt.classes) == classes and len(set(fmt.classes)) == classes
    assert fmt.marker and fmt.manual and fmt.licence.startswith("CC BY-NC-SA 4.0")
    assert (fmt.download is not None and len(fmt.download.sha256) == 64) == sha256
    assert (Path(__file__).resolve().parents[2] / "conf" / "data" / f"{name}.yaml").is_file()
    if name == "realiad":
        assert REALIAD_CLASSES[-5:] == ("u_block", "vcpill", "wooden_beads", "woodstick", "zipper")
