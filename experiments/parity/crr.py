"""Parity of ``method=crr`` with the official CRR code (Qiqigeww/CRR-MUAD cbd2a12).

Official side, imported from the checkout: the DINOv2 encoder exactly as ``models/vit_encoder.py:38-42`` builds it
(``dinov2.models.vision_transformer.vit_base``, 518 px, 4 registers, ``init_values=1e-8``, ``block_chunks=0``,
``interpolate_offset=0.1``, ``interpolate_antialias=False``; the file's own loader is not called: it downloads),
``models/uad.py::ViTill`` with ``bMlp6(drop, lambda_mgd=0.4)`` and 8 ``Block(attn=LinearAttention2)`` as
``dinomaly_realiad_uni_first.py:124-135``, ``DecoderReconstructive(192, 2)`` (``…_second.py:139``), the losses
``utils.global_cosine_hm_percent`` / ``utils.FocalLoss``, ``optimizers.StableAdamW``, ``utils.WarmCosineScheduler``
and the test function ``utils.evaluation_batch_adeval_three_visualize`` (``…_test.py:116``, ``alpha=0.7``), whose
smoothed maps are recorded by wrapping ``utils.get_gaussian_kernel``. Stage-I / stage-II loop bodies (two passes
and the sum of the two loss calls, ``…_first.py:164-174``; softmax, mask resize and threshold,
``…_second.py:170-189``) are inline script code and are re-expressed here.

Our side: ``experiment=crr_mvtec backbone.pretrained=false backbone.img_size=<size>`` (the paper recipe with its
faithful defaults: CLS + register tokens carried, DINOv2's position-table rule; ``mask_at_test`` is our one
deliberate exception and is compared both ways). Weights: :func:`mcad.utils.seeded.seeded_init_` on the whole
``CRRModule``; LayerScale gammas are then scaled by 10 (non-trivial blocks) and the position table is DINOv2's
resize of a seeded smooth 37 x 37 table (:func:`native_pos_table`), since our 28 x 28 table has no official
source. Everything is copied into the official modules with the key maps of :mod:`mcad.methods.crr.official`
(the encoder's CLS position entry is 0, unused official blocks 10-11 / ``norm`` / ``mask_token`` are 0).

Random numbers: the feature mask is drawn in eval mode too by the official ``bMlp6``; our bottleneck draws the
same numbers from the same generator (``mask_rng=cpu``), so with ``torch.manual_seed`` before each side the masks
are identical (``mask_at_test=True`` on our side). Training-mode dropout draws cannot be aligned (one pass over
``[x; x~]`` here, two passes there), so the stage-I loss, gradients and step are compared in eval mode (masks on,
dropout off), which is the same computation.

Checkpoint import: official-format ``model.pth`` (ViTill) and ``Seg_model_7999.pth`` are rebuilt from their
manifests with seeded values, loaded into the official modules (strict), and converted into ours with
:func:`mcad.methods.crr.official.convert_official_checkpoint`; the maps are compared.

Run: ``python experiments/parity/crr.py --official /work/official/CRR [--size 112] [--write-fixture]``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mcad.methods.crr.model import CRRModel  # noqa: E402
from mcad.methods.crr.official import convert_official_checkpoint, encoder_key, recon_key, seg_key  # noqa: E402
from mcad.models.backbones import dinov2_interpolate_pos_embed  # noqa: E402
from mcad.schedulers import warmup_cosine_factor  # noqa: E402
from mcad.utils.seeded import seeded_images, seeded_init_, seeded_tensor  # noqa: E402

OFFICIAL = common.OfficialRepo("Qiqigeww/CRR-MUAD", "cbd2a12")
STUBS = ("imgaug", "imgaug.augmenters", "matplotlib", "matplotlib.pyplot", "adeval", "ptflops")


class _NoColour:
    """colorama's Fore / Back / Style: every colour code is an empty string."""

    def __getattr__(self, name: str) -> str:
        return ""


# optimizers/__init__.py imports every optimiser of the package; ACProp.py (unused) imports tabulate and colorama.
# utils.py imports pandas (unused on the checked paths); sklearn's input checks look for pandas types in it.
SHIMS = {
    "pandas": {name: type(name, (), {}) for name in ("DataFrame", "Series", "Index", "Categorical")},
    "tabulate": {"tabulate": lambda *args, **kwargs: ""},
    "colorama": {"Fore": _NoColour(), "Back": _NoColour(), "Style": _NoColour()},
}
SIZE, BATCH = 112, 2
ITERATIONS = (0, 500, 1000)  # hard-mining p = 0, 0.45, 0.9
GAMMA_SCALE = 10.0
POS_KEY = 881_001
NATIVE_SIDE = 37  # DINOv2's 518 px / 14
DRAWS = 5  # official random-mask draws averaged for the mask_at_test=false row
FILE_SEEDS = {"model.pth": 0, "Seg_model_7999.pth": 17}  # seed offsets of the rebuilt official files
TOL = 1e-5


# ------------------------------------------------------------------------------------------ our side
def overrides(size: int, experiment: str = "crr_mvtec") -> list[str]:
    """Our config: the paper recipe on random weights at a small input (the only change)."""
    return [f"experiment={experiment}", "backbone.pretrained=false", f"backbone.img_size={size}"]


def native_pos_table(seed: int, dim: int, side: int = NATIVE_SIDE) -> Tensor:
    """A seeded, smooth ``(1, side * side, dim)`` patch position table (DINOv2's native grid), std about 0.5."""
    coarse = seeded_tensor((1, dim, 5, 5), seed, key=POS_KEY)
    fine = seeded_tensor((1, dim, side, side), seed, key=POS_KEY + 1)
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False) + 0.1 * fine
    return 0.5 * smooth.flatten(2).transpose(1, 2).contiguous()


def prepare_ours(method: nn.Module, seed: int) -> Tensor:
    """Seeded weights on the whole method, LayerScale x10, DINOv2-resized position table; returns the 37x37 table."""
    seeded_init_(method, seed)
    vit = method.model.backbone.model.model
    native = native_pos_table(seed, vit.embed_dim)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith(".gamma"):
                p.mul_(GAMMA_SCALE)
        vit.pos_embed.copy_(dinov2_interpolate_pos_embed(native, tuple(vit.patch_embed.grid_size)))
    return native


def build_ours(seed: int, size: int, experiment: str = "crr_mvtec") -> tuple[nn.Module, Tensor]:
    """Our method from the recipe overrides with the parity weights, in eval mode."""
    method = common.build_method(overrides(size, experiment))
    native = prepare_ours(method, seed)
    return method.eval(), native


def inputs(seed: int, batch: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, x~, mask)``: seeded images, a copy with a square pasted from other seeded images, its mask."""
    x = seeded_images(seed, batch, size)
    other = seeded_images(seed + 1, batch, size)
    mask = torch.zeros(batch, 1, size, size)
    lo, hi = size // 4, size // 4 + size // 3
    mask[..., lo:hi, lo:hi] = 1.0
    return x, x * (1 - mask) + other * mask, mask


def test_gt(batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Ground truth for the official test function: image 0 normal, the others with a square defect."""
    gt = torch.zeros(batch, 1, size, size)
    gt[1:, :, size // 3 : size // 2, size // 2 : 3 * size // 4] = 1.0
    return gt, torch.tensor([0] + [1] * (batch - 1))


@contextlib.contextmanager
def global_step(method: nn.Module, step: int) -> Iterator[None]:
    """Pretends the trainer is at ``step`` (the hard-mining schedule reads ``global_step``)."""
    with mock.patch.object(type(method), "global_step", new=property(lambda self: step)):
        yield


def our_eval(method: nn.Module, x: Tensor, seed: int | None, mask_at_test: bool) -> tuple[Tensor, Tensor]:
    """Our evaluated maps and scores (the shared inference path), masks drawn after ``manual_seed(seed)``."""
    method.model.bottleneck.mask_at_test = mask_at_test
    if seed is not None:
        torch.manual_seed(seed)
    return common.evaluate_images(method, x)


def our_stage1(method: nn.Module, batch: dict[str, Tensor], it: int, seed: int) -> dict[str, float]:
    """Our stage-I losses (eval mode, random masks on) after ``manual_seed(seed)``; gradients left in place."""
    method.eval()
    method.model.bottleneck.mask_at_test = True
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with global_step(method, it), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        losses = method.training_losses(batch)
    losses["loss"].backward()
    return {k: float(v.detach()) for k, v in losses.items()}


def our_stage2(method: nn.Module, batch: dict[str, Tensor], seed: int, seg_input: Tensor | None = None) -> float:
    """Our stage-II focal loss (recon net eval + random masks, seg head train-mode BN); gradients left in place.

    ``seg_input`` replaces the seg-net input our reconstruction network computes (to compare the head's gradients
    on bit-identical inputs: with train-mode BatchNorm on 2 images they are extremely sensitive to the input).
    """
    method.start_phase("stage2")
    method.train()
    method.model.bottleneck.mask_at_test = True
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    patch = (
        mock.patch.object(CRRModel, "seg_input", staticmethod(lambda enc, dec: seg_input))
        if seg_input is not None
        else contextlib.nullcontext()
    )
    with patch:
        loss = method.training_losses(batch)["loss"]
    loss.backward()
    return float(loss.detach())


def trainable_grads(method: nn.Module) -> dict[str, Tensor]:
    """Gradients of the stage-I parameters by our key."""
    return {f"model.{k}": p.grad for k, p in method.model.named_parameters() if p.requires_grad and p.grad is not None}


def official_files(manifests: dict[str, Any], seed: int) -> dict[str, dict[str, Tensor]]:
    """The official-format files rebuilt from their manifests (values seeded by order) + encoder rescaling.

    The seeded fill gives a position table of std ~1e-3 and LayerScale 0.02; the table is rescaled to std 0.5 and
    the gammas x10 so that the position-table conversion and every encoder block matter for the map.
    """
    # Seed offsets by file name: the fixture's JSON sorts its keys, so the manifests' order cannot be used.
    files = {name: common.rebuild_from_manifest(m, seed + FILE_SEEDS[name]) for name, m in manifests.items()}
    model = files.get("model.pth")
    if model is not None:
        with torch.no_grad():
            pos = model["encoder.pos_embed"]
            pos.mul_(0.5 / pos.std())
            for key, value in model.items():
                if key.endswith(".gamma"):
                    value.mul_(GAMMA_SCALE)
    return files


def load_converted(method: nn.Module, files: dict[str, dict[str, Tensor]]) -> None:
    """Converts the official files and loads them into our method (strict)."""
    state = convert_official_checkpoint(
        files["model.pth"], files.get("Seg_model_7999.pth"), reference=method.state_dict()
    )
    method.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ official side
def official_encoder_state(method: nn.Module, native: Tensor, official_keys: Sequence[str]) -> dict[str, Tensor]:
    """Our backbone in the official DINOv2 layout (CLS position 0; blocks we do not hold and ``norm``: zeros)."""
    ours = method.state_dict()
    vit = "model.backbone.model.model."
    num_blocks = len(method.model.backbone.model.model.blocks)
    out = {}
    for key in official_keys:
        ref = key[len("encoder.") :]
        if ref == "cls_token":
            out[key] = ours[vit + "cls_token"].clone()
        elif ref == "register_tokens":
            out[key] = ours[vit + "reg_token"].clone()
        elif ref == "pos_embed":
            out[key] = torch.cat([torch.zeros_like(native[:, :1]), native], dim=1)
        else:
            mapped = encoder_key(ref, num_blocks)
            out[key] = ours[mapped].clone() if mapped else None
    return out


def official_state_from_ours(
    method: nn.Module, native: Tensor, official_sd: dict[str, Tensor], seg_sd: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Our weights in the official ``ViTill`` / ``DecoderReconstructive`` key layout (through the converter's maps)."""
    ours = method.state_dict()
    enc_keys = [k for k in official_sd if k.startswith("encoder.")]
    model = official_encoder_state(method, native, enc_keys)
    for key in official_sd:
        if key.startswith("encoder."):
            if model[key] is None:
                model[key] = torch.zeros_like(official_sd[key])
            continue
        model[key] = ours[recon_key(key)].clone()
    seg = None if seg_sd is None else {k: ours[seg_key(k)].clone() for k in seg_sd}
    return model, seg


@contextlib.contextmanager
def recorded_smoothing(utils: Any, reseed: int | None = None) -> Iterator[list[Tensor]]:
    """Records the output of every Gaussian kernel the official test functions build (their smoothed maps).

    The kernel is an ``nn.Conv2d`` whose construction draws (then overwrites) random weights, just before the
    model's forward draws its masks: with ``reseed`` the global RNG is re-seeded right after the kernel is built,
    so that the forward sees the state of ``torch.manual_seed(reseed)``, as our side does.
    """
    original = utils.get_gaussian_kernel
    outputs: list[Tensor] = []

    def build(*args: Any, **kwargs: Any) -> nn.Module:
        kernel = Recorder(original(*args, **kwargs))
        if reseed is not None:
            torch.manual_seed(reseed)
        return kernel

    class Recorder(nn.Module):
        def __init__(self, kernel: nn.Module) -> None:
            super().__init__()
            self.kernel = kernel

        def forward(self, x: Tensor) -> Tensor:
            y = self.kernel(x)
            outputs.append(y.detach().clone())
            return y

    utils.get_gaussian_kernel = build
    try:
        yield outputs
    finally:
        utils.get_gaussian_kernel = original


@contextlib.contextmanager
def in_temp_dir() -> Iterator[None]:
    """The official test function writes visualisations to ./visualize: keep them out of the repository."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


def top_percent_mean(maps: Tensor, ratio: float = 0.01) -> Tensor:
    """The official image score of the smoothed maps: mean of the top ``int(HW * ratio)`` pixels (utils.py:783-785)."""
    flat = maps.flatten(1)
    return torch.sort(flat, dim=1, descending=True)[0][:, : int(flat.shape[1] * ratio)].mean(dim=1)


def official_test_maps(off: Any, model: nn.Module, seg_net: nn.Module, x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """The official test path (``evaluation_batch_adeval_three_visualize``, alpha 0.7): smoothed maps, scores."""
    gt, label = test_gt(x.shape[0], x.shape[-1])
    loader = [(x, gt, label, [f"parity/{'good' if i == 0 else 'defect'}/{i:03d}.png" for i in range(x.shape[0])])]
    model.eval()  # dinomaly_realiad_uni_test.py:104 (the function itself only sets seg_net.eval())
    # compute_pro (AUPRO, needs pandas) runs after the maps are recorded and is not compared: skipped.
    no_pro = mock.patch.object(off.utils, "compute_pro", lambda *args, **kwargs: 0.0)
    quiet = warnings.catch_warnings()
    with recorded_smoothing(off.utils, reseed=seed) as outs, in_temp_dir(), no_pro, torch.no_grad(), quiet:
        warnings.simplefilter("ignore")
        off.utils.evaluation_batch_adeval_three_visualize(
            model, seg_net, loader, "cpu", max_ratio=0.01, resize_mask=256, use_adeval=False, alpha=0.7
        )
    maps = outs[0][:, 0]
    return maps, top_percent_mean(maps)


def load_official(folder: Path) -> Any:
    """The official modules (inside an ``official_imports`` context)."""
    import types

    import utils
    from dinov2.models import vision_transformer as dinov2_vit
    from models.uad import ViTill
    from models.vision_transformer import Block, DecoderReconstructive, LinearAttention2, bMlp6
    from optimizers import StableAdamW

    return types.SimpleNamespace(
        dinov2_vit=dinov2_vit, ViTill=ViTill, Block=Block, DecoderReconstructive=DecoderReconstructive,
        LinearAttention2=LinearAttention2, bMlp6=bMlp6, StableAdamW=StableAdamW, utils=utils,
    )  # fmt: skip


def official_encoder(off: Any) -> nn.Module:
    """``models/vit_encoder.py:38-42``'s DINOv2-reg ViT-B/14 (without the download)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xFormers not available
        return off.dinov2_vit.vit_base(
            patch_size=14, img_size=518, block_chunks=0, init_values=1e-8, num_register_tokens=4,
            interpolate_antialias=False, interpolate_offset=0.1,
        )  # fmt: skip


def official_decoder(off: Any, embed_dim: int = 768, num_heads: int = 12) -> nn.ModuleList:
    """``…_first.py:127-131``: 8 ``Block(attn=LinearAttention2)``, LN eps 1e-8, qkv bias."""
    from functools import partial

    return nn.ModuleList(
        off.Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-8), attn_drop=0.0, attn=off.LinearAttention2)
        for _ in range(8)
    )  # fmt: skip


def official_vitill(off: Any, bottleneck: nn.Module) -> nn.Module:
    """``ViTill`` as the scripts build it (blocks 2-9, two loose groups, no neighbour mask)."""
    return off.ViTill(
        encoder=official_encoder(off), bottleneck=nn.ModuleList([bottleneck]), decoder=official_decoder(off),
        target_layers=[2, 3, 4, 5, 6, 7, 8, 9], mask_neighbor_size=0,
        fuse_layer_encoder=[[0, 1, 2, 3], [4, 5, 6, 7]], fuse_layer_decoder=[[0, 1, 2, 3], [4, 5, 6, 7]],
    )  # fmt: skip


def off_trainable(model: nn.Module) -> nn.ModuleList:
    """``trainable = nn.ModuleList([bottleneck, decoder])`` (``…_first.py:137``)."""
    return nn.ModuleList([model.bottleneck, model.decoder])


def official_stage1(off: Any, model: nn.Module, x: Tensor, x_syn: Tensor, it: int, seed: int) -> dict[str, float]:
    """``…_first.py:164-174`` in eval mode: two passes, the sum of the two hard-mined losses; gradients left."""
    model.eval()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    en, de, _ = model(x)
    _, de_aug, _ = model(x_syn)
    p = min(0.9 * it / 1000, 0.9)
    normal = off.utils.global_cosine_hm_percent(en, de, p=p, factor=0.1)
    repair = off.utils.global_cosine_hm_percent(en, de_aug, p=p, factor=0.1)
    loss = normal + repair
    loss.backward()
    return {"loss": float(loss.detach()), "normal": float(normal.detach()), "repair": float(repair.detach())}


def official_stage2(
    off: Any, model: nn.Module, seg_net: nn.Module, x_syn: Tensor, mask: Tensor, seed: int
) -> tuple[float, Tensor]:
    """``…_second.py:170-189``: frozen ViTill (eval, mask drawn), seg net train mode, softmax, focal loss.

    Returns the loss and the seg-net input; gradients are left on the seg net.
    """
    model.eval()
    seg_net.train()
    seg_net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        _, _, output = model(x_syn)
    prob = torch.softmax(seg_net(output), dim=1)
    target = F.interpolate(mask, size=prob.size()[2:], mode="bilinear", align_corners=False)
    target = torch.where(target < 0.5, torch.zeros_like(target), torch.ones_like(target))
    loss = off.utils.FocalLoss()(prob, target)
    loss.backward()
    return float(loss.detach()), output


def relative_grad_diff(ours: dict[str, Tensor], official: dict[str, Tensor]) -> tuple[float, float]:
    """``(max |g_ours - g_official|, max |g_official|)`` over the shared keys (every key must be present)."""
    if set(ours) != set(official):
        raise ValueError(f"gradient keys differ: {sorted(set(ours) ^ set(official))[:5]}")
    diff = max(float((ours[k].double() - official[k].double()).abs().max()) for k in ours)
    scale = max(float(official[k].abs().max()) for k in official)
    return diff, scale


def named_grads(module: nn.Module, rename: Callable[[str], str | None], prefix: str = "") -> dict[str, Tensor]:
    """Gradients of ``module``'s parameters under our key names."""
    out = {}
    for k, p in module.named_parameters():
        if p.grad is None:
            continue
        ours = rename(prefix + k)
        if ours is None:
            raise KeyError(f"no counterpart of official parameter {prefix + k}")
        out[ours] = p.grad
    return out


def n_params(params: Any) -> int:
    return sum(p.numel() for p in params)


def stage1_step(
    off: Any,
    official: nn.Module,
    method: nn.Module,
    our_grads: dict[str, Tensor],
    it: int,
    clip: float,
    official_grads: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """One stage-I optimiser step on both sides at iteration ``it``, parameters restored afterwards.

    Official: ``StableAdamW`` + ``WarmCosineScheduler`` as ``…_first.py:148-151``, ``clip_grad_norm(0.1)``
    (``:178``). Ours: the method's ``configure_optimizers`` and Lightning's norm clipping at
    ``trainer.gradient_clip_val``. The official side steps from ``official_grads`` (default: ``our_grads``,
    i.e. identical gradients; keys are ours).
    """
    official_grads = our_grads if official_grads is None else official_grads
    ours = dict(method.named_parameters())
    pairs = [(p, ours[recon_key(k)]) for k, p in official.named_parameters() if recon_key(k) in our_grads]
    saved = [(a.detach().clone(), b.detach().clone()) for a, b in pairs]
    for k, p in official.named_parameters():
        if recon_key(k) in our_grads:
            p.grad = official_grads[recon_key(k)].clone()
    for k, g in our_grads.items():
        ours[k].grad = g.clone()
    trainable = off_trainable(official)
    opt_off = off.StableAdamW([{"params": trainable.parameters()}], lr=2e-3, betas=(0.9, 0.999),
                              weight_decay=1e-4, amsgrad=True, eps=1e-10)  # fmt: skip
    sched_off = off.utils.WarmCosineScheduler(opt_off, base_value=2e-3, final_value=2e-4, total_iters=10000,
                                              warmup_iters=100)  # fmt: skip
    opt_ours, sched_ours = common.our_optimizer(method, total_steps=10000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedulers stepped before the optimisers
        for _ in range(it):
            sched_off.step()
            sched_ours.step()
    lr = (opt_off.param_groups[0]["lr"], opt_ours.param_groups[0]["lr"])
    norm = (
        float(nn.utils.clip_grad_norm_(trainable.parameters(), max_norm=0.1)),
        float(nn.utils.clip_grad_norm_(common.optimizer_params(opt_ours), max_norm=clip)),
    )
    opt_off.step()
    opt_ours.step()
    step = max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)
    with torch.no_grad():
        for (a, b), (sa, sb) in zip(pairs, saved):
            a.copy_(sa)
            b.copy_(sb)
    schedule_ours = torch.tensor(
        [2e-3 * warmup_cosine_factor(i, 10000, 100, 0.1, 0.0) for i in range(10000)], dtype=torch.float64
    )
    schedule = float((schedule_ours - torch.as_tensor(sched_off.schedule, dtype=torch.float64)).abs().max())
    return {"lr": lr, "norm": norm, "step": step, "schedule": schedule}


def option_effects(
    off: Any, official: nn.Module, seg_net: nn.Module, method: nn.Module, native: Tensor, x: Tensor, seed: int
) -> dict[str, tuple[float, float]]:
    """Size of the two non-faithful backbone options on these weights: ``(max |ΔD|, max |Δmap|)`` vs official.

    ``backbone.prefix_tokens=false`` (patch tokens only through bottleneck and decoder) and
    ``backbone.pos_embed_interpolation=timm`` (timm's antialiased resize of the same 37 x 37 table), each
    alone. The feature mask is off on both sides (``lambda_mgd`` / ``mask_ratio`` 0): without the prefix
    tokens our draws would have another shape, so random masks could not be aligned.
    """
    from timm.layers import resample_abs_pos_embed

    backbone, bottleneck = method.model.backbone, method.model.bottleneck
    vit = backbone.model.model
    ratio = bottleneck.mask_ratio
    official.bottleneck[0].lambda_mgd, bottleneck.mask_ratio = 0.0, 0.0
    ref_maps, _ = official_test_maps(off, official, seg_net, x, seed)
    with torch.no_grad():
        _, ref_dec, _ = official.eval()(x)

    def ours() -> tuple[float, float]:
        maps, _ = our_eval(method, x, seed, mask_at_test=True)
        with torch.no_grad():
            dec = method.model(x).decoder
        return common.max_abs_diff(ref_dec, dec), common.max_abs_diff(ref_maps, maps)

    out = {"masks off, faithful defaults": ours()}
    backbone.prefix_tokens = False
    out["backbone.prefix_tokens=false"] = ours()
    backbone.prefix_tokens = True
    faithful = vit.pos_embed.detach().clone()
    grid = list(vit.patch_embed.grid_size)
    with torch.no_grad():
        vit.pos_embed.copy_(resample_abs_pos_embed(native, new_size=grid, num_prefix_tokens=0))
        out["backbone.pos_embed_interpolation=timm"] = ours()
        vit.pos_embed.copy_(faithful)
    official.bottleneck[0].lambda_mgd, bottleneck.mask_ratio = ratio, ratio
    return out


# ------------------------------------------------------------------------------------------ the comparison
def run(folder: Path, seed: int, size: int, write: bool) -> common.ParityTable:
    torch.manual_seed(seed)
    start = time.time()
    method, native = build_ours(seed, size)
    model: CRRModel = method.model
    dropout = float(model.bottleneck.drop.p)
    x, x_syn, mask = inputs(seed, BATCH, size)
    batch = {"image": x, "synthetic_image": x_syn, "synthetic_mask": mask}
    table = common.ParityTable(
        f"CRR vs Qiqigeww/CRR-MUAD@{OFFICIAL.commit} (experiment=crr_mvtec, random weights, seed {seed}, "
        f"{BATCH}x3x{size}x{size})"
    )
    fixture: dict[str, Any] = {
        "official": {"repo": OFFICIAL.name, "commit": OFFICIAL.commit},
        "seed": seed,
        "overrides": overrides(size),
        "input": {"seed": seed, "batch": BATCH, "size": size},
        "gamma_scale": GAMMA_SCALE,
        "iterations": list(ITERATIONS),
    }

    with common.shim_modules(SHIMS), common.official_imports(folder, stubs=STUBS):
        off = load_official(folder)
        bottleneck = off.bMlp6(768, 768 * 4, 768, drop=dropout, lambda_mgd=model.bottleneck.mask_ratio)
        official = official_vitill(off, bottleneck)
        seg_net = off.DecoderReconstructive(base_width=192, out_channels=2)
        model_sd, seg_sd = official_state_from_ours(method, native, official.state_dict(), seg_net.state_dict())
        official.load_state_dict(model_sd, strict=True)
        seg_net.load_state_dict(seg_sd, strict=True)
        manifests = {"model.pth": common.file_manifest(model_sd), "Seg_model_7999.pth": common.file_manifest(seg_sd)}

        # ---- parameter counts
        counts = {
            "bottleneck": (n_params(official.bottleneck.parameters()), n_params(model.bottleneck.parameters())),
            "decoder (8 blocks)": (n_params(official.decoder.parameters()), n_params(model.decoder.parameters())),
            "trainable stage I": (
                n_params(off_trainable(official).parameters()),
                n_params(model.trainable_parameters()),
            ),
            "segmentation head": (n_params(seg_net.parameters()), n_params(method.seg_head.parameters())),
        }
        for name, (a, b) in counts.items():
            table.add(f"parameters: {name}", float(abs(a - b)), 0.0, a, b)
        enc = official.encoder
        used = n_params(enc.parameters()) - n_params(enc.blocks[10:].parameters()) - n_params(enc.norm.parameters())
        ours_enc = n_params(model.backbone.parameters())
        table.add(
            "parameters: encoder up to block 9 (official: 1 + 37² position entries + mask token)",
            float(abs(used - ours_enc)), None, used, ours_enc,
        )  # fmt: skip
        fixture["params"] = {k: v[0] for k, v in counts.items()}

        # ---- converter round trip (official layout of our weights -> ours)
        back = convert_official_checkpoint(model_sd, seg_sd, reference=method.state_dict())
        ours_sd = method.state_dict()
        table.add("converter round trip (ours -> official layout -> ours)",
                  max(float((back[k].double() - ours_sd[k].double()).abs().max()) if back[k].numel() else 0.0
                      for k in back if k != "seg_head_active"), 0.0)  # fmt: skip

        # ---- eval forward, same masks
        official.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            en, de, seg_in = official(x)
            model.bottleneck.mask_at_test = True
            torch.manual_seed(seed)
            ours_out = model(x)
            enc_g, dec_g = ours_out.encoder, ours_out.decoder
        table.add("encoder groups E1, E2", common.max_abs_diff(en, enc_g), TOL)
        table.add("decoder groups D1, D2 (eval, same random masks)", common.max_abs_diff(de, dec_g), TOL,
                  f"|D|max {max(float(d.abs().max()) for d in de):.3f}")  # fmt: skip
        table.add("seg-net input -(Ê⊙D̂)", common.max_abs_diff(seg_in, CRRModel.seg_input(enc_g, dec_g)), TOL)
        recon_off = off.utils.cal_anomaly_maps(en, de, 256)[0]
        recon_ours = CRRModel.reconstruction_map(enc_g, dec_g, out_size=(256, 256))
        table.add("reconstruction map at 256²", common.max_abs_diff(recon_off, recon_ours), TOL)
        with torch.no_grad():
            logits_off = seg_net.eval()(seg_in)
            logits_ours = method.seg_head.eval()(seg_in)
        table.add("seg-net logits (eval BN)", common.max_abs_diff(logits_off, logits_ours), TOL)

        # ---- the full test path (0.7 recon + 0.3 seg, 5x5 Gaussian, top 1 %)
        method.seg_head_active.fill_(True)
        off_maps, off_scores = official_test_maps(off, official, seg_net, x, seed)
        our_maps, our_scores = our_eval(method, x, seed, mask_at_test=True)
        table.add("test map at 256² (mask_at_test=true, same masks)", common.max_abs_diff(off_maps, our_maps), TOL,
                  f"max {float(off_maps.max()):.4f}")  # fmt: skip
        table.add("image scores (top-1 % mean)", common.max_abs_diff(off_scores, our_scores), TOL,
                  " ".join(f"{s:.6f}" for s in off_scores.tolist()),
                  " ".join(f"{s:.6f}" for s in our_scores.tolist()))  # fmt: skip
        fixture["eval"] = {
            "stats": [common.map_stats(m) for m in off_maps],
            "pooled": [common.pooled_map(m) for m in off_maps],
            "scores": off_scores.tolist(),
        }

        # ---- our deterministic default against the official random masks
        draws = [official_test_maps(off, official, seg_net, x, seed + 100 + i) for i in range(DRAWS)]
        mean_map = torch.stack([m for m, _ in draws]).mean(0)
        mean_score = torch.stack([s for _, s in draws]).mean(0)
        spread = torch.stack([m for m, _ in draws]).std(0)
        det_maps, det_scores = our_eval(method, x, None, mask_at_test=False)
        det_diff = (det_maps - mean_map).abs()
        table.add(f"mask_at_test=false (default) vs mean of {DRAWS} official draws: map (mean abs "
                  f"{float(det_diff.mean()):.2e}; official per-pixel std {float(spread.mean()):.2e})",
                  float(det_diff.max()), None)  # fmt: skip
        table.add(f"mask_at_test=false vs mean of {DRAWS} official draws: image scores",
                  common.max_abs_diff(mean_score, det_scores), None,
                  " ".join(f"{s:.6f}" for s in mean_score.tolist()),
                  " ".join(f"{s:.6f}" for s in det_scores.tolist()))  # fmt: skip
        fixture["deterministic"] = {"scores": det_scores.tolist(), "stats": [common.map_stats(m) for m in det_maps]}
        for label, (d_dec, d_map) in option_effects(off, official, seg_net, method, native, x, seed).items():
            tol = TOL if label.startswith("masks off") else None
            table.add(f"{label}: decoder groups", d_dec, tol)
            table.add(f"{label}: test map at 256²", d_map, tol)

        # ---- stage II: focal loss and seg-head gradients, one Adam step
        loss_ours = our_stage2(method, batch, seed)
        g_ours = {f"seg_head.{k}": p.grad.clone() for k, p in method.seg_head.named_parameters()}
        loss_off, seg_in_syn = official_stage2(off, official, seg_net, x_syn, mask, seed)
        g_off = named_grads(seg_net, seg_key)
        table.add("stage II focal loss", abs(loss_off - loss_ours), TOL, loss_off, loss_ours)
        diff, scale = relative_grad_diff(g_ours, g_off)
        table.add(
            "stage II gradients / max |g|, end to end (train-mode BN on 2 images amplifies the ~1e-8 difference "
            "of the seg-net inputs)", diff / scale, None,
        )  # fmt: skip
        loss_same = our_stage2(method, batch, seed, seg_input=seg_in_syn)
        g_same = {f"seg_head.{k}": p.grad for k, p in method.seg_head.named_parameters()}
        diff, scale = relative_grad_diff(g_same, g_off)
        table.add(f"stage II gradients / max |g| ({scale:.2e}), same seg-net input", diff / scale, 1e-6)
        table.add("stage II focal loss, same seg-net input", abs(loss_off - loss_same), TOL, loss_off, loss_same)
        fixture["stage2"] = {"loss": loss_off, "grad_norm": common.grad_norm(list(seg_net.parameters()))}
        ours_params = dict(method.named_parameters())
        for k, p in seg_net.named_parameters():  # one step from identical gradients
            ours_params[seg_key(k)].grad = p.grad.detach().clone()
        adam_off = torch.optim.Adam([{"params": seg_net.parameters(), "lr": 0.0001}])  # …_second.py:153
        adam_ours = method.seg_optimizer_factory(method.seg_head.parameters())
        adam_off.step()
        adam_ours.step()
        step_diff = max(
            float((p.detach() - ours_params[seg_key(k)].detach()).abs().max()) for k, p in seg_net.named_parameters()
        )
        table.add("stage II Adam step from the same gradients: parameters after", step_diff, 1e-7)
        method.start_phase("stage1")
        method.eval()

        # ---- stage I: losses and gradients at p = 0, 0.45, 0.9
        fixture["stage1"] = []
        for it in ITERATIONS:
            l_off = official_stage1(off, official, x, x_syn, it, seed)
            l_ours = our_stage1(method, batch, it, seed)
            p = min(0.9 * it / 1000, 0.9)
            for key, label in (("normal", "normal term"), ("repair", "repair term"), ("loss", "total")):
                table.add(f"stage I loss, {label}, p={p:g}", abs(l_off[key] - l_ours[key]), TOL, l_off[key],
                          l_ours[key])  # fmt: skip
            diff, scale = relative_grad_diff(trainable_grads(method), named_grads(official, recon_key))
            table.add(f"stage I gradients / max |g| ({scale:.2e}), p={p:g}", diff / scale, 1e-5)
            fixture["stage1"].append(
                {"iteration": it, **l_off, "grad_norm": common.grad_norm(list(off_trainable(official).parameters()))}
            )

        # ---- one optimiser step (gradients of the p = 0.9 call), schedule, clipping
        it = ITERATIONS[-1]
        own = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
        official_grads = {recon_key(k): p.grad.clone() for k, p in official.named_parameters() if p.grad is not None}
        clip = float(common.compose(overrides(size)).trainer.gradient_clip_val)
        same = stage1_step(off, official, method, official_grads, it, clip)
        table.add(f"learning rate at iteration {it}", abs(same["lr"][0] - same["lr"][1]), 1e-12, *same["lr"])
        table.add("LR schedule, 10 000 iterations", same["schedule"], 1e-12)
        table.add("gradient norm before clipping (max_norm 0.1)", abs(same["norm"][0] - same["norm"][1]),
                  1e-6 * same["norm"][0], *same["norm"])  # fmt: skip
        table.add(f"StableAdamW step from the same gradients: parameters after (lr {same['lr'][0]:.2e})",
                  same["step"], 1e-7)  # fmt: skip
        mixed = stage1_step(off, official, method, own, it, clip, official_grads=official_grads)
        table.add(
            "StableAdamW step from each side's own gradients (Adam's first step is ~lr·sign(g): near-zero "
            "gradients that differ by float noise flip sign)", mixed["step"], None,
        )  # fmt: skip
        del official, seg_net, model_sd, seg_sd, own, official_grads

        # ---- checkpoint import: official-format files from their manifests
        files = official_files(manifests, seed)
        official = official_vitill(off, off.bMlp6(768, 768 * 4, 768, drop=dropout, lambda_mgd=0.4))
        seg_net = off.DecoderReconstructive(base_width=192, out_channels=2)
        official.load_state_dict(files["model.pth"], strict=True)  # …_test.py:103
        seg_net.load_state_dict(files["Seg_model_7999.pth"], strict=True)  # …_test.py:108
        ck_maps, ck_scores = official_test_maps(off, official, seg_net, x, seed)
        del official, seg_net

    load_converted(method, files)
    conv_maps, conv_scores = our_eval(method, x, seed, mask_at_test=True)
    table.add("imported official checkpoint: test map at 256²", common.max_abs_diff(ck_maps, conv_maps), TOL)
    table.add("imported official checkpoint: image scores", common.max_abs_diff(ck_scores, conv_scores), TOL,
              " ".join(f"{s:.6f}" for s in ck_scores.tolist()),
              " ".join(f"{s:.6f}" for s in conv_scores.tolist()))  # fmt: skip
    fixture["checkpoint"] = {
        "manifest": manifests,
        "stats": [common.map_stats(m) for m in ck_maps],
        "pooled": [common.pooled_map(m) for m in ck_maps],
        "scores": ck_scores.tolist(),
    }
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)
    if write:
        common.write_fixture("crr", fixture)
    return table


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], OFFICIAL)
    p.add_argument("--size", type=int, default=SIZE, help=f"input side, a multiple of 14 (default {SIZE})")
    args = p.parse_args()
    folder = common.checkout(args.official, OFFICIAL, args.allow_other_commit)
    return common.finish([run(folder, args.seed, args.size, args.write_fixture)])


if __name__ == "__main__":
    sys.exit(main())
