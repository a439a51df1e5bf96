"""Parity of ``method=ccl_rd`` with the official CCL code (LGC-AD/AD-LGC), both code versions.

* ``--version v1``: 204b215 (``model/lgc.py::LGC``, ``loss/base_loss.py`` ``DenseLoss``/``SCLLoss`` on both
  views, ``trainer/lgc_trainer.py``, config ``configs/lgc/lgc_mvtec.py``), against ``experiment=ccl_rd_mvtec
  loss.global_cl=ccl_v1``.
* ``--version head``: 6502f68 (``model/rd.py::RDLGC``, ``loss/base_loss.py`` with the clean-view ``SCLLoss``,
  ``trainer/rdlgc_trainer.py``, config ``configs/rd/rd_mvtec.py``), against ``experiment=ccl_rd_mvtec`` with its
  default global term (meant to be ``ccl_head``; the test checks that default).

Both official models are built from their own configs (only the teacher's ImageNet download is switched off) and
stepped as their trainers do: ``RDLGCTrainer``/``LGCTrainer.optimize_parameters`` (forward, ``cos`` + ``scl`` +
``dense``), ``backward_term`` (two Adams: projection at ``lr``, the rest at ``5 lr``; joint grad-norm clip 5).

Randomness, aligned or switched off:

* feature noise: off on both sides. Ours: ``method.noise_prob=0``. Official: ``train_forward`` draws
  ``torch.randn(1) > 0.5``; the global RNG is seeded right before the forward with a seed whose draw is <= 0.5
  (the value is printed in the table), so the official code runs unchanged and skips the noise. (Its mask uses
  ``randint``, ours ``rand < 0.5``, so a noisy step cannot be matched draw for draw.)
* dense-loss negatives: both codes draw them with the global CPU RNG in a per-sample loop; both sides are seeded
  with the same seed right before the losses.
* second view: the same tensor on both sides, the clean images flipped left-right and shifted (no augmentation
  pipeline; the distribution of the official ``aug_transforms`` is a separate, reported check).

Batch: 3 images with class labels (0, 0, 1), so that one sample has two candidate negatives (a real draw) and
the global term has positive pairs.

Run: ``python experiments/parity/ccl.py --version v1 --official /work/official/AD-LGC-v1`` (``--version head
--official /work/official/AD-LGC-head``); ``--write-fixture`` writes ``tests/fixtures/parity/ccl_<version>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import rd  # noqa: E402

from mcad.methods.ccl_rd.official import ccl_key, convert_official_checkpoint  # noqa: E402
from mcad.utils.seeded import seeded_images, seeded_init_  # noqa: E402

REPOS = {
    "v1": common.OfficialRepo("LGC-AD/AD-LGC", "204b215"),
    "head": common.OfficialRepo("LGC-AD/AD-LGC", "6502f68"),
}
CODE = {
    "v1": ("configs.lgc.lgc_mvtec", "model.lgc"),
    "head": ("configs.rd.rd_mvtec", "model.rd"),
}
GLOBAL_CL = {"v1": "ccl_v1", "head": "ccl_head"}
SIZE, LABELS, LOSS_SEED_OFFSET = 64, (0, 0, 1), 17


def overrides(version: str, size: int = SIZE) -> list[str]:
    """Our side: the paper recipe with random teacher weights, noise off, evaluation at the input size.

    v1 selects its global term explicitly; HEAD relies on the recipe's default (which must be ``ccl_head``).
    """
    base = [
        "experiment=ccl_rd_mvtec",
        "backbone.pretrained=false",
        "method.noise_prob=0",
        f"data.image_size={size}",
        f"protocol.eval_size={size}",
    ]
    return base + (["loss.terms.global_cl=ccl_v1"] if version == "v1" else [])


def second_view(images: Tensor, spec: dict[str, Any]) -> Tensor:
    """The augmented view fed to both sides: ``roll(flip(images, flip), shift)``."""
    return torch.roll(torch.flip(images, dims=spec["flip"]), shifts=spec["shift"], dims=(2, 3))


def view_spec(size: int) -> dict[str, Any]:
    return {"flip": [3], "shift": [size // 16, -size // 16]}


def quiet_noise_seed(start: int) -> tuple[int, float]:
    """The first seed >= ``start`` whose first ``torch.randn(1)`` on the global generator is <= 0.5."""
    seed = start
    while True:
        value = float(torch.randn(1, generator=torch.Generator().manual_seed(seed)))
        if value <= 0.5:
            return seed, value
        seed += 1


def ours_losses(method: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our training step's loss terms, combined as ``AnomalyModule.training_step`` does with a loss plug-in."""
    losses, features = method.contrastive_forward(batch)
    extra = method.loss_plugin(features, batch)
    total = losses["loss"] + sum(extra.values())
    return {"cos": losses["cos"], "dense": extra["ccl_dense"], "global": extra["ccl_global"], "total": total}


class AdLgc(rd.AderRD):
    """AD-LGC's ``LGC`` (v1) / ``RDLGC`` (HEAD) with the steps of its trainer."""

    fmt = "ad-lgc"

    def __init__(self, ob: Any, version: str) -> None:
        super().__init__(ob)
        self.version = version

    def parts(self) -> dict[str, nn.Module]:
        return {**super().parts(), "proj": self.net.proj_layer}

    def load_ours(self, ours: dict[str, Tensor]) -> int:
        return rd.copy_ours_into(self.net, ours, ccl_key)

    def forward(self, images: Tensor, images_aug: Tensor | None = None) -> tuple[Any, ...]:
        # RDLGCTrainer / LGCTrainer.forward: self.net(self.imgs, self.aug_imgs) -> train_forward in train mode:
        # (feats_t, feats_s, feats_t_k, feats_t_q_grid, feats_t_k_grid, glb_feats, glb_feats_k)
        return self.net(images, images_aug)

    def eval_features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        out = self.net(images)  # eval mode: teacher -> projection -> OCBE -> student; test() uses out[0], out[1]
        return out[0], out[1]

    def losses(self, out: Any, labels: Tensor | None = None) -> dict[str, Tensor]:
        feats_t, feats_s, feats_t_k, q_grid, k_grid, glb, glb_k = out
        terms = self.loss_terms
        cos = terms["cos"](feats_t, feats_s)
        if self.version == "v1":  # lgc_trainer.py:89-93
            glob = terms["scl"](glb, glb_k, labels)
            dense = terms["dense"](feats_t, feats_t_k, q_grid, k_grid, labels)
            total = cos + self.cfg.lambda_1 * glob + self.cfg.lambda_2 * dense
        else:  # rdlgc_trainer.py:85-90
            glob = terms["scl"](glb, labels)
            dense = terms["dense"](feats_t, feats_t_k, q_grid, k_grid, labels)
            total = cos + glob + dense
        return {"cos": cos, "global": glob, "dense": dense, "total": total}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        # Trainer __init__ (rdlgc_trainer.py:43-48, lgc_trainer.py:46-51): proj_opt over proj_layer at lr, then
        # distill_opt over the net with proj_layer set to None (so without it) at lr * 5.
        cfg = self.cfg
        proj_opt = common.ader_adam(cfg.optim.proj_opt.kwargs, self.net.proj_layer, lr=cfg.optim.lr)
        proj_layer = self.net.proj_layer
        self.net.proj_layer = None
        distill_opt = common.ader_adam(cfg.optim.distill_opt.kwargs, self.net, lr=cfg.optim.lr * 5)
        self.net.proj_layer = proj_layer
        return [proj_opt, distill_opt]

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {ccl_key(k): p for k, p in self.net.named_parameters() if p.requires_grad}

    def mapped_state(self) -> dict[str, Tensor]:
        return {ccl_key(k): v for k, v in self.net.state_dict().items()}


def run(version: str, folder: Path, seed: int, write: bool, size: int = SIZE) -> common.ParityTable:
    ours_over = overrides(version, size)
    clip = rd.clip_value(ours_over)
    method = common.build_method(ours_over)
    seeded_init_(method.model, seed)
    images = seeded_images(seed, len(LABELS), size)
    spec = view_spec(size)
    images_aug = second_view(images, spec)
    labels = torch.tensor(LABELS)
    noise_seed, noise_draw = quiet_noise_seed(seed)
    loss_seed = seed + LOSS_SEED_OFFSET
    repo = REPOS[version]
    table = common.ParityTable(
        f"CCL-on-RD ({version}: {repo.name}@{repo.commit}) vs `{' '.join(ours_over)}`, seed "
        f"{seed}, batch {len(LABELS)} (labels {list(LABELS)}), {size} px"
    )
    inputs = {
        "fn": "seeded_images",
        "seed": seed,
        "batch": len(LABELS),
        "size": size,
        "labels": list(LABELS),
        "second_view": spec,
        "loss_seed": loss_seed,
    }
    fixture = rd.fixture_head("ccl_rd", version, repo, seed, inputs, ours_over)
    fixture["global_cl"] = GLOBAL_CL[version]
    table.add(
        f"our global term (loss.terms.global_cl; official {version}: {GLOBAL_CL[version]})",
        0.0 if method.loss_plugin.terms.global_cl == GLOBAL_CL[version] else None,
        0,
        GLOBAL_CL[version],
        method.loss_plugin.terms.global_cl,
    )

    config, model_module = CODE[version]
    with common.ader_codebase(
        folder, config, ["model.ad_factory", model_module, "loss.base_loss", "util.metric"]
    ) as ob:
        side = AdLgc(ob, version)
        ours_sd = method.state_dict()
        copied = side.load_ours(ours_sd)
        model = method.model
        ours_parts = {"teacher": model.teacher, "ocbe": model.rd.ocbe, "decoder": model.rd.decoder, "proj": model.proj}
        counts = rd.compare_params(side, ours_parts, table)
        trainable = rd.n_params(model, trainable=True)
        off_trainable = counts["ocbe"] + counts["decoder"] + counts["proj"]
        table.add(
            "params trainable (projection + OCBE + decoder)",
            abs(off_trainable - trainable),
            0,
            off_trainable,
            trainable,
        )
        fixture["params"] = {**counts, "trainable": off_trainable}
        table.add("tensors copied ours -> official", abs(copied - len(ours_sd)), 0, copied, len(ours_sd))

        rd.compare_eval(side, method, images, size, rd.SCALE_TO_OURS["ader"], table, fixture)

        # One training step (train mode): official forward under the quiet noise seed, both losses under one seed.
        side.train(True)
        method.train()
        torch.manual_seed(noise_seed)
        out_off = side.forward(images, images_aug)
        torch.manual_seed(loss_seed)
        losses_off = side.losses(out_off, labels)
        captured: list[Any] = []
        forward = model.train_forward
        model.train_forward = lambda *a, **k: captured.append(forward(*a, **k)) or captured[-1]  # type: ignore[method-assign]
        torch.manual_seed(loss_seed)
        batch = {"image": images, "image_aug": images_aug, "class_id": labels, "contrast_label": labels}
        losses_our = ours_losses(method, batch)
        del model.train_forward
        ours_out = captured[0]
        table.add(
            f"feature noise: official draw randn(1) = {noise_draw:.4f} <= 0.5 (seed {noise_seed}); ours noise_prob=0",
            0.0 if not ours_out.noised else None,
            0,
        )
        pairs = [
            ("teacher T (clean)", 0, ours_out.teacher),
            ("student S", 1, ours_out.student),
            ("teacher T' (augmented)", 2, ours_out.teacher_aug),
            ("projection P (clean)", 3, ours_out.proj),
            ("projection P' (augmented)", 4, ours_out.proj_aug),
            ("global g (GAP of OCBE)", 5, ours_out.embedding),
            ("global g' (augmented)", 6, ours_out.embedding_aug),
        ]
        for name, idx, ours_t in pairs:
            table.add(f"train forward: {name}", common.max_abs_diff(out_off[idx], ours_t))
        our_terms = losses_our
        for name in ("cos", "dense", "global", "total"):
            table.add(
                f"loss {name}",
                common.max_abs_diff(losses_off[name], our_terms[name]),
                official=losses_off[name].item(),
                ours=our_terms[name].item(),
            )
        fixture["losses"] = {k: v.item() for k, v in losses_off.items()}
        rd.running_stats(side, method, table, "model.rd.ocbe.")
        rd.compare_step(side, method, losses_off["total"], losses_our["total"], clip, table, fixture)

        rd.compare_checkpoint(
            side, method, images, size, seed, rd.SCALE_TO_OURS["ader"], convert_official_checkpoint, table, fixture
        )
    if write:
        common.write_fixture(f"ccl_{version}", fixture)
    return table


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], REPOS["head"])
    p.add_argument("--version", choices=sorted(REPOS), required=True, help="v1 (204b215) or head (6502f68)")
    p.add_argument("--size", type=int, default=SIZE, help=f"input side (default {SIZE})")
    args = p.parse_args()
    folder = common.checkout(args.official, REPOS[args.version], args.allow_other_commit)
    return common.finish([run(args.version, folder, args.seed, args.write_fixture, size=args.size)])


if __name__ == "__main__":
    raise SystemExit(main())
