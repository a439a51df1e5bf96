"""Parity of ``method=rd`` with the official Reverse Distillation code.

Two variants, one table each:

* ``--variant ader`` (default): the multi-class recipe of zhangzjn/ADer 902937a (``model/rd.py::RD``,
  ``trainer/rd_trainer.py``, ``loss/base_loss.py::CosLoss``, ``util/metric.py::cal_anomaly_map``), built from
  its own config ``configs/benchmark/rd/rd_256_100e.py``, against ``experiment=rd_mvtec``. AD-LGC HEAD's
  ``model/rd.py::RD`` is the same model.
* ``--variant rd4ad``: the original hq-deng/RD4AD 6554076 (``resnet.py`` encoder + ``BN_layer`` of width 128,
  ``de_resnet.py``, ``main.py::loss_fucntion``, ``test.py::cal_anomaly_map``), against ``experiment=rd_mvtec
  method.ocbe.base_width=128``.

Weights: :func:`mcad.utils.seeded.seeded_init_` on our model, copied into the official modules through the key
map of :mod:`mcad.methods.rd.official` (the checkpoint converter's; the forward comparison checks that map). RD4AD's
encoder is a torchvision-layout ResNet: our timm teacher is copied into it by order and shape (its unused
``layer4``/``fc`` keep their initialisation). Inputs: ``seeded_images(seed, batch, size)``. A training step of
RD draws no random numbers.

Checkpoint import: an official-format file (RD4AD ``{'bn', 'decoder'}``; ADer's trainer checkpoint) is rebuilt
from its manifest with values seeded by order, loaded into the official model by the official loading code and
into ours by :func:`mcad.methods.rd.official.convert_official_checkpoint`; the two maps are compared.

Run: ``python experiments/parity/rd.py --official /work/official/ADer`` or ``--variant rd4ad --official
/work/official/RD4AD``; ``--write-fixture`` writes ``tests/fixtures/parity/rd.json`` / ``rd4ad.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mcad.methods.rd.official import ader_key, convert_official_checkpoint, rd4ad_key  # noqa: E402
from mcad.utils.seeded import seeded_images, seeded_init_  # noqa: E402

REPOS = {
    "ader": common.OfficialRepo("zhangzjn/ADer", "902937a"),
    "rd4ad": common.OfficialRepo("hq-deng/RD4AD", "6554076"),
}
FIXTURE = {"ader": "rd", "rd4ad": "rd4ad"}
SIZE, BATCH = 64, 2

# The official ADer map is the level sum / (levels x sum of weights) = sum / 9 (util/metric.py:287-292); RD4AD
# sums the levels (test.py:36-44); ours is their mean. official x SCALE_TO_OURS = ours.
SCALE_TO_OURS = {"ader": 3.0, "rd4ad": 1.0 / 3.0}


def overrides(variant: str, size: int = SIZE) -> list[str]:
    """Our side: the paper recipe, random teacher weights, evaluation at the input size (as the official maps)."""
    base = ["experiment=rd_mvtec", "backbone.pretrained=false", f"data.image_size={size}", f"protocol.eval_size={size}"]
    return base + (["method.ocbe.base_width=128"] if variant == "rd4ad" else [])


# ------------------------------------------------------------------------------------------ helpers
def n_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def copy_ours_into(official: nn.Module, ours: dict[str, Tensor], key_of: Callable[[str], str | None]) -> int:
    """Copies our tensors into ``official`` through ``key_of(official key) -> our key | None`` (shapes checked)."""
    mapped = {}
    for key, ref in official.state_dict().items():
        our_key = key_of(key)
        if our_key is None:
            continue
        if tuple(ours[our_key].shape) != tuple(ref.shape):
            raise ValueError(f"{key}{tuple(ref.shape)} <- {our_key}{tuple(ours[our_key].shape)}")
        mapped[key] = ours[our_key].detach().clone()
    official.load_state_dict(mapped, strict=False)
    return len(mapped)


def as_tensor(maps: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(maps, dtype=np.float64))


def map_entry(maps: Tensor) -> dict[str, Any]:
    """Fixture entry of ``(B, S, S)`` official maps (already on our scale): statistics, pooled maps, scores."""
    return {
        "stats": [common.map_stats(m) for m in maps],
        "pooled": [common.pooled_map(m) for m in maps],
        "scores": maps.flatten(1).amax(dim=1).tolist(),
    }


def fixture_head(
    name: str, variant: str, repo: common.OfficialRepo, seed: int, inputs: dict[str, Any], ours: list[str]
) -> dict[str, Any]:
    return {
        "method": name,
        "variant": variant,
        "official": {"repo": repo.name, "commit": repo.commit},
        "seed": seed,
        "input": inputs,
        "overrides": ours,
    }


def clip_value(ours: list[str]) -> float:
    """Our gradient clipping (Lightning ``gradient_clip_val``, algorithm ``norm``) from the composed config."""
    cfg = common.compose(ours)
    if cfg.trainer.get("gradient_clip_algorithm") not in (None, "norm"):
        raise SystemExit("the parity step reproduces Lightning's norm clipping only")
    return float(cfg.trainer.gradient_clip_val)


# ------------------------------------------------------------------------------------------ official sides
class AderRD:
    """ADer's ``RD`` from its config (``rd_256_100e.py``) and the steps of its trainer (``rd_trainer.py``)."""

    fmt = "ader"

    def __init__(self, ob: Any) -> None:
        self.ob = ob
        self.cfg = ob.cfg
        # The one change to the official config: no ImageNet download for the teacher (random weights).
        self.cfg.model_t.kwargs.update(pretrained=False, checkpoint_path=None)
        self.net = ob.get_model(self.cfg.model)
        self.loss_terms = ob.get_loss_terms(self.cfg.loss.loss_terms, device="cpu")
        self.evaluator = ob.modules["util.metric"].Evaluator

    def parts(self) -> dict[str, nn.Module]:
        return {"teacher": self.net.net_t, "ocbe": self.net.mff_oce, "decoder": self.net.net_s}

    def load_ours(self, ours: dict[str, Tensor]) -> int:
        return copy_ours_into(self.net, ours, ader_key)

    def train(self, mode: bool) -> None:
        self.net.train(mode)  # RD.train keeps net_t frozen in eval mode (model/rd.py)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self.net(images)  # RDTrainer.forward (rd_trainer.py:47-48)

    def losses(self, out: Any, labels: Tensor | None = None) -> dict[str, Tensor]:
        return {"cos": self.loss_terms["cos"](*out)}  # RDTrainer.optimize_parameters (rd_trainer.py:54)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        # BaseTrainer.__init__: get_optim(cfg.optim.kwargs, net, lr=cfg.optim.lr); the step schedule keeps the first
        # iteration at the base LR.
        return [common.ader_adam(self.cfg.optim.kwargs, self.net, lr=self.cfg.optim.lr)]

    def clip(self) -> None:
        # BaseTrainer.backward_term: dispatch_clip_grad(self.net.parameters(), value=cfg.loss.clip_grad)
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad(self.net.parameters(), value=self.cfg.loss.clip_grad)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {ader_key(k): p for k, p in self.net.named_parameters() if p.requires_grad}

    def mapped_state(self) -> dict[str, Tensor]:
        return {ader_key(k): v for k, v in self.net.state_dict().items()}

    def eval_features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self.forward(images)

    def anomaly_map(self, teacher: list[Tensor], student: list[Tensor], size: int) -> Tensor:
        # RDTrainer.test (rd_trainer.py:84): uni_am=False, amap_mode='add', gaussian_sigma=4
        amap, _ = self.evaluator.cal_anomaly_map(
            teacher, student, [size, size], uni_am=False, amap_mode="add", gaussian_sigma=4
        )
        return as_tensor(amap)

    def checkpoint_object(self) -> dict[str, Any]:
        """The structure ``BaseTrainer.save_checkpoint`` writes to ``ckpt.pth`` (_base_trainer.py:232-246)."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizers()[0].state_dict(),
            "scheduler": {},
            "scaler": None,
            "iter": 0,
            "epoch": 0,
            "metric_recorder": {},
            "total_time": 0.0,
        }

    def load_file(self, path: Path) -> None:
        """The official loader: ``get_model`` with ``model.kwargs['checkpoint_path']`` (``ckpt['net']``, strict)."""
        self.cfg.model.kwargs["checkpoint_path"] = str(path)
        self.net = self.ob.get_model(self.cfg.model)
        self.cfg.model.kwargs["checkpoint_path"] = ""


class Rd4ad:
    """RD4AD's encoder, ``BN_layer`` and decoder as ``main.py::train`` builds and steps them."""

    fmt = "rd4ad"

    def __init__(self, mods: dict[str, Any]) -> None:
        self.mods = mods
        self.encoder, self.bn = mods["resnet"].wide_resnet50_2(pretrained=False)
        self.decoder = mods["de_resnet"].de_wide_resnet50_2(pretrained=False)
        self.encoder.eval()  # main.py:86

    def parts(self) -> dict[str, nn.Module]:
        return {"teacher": self.encoder, "ocbe": self.bn, "decoder": self.decoder}

    def load_ours(self, ours: dict[str, Tensor]) -> int:
        teacher = {k[len("model.teacher.model.") :]: v for k, v in ours.items() if k.startswith("model.teacher.model.")}
        copied = common.copy_by_order(teacher, self.encoder, skip=("layer4", "fc"))
        copied += copy_ours_into(self.bn, ours, lambda k: rd4ad_key("bn", k))
        return copied + copy_ours_into(self.decoder, ours, lambda k: rd4ad_key("decoder", k))

    def train(self, mode: bool) -> None:
        self.bn.train(mode)  # main.py:95-96; the encoder stays in eval mode
        self.decoder.train(mode)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        inputs = self.encoder(images)  # main.py:98-99
        return inputs, self.decoder(self.bn(inputs))

    def losses(self, out: Any, labels: Tensor | None = None) -> dict[str, Tensor]:
        return {"cos": self.mods["main"].loss_fucntion(*out)}  # main.py:100

    def optimizers(self) -> list[torch.optim.Optimizer]:
        # main.py:90: Adam(list(decoder.parameters()) + list(bn.parameters()), lr=0.005, betas=(0.5, 0.999))
        params = list(self.decoder.parameters()) + list(self.bn.parameters())
        return [torch.optim.Adam(params, lr=0.005, betas=(0.5, 0.999))]

    def clip(self) -> None:
        """RD4AD does not clip gradients (main.py:101-103)."""

    def named_trainable(self) -> dict[str, nn.Parameter]:
        out = {rd4ad_key("bn", k): p for k, p in self.bn.named_parameters()}
        out.update({rd4ad_key("decoder", k): p for k, p in self.decoder.named_parameters()})
        out.pop(None, None)  # conv4 / bn4: in the optimiser, never used, no gradient
        return out

    def mapped_state(self) -> dict[str, Tensor]:
        out = {rd4ad_key("bn", k): v for k, v in self.bn.state_dict().items()}
        out.update({rd4ad_key("decoder", k): v for k, v in self.decoder.state_dict().items()})
        out.pop(None, None)
        return out

    def eval_features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self.forward(images)

    def anomaly_map(self, teacher: list[Tensor], student: list[Tensor], size: int) -> Tensor:
        # test.py::evaluation runs batch 1 (test.py:78-81): cal_anomaly_map(inputs, outputs, img.shape[-1],
        # amap_mode='a'), then gaussian_filter(sigma=4); here image by image.
        from scipy.ndimage import gaussian_filter

        maps = []
        for b in range(teacher[0].shape[0]):
            amap, _ = self.mods["test"].cal_anomaly_map(
                [t[b : b + 1] for t in teacher], [s[b : b + 1] for s in student], size, amap_mode="a"
            )
            maps.append(gaussian_filter(amap, sigma=4))
        return as_tensor(np.stack(maps))

    def checkpoint_object(self) -> dict[str, Any]:
        return {"bn": self.bn.state_dict(), "decoder": self.decoder.state_dict()}  # main.py:112-113

    def load_file(self, path: Path) -> None:
        # test.py:124-129: torch.load, drop the 'memory' keys of bn, load decoder and bn (strict).
        ckp = torch.load(path, weights_only=True)
        for k in list(ckp["bn"]):
            if "memory" in k:
                ckp["bn"].pop(k)
        self.decoder.load_state_dict(ckp["decoder"])
        self.bn.load_state_dict(ckp["bn"])


# RD4AD's test.py / main.py import plotting and table packages at module level; none is used on these paths.
RD4AD_SHIMS: dict[str, dict[str, Any]] = {
    "matplotlib": {"use": lambda *a, **k: None},
    "matplotlib.pyplot": {},
    "matplotlib.ticker": {"NullFormatter": object},
    "pandas": {},
}


@contextlib.contextmanager
def rd4ad_codebase(folder: Path) -> Iterator[dict[str, Any]]:
    with common.shim_modules(RD4AD_SHIMS), common.official_imports(folder):
        yield {name: importlib.import_module(name) for name in ("resnet", "de_resnet", "test", "main")}


# ------------------------------------------------------------------------------------------ comparisons
def compare_params(side: Any, ours: dict[str, nn.Module], table: common.ParityTable) -> dict[str, int]:
    """Parameter counts per module; RD4AD's never-used modules are reported as known differences."""
    counts = {}
    for name, ours_part in ours.items():
        part = side.parts()[name]
        official_n, ours_n = n_params(part), n_params(ours_part)
        unused = ()
        if side.fmt == "rd4ad" and name == "teacher":
            unused = ("layer4", "fc")
        elif side.fmt == "rd4ad" and name == "ocbe":
            unused = ("conv4", "bn4")
        if unused:
            used = sum(p.numel() for k, p in part.named_parameters() if not k.startswith(unused))
            table.add(f"params {name}, official incl. never-used {'/'.join(unused)}", None, None, official_n, ours_n)
            table.add(f"params {name} without {'/'.join(unused)}", abs(used - ours_n), 0, used, ours_n)
            official_n = used
        else:
            table.add(f"params {name}", abs(official_n - ours_n), 0, official_n, ours_n)
        counts[name] = official_n
    return counts


def compare_step(
    side: Any,
    method: Any,
    loss_off: Tensor,
    loss_our: Tensor,
    clip: float,
    table: common.ParityTable,
    fixture: dict[str, Any],
) -> None:
    """Gradients, their norm, and one optimiser step (official optimisers + clipping vs ours + Lightning's clip)."""
    opts_off = side.optimizers()
    opt_our, _ = common.our_optimizer(method)
    for opt in [*opts_off, opt_our]:
        opt.zero_grad()
    loss_off.backward()
    loss_our.backward()
    named_off = side.named_trainable()
    named_our = {k: p for k, p in method.named_parameters() if p.requires_grad}
    keys = sorted(named_our)
    if sorted(named_off) != keys:
        raise RuntimeError(f"trainable parameters differ: {sorted(set(named_off) ^ set(named_our))[:10]}")
    p_off, p_our = [named_off[k] for k in keys], [named_our[k] for k in keys]
    g_max = max(float(p.grad.abs().max()) for p in p_off)
    norm_off, norm_our = common.grad_norm(p_off), common.grad_norm(p_our)
    # Both sides run the same float32 operations, but autograd may sum branch gradients in another order (and the
    # CCL terms are written with logsumexp): 1e-5 relative to the largest gradient element (at least 1e-5).
    table.add(
        f"gradients, all {len(keys)} trainable tensors (max abs g {g_max:.3g}; tol 1e-5 x max(1, max abs g))",
        common.max_abs_diff([p.grad for p in p_off], [p.grad for p in p_our]),
        1e-5 * max(1.0, g_max),
    )
    table.add("gradient norm before clipping", abs(norm_off - norm_our), 1e-5 * max(1.0, norm_off), norm_off, norm_our)
    fixture["grad_norm"] = norm_off

    side.clip()
    torch.nn.utils.clip_grad_norm_(common.optimizer_params(opt_our), clip)  # Lightning: gradient_clip_val, norm
    if side.fmt == "rd4ad" and norm_off > clip:
        table.add(
            f"clipped gradients (RD4AD never clips; ours clips the norm at {clip:g}, ADer's recipe)",
            common.max_abs_diff([p.grad for p in p_off], [p.grad for p in p_our]),
            None,
        )
    # The optimisers themselves: our gradients replaced by the official (clipped) ones, then one step each.
    before = [p.detach().clone() for p in p_our]
    own = [p.grad.clone() for p in p_our]
    for p, q in zip(p_our, p_off):
        p.grad = q.grad.clone()
    for opt in opts_off:
        opt.step()
    opt_our.step()
    table.add(
        "one optimiser step from identical (official) gradients: parameters", common.max_abs_diff(p_off, p_our), 1e-7
    )
    # The step from our own gradients. Adam's first step is lr * g / (|g| + eps), about lr * sign(g): a gradient
    # element at float32 noise level around 0 can move by opposite +-lr on the two sides.
    with torch.no_grad():
        for p, b in zip(p_our, before):
            p.copy_(b)
    opt_our.state.clear()
    for p, g in zip(p_our, own):
        p.grad = g
    opt_our.step()
    diffs = [(q.detach() - p.detach()).abs().flatten() for p, q in zip(p_off, p_our)]
    g_ref = torch.cat([p.grad.detach().abs().flatten() for p in p_off])
    moved = torch.cat(diffs) > 1e-6
    g_at = float(g_ref[moved].max()) if bool(moved.any()) else 0.0
    table.add(
        f"one optimiser step from each side's own gradients: parameters ({int(moved.sum()):,} of "
        f"{g_ref.numel():,} elements differ by > 1e-6, all with abs g <= {g_at:.1e})",
        max(float(d.max()) for d in diffs),
        None,
    )


def compare_checkpoint(
    side: Any,
    method: Any,
    images: Tensor,
    size: int,
    seed: int,
    scale: float,
    convert: Callable[..., dict[str, Tensor]],
    table: common.ParityTable,
    fixture: dict[str, Any],
) -> None:
    """An official-format file with seeded values: official loader + map vs our converter + map."""
    manifest = common.file_manifest(side.checkpoint_object())
    rebuilt = common.rebuild_from_manifest(manifest, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pth"
        torch.save(rebuilt, path)
        side.load_file(path)
        loaded = torch.load(path, weights_only=True)
    side.train(False)
    with torch.no_grad():
        off_map = side.anomaly_map(*side.eval_features(images), size) * scale
    method.load_state_dict(convert(loaded, reference=method.state_dict()))
    our_map, our_scores = common.evaluate_images(method, images)
    table.add(
        f"checkpoint import ({side.fmt} file -> convert_official_checkpoint): map",
        common.max_abs_diff(off_map, our_map),
        official=float(off_map.max()),
        ours=float(our_map.max()),
    )
    table.add("checkpoint import: image scores", common.max_abs_diff(off_map.flatten(1).amax(dim=1), our_scores))
    fixture["checkpoint"] = {"format": side.fmt, "manifest": manifest, "seed": seed, "map": map_entry(off_map)}


def compare_eval(
    side: Any, method: Any, images: Tensor, size: int, scale: float, table: common.ParityTable, fixture: dict[str, Any]
) -> None:
    """Eval-mode features, the anomaly map at evaluation size (smoothed) and the image scores."""
    side.train(False)
    method.eval()
    with torch.no_grad():
        t_off, s_off = side.eval_features(images)
        out = method.model(images)
        t_our, s_our = out.teacher, out.student
    table.add("eval teacher features (3 levels)", common.max_abs_diff(t_off, t_our))
    table.add("eval student features (3 levels)", common.max_abs_diff(s_off, s_our))
    off_map = side.anomaly_map(t_off, s_off, size) * scale
    our_map, our_scores = common.evaluate_images(method, images)
    off_scores = off_map.flatten(1).amax(dim=1)  # image score = max of the smoothed map in both codes
    table.add(
        f"anomaly map {size}x{size}, smoothed (official x {scale:.4g})",
        common.max_abs_diff(off_map, our_map),
        official=float(off_map.max()),
        ours=float(our_map.max()),
    )
    table.add(
        "image scores",
        common.max_abs_diff(off_scores, our_scores),
        official=float(off_scores[0]),
        ours=float(our_scores[0]),
    )
    fixture["map"] = {"scale_to_ours": scale, **map_entry(off_map)}


def running_stats(side: Any, method: Any, table: common.ParityTable, prefix: str) -> None:
    off_state, our_state = side.mapped_state(), method.state_dict()
    running = [k for k in our_state if k.startswith(prefix) and "running" in k]
    table.add(
        f"OCBE BN running stats after the pass ({len(running)} tensors)",
        common.max_abs_diff([off_state[k] for k in running], [our_state[k] for k in running]),
    )


# ------------------------------------------------------------------------------------------ the check
def run(variant: str, folder: Path, seed: int, write: bool, size: int = SIZE, batch: int = BATCH) -> common.ParityTable:
    ours_over = overrides(variant, size)
    clip = clip_value(ours_over)
    method = common.build_method(ours_over)
    seeded_init_(method.model, seed)
    images = seeded_images(seed, batch, size)
    repo = REPOS[variant]
    table = common.ParityTable(
        f"RD ({variant}: {repo.name}@{repo.commit}) vs `{' '.join(ours_over)}`, seed {seed}, batch {batch}, {size} px"
    )
    inputs = {"fn": "seeded_images", "seed": seed, "batch": batch, "size": size}
    fixture = fixture_head("rd", variant, repo, seed, inputs, ours_over)
    if variant == "ader":
        modules = ["model.ad_factory", "model.rd", "loss.base_loss", "util.metric"]
        codebase = common.ader_codebase(folder, "configs.benchmark.rd.rd_256_100e", modules)
    else:
        codebase = rd4ad_codebase(folder)
    with codebase as handle:
        side = AderRD(handle) if variant == "ader" else Rd4ad(handle)
        ours_sd = method.state_dict()
        copied = side.load_ours(ours_sd)
        model = method.model
        counts = compare_params(side, {"teacher": model.teacher, "ocbe": model.ocbe, "decoder": model.decoder}, table)
        trainable = n_params(model, trainable=True)
        table.add(
            "params trainable (OCBE + decoder)",
            abs(counts["ocbe"] + counts["decoder"] - trainable),
            0,
            counts["ocbe"] + counts["decoder"],
            trainable,
        )
        fixture["params"] = {**counts, "trainable": counts["ocbe"] + counts["decoder"]}
        table.add("tensors copied ours -> official", abs(copied - len(ours_sd)), 0, copied, len(ours_sd))

        compare_eval(side, method, images, size, SCALE_TO_OURS[variant], table, fixture)

        # One training step: train mode (BatchNorm on batch statistics, running statistics updated once).
        side.train(True)
        method.train()
        out_off = side.forward(images)
        loss_off = side.losses(out_off)["cos"]
        captured: list[Any] = []
        hook = model.decoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
        loss_our = method.training_losses({"image": images})["loss"]  # our training step's loss
        hook.remove()
        table.add("train student features", common.max_abs_diff(out_off[1], captured[0]))
        table.add(
            "loss (global cosine, train mode)",
            common.max_abs_diff(loss_off, loss_our),
            official=loss_off.item(),
            ours=loss_our.item(),
        )
        fixture["losses"] = {"cos": loss_off.item()}
        running_stats(side, method, table, "model.ocbe.")
        compare_step(side, method, loss_off, loss_our, clip, table, fixture)

        compare_checkpoint(
            side, method, images, size, seed, SCALE_TO_OURS[variant], convert_official_checkpoint, table, fixture
        )
    if write:
        common.write_fixture(FIXTURE[variant], fixture)
    return table


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], REPOS["ader"])
    p.add_argument("--variant", choices=sorted(REPOS), default="ader", help="ader (default) or rd4ad")
    p.add_argument("--size", type=int, default=SIZE, help=f"input side (default {SIZE})")
    args = p.parse_args()
    folder = common.checkout(args.official, REPOS[args.variant], args.allow_other_commit)
    return common.finish([run(args.variant, folder, args.seed, args.write_fixture, size=args.size)])


if __name__ == "__main__":
    raise SystemExit(main())
