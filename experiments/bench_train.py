"""Training / inference throughput of every method: Lightning path vs a bare PyTorch loop.

For each method, in one process and on the same data and batch size:

* train images/s through ``lightning.Trainer.fit`` (the framework's path) and through a bare loop
  over the same ``nn.Module`` (forward, loss, backward, clip, optimiser step), and their ratio;
* test images/s through ``Trainer.test`` (the shared evaluator included);
* data-loader images/s alone, cold (decoding every file) and with the decoded-image cache;
* parameters and FLOPs per image (``torch.utils.flop_counter``).

Usage::

    python experiments/bench_train.py                                 # all methods, proxy recipes, real data, CPU
    python experiments/bench_train.py --methods rd rlr --steps 20 --data-root ../shared/data/real
    python experiments/bench_train.py --paper --accelerator gpu --precision bf16-mixed   # paper backbones

Timed windows skip the first ``--warmup`` steps (allocator and thread-pool warm-up). Lightning and bare
runs alternate ``--rounds`` times per method and the medians are compared, so that drift of the machine
affects both alike.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mcad.train import build_components, config_dir, count_flops

REPO = Path(__file__).resolve().parents[1]
PAPER_BACKBONES = {"rd": "wide_resnet50_2", "ccl_rd": "wide_resnet50_2", "rlr": "tf_efficientnet_b6",
                   "crr": "vit_base_patch14_reg4_dinov2"}  # fmt: skip


def make_cfg(method: str, args: argparse.Namespace, out: Path, cache: Path):
    common = [f"data.root={args.data_root}", f"data.num_workers={args.workers}",
              f"trainer.accelerator={args.accelerator}", f"trainer.precision={args.precision}",
              "trainer.enable_progress_bar=false", "logger=none", "callbacks=none"]  # fmt: skip
    if args.batch_size is not None:
        common.append(f"data.batch_size={args.batch_size}")
    if args.paper:
        # The paper recipe of the method on the paper backbone (random weights: throughput only).
        overrides = [
            f"method={method}",
            "data=folder",
            f"backbone={PAPER_BACKBONES[method]}",
            "backbone.pretrained=false",
        ]
    else:
        # The CPU proxy recipe (Lite0, its decoder size and batch size): what trains on this machine.
        overrides = [f"experiment=proxy_{method}"]
    overrides += common
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir, cfg.paths.cache_dir = str(REPO), str(out), str(cache)
        del cfg.hydra
    return cfg


def loader_throughput(datamodule, epochs: int = 1) -> float:
    loader = datamodule.train_dataloader()
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["image"])
    return n / (time.perf_counter() - start)


def bare_loop(method, datamodule, steps: int, warmup: int, device: torch.device, clip: float | None) -> float:
    """The same module trained by a plain loop: forward + loss, backward, clip, step."""
    method.to(device).train()
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    loader = datamodule.train_dataloader()
    it, n, start = iter(loader), 0, None
    for step in range(steps + warmup):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, n = time.perf_counter(), 0
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = method.training_losses(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        n += len(batch["image"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.n, self.start, self.end = warmup, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.n += len(batch["image"])
            self.end = time.perf_counter()


def lightning_loop(cfg, steps: int, warmup: int, test: bool = True) -> tuple[float, float | None, object, object]:
    from hydra.utils import instantiate

    method, datamodule = build_components(cfg)
    timer = _StepTimer(warmup)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[timer], max_steps=steps + warmup, max_epochs=-1,
                          enable_checkpointing=False)  # fmt: skip
    trainer.fit(method, datamodule=datamodule)
    train_ips = timer.n / (timer.end - timer.start)
    if not test:
        return train_ips, None, method, datamodule
    start = time.perf_counter()
    trainer.test(method, datamodule=datamodule, verbose=False)
    test_ips = len(datamodule.test_dataset) / (time.perf_counter() - start)
    return train_ips, test_ips, method, datamodule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rd", "ccl_rd", "rlr", "crr"])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "real"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating Lightning/bare rounds (median)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--paper", action="store_true", help="paper backbones (random weights) instead of Lite0")
    args = parser.parse_args()
    available = {p.stem for p in (Path(config_dir()) / "method").glob("*.yaml")}
    work = Path(tempfile.mkdtemp(prefix="mcad-bench-"))
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    rows = []
    try:
        for name in args.methods:
            if name not in available:
                print(f"[skip] method {name}: no conf/method/{name}.yaml")
                continue
            cache = work / f"cache-{name}"
            cfg = make_cfg(name, args, work / name, cache)
            L.seed_everything(0, workers=True)
            method, datamodule = build_components(cfg)
            start = time.perf_counter()
            datamodule.setup("fit")  # decodes every file once: the cold pass
            cold_ips = (len(datamodule.train_dataset) + len(datamodule.test_dataset)) / (time.perf_counter() - start)
            cached_ips = loader_throughput(datamodule)
            clip = cfg.trainer.get("gradient_clip_val")
            # Alternate the two loops and keep the median of each: on a small shared machine one window of a
            # few steps drifts by 10-20 %, more than the overhead being measured.
            lit_runs, bare_runs, test_ips = [], [], float("nan")
            for round_index in range(args.rounds):
                lit, test, method_l, dm_l = lightning_loop(cfg, args.steps, args.warmup, test=round_index == 0)
                test_ips = test if test is not None else test_ips  # measured in the first round
                lit_runs.append(lit)
                bare_runs.append(bare_loop(method, datamodule, args.steps, args.warmup, device, clip))
            lit_ips, bare_ips = statistics.median(lit_runs), statistics.median(bare_runs)
            print(
                f"[{name}] rounds: Lightning {[round(x, 2) for x in lit_runs]}, bare {[round(x, 2) for x in bare_runs]}"
            )
            counts = method_l.parameter_counts()
            flops = count_flops(method_l, dm_l.input_size)
            rows.append((name, lit_ips, bare_ips, test_ips, cold_ips, cached_ips, counts, flops))
            print(
                f"[{name}] train Lightning {lit_ips:.2f} img/s, bare {bare_ips:.2f} img/s, "
                f"ratio {lit_ips / bare_ips:.3f}; "
                f"test {test_ips:.2f} img/s; loader cold {cold_ips:.1f} / cached {cached_ips:.1f} img/s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    recipe = "paper recipes (random weights)" if args.paper else "proxy recipes (Lite0)"
    print(f"\n{dev}, {recipe}, batch {args.batch_size or 'of the recipe'}, precision {args.precision}, "
          f"{args.steps} timed steps")  # fmt: skip
    print(
        "| method | train img/s (Lightning) | train img/s (bare) | Lightning/bare | test img/s | loader cold img/s "
        "| loader cached img/s | cached loader / train | params total | params trainable | GFLOPs/img |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, lit, bare, test, cold, cached, counts, flops in rows:
        gflops = f"{flops / 1e9:.2f}" if flops else "n/a"
        print(
            f"| {name} | {lit:.2f} | {bare:.2f} | {lit / bare:.3f} | {test:.2f} | {cold:.1f} | {cached:.1f} | "
            f"{cached / lit:.1f}x | {counts['params_total']:,} | {counts['params_trainable']:,} | {gflops} |"
        )


if __name__ == "__main__":
    main()
