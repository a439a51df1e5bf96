import csv

import numpy as np
import pytest
import torch
from PIL import Image

import mcad.data.datamodule as datamodule_module
from mcad.data.datamodule import MultiClassDataModule
from mcad.data.datasets.mvtec import mvtec_layout_records
from mcad.data.datasets.synthetic import generate_synthetic_dataset
from mcad.data.datasets.visa import visa_records
from mcad.data.io import DataError
from mcad.data.requests import DataRequest, SecondView


def _img(path, size=(20, 16), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _mask(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[2:6, 3:9] = 255
    Image.fromarray(m).save(path)


def make_mvtec_tree(root, classes=("a", "b")):
    for c in classes:
        for i in range(3):
            _img(root / c / "train" / "good" / f"{i:03d}.png")
        _img(root / c / "test" / "good" / "000.png")
        _img(root / c / "test" / "crack" / "000.png")
        _mask(root / c / "ground_truth" / "crack" / "000_mask.png")
    return root


def test_mvtec_layout_lists_samples_with_labels_and_masks(tmp_path):
    root = make_mvtec_tree(tmp_path / "d")
    (root / "a" / "train" / "good" / "notes.txt").write_text("ignored")
    train = mvtec_layout_records(root, ["a", "b"], "train")
    test = mvtec_layout_records(root, ["a", "b"], "test")
    assert len(train) == 6 and all(r.label == 0 and r.mask_path is None for r in train)
    assert sorted((r.class_name, r.defect_type, r.label) for r in test) == [
        ("a", "crack", 1),
        ("a", "good", 0),
        ("b", "crack", 1),
        ("b", "good", 0),
    ]
    assert all(r.mask_path.endswith("000_mask.png") for r in test if r.label)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: None, "Dataset root not found"),
        (lambda r: __import__("shutil").rmtree(r / "a" / "train"), "train/good"),
        (lambda r: (r / "a" / "ground_truth" / "crack" / "000_mask.png").unlink(), "No mask"),
        (lambda r: [p.unlink() for p in (r / "b" / "train" / "good").iterdir()], "no images"),
    ],
)
def test_bad_layouts_raise_actionable_errors(tmp_path, breakage, message):
    root = tmp_path / "d"
    if message != "Dataset root not found":
        make_mvtec_tree(root)
        breakage(root)
    split = "test" if message == "No mask" else "train"
    with pytest.raises(DataError, match=message):
        mvtec_layout_records(root, ["a", "b"], split)


def test_visa_reader_uses_the_split_csv(tmp_path):
    root = tmp_path / "visa"
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0.JPG", "")]
    rows += [("candle", "test", "normal", "candle/Data/Images/Normal/1.JPG", "")]
    rows += [("candle", "test", "anomaly", "candle/Data/Images/Anomaly/2.JPG", "candle/Data/Masks/Anomaly/2.png")]
    rows += [("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0.JPG", "")]
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    test = visa_records(root, ["candle"], "test")
    assert [(r.label, r.mask_path is not None) for r in test] == [(0, False), (1, True)]
    assert visa_records(root, ["candle", "pcb1"], "train")[1].class_name == "pcb1"
    with pytest.raises(DataError, match="pcb1"):
        visa_records(root, ["pcb1"], "test")


def test_synthetic_generation_is_deterministic_and_cached(tmp_path):
    kwargs = dict(classes=("stripes", "disk"), num_train=2, num_test_good=1, num_test_defect=2, image_size=64, seed=3)
    a = generate_synthetic_dataset(tmp_path / "c1", **kwargs)
    b = generate_synthetic_dataset(tmp_path / "c2", **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files:
        np.testing.assert_array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(b / rel)))
    mtime = (a / "params.json").stat().st_mtime_ns
    assert generate_synthetic_dataset(tmp_path / "c1", **kwargs) == a
    assert (a / "params.json").stat().st_mtime_ns == mtime
    masks = list(a.rglob("*_mask.png"))
    assert len(masks) == 4 and all(np.asarray(Image.open(m)).max() == 255 for m in masks)
    c = generate_synthetic_dataset(tmp_path / "c1", **{**kwargs, "seed": 4})
    assert c != a


def test_datamodule_batches_carry_every_field(tmp_path):
    root = make_mvtec_tree(tmp_path / "d")
    dm = MultiClassDataModule(
        name="t",
        format="folder",
        root=str(root),
        image_size=32,
        batch_size=2,
        eval_batch_size=4,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    dm.setup()
    assert dm.class_names == ["a", "b"]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["class_id"].tolist() == [0, 0, 1, 1]
    anomalous = batch["label"] == 1
    assert (batch["mask"][anomalous].amax(dim=(1, 2, 3)) > 0.5).all()
    assert (batch["mask"][~anomalous] == 0).all()
    # normalisation: a 100-grey image maps to (100/255 - 0.5) / 0.5
    assert torch.allclose(batch["image"][0, :, 8, 8], torch.full((3,), 100 / 255 / 0.5 - 1.0), atol=1e-5)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 10 + 2  # images + masks


@pytest.mark.parametrize("from_original", [False, True])
def test_view_pipeline_gets_the_file_at_full_resolution_when_asked(tmp_path, from_original, monkeypatch):
    root = tmp_path / "d"
    for c in ("a", "b"):
        _img(root / c / "train" / "good" / "000.png", size=(40, 24))
        _img(root / c / "test" / "good" / "000.png", size=(40, 24))
    seen = []

    def record(image):  # stands in for the view pipeline: keeps the array it was handed
        seen.append(image.shape)
        return {"image": torch.zeros(3, 16, 16)}

    dm = MultiClassDataModule(
        name="t", format="folder", root=str(root), image_size=16, batch_size=2, num_workers=0,
        cache_dir=str(tmp_path / "cache"), mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    monkeypatch.setattr(datamodule_module, "contrastive_view_transform", lambda *args, **kwargs: record)
    dm.configure(DataRequest(second_view=SecondView(from_original=from_original)))
    dm.setup("fit")
    item = dm.train_dataset[0]
    assert seen == [(24, 40, 3) if from_original else (16, 16, 3)]
    assert item["image"].shape == (3, 16, 16) and item["image_aug"].shape == (3, 16, 16)


def test_full_resolution_view_decodes_each_file_once_per_item(tmp_path, monkeypatch):
    import mcad.data.dataset as dataset_module

    root = tmp_path / "d"
    for c in ("a", "b"):
        _img(root / c / "train" / "good" / "000.png", size=(40, 24), value=60)
        _img(root / c / "test" / "good" / "000.png", size=(40, 24))
    dm = MultiClassDataModule(
        name="t", format="folder", root=str(root), image_size=16, batch_size=2, num_workers=0,
        cache_decoded=False, mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    monkeypatch.setattr(datamodule_module, "contrastive_view_transform",
                        lambda *args, **kwargs: lambda image: {"image": torch.from_numpy(image.copy())})  # fmt: skip
    dm.configure(DataRequest(second_view=SecondView(from_original=True)))
    dm.setup("fit")
    decoded = []
    real_load_image = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: decoded.append(path) or real_load_image(path))
    item = dm.train_dataset[0]
    assert decoded == [item["path"]]  # one decode feeds both the resized image and the view
    assert item["image_aug"].shape == (24, 40, 3)
    assert torch.allclose(item["image"][:, 8, 8], torch.full((3,), 60 / 255 / 0.5 - 1.0), atol=1e-5)


def test_mask_of_another_size_is_refused_before_training(tmp_path):
    root = make_mvtec_tree(tmp_path / "d")
    _mask(root / "a" / "ground_truth" / "crack" / "000_mask.png", size=(10, 10))
    dm = MultiClassDataModule(
        format="folder", root=str(root), num_workers=0, cache_dir=str(tmp_path / "c"), mean=[0.5] * 3, std=[0.5] * 3
    )
    with pytest.raises(DataError, match="000_mask.png.*10x10"):
        dm.setup()


def _unbalanced_class_balanced_datamodule(tmp_path, batch_size: int) -> MultiClassDataModule:
    """Folder data with 9 training images of class a and 3 of class b, read with data.sampler=class_balanced."""
    root = make_mvtec_tree(tmp_path / "d")
    for i in range(3, 9):
        _img(root / "a" / "train" / "good" / f"{i:03d}.png")
    return MultiClassDataModule(
        format="folder", root=str(root), image_size=32, batch_size=batch_size, num_workers=0,
        sampler="class_balanced", cache_dir=str(tmp_path / "c"), mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip


def test_datamodule_class_balanced_sampler_is_used_for_training(tmp_path):
    dm = _unbalanced_class_balanced_datamodule(tmp_path, batch_size=2)
    dm.setup("fit")
    names = [name for batch in dm.train_dataloader() for name in batch["class_name"]]
    assert len(names) == 12 and names.count("a") == names.count("b") == 6
    with pytest.raises(DataError, match="class_balanced"):
        MultiClassDataModule(format="folder", root=str(tmp_path / "d"), sampler="balanced")


def test_mixed_batches_keep_the_class_balanced_order(tmp_path):
    dm = _unbalanced_class_balanced_datamodule(tmp_path, batch_size=4)
    dm.configure(DataRequest(mixed_batches=True))  # what loss=ccl asks for
    dm.setup("fit")
    batches = [list(batch["class_name"]) for batch in dm.train_dataloader()]
    assert len(batches) == 3 and all(len(set(b)) == 2 for b in batches)
    names = [n for b in batches for n in b]
    assert names.count("b") >= 5  # balanced: 6 of 12 draws (a swap into a single-class batch may move one)


def test_pin_memory_follows_the_trainer_device_unless_set(tmp_path):
    from types import SimpleNamespace

    def kwargs(pin, device):
        dm = MultiClassDataModule(format="folder", root=str(tmp_path), pin_memory=pin)
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0)
        return dm._loader_kwargs()["pin_memory"]

    assert kwargs(None, "cuda") is True and kwargs(None, "cpu") is False
    assert kwargs(True, "cpu") is True and kwargs(False, "cuda") is False


def test_configure_after_setup_is_refused(tmp_path):
    root = make_mvtec_tree(tmp_path / "d")
    dm = MultiClassDataModule(format="folder", root=str(root), num_workers=0, cache_dir=str(tmp_path / "c"),
                              mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="before setup"):
        dm.configure(DataRequest(mixed_batches=True))


def test_request_merge_combines_needs_and_refuses_conflicts():
    view = SecondView(rotate_limit=30.0)
    stats = ((0.5,) * 3, (0.2,) * 3)
    merged = DataRequest(normalization=stats).merge(DataRequest(second_view=view, mixed_batches=True))
    assert merged.second_view == view and merged.mixed_batches and merged.normalization == stats
    with pytest.raises(ValueError, match="second_view"):
        merged.merge(DataRequest(second_view=SecondView()))
