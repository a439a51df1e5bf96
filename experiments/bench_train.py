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
    python experiments/bench_train.py --methods rlr rlr+ccl crr crr+ccl      # what the CCL plug-in costs
    python experiments/bench_train.py --paper --accelerator gpu --precision bf16-mixed   # paper backbones

Timed windows skip the first ``--warmup`` steps (allocator and thread-pool warm-up). Lightning and bare
runs alternate ``--rounds`` times per method; every step is timed from the start of one batch to the start
of the next (data fetch and hooks included) and the pooled medians are compared, so that drift of the
machine affects both alike and one stray slow step does not decide the ratio.
"""

from __future__ import annotations

import argparse
import math
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

from mcad.build import build_components
from mcad.config import config_dir
from mcad.logging import workflow_callbacks
from mcad.training.efficiency import count_flops

REPO = Path(__file__).resolve().parents[1]


def make_cfg(spec: str, args: argparse.Namespace, out: Path, cache: Path):
    """The run config of one benchmark entry: ``method`` or ``method+plugin`` (``crr+ccl``: ``loss=ccl``)."""
    method, *plugins = spec.split("+")
    common = [f"data.num_workers={args.workers}", f"channels_last={str(args.channels_last).lower()}",
              f"trainer.accelerator={args.accelerator}", f"trainer.precision={args.precision}",
              "trainer.enable_progress_bar=false", "logger=none", "callbacks=none"]  # fmt: skip
    if args.batch_size is not None:
        common.append(f"data.batch_size={args.batch_size}")
    if args.paper:
        # The paper recipe (MVTec experiment: backbone, resolution, batch size) with random weights: throughput
        # only, so no weights file or download is needed.
        overrides = [f"experiment={method}_mvtec", "backbone.pretrained=false"]
    else:
        # The CPU proxy recipe (Lite0, its decoder size and batch size): what trains on this machine.
        overrides = [f"experiment=proxy_{method}"]
    if args.data_root == "synthetic":
        # The procedural dataset, generated into the bench's cache: for machines without the real images.
        overrides += ["data=synthetic", f"data.options.num_train={args.synthetic_train}"]
    else:
        overrides += ["data=folder", f"data.root={args.data_root}"]
    overrides += [f"loss={plugin}" for plugin in plugins] + common
    if plugins:
        overrides += list(args.plugin_overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir, cfg.paths.cache_dir = str(REPO), str(out), str(cache)
        del cfg.hydra
    return cfg


def loader_throughput(datamodule, epochs: int = 2) -> float:
    """Images/s of the training loader alone over ``epochs`` epochs, after its first batch.

    The first batch (worker start-up) is a one-off cost and is left out; epoch boundaries count, as they
    do in training.
    """
    loader = datamodule.train_dataloader()
    n, start = 0, None
    for _ in range(epochs):
        for batch in loader:
            if start is None:
                start = time.perf_counter()
                continue
            n += len(batch["image"])
    return n / (time.perf_counter() - start)


def bare_loop(
    method,
    datamodule,
    steps: int,
    warmup: int,
    device: torch.device,
    clip: float | None,
    precision: str,
    channels_last: bool = False,
) -> tuple[list[float], list[float]]:
    """The same module trained by a plain loop: forward + loss (under autocast for ``*-mixed``), backward, clip, step.

    Returns:
        Wall seconds of each timed step, measured like the Lightning path: from the start of one
        iteration (data fetch included) to the start of the next; and the loss of every step.
    """
    method.to(device).train()
    if channels_last:
        method.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    if device.type == "cuda" and datamodule.pin_memory is None:
        datamodule.pin_memory = True  # as the Lightning path (pinned exactly when training on a GPU)
    loader = datamodule.train_dataloader()
    it, stamps, losses = iter(loader), [], []
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    for _ in range(steps + warmup):
        _sync(device)
        stamps.append(time.perf_counter())
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = method.compute_losses(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    _sync(device)
    stamps.append(time.perf_counter())  # the end of the last step, as _StepTimer.on_train_end
    return _intervals(stamps, warmup), losses


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _intervals(stamps: list[float], warmup: int) -> list[float]:
    """Durations between consecutive step starts, without the first ``warmup`` steps."""
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]


class _StepTimer(L.Callback):
    """Stamps the start of every training batch (and the end of the last) for per-step wall times."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        self.stamps.append(time.perf_counter())


def lightning_loop(
    cfg, steps: int, warmup: int, device: torch.device, test: bool = True
) -> tuple[list[float], float | None, float | None, object, object]:
    """``Trainer.fit`` for ``steps + warmup`` steps, then optionally ``Trainer.test``.

    A Lightning step is timed from one ``on_train_batch_start`` to the next, so the data fetch and every
    hook between steps count, as in :func:`bare_loop`.

    Returns:
        Per-step wall seconds, test images/s (None unless ``test``), peak GPU memory of training in MiB
        (None on CPU), the module and the datamodule.
    """
    from hydra.utils import instantiate

    method, datamodule = build_components(cfg)
    timer = _StepTimer(device)
    callbacks = [timer, *workflow_callbacks(cfg, [timer])]  # as train.py: `channels_last=true` adds ChannelsLast
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, max_steps=steps + warmup, max_epochs=-1,
                          enable_checkpointing=False)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(method, datamodule=datamodule)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    step_times = _intervals(timer.stamps, warmup)
    if not test:
        return step_times, None, peak_mib, method, datamodule
    start = time.perf_counter()
    trainer.test(method, datamodule=datamodule, verbose=False)
    test_ips = len(datamodule.test_dataset) / (time.perf_counter() - start)
    return step_times, test_ips, peak_mib, method, datamodule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rd", "ccl_rd", "rlr", "crr"],
                        help="method names, or method+loss plug-in (crr+ccl): a plug-in's cost")  # fmt: skip
    parser.add_argument("--plugin-overrides", nargs="*", default=[],
                        help="overrides of the method+plugin entries only (loss.view_source=resized)")  # fmt: skip
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "real"),
                        help="an MVTec-layout folder, or 'synthetic' for the procedural dataset")  # fmt: skip
    parser.add_argument("--synthetic-train", type=int, default=40, help="training images per synthetic class")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternating Lightning/bare rounds (pooled steps)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC weights (mcad.training.callbacks.ChannelsLast)"
    )
    parser.add_argument("--paper", action="store_true", help="paper backbones (random weights) instead of Lite0")
    args = parser.parse_args()
    available = {p.stem for p in (Path(config_dir()) / "method").glob("*.yaml")}
    work = Path(tempfile.mkdtemp(prefix="mcad-bench-"))
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    rows = []
    try:
        for name in args.methods:
            if name.split("+")[0] not in available:
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
            # Alternate the two loops and pool the per-step wall times of all rounds: on a small shared machine
            # one window of a few steps drifts by 10-20 %, more than the overhead being measured, so the
            # primary figure is the median step (robust to a stray slow step of either loop); the mean step
            # (every epoch boundary and hook included) is printed beside it.
            lit_steps, bare_steps, bare_losses, test_ips, peak_mib = [], [], [], float("nan"), None
            for round_index in range(args.rounds):
                steps, test, peak, method_l, dm_l = lightning_loop(cfg, args.steps, args.warmup, device,
                                                                   test=round_index == 0)  # fmt: skip
                if round_index == 0:  # test throughput and peak training memory: measured in the first round
                    test_ips, peak_mib = test, peak
                lit_steps += steps
                bare_times, losses = bare_loop(
                    method, datamodule, args.steps, args.warmup, device, clip, args.precision, args.channels_last
                )
                bare_steps += bare_times
                bare_losses += losses
            batch = datamodule.batch_size
            lit_ips, bare_ips = batch / statistics.median(lit_steps), batch / statistics.median(bare_steps)
            lit_mean, bare_mean = batch / statistics.fmean(lit_steps), batch / statistics.fmean(bare_steps)
            non_finite = sum(not math.isfinite(v) for v in bare_losses)
            print(
                f"[{name}] {len(lit_steps)} + {len(bare_steps)} timed steps; mean-step img/s: Lightning "
                f"{lit_mean:.2f}, bare {bare_mean:.2f}, ratio {lit_mean / bare_mean:.3f}; bare-loop loss "
                f"{bare_losses[0]:.4f} -> {bare_losses[-1]:.4f}, non-finite steps {non_finite}"
            )
            counts = method_l.parameter_counts()
            flops = count_flops(method_l, dm_l.input_size)
            rows.append((name, lit_ips, bare_ips, test_ips, cold_ips, cached_ips, counts, flops, peak_mib))
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
          f"{args.rounds} x {args.steps} timed steps per loop, median step"
          f"{', channels-last' if args.channels_last else ''}")  # fmt: skip
    print(
        "| method | train img/s (Lightning) | train img/s (bare) | Lightning/bare | test img/s | loader cold img/s "
        "| loader cached img/s | cached loader / train | params total | params trainable | GFLOPs/img "
        "| peak GPU MiB (train) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, lit, bare, test, cold, cached, counts, flops, peak in rows:
        gflops = f"{flops / 1e9:.2f}" if flops else "n/a"
        peak_text = f"{peak:,.0f}" if peak is not None else "n/a"
        print(
            f"| {name} | {lit:.2f} | {bare:.2f} | {lit / bare:.3f} | {test:.2f} | {cold:.1f} | {cached:.1f} | "
            f"{cached / lit:.1f}x | {counts['params_total']:,} | {counts['params_trainable']:,} | {gflops} "
            f"| {peak_text} |"
        )


if __name__ == "__main__":
    main()
