"""Parity of ``method=dinomaly`` with the official Dinomaly code (guojiajeremy/Dinomaly c5c76d0).

``method=dinomaly`` is CRR's network with the repair term, the feature masking and stage II switched off
(``mcad.methods.crr.module.CRRModule(repair=False, seg_head=None, stage2_steps=0)``, ``decoder.mask_ratio=0``).

Official side, imported from the checkout: the DINOv2 encoder as ``models/vit_encoder.py:38-42`` builds it (518 px,
4 registers, ``init_values=1e-8``, ``interpolate_offset=0.1``, no antialiasing; without the download),
``models/uad.py::ViTill`` with ``bMlp(768, 3072, 768, drop=0.2)`` and 8 ``Block(attn=LinearAttention2)`` as
``dinomaly_mvtec_uni.py:116-146``, ``utils.global_cosine_hm_percent`` (``:184-186``), ``optimizers.StableAdamW`` and
``utils.WarmCosineScheduler`` (``:165-168``), ``clip_grad_norm(0.1)`` (``:191``), and the test function
``utils.evaluation_batch(model, loader, max_ratio=0.01, resize_mask=256)`` (``:206``), whose smoothed maps are
recorded by wrapping ``utils.get_gaussian_kernel``.

Our side: ``experiment=dinomaly_mvtec backbone.pretrained=false backbone.img_size=<size>``; weights as in
``crr.py`` (seeded, LayerScale x10, DINOv2-resized smooth 37 x 37 position table), copied into the official
modules through the key maps of :mod:`mcad.methods.crr.official`.

Random numbers: Dinomaly draws only dropout masks (bottleneck, training). Both sides draw them in the same order
and shapes (input, hidden, output dropout of the bottleneck; the decoder's dropouts have p = 0), so the training
loss, gradients and step are compared in training mode after the same ``torch.manual_seed``.

Known difference: the official evaluation upsamples the map to the input size (bilinear, ``align_corners=True``),
then to 256 (bilinear, ``align_corners=False``); our protocol upsamples once to 256 (``align_corners=True``). The
table shows its size and, separately, our raw map put through the official two-step resize and our smoothing and
score (which must match).

Run: ``python experiments/parity/dinomaly.py --official /work/official/Dinomaly [--size 112] [--write-fixture]``.
"""

from __future__ import annotations

import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import crr  # noqa: E402

from mcad.methods.crr.official import convert_official_checkpoint, recon_key  # noqa: E402

OFFICIAL = common.OfficialRepo("guojiajeremy/Dinomaly", "c5c76d0")
EXPERIMENT = "dinomaly_mvtec"
SIZE, BATCH = crr.SIZE, crr.BATCH
ITERATIONS = crr.ITERATIONS
TOL = crr.TOL


def overrides(size: int) -> list[str]:
    """Our config: the Dinomaly MVTec recipe on random weights at a small input."""
    return crr.overrides(size, EXPERIMENT)


def build_ours(seed: int, size: int) -> tuple[nn.Module, Tensor]:
    """Our method with the parity weights (see ``crr.prepare_ours``), in eval mode."""
    return crr.build_ours(seed, size, EXPERIMENT)


def our_train_loss(method: nn.Module, x: Tensor, it: int, seed: int) -> float:
    """Our training loss in training mode (dropout on) after ``manual_seed(seed)``; gradients left in place."""
    method.train()
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with crr.global_step(method, it), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = method.training_losses({"image": x})["loss"]
    loss.backward()
    method.eval()
    return float(loss.detach())


def load_official() -> Any:
    """The official modules (inside an ``official_imports`` context)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xFormers is not available
        import utils
        from dinov2.models import vision_transformer as dinov2_vit
        from models.uad import ViTill
        from models.vision_transformer import Block, LinearAttention2, bMlp
        from optimizers import StableAdamW

    return types.SimpleNamespace(
        dinov2_vit=dinov2_vit, ViTill=ViTill, Block=Block, LinearAttention2=LinearAttention2, bMlp=bMlp,
        StableAdamW=StableAdamW, utils=utils,
    )  # fmt: skip


def official_test_maps(off: Any, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The official test path (``utils.evaluation_batch(max_ratio=0.01, resize_mask=256)``): smoothed maps, scores."""
    gt, label = crr.test_gt(x.shape[0], x.shape[-1])
    loader = [(x, gt, label, [f"parity/{i:03d}.png" for i in range(x.shape[0])])]
    no_pro = mock.patch.object(off.utils, "compute_pro", lambda *args, **kwargs: 0.0)  # AUPRO: needs pandas
    quiet = warnings.catch_warnings()
    with crr.recorded_smoothing(off.utils) as outs, no_pro, torch.no_grad(), quiet:
        warnings.simplefilter("ignore")
        off.utils.evaluation_batch(model, loader, "cpu", max_ratio=0.01, resize_mask=256)
    maps = outs[0][:, 0]
    return maps, crr.top_percent_mean(maps)


def official_train_loss(off: Any, model: nn.Module, x: Tensor, it: int, seed: int) -> float:
    """``dinomaly_mvtec_uni.py:174-187``: training mode, one pass, the hard-mined loss; gradients left."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    en, de = model(x)
    p = min(0.9 * it / 1000, 0.9)
    loss = off.utils.global_cosine_hm_percent(en, de, p=p, factor=0.1)
    loss.backward()
    model.eval()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------ the comparison
def run(folder: Path, seed: int, size: int, write: bool) -> common.ParityTable:
    torch.manual_seed(seed)
    start = time.time()
    method, native = build_ours(seed, size)
    model = method.model
    dropout = float(model.bottleneck.drop.p)
    x, _, _ = crr.inputs(seed, BATCH, size)
    table = common.ParityTable(
        f"Dinomaly vs {OFFICIAL.name}@{OFFICIAL.commit} (experiment={EXPERIMENT}, random weights, seed {seed}, "
        f"{BATCH}x3x{size}x{size})"
    )
    fixture: dict[str, Any] = {
        "official": {"repo": OFFICIAL.name, "commit": OFFICIAL.commit},
        "seed": seed,
        "overrides": overrides(size),
        "input": {"seed": seed, "batch": BATCH, "size": size},
        "gamma_scale": crr.GAMMA_SCALE,
        "iterations": list(ITERATIONS),
    }
    with common.shim_modules(crr.SHIMS), common.official_imports(folder, stubs=crr.STUBS):
        off = load_official()
        official = crr.official_vitill(off, off.bMlp(768, 768 * 4, 768, drop=dropout))
        model_sd, _ = crr.official_state_from_ours(method, native, official.state_dict(), None)
        official.load_state_dict(model_sd, strict=True)
        manifests = {"model.pth": common.file_manifest(model_sd)}

        # ---- parameter counts
        counts = {
            "bottleneck": (official.bottleneck.parameters(), model.bottleneck.parameters()),
            "decoder (8 blocks)": (official.decoder.parameters(), model.decoder.parameters()),
            "trainable": (crr.off_trainable(official).parameters(), model.trainable_parameters()),
        }
        counts = {k: (crr.n_params(a), crr.n_params(b)) for k, (a, b) in counts.items()}
        for name, (a, b) in counts.items():
            table.add(f"parameters: {name}", float(abs(a - b)), 0.0, a, b)
        table.add("parameters: segmentation head (none)", 0.0, 0.0, 0, method.parameter_counts()["params_seg_head"])
        fixture["params"] = {k: v[0] for k, v in counts.items()}
        back = convert_official_checkpoint(model_sd, reference=method.state_dict())
        ours_sd = method.state_dict()
        table.add(
            "converter round trip (ours -> official layout -> ours)",
            max(
                float((back[k].double() - ours_sd[k].double()).abs().max()) if back[k].numel() else 0.0
                for k in back
                if k != "seg_head_active"
            ),
            0.0,
        )

        # ---- eval forward (deterministic on both sides)
        official.eval()
        with torch.no_grad():
            en, de = official(x)
            ours_out = model(x)
            enc_g, dec_g = ours_out.encoder, ours_out.decoder
        table.add("encoder groups E1, E2", common.max_abs_diff(en, enc_g), TOL)
        table.add("decoder groups D1, D2 (eval)", common.max_abs_diff(de, dec_g), TOL,
                  f"|D|max {max(float(d.abs().max()) for d in de):.3f}")  # fmt: skip

        # ---- the test path
        off_maps, off_scores = official_test_maps(off, official, x)
        our_maps, our_scores = common.evaluate_images(method, x)
        table.add("test map at 256² (protocol dinomaly_gt0: via the input size, as the official evaluation)",
                  common.max_abs_diff(off_maps, our_maps), TOL, f"max {float(off_maps.max()):.4f}")  # fmt: skip
        table.add("image scores (top-1 % mean)", common.max_abs_diff(off_scores, our_scores), TOL,
                  " ".join(f"{s:.6f}" for s in off_scores.tolist()),
                  " ".join(f"{s:.6f}" for s in our_scores.tolist()))  # fmt: skip
        with torch.no_grad():
            raw = method.anomaly_maps(x).anomaly_map
        direct = method.protocol.smooth(F.interpolate(raw, size=(256, 256), mode="bilinear", align_corners=True)[:, 0])
        table.add("test map resized straight to 256 instead (protocol.resize_via_input=false)",
                  common.max_abs_diff(off_maps, direct), None)  # fmt: skip
        fixture["eval"] = {
            "stats": [common.map_stats(m) for m in off_maps],
            "pooled": [common.pooled_map(m) for m in off_maps],
            "scores": off_scores.tolist(),
        }

        # ---- training: loss and gradients in training mode (same dropout draws)
        fixture["train"] = []
        for it in ITERATIONS:
            l_off = official_train_loss(off, official, x, it, seed)
            l_ours = our_train_loss(method, x, it, seed)
            p = min(0.9 * it / 1000, 0.9)
            table.add(f"training loss, dropout on, p={p:g}", abs(l_off - l_ours), TOL, l_off, l_ours)
            diff, scale = crr.relative_grad_diff(crr.trainable_grads(method), crr.named_grads(official, recon_key))
            table.add(f"gradients / max |g| ({scale:.2e}), p={p:g}", diff / scale, 1e-5)
            grad_norm = common.grad_norm(list(crr.off_trainable(official).parameters()))
            fixture["train"].append({"iteration": it, "loss": l_off, "grad_norm": grad_norm})

        # ---- one optimiser step (gradients of the p = 0.9 call)
        it = ITERATIONS[-1]
        own = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
        official_grads = {recon_key(k): p.grad.clone() for k, p in official.named_parameters() if p.grad is not None}
        clip = float(common.compose(overrides(size)).trainer.gradient_clip_val)
        same = crr.stage1_step(off, official, method, official_grads, it, clip)
        table.add(f"learning rate at iteration {it}", abs(same["lr"][0] - same["lr"][1]), 1e-12, *same["lr"])
        table.add("LR schedule, 10 000 iterations", same["schedule"], 1e-12)
        table.add("gradient norm before clipping (max_norm 0.1)", abs(same["norm"][0] - same["norm"][1]),
                  1e-6 * same["norm"][0], *same["norm"])  # fmt: skip
        table.add(f"StableAdamW step from the same gradients: parameters after (lr {same['lr'][0]:.2e})",
                  same["step"], 1e-7)  # fmt: skip
        mixed = crr.stage1_step(off, official, method, own, it, clip, official_grads=official_grads)
        table.add("StableAdamW step from each side's own gradients (~lr·sign(g) on near-zero gradients)",
                  mixed["step"], None)  # fmt: skip
        del official, model_sd, own, official_grads

        # ---- checkpoint import
        files = crr.official_files(manifests, seed)
        official = crr.official_vitill(off, off.bMlp(768, 768 * 4, 768, drop=dropout))
        official.load_state_dict(files["model.pth"], strict=True)
        ck_maps, ck_scores = official_test_maps(off, official, x)
        with torch.no_grad():
            en_ck, de_ck = official.eval()(x)
            ck_raw = off.utils.cal_anomaly_maps(en_ck, de_ck, size)[0]
        del official

    state = convert_official_checkpoint(files["model.pth"], reference=method.state_dict())
    method.load_state_dict(state, strict=True)
    conv_maps, conv_scores = common.evaluate_images(method, x)
    with torch.no_grad():
        raw = method.anomaly_maps(x).anomaly_map
    at_input = F.interpolate(raw, size=size, mode="bilinear", align_corners=True)[:, 0]
    table.add("imported official checkpoint: evaluated map", common.max_abs_diff(ck_maps, conv_maps), TOL)
    table.add("imported official checkpoint: image scores", common.max_abs_diff(ck_scores, conv_scores), TOL)
    table.add("imported official checkpoint: map at input size", common.max_abs_diff(ck_raw[:, 0], at_input), TOL)
    fixture["checkpoint"] = {
        "manifest": manifests,
        "stats": [common.map_stats(m) for m in ck_maps],
        "pooled": [common.pooled_map(m) for m in ck_maps],
        "scores": ck_scores.tolist(),
    }
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)
    if write:
        common.write_fixture("dinomaly", fixture)
    return table


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], OFFICIAL)
    p.add_argument("--size", type=int, default=SIZE, help=f"input side, a multiple of 14 (default {SIZE})")
    args = p.parse_args()
    folder = common.checkout(args.official, OFFICIAL, args.allow_other_commit)
    return common.finish([run(folder, args.seed, args.size, args.write_fixture)])


if __name__ == "__main__":
    sys.exit(main())
