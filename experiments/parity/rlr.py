"""Parity of our RLR with the official code (hlr7999/RLR @ 06e597b), run on the CPU.

    python experiments/parity/rlr.py --official ../RLR [--seed 0] [--real-data ../shared/data/real] [--write-fixture]

The official side is the unmodified checkout, imported at run time: its models are built by
``Trainer.build_model`` with the README training arguments, trained by ``Trainer.train`` (one epoch of
one batch) and evaluated by ``Trainer.test`` / ``Trainer.test_separate``; its numbers are read through
hooks (optimiser step hooks, forward hooks, recording criteria, a recording ``roc_auc_score``). Only
environment shims are added: no CUDA (``Tensor.cuda`` keeps the tensor on the CPU, in the default float
dtype), no weight download (timm ``pretrained=False``), matplotlib stubbed (only the visualiser uses it),
``Image.ANTIALIAS`` = LANCZOS for the real-image check (its Pillow < 10 alias), and, for the legacy
schedule, ``optimizer.zero_grad`` with ``set_to_none=False``, the default of the pinned torch 1.12.1.

Our side is built from the paper recipe (``experiment=rlr_mvtec backbone.pretrained=false``): weights
from :func:`mcad.utils.seeded.seeded_init_` (the learnable references rescaled to unit variance, as
RLR's ``randn``), copied into the official modules by order and shape (the kernel-1 ``Conv1d`` weights
``(d, C, 1)`` from our ``Linear`` ``(d, C)``). Random numbers: the official jitter draws
``torch.rand(B, L)`` before its noise even when every token is jittered (trainer.py:124); our jitter
does not, so our side draws the same extra numbers from a generator seeded like the official global RNG
("aligned"); the unaligned difference is reported as a known row. A float64 rerun of the training step
(jitter off, our rounded position tables in both) shows that the float32 step residual is rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OfficialRepo,
    ParityTable,
    build_method,
    checkout,
    compose,
    evaluate_images,
    finish,
    map_stats,
    max_abs_diff,
    official_imports,
    parser,
    pooled_map,
    write_fixture,
)

from mcad.methods.rlr.model import rlr_optimization_step  # noqa: E402
from mcad.methods.rlr.official import convert_official_checkpoint, load_official_checkpoint  # noqa: E402
from mcad.synthesis.feature_jitter import FeatureJitter, feature_jitter  # noqa: E402
from mcad.utils.seeded import seeded_images, seeded_init_, seeded_tensor  # noqa: E402

OFFICIAL = OfficialRepo("hlr7999/RLR", "06e597b")
OVERRIDES = ["experiment=rlr_mvtec", "backbone.pretrained=false"]
SIZE = 256  # the official window table only knows 16/32/64 grids: 256 px is the smallest input
TRAIN_BATCH = 2
EVAL_BATCH = 4
EVAL_LABELS = [0, 1, 0, 1]
BOXES = {1: (40, 120, 60, 150), 3: (150, 230, 20, 90)}  # image -> (row0, row1, col0, col1), at 256 px
JITTER_SEED_OFFSET = 17  # jitter RNG seed = seed + 17
CHECKPOINT_SEED_OFFSET = 101  # values of the official-format file = seed + 101
# The official README training command (model-relevant arguments; main.py defaults for the rest).
README_ARGS = dict(
    dataset="mvtec", backbone_arch="tf_efficientnet_b6", feature_levels=2, out_indices=[2, 3], feature_jitter=4.0,
    layers=4, blocks=["mca", "nsa"], blocks_gate="none", batch_size=TRAIN_BATCH, num_epochs=1, lr=1e-4,
    inp_size=SIZE, block_mode="parallel", ref_len=1, ref_loss=False, noise_prob=1.0, no_avg=False,
    with_mask=False, with_decoder=False, save_prefix="parity", num_workers=0, vis=False,
)  # fmt: skip
#: Tolerances of the parameters after one batch. Adam's first step moves a weight by lr * g / (|g| + eps)
#: (lr 1e-4, eps 1e-8): where |g| is near eps, float32 gradient noise (about 1e-7 absolute here) changes the
#: step by a sizeable part of lr. Weights with |g| >= 1e-6 are well conditioned (|d step / d g| <= 1e-4 /
#: (1e-6)^2 * 1e-8 = 1), so they must agree to 1e-6 = 1 % of lr; all weights are compared in float64.
STEP_TOL, STEP_GRAD_FLOOR, STEP_TOL_64 = 1e-6, 1e-6, 1e-10


# ------------------------------------------------------------------------------------------ shims
@contextlib.contextmanager
def official_environment() -> Iterator[None]:
    """CPU instead of CUDA and no weight download, for the duration of the official calls."""
    import timm

    cuda, create_model = torch.Tensor.cuda, timm.create_model

    def no_download(*args: Any, **kwargs: Any) -> nn.Module:
        kwargs["pretrained"] = False  # the official code reads local ImageNet weights (trainer.py:56-67)
        return create_model(*args, **kwargs)

    def stay(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # generate_mask (model.py:171,178) builds float32 masks and moves them to CUDA.
        return self.to(torch.get_default_dtype()) if self.is_floating_point() else self

    torch.Tensor.cuda = stay
    timm.create_model = no_download
    try:
        yield
    finally:
        torch.Tensor.cuda, timm.create_model = cuda, create_model


def cpu_defaults(function: Any) -> None:
    """Replaces ``torch.device('cuda')`` default arguments (embedding.py:7,49) by the CPU."""
    defaults = function.__defaults__ or ()
    function.__defaults__ = tuple(
        torch.device("cpu") if isinstance(d, torch.device) and d.type == "cuda" else d for d in defaults
    )


def quiet() -> contextlib.AbstractContextManager:
    """The official code prints progress and option tables."""
    return contextlib.redirect_stdout(io.StringIO())


class Recording(nn.Module):
    """Wraps one of the official criteria (trainer.py:53-54) and records every call's inputs and output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        result = self.inner(output, target)
        self.calls.append((output.detach().clone(), target.detach().clone(), result.detach().clone()))
        return result


class AlignedJitter(FeatureJitter):
    """Our feature jitter, preceded per level by the official extra ``torch.rand(B, L)`` draw (trainer.py:124).

    The noise itself is our :func:`~mcad.synthesis.feature_jitter.feature_jitter`; the generator is seeded like
    the official global RNG, so both sides draw the same numbers in the same order.
    """

    def forward(self, features: Any) -> Any:
        single = isinstance(features, Tensor)
        out = []
        for f in [features] if single else features:
            torch.rand(f.shape[0], f[0, 0].numel(), generator=self.generator)
            out.append(feature_jitter(f, self.scale, self.prob, self.generator))
        return out[0] if single else out


def align_jitter(method: Any, seed: int) -> None:
    """Swaps the method's configured jitter for an :class:`AlignedJitter` with the same scale and fraction."""
    configured = method.model.jitter
    generator = torch.Generator().manual_seed(seed)
    method.model.jitter = AlignedJitter(configured.scale, configured.prob, generator=generator)


# ------------------------------------------------------------------------------------------ our side
def seeded_method(seed: int, overrides: list[str] = OVERRIDES) -> Any:
    """Our method from the recipe, with seeded weights (references at unit variance, like RLR's randn)."""
    method = build_method(overrides)
    seeded_init_(method.model, seed)
    rescale_references(method)
    return method


@torch.no_grad()
def rescale_references(method: Any) -> None:
    """``seeded_init_`` scales a 3-D tensor by 1/sqrt(L*C); RLR's reference is N(0, 1) (model.py:234)."""
    for level in method.model.decoder.levels:
        level.reference.mul_(math.sqrt(level.reference[0].numel()))


def eval_masks() -> Tensor:
    """``(EVAL_BATCH, 1, 256, 256)`` binary box masks at the evaluation size (no resizing on either side)."""
    masks = torch.zeros(EVAL_BATCH, 1, SIZE, SIZE)
    for index, (r0, r1, c0, c1) in BOXES.items():
        masks[index, 0, r0:r1, c0:c1] = 1.0
    return masks


def level_params(method: Any) -> list[list[nn.Parameter]]:
    return [list(level.parameters()) for level in method.model.decoder.levels]


def our_step(method: Any, images: Tensor, schedule: str, jitter_seed: int | None, initial: dict[str, Tensor]) -> dict:
    """One training iteration of ours from the initial decoder weights under ``schedule`` (no jitter if seed None)."""
    method.model.decoder.load_state_dict(initial)
    if jitter_seed is not None:
        align_jitter(method, jitter_seed)
    method.train()
    optimizer = method.configure_optimizers()
    losses = rlr_optimization_step(method.model, images, optimizer, schedule=schedule)
    steps = [int(optimizer.state[lvl[0]]["step"]) if lvl[0] in optimizer.state else 0 for lvl in level_params(method)]
    return {
        "losses": [float(x) for x in losses],
        "params": [[p.detach().clone() for p in lvl] for lvl in level_params(method)],
        "grads": [[None if p.grad is None else p.grad.detach().clone() for p in lvl] for lvl in level_params(method)],
        "adam_steps": steps,
    }


def our_train_recon(method: Any, images: Tensor, jitter_seed: int, initial: dict[str, Tensor]) -> list[Tensor]:
    """Our reconstructions of the aligned-jitter input at the initial weights, as ``(B, L, C)`` tokens."""
    method.model.decoder.load_state_dict(initial)
    align_jitter(method, jitter_seed)
    method.train()
    with torch.no_grad():
        recons = method.model.decoder(method.model.jitter(method.model.extract_features(images)))
    return [r.permute(0, 2, 3, 1).flatten(1, 2) for r in recons]


def lightning_step(method: Any, images: Tensor, jitter_seed: int, initial: dict[str, Tensor]) -> tuple[Any, list]:
    """One batch through ``lightning.Trainer.fit`` with the recipe's schedule; returns the trainer and params."""
    import lightning as L

    method.model.decoder.load_state_dict(initial)
    align_jitter(method, jitter_seed)
    loader = torch.utils.data.DataLoader([{"image": img} for img in images], batch_size=len(images))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(method, train_dataloaders=loader)
    return trainer, [[p.detach().clone() for p in lvl] for lvl in level_params(method)]


# ------------------------------------------------------------------------------------------ official side
def import_official(folder: Path) -> SimpleNamespace:
    """The official modules, imported from the checkout (dropped from ``sys.modules`` afterwards)."""
    with official_imports(folder, stubs=["matplotlib", "matplotlib.pyplot"]):
        import datasets.mvtec as mvtec
        import models.embedding as embedding
        import trainer
        import utils.utils as utils
    cpu_defaults(embedding.PositionalEmbedding.__init__)
    cpu_defaults(embedding.Embedding2D.__init__)
    return SimpleNamespace(trainer=trainer, utils=utils, mvtec=mvtec)


def official_args(save_dir: Path, **extra: Any) -> argparse.Namespace:
    """The README arguments plus what main.py derives from them (main.py:76-80)."""
    args = argparse.Namespace(**{**README_ARGS, **extra})
    args.root_path = str(save_dir)
    args.save_path = str(save_dir / "save")
    args.device = torch.device("cpu")
    args.img_size = (args.inp_size, args.inp_size)
    args.crop_size = (args.inp_size, args.inp_size)
    args.norm_mean, args.norm_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return args


def official_trainer(off: SimpleNamespace, save_dir: Path, method: Any, copy_decoder: bool = True, **extra: Any) -> Any:
    """A ``Trainer`` whose models come from the official ``build_model``, holding our seeded weights.

    ``Trainer.__init__`` builds data loaders from folders on disk; the bare object gets the attributes that
    ``__init__`` sets (trainer.py:25-54) instead, with in-memory loaders set by the caller.
    """
    t = object.__new__(off.trainer.Trainer)
    t.args = official_args(save_dir, **extra)
    t.class_names = ["parity"]
    t.start_epoch, t.best_img_auc, t.best_pix_auc, t.best_img_aucs, t.best_pix_aucs = 0, 0.0, 0.0, [], []
    with official_environment(), quiet():
        t.build_model()
    t.l2_criterion = Recording(nn.MSELoss())
    t.cos_criterion = Recording(nn.CosineSimilarity(dim=-1))
    copy_backbone(method, t.encoder)
    if copy_decoder:
        for ours, theirs in zip(method.model.decoder.levels, t.models):
            copy_level(ours.state_dict(), theirs)
    return t


@torch.no_grad()
def copy_backbone(method: Any, encoder: nn.Module) -> None:
    """Our (seeded) timm feature extractor into the official one: the same timm model, tensor by tensor in order."""
    source = list(method.model.backbone.model.state_dict().values())
    target = encoder.state_dict()
    if len(source) != len(target):
        raise ValueError(f"backbone: {len(source)} tensors for {len(target)}")
    for value, (key, ref) in zip(source, target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"backbone {key}: {tuple(value.shape)} vs {tuple(ref.shape)}")
        ref.copy_(value)


@torch.no_grad()
def copy_level(source: dict[str, Tensor], official: nn.Module) -> int:
    """One level by order and shape; a Linear ``(d, C)`` goes into a kernel-1 Conv1d ``(d, C, 1)``."""
    target = official.state_dict()
    if len(source) != len(target):
        raise ValueError(f"level: {len(source)} tensors for {len(target)}")
    for (src, value), (dst, ref) in zip(source.items(), target.items()):
        if tuple(ref.shape) == (*value.shape, 1) and dst.endswith("project.weight"):
            value = value.unsqueeze(-1)
        if value.shape != ref.shape:
            raise ValueError(f"{src}{tuple(value.shape)} -> {dst}{tuple(ref.shape)}")
        ref.copy_(value)
    return len(target)


def train_batch(images: Tensor) -> list[tuple]:
    """A one-batch "loader" in the official item format ``(image, label, mask, name, anomaly)``."""
    n = len(images)
    return [(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1, SIZE, SIZE), ["x"] * n, ["good"] * n)]


def test_batches(images: Tensor, masks: Tensor, labels: list[int]) -> list[tuple]:
    """The test "loader": batches of two, ``datasets/base.py::__getitem__`` items collated."""
    out = []
    for start in range(0, len(images), 2):
        sl = slice(start, start + 2)
        n = len(images[sl])
        out.append((images[sl], torch.tensor(labels[sl]), masks[sl], [f"img{start + i}" for i in range(n)], ["x"] * n))
    return out


@contextlib.contextmanager
def recording_auroc(off: SimpleNamespace) -> Iterator[list[tuple[np.ndarray, np.ndarray, float]]]:
    """Records the inputs of the official ``roc_auc_score`` calls (trainer.py:332 pixel, 339 image)."""
    calls: list[tuple[np.ndarray, np.ndarray, float]] = []
    real = off.trainer.roc_auc_score

    def record(y_true: Any, y_score: Any, *args: Any, **kwargs: Any) -> float:
        value = real(y_true, y_score, *args, **kwargs)
        calls.append((np.array(y_true), np.array(y_score), float(value)))
        return value

    off.trainer.roc_auc_score = record
    try:
        yield calls
    finally:
        off.trainer.roc_auc_score = real


def official_test(off: SimpleNamespace, t: Any, batches: list[tuple], checkpoint_path: str | None = None) -> dict:
    """Runs the official ``Trainer.test`` on in-memory batches; returns its AUROC inputs and values."""
    t.test_loaders = {"parity": batches}
    outputs: list[list[Tensor]] = [[] for _ in t.models]
    handles = [
        m.register_forward_hook(lambda mod, a, out, i=i: outputs[i].append(out.detach()))
        for i, m in enumerate(t.models)
    ]
    try:
        with recording_auroc(off) as calls, official_environment(), quiet():
            t.test(vis=False, checkpoint_path=checkpoint_path)
    finally:
        for h in handles:
            h.remove()
    (mask_flat, pixel_flat, pix_value), (_, image_scores, img_value) = calls
    n = len(image_scores)
    return {
        "pixel_map": torch.from_numpy(pixel_flat.reshape(n, SIZE, SIZE)).float(),
        "gt": torch.from_numpy(mask_flat.reshape(n, SIZE, SIZE).astype(np.uint8)),
        "image_scores": torch.from_numpy(image_scores).float(),
        "p_auroc": pix_value,
        "i_auroc": img_value,
        "recon": [torch.cat(o) for o in outputs],
    }


def official_train(off: SimpleNamespace, t: Any, images: Tensor, jitter_seed: int, legacy: bool) -> dict:
    """Runs the official ``Trainer.train`` (one epoch of one batch, its ``test`` stubbed) and records it.

    Args:
        legacy: ``zero_grad(set_to_none=False)``, the default of the pinned torch 1.12.1 (E-RLR1).

    Returns:
        The parameters before and after, the gradients each optimiser step saw, the recorded criterion
        calls, the Adam step counters and the folder the official code saved its model files to.
    """
    params = [p for group in t.optimizer.param_groups for p in group["params"]]
    grads: list[list[Tensor | None]] = []
    t.optimizer.register_step_pre_hook(
        lambda opt, a, k: grads.append([None if p.grad is None else p.grad.detach().clone() for p in params])
    )
    if legacy:
        t.optimizer.zero_grad = functools.partial(t.optimizer.zero_grad, set_to_none=False)
    t.train_loader = train_batch(images)
    t.test = lambda vis=False, checkpoint_path=None: (0.5, 0.5, [0.5], [0.5])  # no test data; saves best-img.pth
    before = [[p.detach().clone() for p in m.parameters()] for m in t.models]
    off.utils.init_seeds(jitter_seed)  # the official seeding helper (main.py:14 calls it with 3407)
    with official_environment(), quiet():
        t.train()
    sizes = [len(list(m.parameters())) for m in t.models]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return {
        "before": before,
        "params": [[p.detach().clone() for p in m.parameters()] for m in t.models],
        # Step i back-propagates level i; level 1's weights are untouched by step 0 (its gradients are None).
        "grads": [grads[i][offsets[i] : offsets[i] + sizes[i]] for i in range(len(sizes))],
        "mse": [float(c[2]) for c in t.l2_criterion.calls],
        "cos": [float(torch.mean(1 - c[2])) for c in t.cos_criterion.calls],
        "recon": [c[0] for c in t.l2_criterion.calls],
        "target": [c[1] for c in t.l2_criterion.calls],
        "adam_steps": [int(t.optimizer.state[next(m.parameters())]["step"]) for m in t.models],
        "save_dir": Path(t.args.save_path) / t.args.save_prefix,
    }


class InDefaultDtype(nn.Module):
    """Feeds a module its input in the default float dtype (the float64 check; the images are float32 values)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Any:
        return self.inner(x.to(torch.get_default_dtype()))


@torch.no_grad()
def use_our_position_tables(method: Any, t: Any) -> None:
    """Puts our (float64-computed, float32-rounded) position tables into the official embeddings (float64 check)."""
    for level, model in zip(method.model.decoder.levels, t.models):
        for ours, theirs in ((level.embedding, model.embedding), (level.reference_embedding, model.ref_mca_embedding)):
            table = ours.pos.encoding  # (h*w, d)
            h, w = level.grid_size
            theirs.position_embedding.pos_embed = table.T.reshape(-1, h, w).to(torch.get_default_dtype()).clone()


# ------------------------------------------------------------------------------------------ numbers
def flat_diff(ours: list[Tensor], theirs: list[Tensor], where: list[Tensor] | None = None) -> float:
    """Max |diff| of two parameter lists (official Conv1d shapes reshaped to ours), optionally where a mask is set."""
    worst = 0.0
    for k, (a, b) in enumerate(zip(ours, theirs)):
        d = (a.detach().double() - b.detach().double().reshape(a.shape)).abs()
        if where is not None:
            d = d[where[k].reshape(a.shape)]
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst


def update_summary(after: list[Tensor], before: list[Tensor]) -> dict[str, float]:
    """L1 norm and max of a level's update ``theta_1 - theta_0`` (fixture entries)."""
    deltas = [(a.detach().double().reshape(b.shape) - b.detach().double()) for a, b in zip(after, before)]
    return {"l1": float(sum(d.abs().sum() for d in deltas)), "max": float(max(d.abs().max() for d in deltas))}


def as_tokens(maps: Tensor) -> Tensor:
    return maps.permute(0, 2, 3, 1).flatten(1, 2)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def manifest_of(state: dict[str, Any]) -> dict[str, Any]:
    """The official file's structure: its non-tensor entries and every tensor's level, key and shape, in order."""
    tensors = [
        {"level": i, "key": k, "shape": list(v.shape)}
        for i, sd in enumerate(state["state_dict"])
        for k, v in sd.items()
    ]
    entries = {k: v for k, v in state.items() if k != "state_dict"}
    return {"top_level_keys": sorted(state), "entries": entries, "tensors": tensors}


def manifest_fill(key: str, shape: list[int]) -> tuple[float, float]:
    """``(offset, scale)`` of a manifest tensor's seeded values: value = offset + scale * N(0, 1)."""
    if key == "ref_mca":
        return 0.0, 1.0  # RLR's reference: randn
    if len(shape) <= 1:
        return (1.0, 0.1) if key.endswith("weight") else (0.0, 0.02)
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))


def state_from_manifest(manifest: dict[str, Any], seed: int) -> dict[str, Any]:
    """Rebuilds an official-format file from its manifest; tensor ``i`` from ``seeded_tensor(shape, seed, i)``."""
    levels: list[dict[str, Tensor]] = []
    for index, entry in enumerate(manifest["tensors"]):
        while len(levels) <= entry["level"]:
            levels.append({})
        offset, scale = manifest_fill(entry["key"], entry["shape"])
        levels[entry["level"]][entry["key"]] = offset + scale * seeded_tensor(tuple(entry["shape"]), seed, index)
    return {"state_dict": levels, **copy.deepcopy(manifest["entries"])}


# ------------------------------------------------------------------------------------------ the tables
def parameter_table(method: Any, t: Any) -> tuple[ParityTable, dict[str, int]]:
    table = ParityTable("RLR parameters (EfficientNet-B6 stages 2-3 at 256 px, the README command)")
    counts: dict[str, int] = {}
    for i, (ours, theirs) in enumerate(zip(method.model.decoder.levels, t.models)):
        parts = {
            "reference": (theirs.ref_mca.numel(), ours.reference.numel()),
            "input + reference embeddings": (
                count(theirs.embedding) + count(theirs.ref_mca_embedding),
                count(ours.embedding) + count(ours.reference_embedding),
            ),
            f"{len(ours.layers)} layers": (count(theirs.encoder.encode_layers), count(ours.layers)),
            "final norm + projection": (
                count(theirs.encoder.norm) + count(theirs.projection),
                count(ours.norm) + count(ours.projection),
            ),
            "total": (count(theirs), count(ours)),
        }
        for name, (a, b) in parts.items():
            table.add(
                f"level {i} ({ours.grid_size[0]}x{ours.grid_size[1]}, C {ours.in_channels}, d {ours.hidden_dim}): "
                f"{name}",
                abs(a - b),
                0,
                a,
                b,
            )
        counts[f"level{i}"] = count(theirs)
    table.add(
        "backbone (timm features_only)",
        abs(count(method.model.backbone) - count(t.encoder)),
        0,
        count(t.encoder),
        count(method.model.backbone),
    )
    theirs_opt, ours_opt = t.optimizer, method.configure_optimizers()
    n_theirs = sum(p.numel() for g in theirs_opt.param_groups for p in g["params"])
    n_ours = sum(p.numel() for g in ours_opt.param_groups for p in g["params"])
    table.add("parameters in the optimiser", abs(n_theirs - n_ours), 0, n_theirs, n_ours)
    a, b = theirs_opt.param_groups[0], ours_opt.param_groups[0]
    hyper = [abs(float(a[k]) - float(b[k])) for k in ("lr", "eps", "weight_decay")]
    hyper += [abs(x - y) for x, y in zip(a["betas"], b["betas"])]
    desc = (
        f"{type(theirs_opt).__name__} lr {a['lr']}, betas {tuple(a['betas'])}, eps {a['eps']}, wd {a['weight_decay']}"
    )
    table.add(f"optimiser hyper-parameters ({desc})", max(hyper), 0, type(theirs_opt).__name__, type(ours_opt).__name__)
    counts["backbone"], counts["optimised"] = count(t.encoder), n_theirs
    return table, counts


def evaluation_table(
    off: SimpleNamespace, method: Any, t: Any, images: Tensor, masks: Tensor
) -> tuple[ParityTable, dict]:
    table = ParityTable("RLR evaluation: Trainer.test_separate vs ours (evaluate_images), seeded images")
    official = official_test(off, t, test_batches(images, masks, EVAL_LABELS))
    method.eval()
    with torch.no_grad():
        recons = method.model.decoder(method.model.extract_features(images))
    for i, (r, o) in enumerate(zip(recons, official["recon"])):
        table.add(
            f"eval reconstruction, level {i} (max abs x_hat {float(o.abs().max()):.3g})", max_abs_diff(as_tokens(r), o)
        )
    pixel_maps, scores = evaluate_images(method, images)
    gt = method.protocol.binarize_masks(masks)
    proto = method.protocol
    table.add(
        f"pixel map at 256 px under protocol={proto.name} (smooth_for_pixel={proto.smooth_for_pixel}; official "
        f"max {float(official['pixel_map'].max()):.4g})",
        max_abs_diff(pixel_maps, official["pixel_map"]),
    )
    table.add(
        "image scores (max of the sigma-4 map)",
        max_abs_diff(scores, official["image_scores"]),
        official=", ".join(f"{s:.5f}" for s in official["image_scores"].tolist()),
        ours=", ".join(f"{s:.5f}" for s in scores.tolist()),
    )
    table.add(
        "ground-truth masks (pixels that differ; both given 256-px binary masks)",
        float((gt != official["gt"]).sum()),
        0,
    )
    from mcad.metrics import auroc

    p_auroc = auroc(pixel_maps.flatten().numpy(), gt.flatten().numpy())
    i_auroc = auroc(scores.numpy(), np.array(EVAL_LABELS))
    table.add(
        "P-AUROC (official sklearn; ours mcad.metrics)",
        abs(p_auroc - official["p_auroc"]),
        1e-6,
        official["p_auroc"],
        p_auroc,
    )
    table.add("I-AUROC", abs(i_auroc - official["i_auroc"]), 1e-6, official["i_auroc"], i_auroc)
    smoothed = proto.smooth(proto.fuse(method.anomaly_maps(images).anomaly_map))
    table.add(
        "protocol=default instead: the smoothed pixel map vs the official pixel input (E2)",
        max_abs_diff(smoothed, official["pixel_map"]),
        None,
    )
    fixture = {
        "map_stats": map_stats(official["pixel_map"]),
        "pooled_maps": [pooled_map(m) for m in official["pixel_map"]],
        "image_scores": official["image_scores"].tolist(),
        "p_auroc": official["p_auroc"],
        "i_auroc": official["i_auroc"],
    }
    return table, fixture


def training_table(
    off: SimpleNamespace, method: Any, t_eval: Any, images: Tensor, jitter_seed: int, tmp: Path
) -> tuple[ParityTable, dict, dict]:
    table = ParityTable("RLR training: one batch of Trainer.train vs ours (jitter RNG aligned), float32")
    initial = copy.deepcopy(method.model.decoder.state_dict())
    runs = {
        legacy: official_train(off, official_trainer(off, tmp / f"train-{legacy}", method), images, jitter_seed, legacy)
        for legacy in (True, False)
    }
    ref = runs[False]
    with torch.no_grad():
        feats = method.model.extract_features(images)
    for i, f in enumerate(feats):
        table.add(
            f"pooled backbone features, level {i} (max {float(f.abs().max()):.3g})",
            max_abs_diff(as_tokens(f), ref["target"][i]),
        )
    # The official add_jitter on the same clean tokens and seed, vs ours with and without the extra draw.
    a = t_eval.args
    off.utils.init_seeds(jitter_seed)
    theirs = [
        t_eval.add_jitter(as_tokens(f), a.feature_jitter, a.noise_prob, a.device, a.with_mask) - as_tokens(f)
        for f in feats
    ]
    align_jitter(method, jitter_seed)
    ours = [as_tokens(j - f) for j, f in zip(method.model.jitter(feats), feats)]
    table.add(
        f"jitter noise, both levels (scale {a.feature_jitter}, all tokens; aligned RNG)", max_abs_diff(ours, theirs)
    )
    plain = FeatureJitter(
        method.model.jitter.scale, method.model.jitter.prob, torch.Generator().manual_seed(jitter_seed)
    )
    unaligned = [as_tokens(j - f) for j, f in zip(plain(feats), feats)]
    table.add(
        "jitter noise without the extra rand(B, L) draw (O5: same law, other numbers)",
        max_abs_diff(unaligned, theirs),
        None,
    )

    recipe = method.optimization
    ours_legacy = our_step(method, images, "shared_adam_legacy", jitter_seed, initial)
    ours_summed = our_step(method, images, "summed", jitter_seed, initial)
    recon = our_train_recon(method, images, jitter_seed, initial)
    for i in range(2):
        loss = ref["mse"][i] + ref["cos"][i]
        table.add(f"train reconstruction (jittered input), level {i}", max_abs_diff(recon[i], ref["recon"][i]))
        table.add(
            f"train loss, level {i} (official MSE {ref['mse'][i]:.6f} + cos {ref['cos'][i]:.6f})",
            abs(ours_summed["losses"][i] - loss),
            1e-5,
            loss,
            ours_summed["losses"][i],
        )
    for i in range(2):
        scale = max(float(g.abs().max()) for g in ref["grads"][i])
        table.add(
            f"gradient, level {i}, all {sum(g.numel() for g in ref['grads'][i]):,} weights (max abs g {scale:.3g}; "
            "tol 1e-4 relative)",
            flat_diff(ours_summed["grads"][i], ref["grads"][i]),
            1e-4 * scale,
        )
    for name, ours_run, official in (
        ("shared_adam_legacy", ours_legacy, runs[True]),
        ("summed", ours_summed, runs[False]),
    ):
        zero_grad = "set_to_none=False" if official is runs[True] else "set_to_none=True"
        for i in range(2):
            well = [g.abs() >= STEP_GRAD_FLOOR for g in official["grads"][i]]
            share = sum(int(w.sum()) for w in well) / sum(w.numel() for w in well)
            size = update_summary(official["params"][i], official["before"][i])["max"]
            table.add(
                f"after one batch, level {i}: {name} vs official ({zero_grad}), weights with abs g >= 1e-6 "
                f"({share:.1%}; max update {size:.3g})",
                flat_diff(ours_run["params"][i], official["params"][i], well),
                STEP_TOL,
            )
            table.add(
                f"after one batch, level {i}: {name} vs official, all weights (float32 Adam near abs g ~ eps)",
                flat_diff(ours_run["params"][i], official["params"][i]),
                None,
            )
        table.add(
            f"Adam step counters per level after one batch: {name}",
            float(ours_run["adam_steps"] != official["adam_steps"]),
            0,
            str(official["adam_steps"]),
            str(ours_run["adam_steps"]),
        )
    for i in range(2):
        table.add(
            f"official set_to_none=False vs True, level {i} (E-RLR1: the schedules really differ)",
            flat_diff(runs[True]["params"][i], runs[False]["params"][i]),
            None,
        )
    trainer, fitted = lightning_step(method, images, jitter_seed, initial)
    official = runs[True] if recipe == "shared_adam_legacy" else runs[False]
    well = [[g.abs() >= STEP_GRAD_FLOOR for g in official["grads"][i]] for i in range(2)]
    table.add(
        f"Lightning fit of the recipe (method.optimization={recipe}), both levels, abs g >= 1e-6",
        max(flat_diff(fitted[i], official["params"][i], well[i]) for i in range(2)),
        STEP_TOL,
    )
    expected = 1 if recipe == "summed" else 2
    table.add(
        "Lightning global_step after one batch (optimiser steps)",
        float(trainer.global_step != expected),
        0,
        expected,
        trainer.global_step,
    )
    method.model.decoder.load_state_dict(initial)
    fixture = {
        "losses": [ref["mse"][i] + ref["cos"][i] for i in range(2)],
        "update": {
            "shared_adam_legacy": [update_summary(runs[True]["params"][i], runs[True]["before"][i]) for i in range(2)],
            "summed": [update_summary(runs[False]["params"][i], runs[False]["before"][i]) for i in range(2)],
        },
        "adam_steps": {"shared_adam_legacy": runs[True]["adam_steps"], "summed": runs[False]["adam_steps"]},
    }
    return table, fixture, runs


def float64_table(off: SimpleNamespace, seed: int, tmp: Path) -> ParityTable:
    """The one-batch step in float64, jitter off, both sides on our rounded position tables: logic, not rounding."""
    table = ParityTable("RLR training step in float64 (batch 1, jitter off, the same position tables)")
    previous = torch.get_default_dtype()
    method = seeded_method(seed).double()
    method.model.jitter = None
    images = seeded_images(seed, 1, SIZE).double()
    initial = copy.deepcopy(method.model.decoder.state_dict())
    torch.set_default_dtype(torch.float64)
    try:
        runs = {}
        for legacy in (True, False):
            t = official_trainer(off, tmp / f"f64-{legacy}", method, feature_jitter=0.0, batch_size=1)
            use_our_position_tables(method, t)
            t.encoder = InDefaultDtype(t.encoder)  # trainer.py:154 casts the images to float32
            runs[legacy] = official_train(off, t, images, seed, legacy)
    finally:
        torch.set_default_dtype(previous)
    for name, official in (("shared_adam_legacy", runs[True]), ("summed", runs[False])):
        ours = our_step(method, images, name, None, initial)
        for i in range(2):
            zero_grad = "set_to_none=False" if official is runs[True] else "set_to_none=True"
            table.add(
                f"after one batch, level {i}: {name} vs official ({zero_grad}), all weights",
                flat_diff(ours["params"][i], official["params"][i]),
                STEP_TOL_64,
            )
        table.add(
            f"train losses, {name}",
            max(abs(a - b - c) for a, b, c in zip(ours["losses"], official["mse"], official["cos"])),
            1e-12,
        )
    for i in range(2):
        table.add(
            f"official set_to_none=False vs True, level {i}",
            flat_diff(runs[True]["params"][i], runs[False]["params"][i]),
            None,
        )
    return table


def checkpoint_table(
    off: SimpleNamespace, method: Any, runs: dict, images: Tensor, masks: Tensor, seed: int, tmp: Path
) -> tuple[ParityTable, dict]:
    table = ParityTable("RLR official model files (trainer.py:209-228) -> mcad.methods.rlr.official")
    saved_dir = runs[False]["save_dir"]
    state = torch.load(saved_dir / "best-img.pth", map_location="cpu", weights_only=True)
    manifest = manifest_of(state)
    table.add(
        f"written by Trainer.train: {', '.join(sorted(os.listdir(saved_dir)))}; keys {manifest['top_level_keys']}; "
        f"{len(manifest['tensors'])} tensors",
        None,
        None,
    )
    # The official weights after the batch, converted, against our own weights after the same batch.
    converted = convert_official_checkpoint(state, target=method.state_dict())
    names = [[n for n, _ in level.named_parameters()] for level in method.model.decoder.levels]
    worst = max(
        float(
            (converted[f"model.decoder.levels.{i}.{n}"] - p.reshape(converted[f"model.decoder.levels.{i}.{n}"].shape))
            .abs()
            .max()
        )
        for i, level in enumerate(runs[False]["params"])
        for n, p in zip(names[i], level)
    )
    table.add(f"convert_official_checkpoint: {len(converted)} tensors vs the official trained parameters", worst, 0)
    # A file of the same format with seeded values, loaded by the official `--mode test` path (best-img.pth).
    rebuilt = state_from_manifest(manifest, seed + CHECKPOINT_SEED_OFFSET)
    root = tmp / "ckpt"
    (root / README_ARGS["save_prefix"]).mkdir(parents=True)
    torch.save(rebuilt, root / README_ARGS["save_prefix"] / "best-img.pth")
    t = official_trainer(off, tmp / "ckpt-model", method, copy_decoder=False)
    official = official_test(off, t, test_batches(images, masks, EVAL_LABELS), checkpoint_path=str(root))
    fresh = seeded_method(seed)
    kept = load_official_checkpoint(fresh, rebuilt)
    table.add(
        f"load_official_checkpoint: keys left to the backbone config ({len(kept)}), others",
        float(sum(".backbone." not in f".{k}" for k in kept)),
        0,
    )
    maps, scores = evaluate_images(fresh, images)
    table.add(
        "pixel map: official test() loads the file vs ours loads the converted file",
        max_abs_diff(maps, official["pixel_map"]),
    )
    table.add("image scores", max_abs_diff(scores, official["image_scores"]))
    fixture = {
        "saved_by": "trainer.py:209-228 (best-img.pth; loaded by trainer.py:234-238)",
        "manifest": manifest,
        "seed": seed + CHECKPOINT_SEED_OFFSET,
        "fill": "tensor i = offset + scale * seeded_tensor(shape, seed, i); ref_mca (0, 1); 1-D weight (1, 0.1); "
        "1-D bias (0, 0.02); otherwise (0, 1/sqrt(prod(shape[1:])))",
        "map_stats": map_stats(official["pixel_map"]),
        "pooled_maps": [pooled_map(m) for m in official["pixel_map"]],
        "image_scores": official["image_scores"].tolist(),
    }
    return table, fixture


def real_image_table(off: SimpleNamespace, method: Any, t: Any, root: Path, class_name: str, tmp: Path) -> ParityTable:
    """Real test images through both data paths: what the resize filter (D1) and mask rule (E5) change."""
    from PIL import Image

    from mcad.build import build_components

    table = ParityTable(
        f"RLR on real images ({class_name}, 4 test images): official datasets/base.py vs our data module"
    )
    if not hasattr(Image, "ANTIALIAS"):
        Image.ANTIALIAS = Image.Resampling.LANCZOS  # the Pillow < 10 alias that base.py:19 uses
    args = official_args(tmp / "real", data_path=str(root))
    dataset = off.mvtec.MVTecDataset(args, is_train=False, class_name=class_name)
    picks = [0, 1, len(dataset) - 2, len(dataset) - 1]  # two defects (sorted first), two good images
    items = [dataset[i] for i in picks]
    o_images, o_masks = torch.stack([it[0] for it in items]), torch.stack([it[2] for it in items])
    labels = [int(it[1]) for it in items]
    cfg = compose(
        [
            *OVERRIDES,
            "data=folder",
            f"data.root={root}",
            f"data.classes=[{class_name}]",
            "data.num_workers=0",
            "data.cache_decoded=false",
        ]
    )
    _, datamodule = build_components(cfg)
    datamodule.setup("test")
    by_path = {os.path.abspath(r.image_path): i for i, r in enumerate(datamodule.test_dataset.records)}
    ours_items = [datamodule.test_dataset[by_path[os.path.abspath(dataset.x[i])]] for i in picks]
    m_images = torch.stack([it["image"] for it in ours_items])
    m_masks = torch.stack([it["mask"] for it in ours_items])
    pixels = ((o_images - m_images) * torch.tensor(args.norm_std).view(1, 3, 1, 1) * 255).abs()
    table.add(
        f"images: abs(official PIL Lanczos - ours) in 1/255 (mean {float(pixels.mean()):.3f}, 99th percentile "
        f"{float(pixels.flatten().quantile(0.99)):.2f})",
        float(pixels.max()),
        None,
    )
    gt_official = (o_masks.squeeze(1) > 0).to(torch.uint8)  # NEAREST resize (base.py:24), bool cast (trainer.py:331)
    gt_ours = method.protocol.binarize_masks(m_masks)
    table.add(
        f"GT masks: pixels that differ (of {int(gt_official.sum())} official positives)",
        float((gt_official != gt_ours).sum()),
        None,
    )
    official = official_test(off, t, test_batches(o_images, o_masks, labels))
    maps_same, scores_same = evaluate_images(method, o_images)
    maps_ours, scores_ours = evaluate_images(method, m_images)
    top = float(official["pixel_map"].max())
    table.add(
        f"pixel map, ours on the official input tensors (official max {top:.3g})",
        max_abs_diff(maps_same, official["pixel_map"]),
    )
    table.add("image scores, ours on the official input tensors", max_abs_diff(scores_same, official["image_scores"]))
    table.add(
        "pixel map, ours on our own loading (resize filter D1)", max_abs_diff(maps_ours, official["pixel_map"]), None
    )
    table.add("image scores, ours on our own loading", max_abs_diff(scores_ours, official["image_scores"]), None)
    return table


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], OFFICIAL)
    p.add_argument("--real-data", default=None, help="MVTec-layout folder: also measure the resize filter's effect")
    p.add_argument("--real-class", default="bottle")
    p.add_argument("--skip-float64", action="store_true", help="skip the float64 rerun of the training step")
    args = p.parse_args(argv)
    folder = checkout(args.official, OFFICIAL, allow_other_commit=args.allow_other_commit)
    off = import_official(folder)
    # The official code writes its model files (about 90 MB each) into save folders: all under one temporary folder.
    with tempfile.TemporaryDirectory(prefix="rlr-parity-") as folder:
        return run(args, off, Path(folder))


def run(args: argparse.Namespace, off: SimpleNamespace, tmp: Path) -> int:
    """All tables (and the fixture) with the official code's files under ``tmp``."""
    seed, jitter_seed = args.seed, args.seed + JITTER_SEED_OFFSET
    method = seeded_method(seed)
    train_images = seeded_images(seed, TRAIN_BATCH, SIZE)
    eval_images = seeded_images(seed + 1, EVAL_BATCH, SIZE)
    masks = eval_masks()
    t_eval = official_trainer(off, tmp / "eval", method)

    params, counts = parameter_table(method, t_eval)
    evaluation, eval_fixture = evaluation_table(off, method, t_eval, eval_images, masks)
    training, train_fixture, runs = training_table(off, method, t_eval, train_images, jitter_seed, tmp)
    files, ckpt_fixture = checkpoint_table(off, method, runs, eval_images, masks, seed, tmp)
    tables = [params, evaluation, training]
    if not args.skip_float64:
        tables.append(float64_table(off, seed, tmp))
    tables.append(files)
    if args.real_data:
        tables.append(real_image_table(off, method, t_eval, Path(args.real_data), args.real_class, tmp))
    if args.write_fixture:
        write_fixture("rlr", {
            "method": "rlr", "official": {"repo": OFFICIAL.name, "commit": OFFICIAL.commit}, "seed": seed,
            "overrides": OVERRIDES, "references": "seeded_init_, then multiplied by sqrt(L * C) (unit variance)",
            "input": {"train": {"seeded_images": [seed, TRAIN_BATCH, SIZE]},
                      "eval": {"seeded_images": [seed + 1, EVAL_BATCH, SIZE], "labels": EVAL_LABELS,
                               "boxes": {str(k): list(v) for k, v in BOXES.items()}},
                      "jitter_seed": jitter_seed,
                      "jitter": "torch.Generator seeded with jitter_seed; before each level's noise, rand(B, h*w)"},
            "param_counts": counts, "eval": eval_fixture, "train": train_fixture, "checkpoint": ckpt_fixture,
        })  # fmt: skip
    return finish(tables)


if __name__ == "__main__":
    sys.exit(main())
