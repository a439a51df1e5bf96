"""Bad inputs through the real entry point (`mcad.train.train` or `python train.py`): each stops at start-up with
one actionable error naming the file or key, and leaves no results files that would make the run look finished.
Unusual but valid image formats train normally."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image
from reliability_helpers import TINY, assert_no_results, make_folder_dataset, run_train, save_image

from mcad.config.validate import ConfigError
from mcad.data.io import DataError
from mcad.methods.base import NonFiniteLossError
from mcad.methods.rd.module import RDModule
from mcad.train import train


def folder_run(root: Path, *extra: str) -> list[str]:
    """A tiny RD run on an MVTec-layout folder (32 px, Lite0, one epoch)."""
    return [
        "method=rd",
        "backbone=tf_efficientnet_lite0",
        "data=folder",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "count_flops=false",
        "print_table=false",
        *extra,
    ]


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "data")


def _fails(make_config, tmp_path, overrides, error, *fragments):
    """Runs `train` expecting ``error`` whose message holds every fragment; checks nothing finished-looking is left."""
    run = tmp_path / "run"
    with pytest.raises(error) as info:
        train(make_config(overrides, run))
    for fragment in fragments:
        assert str(fragment) in str(info.value), str(info.value)
    assert_no_results(run)
    return info.value


# ------------------------------------------------------------------------------------------------ data


def test_missing_dataset_root(make_config, tmp_path):
    missing = tmp_path / "nowhere"
    _fails(make_config, tmp_path, folder_run(missing), DataError, "Dataset root not found", missing, "data.root")


@pytest.mark.parametrize("explicit", [False, True])
def test_class_folder_without_train_good(make_config, tmp_path, dataset, explicit):
    shutil.rmtree(dataset / "b" / "train")
    extra = ["data.classes=[a,b]"] if explicit else []  # discovered classes: b is broken, not silently skipped
    _fails(make_config, tmp_path, folder_run(dataset, *extra), DataError, dataset / "b", "train/good")


def test_defect_images_without_masks(make_config, tmp_path, dataset):
    shutil.rmtree(dataset / "a" / "ground_truth")
    image = dataset / "a" / "test" / "crack" / "000.png"
    _fails(make_config, tmp_path, folder_run(dataset), DataError, "No mask", image, "000_mask.png")


def test_mask_of_another_size_than_its_image(make_config, tmp_path, dataset):
    mask = dataset / "b" / "ground_truth" / "crack" / "001_mask.png"
    save_image(mask, np.zeros((20, 24), np.uint8))
    _fails(make_config, tmp_path, folder_run(dataset), DataError, mask, "24x20", "32x32")


def test_empty_class(make_config, tmp_path, dataset):
    for image in (dataset / "b" / "train" / "good").iterdir():
        image.unlink()
    _fails(make_config, tmp_path, folder_run(dataset), DataError, "Class 'b' has no images", dataset / "b" / "train")


@pytest.mark.parametrize("cache_decoded", [True, False])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_image(make_config, tmp_path, dataset, cache_decoded, damage):
    # Without the decoded cache nothing is decoded before training unless validation decodes: it must.
    bad = dataset / "a" / "test" / "good" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3] if damage == "truncated" else b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    overrides = folder_run(dataset, f"data.cache_decoded={str(cache_decoded).lower()}")
    _fails(make_config, tmp_path, overrides, DataError, bad)


def test_unusual_png_formats_and_a_non_image_file_train_normally(make_config, tmp_path, dataset, caplog):
    # Grayscale, RGBA, palette and 16-bit PNGs decode to the RGB the other images give; a text file in an
    # image folder is ignored with a warning naming it (documented in README "Data").
    good = dataset / "a" / "train" / "good"
    rgb = np.asarray(Image.open(good / "000.png"))
    gray = rgb[..., 0]
    save_image(good / "gray.png", gray)
    save_image(good / "rgba.png", np.dstack([rgb, np.full(gray.shape, 77, np.uint8)]))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(good / "palette.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(good / "sixteen.png")
    (good / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        results = train(make_config(folder_run(dataset), run))
    assert (run / "results.json").is_file() and set(results["per_class"]) == {"a", "b"}
    assert any("notes.txt" in r.getMessage() for r in caplog.records)

    from mcad.data.io import load_image

    assert load_image(good / "gray.png").shape == rgb.shape
    np.testing.assert_array_equal(load_image(good / "sixteen.png")[..., 1], gray)
    np.testing.assert_array_equal(load_image(good / "rgba.png"), rgb)
    assert np.abs(load_image(good / "palette.png").astype(int) - rgb).mean() < 8


# ------------------------------------------------------------------------------------------------ config


def test_unknown_group_option_on_the_command_line(tmp_path, cache_dir):
    run = tmp_path / "run"
    done = run_train(["method=foo"], run, cache_dir, timeout=300)
    assert done.returncode != 0
    assert "Could not find 'method/foo'" in done.stderr and "rd" in done.stderr  # lists the available options
    assert_no_results(run)


def test_misspelt_keys(make_config, tmp_path):
    with pytest.raises(ConfigCompositionException, match="batch_sizee"):
        make_config([*TINY, "data.batch_sizee=3"])
    _fails(make_config, tmp_path, [*TINY, "+method.optimizer.lrr=0.1"], ConfigError, "method.optimizer.lrr", "'lr'")
    _fails(
        make_config, tmp_path, [*TINY, "+data.cache_decode=false"], ConfigError, "data.cache_decode", "cache_decoded"
    )


def test_wrong_type(make_config, tmp_path):
    _fails(make_config, tmp_path, [*TINY, "data.batch_size=sixteen"], ConfigError, "data.batch_size", "int")
    _fails(make_config, tmp_path, [*TINY, "trainer.max_epochs=[1]"], ConfigError, "trainer.max_epochs")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        # RD's OCBE and de-ResNet decoder need three teacher levels.
        (["method=rd", "backbone.out_indices=[2,3]"], ["[40, 112]", "3 levels", "backbone.out_indices"]),
        (["method=ccl_rd", "backbone.out_indices=[3]"], ["[112]", "3 levels"]),
        # RLR's per-level widths given explicitly for fewer levels than the backbone has.
        (["method=rlr", "decoder.hidden_dims=[256]"], ["[40, 112]", "hidden_dims"]),
    ],
)
def test_backbone_widths_that_do_not_fit_the_decoder_fail_at_build_time(make_config, tmp_path, overrides, fragments):
    _fails(
        make_config,
        tmp_path,
        [*TINY, *overrides, "backbone=tf_efficientnet_lite0"],
        ValueError,
        "tf_efficientnet_lite0",
        *fragments,
    )


def test_ccl_with_a_single_class_and_gt_labels(make_config, tmp_path):
    overrides = [*TINY, "method=rd", "loss=ccl", "loss.label_source=gt", "data.classes=[stripes]"]
    _fails(make_config, tmp_path, overrides, DataError, "loss.label_source=gt", "two", "['stripes']")


# ------------------------------------------------------------------------------------------------ NaN / Inf


def _poison(monkeypatch, value: float, at_call: int = 2) -> list:
    """Makes RD's loss non-finite for one training batch (the second); returns the paths of the batches seen."""
    seen: list[list[str]] = []
    original = RDModule.training_losses

    def losses(self, batch):
        out = original(self, batch)
        seen.append(list(batch["path"]))
        if len(seen) == at_call:
            out["loss"] = out["loss"] * value
        return out

    monkeypatch.setattr(RDModule, "training_losses", losses)
    return seen


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_naming_the_step_and_the_batch(make_config, tmp_path, monkeypatch, value):
    seen = _poison(monkeypatch, value)
    error = _fails(make_config, tmp_path, [*TINY, "trainer.max_epochs=2"], NonFiniteLossError, "global step 1")
    assert len(seen) == 2
    assert all(path in str(error) for path in seen[1])  # the offending batch's sample paths
    assert not any(path in str(error) for path in seen[0] if path not in seen[1])
    assert "method.on_nonfinite=skip" in str(error)


def test_nonfinite_loss_is_skipped_when_configured(make_config, tmp_path, monkeypatch, caplog):
    seen = _poison(monkeypatch, float("nan"))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        results = train(make_config([*TINY, "trainer.max_epochs=2", "method.on_nonfinite=skip"], run))
    assert len(seen) == 6  # 2 epochs x 3 batches: the run went on after the bad batch
    assert any("skipping the batch" in r.getMessage() and "global step 1" in r.getMessage() for r in caplog.records)
    assert all(np.isfinite(v) for v in results["mean"].values())
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
