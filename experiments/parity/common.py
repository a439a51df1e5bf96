"""Shared plumbing of the parity scripts: official checkouts, our side's build, the table, the fixtures.

Each script (``rd.py``, ``ccl.py``, ``rlr.py``, ``crr.py``) builds the official modules from a local
checkout of the official repository at its pinned commit and ours from the project's Hydra configs, puts
the same seeded weights into both (:func:`mcad.utils.seeded.seeded_init_` on our side, copied into the
official modules), feeds both the same seeded inputs and prints one table. ``--write-fixture`` also saves
the official side's numbers into ``tests/fixtures/parity/<name>.json``; ``tests/parity/`` rebuilds our
side from the same seeds and compares, without any official code.

Nothing from the official repositories is copied here: they are imported from the checkout at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "parity"


# ------------------------------------------------------------------------------------------ checkouts
@dataclass(frozen=True)
class OfficialRepo:
    """A public repository at the commit the parity check was written against."""

    name: str  # owner/name on GitHub
    commit: str  # full or abbreviated hash

    def clone_hint(self, folder: str = "..") -> str:
        """The commands that produce a suitable checkout."""
        target = f"{folder}/{self.name.split('/')[1]}"
        return f"git clone https://github.com/{self.name} {target} && git -C {target} checkout {self.commit}"


def checkout(path: str | Path, repo: OfficialRepo, allow_other_commit: bool = False) -> Path:
    """Validates a local checkout of ``repo`` and returns its folder.

    Raises:
        SystemExit: The folder is missing, or (for a git checkout) is at another commit.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"No checkout of {repo.name} at {folder}. Get one with:\n  {repo.clone_hint()}")
    if (folder / ".git").exists():
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = head.stdout.strip()
        if head.returncode == 0 and not commit.startswith(repo.commit) and not allow_other_commit:
            raise SystemExit(
                f"{folder} is at {commit[:12]}, the parity check is pinned to {repo.name}@{repo.commit}: "
                f"git -C {folder} checkout {repo.commit} (or pass --allow-other-commit)."
            )
    else:
        print(f"note: {folder} is not a git checkout; assuming it holds {repo.name}@{repo.commit}", file=sys.stderr)
    return folder


@contextlib.contextmanager
def official_imports(folder: Path, stubs: Sequence[str] = ()) -> Iterator[None]:
    """Puts ``folder`` first on ``sys.path`` and stands in empty modules for ``stubs`` (absent extras).

    The official repositories import packages they never use on the checked paths (plotting, imgaug,
    logging services); an empty module lets their files import. Modules loaded from ``folder`` are
    dropped afterwards, so two checkouts with equally named packages (``model``, ``utils``) never mix.
    """
    before = set(sys.modules)
    added = []
    for name in stubs:
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so that `import name.sub` finds further stubs
        sys.modules[name] = module
        added.append(name)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            origin = getattr(module, "__file__", None) or ""
            if name in added or origin.startswith(str(folder)):
                del sys.modules[name]


# ------------------------------------------------------------------------------------------ our side
def compose(overrides: Sequence[str]) -> Any:
    """Our config composed like the command line would (``experiment=...`` etc.), without a Hydra run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from mcad.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO_ROOT)
        cfg.paths.output_dir = str(REPO_ROOT / "outputs" / "parity")
        cfg.paths.cache_dir = str(REPO_ROOT / ".cache")
    return cfg


def build_method(overrides: Sequence[str]) -> Any:
    """Our method (a LightningModule) built from the config groups, as ``mcad.train`` builds it."""
    from mcad.build import build_components

    method, _ = build_components(compose(overrides))
    return method


# ------------------------------------------------------------------------------------------ numbers
def max_abs_diff(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    """Largest absolute difference between two tensors or two equally long lists of tensors."""
    if isinstance(a, Tensor):
        a, b = [a], [b]  # type: ignore[list-item]
    assert isinstance(b, Sequence) and len(a) == len(b), "lists of different lengths"
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        worst = max(worst, float((x.detach().double() - y.detach().double()).abs().max()))
    return worst


def copy_by_order(source: dict[str, Tensor], target: torch.nn.Module, skip: Sequence[str] = ()) -> int:
    """Copies ``source`` tensors into ``target``'s state dict in order, checking every shape.

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: The two sides hold different numbers of tensors, or a pair differs in shape.
    """
    own = {k: v for k, v in target.state_dict().items() if not any(s in k for s in skip)}
    if len(own) != len(source):
        raise ValueError(f"{len(source)} source tensors for {len(own)} target tensors")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), own.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"{src_key}{tuple(tensor.shape)} -> {dst_key}{tuple(ref.shape)}")
        mapped[dst_key] = tensor.detach().clone()
    target.load_state_dict(mapped, strict=not skip)
    return len(mapped)


def pooled_map(anomaly_map: Tensor, side: int = 16) -> list[list[float]]:
    """An ``(H, W)`` map average-pooled to ``side x side`` as nested lists (a small fixture entry)."""
    x = anomaly_map.detach().double().reshape(1, 1, *anomaly_map.shape[-2:])
    return torch.nn.functional.adaptive_avg_pool2d(x, side)[0, 0].tolist()


def map_stats(anomaly_map: Tensor) -> dict[str, float]:
    """Mean, std, min and max of a map (fixture entries)."""
    x = anomaly_map.detach().double()
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


# ------------------------------------------------------------------------------------------ the table
@dataclass
class ParityTable:
    """Rows of ``quantity | official | ours | max |diff| | tolerance | ok``, printed as Markdown."""

    title: str
    rows: list[tuple[str, str, str, float | None, float | None]] = field(default_factory=list)

    def add(
        self, quantity: str, diff: float | None, tol: float | None = 1e-5, official: Any = "", ours: Any = ""
    ) -> None:
        """Adds a comparison; ``tol=None`` records a known difference (reported, never failing)."""
        self.rows.append((quantity, _fmt(official), _fmt(ours), diff, tol))

    @property
    def failures(self) -> list[str]:
        """Quantities whose difference exceeds their tolerance."""
        return [q for q, _, _, d, t in self.rows if t is not None and (d is None or not d <= t)]

    def markdown(self) -> str:
        """The table as Markdown."""
        lines = [f"### {self.title}", "", "| quantity | official | ours | max abs diff | tolerance | ok |",
                 "|---|---:|---:|---:|---:|:-:|"]  # fmt: skip
        for quantity, official, ours, diff, tol in self.rows:
            ok = "known" if tol is None else ("yes" if diff is not None and diff <= tol else "**NO**")
            d = "" if diff is None else f"{diff:.2e}"
            t = "" if tol is None else f"{tol:.0e}"
            lines.append(f"| {quantity} | {official} | {ours} | {d} | {t} | {ok} |")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.7g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ------------------------------------------------------------------------------------------ fixtures
def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.9g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def write_fixture(name: str, payload: dict[str, Any]) -> Path:
    """Writes ``tests/fixtures/parity/<name>.json`` (floats to 9 significant digits, a few kilobytes)."""
    from mcad.utils.files import atomic_write

    path = FIXTURE_DIR / f"{name}.json"
    text = json.dumps(_rounded(payload), indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text))
    print(f"wrote {path} ({len(text)} bytes)")
    return path


def parser(description: str, repo: OfficialRepo) -> argparse.ArgumentParser:
    """The command line every parity script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--official", required=True, help=f"local checkout of {repo.name} at {repo.commit}")
    p.add_argument("--allow-other-commit", action="store_true", help="run against another commit anyway")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared weights and inputs")
    p.add_argument("--write-fixture", action="store_true", help="also write tests/fixtures/parity/<name>.json")
    return p


def finish(tables: Sequence[ParityTable]) -> int:
    """Prints the tables; returns the process exit code (1 if any comparison failed)."""
    failures = [f"{t.title}: {q}" for t in tables for q in t.failures]
    print("\n\n".join(t.markdown() for t in tables))
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1
    print("\nall comparisons within tolerance")
    return 0


def evaluate_images(method: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """Our evaluated ``(B, S, S)`` pixel maps and ``(B,)`` image scores: the method's maps through its protocol.

    This is the one place the parity scripts call our inference path, so that they follow it when it changes.
    """
    method.eval()
    with torch.no_grad():
        out = method.anomaly_maps(images)
        return method.protocol.process(out.anomaly_map, out.segmentation, tuple(images.shape[-2:]))


# ------------------------------------------------------------------------------------------ official code bases
@contextlib.contextmanager
def shim_modules(shims: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Stands in small modules with the given attributes (``{"numba": {"jit": ...}}``) while the block runs.

    Unlike the empty stubs of :func:`official_imports`, a shim satisfies ``from package import name``. Names
    already importable are left alone; the shims are removed afterwards.
    """
    added = []
    for name, attrs in shims.items():
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__path__ = []
        for key, value in attrs.items():
            setattr(module, key, value)
        sys.modules[name] = module
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _decorator_factory(*args: Any, **kwargs: Any) -> Any:
    # numba.jit stand-in: `@jit` and `@jit(nopython=True)` both return the function unchanged.
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


#: What the ADer code base (and AD-LGC, built on it) imports at module level without needing it for a forward
#: pass, a loss or ``cal_anomaly_map``: logging, FLOP counting, a CUDA evaluator and a JIT.
ADER_SHIMS: dict[str, dict[str, Any]] = {
    "tensorboardX": {"SummaryWriter": object},
    "fvcore": {},
    "fvcore.nn": {"FlopCountAnalysis": None, "flop_count_table": None, "parameter_count": None},
    "numba": {"jit": _decorator_factory},
    "adeval": {"EvalAccumulatorCuda": None},
}


@contextlib.contextmanager
def ader_codebase(folder: Path, config_module: str, modules: Sequence[str]) -> Iterator[types.SimpleNamespace]:
    """Imports an ADer-style repository (ADer, AD-LGC): its config class, model and loss registries.

    ADer's packages import every file of their folder at import time (``glob('model/[!_]*.py')`` relative to
    the working directory), which would pull in models with unavailable dependencies (Mamba kernels ...).
    The registries are therefore imported from an empty working directory, so that the glob finds nothing,
    and only the listed ``modules`` are imported explicitly (their ``@MODEL.register_module`` fills the
    registry). The config is imported from the repository folder, where its own glob works. ``util/net.py``
    still imports ``collections.Iterable`` (removed in Python 3.10): the alias is provided while importing.

    Args:
        folder: The checkout.
        config_module: Dotted config module, e.g. ``configs.rd.rd_mvtec``.
        modules: Dotted modules to import, e.g. ``["model.ad_factory", "model.rd", "loss.base_loss"]``.

    Yields:
        ``cfg`` (an instance of the config class), ``get_model``, ``get_loss_terms`` and ``modules`` (name ->
        module). Everything official must be used inside the ``with`` block.
    """
    import collections
    import collections.abc
    import importlib
    import tempfile

    had_iterable = hasattr(collections, "Iterable")
    if not had_iterable:
        collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]
    try:
        with shim_modules(ADER_SHIMS), official_imports(folder):
            with contextlib.chdir(folder):
                cfg_module = importlib.import_module(config_module)
            with tempfile.TemporaryDirectory() as empty, contextlib.chdir(empty):
                model_pkg = importlib.import_module("model")
                loss_pkg = importlib.import_module("loss")
                loaded = {name: importlib.import_module(name) for name in modules}
            yield types.SimpleNamespace(
                cfg=cfg_module.cfg(),
                get_model=model_pkg.get_model,
                get_loss_terms=loss_pkg.get_loss_terms,
                modules=loaded,
            )
    finally:
        if not had_iterable:
            del collections.Iterable  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ official files
def file_manifest(obj: Any) -> Any:
    """The structure of a checkpoint object, compact enough for a fixture.

    A dict becomes a list of ``[key, manifest]`` pairs (JSON objects would lose the order when sorted), a tensor
    the string ``"<dtype>[<shape>]"`` (``"float32[64,3,7,7]"``), anything else ``"<type name>"``.
    :func:`rebuild_from_manifest` turns it back into an object of the same structure with seeded tensors.
    """
    if isinstance(obj, Tensor):
        return f"{str(obj.dtype).replace('torch.', '')}[{','.join(str(d) for d in obj.shape)}]"
    if isinstance(obj, dict):
        return [[str(k), file_manifest(v)] for k, v in obj.items()]
    return f"<{type(obj).__name__}>"


def rebuild_from_manifest(manifest: Any, seed: int) -> Any:
    """An object of the manifest's structure; tensors filled by their order in the file (non-tensors: ``None``).

    Values follow :func:`mcad.utils.seeded.seeded_init_`'s scaling by the last name component (BatchNorm
    statistics positive, norm scales near 1, weights fan-in scaled), keyed by the tensor's rank in the file, so
    the same manifest and seed always give the same file. Integer tensors are zeros.
    """
    from mcad.utils.seeded import seeded_fill

    counter = [0]

    def build(node: Any, name: str) -> Any:
        if isinstance(node, list):
            return {k: build(v, k) for k, v in node}
        if node.startswith("<"):
            return None
        dtype, _, dims = node.rstrip("]").partition("[")
        shape = [int(d) for d in dims.split(",") if d]
        empty = torch.zeros(shape, dtype=getattr(torch, dtype))
        counter[0] += 1
        if not empty.is_floating_point():
            return empty
        return seeded_fill(name, empty, seed, 7_000_000 + counter[0])

    return build(manifest, "")


# ------------------------------------------------------------------------------------------ our optimiser step
def our_optimizer(method: Any, total_steps: int = 1000) -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, scheduler or None)`` from the method's own ``configure_optimizers``.

    A schedule needs ``trainer.estimated_stepping_batches``; a stand-in trainer holding only that number is
    attached for the call (and removed), so the optimiser, its parameter groups and learning rates are exactly
    what training would use.
    """
    attached = method._trainer
    if attached is None:
        method._trainer = types.SimpleNamespace(estimated_stepping_batches=total_steps)
    try:
        conf = method.configure_optimizers()
    finally:
        method._trainer = attached
    if isinstance(conf, dict):
        return conf["optimizer"], conf.get("lr_scheduler", {}).get("scheduler")
    return conf, None


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every group (what Lightning's gradient clipping acts on)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def grad_norm(params: Sequence[Tensor]) -> float:
    """The total 2-norm of the gradients (the value ``clip_grad_norm_`` compares with its limit)."""
    grads = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def ader_adam(optim_kwargs: dict[str, Any], net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """ADer's ``optim.get_optim(optim_kwargs, net, lr)`` for the configurations the RD recipes use.

    ADer's ``optim/__init__.py`` imports optimisers that newer timm versions renamed (``timm.optim.nadam.Nadam``),
    and AD-LGC HEAD ships no ``optim`` package at all. For ``name='adam'`` without ``weight_decay`` that function
    is ``torch.optim.Adam(net.parameters(), lr=lr, **rest)`` (no parameter groups, no weight-decay split), which
    is built here; any other configuration is refused.
    """
    kwargs = dict(optim_kwargs)
    name = kwargs.pop("name").lower()
    if name != "adam" or kwargs.get("weight_decay"):
        raise NotImplementedError(f"only ADer's plain 'adam' is reproduced, got {optim_kwargs}")
    return torch.optim.Adam(net.parameters(), lr=lr, **kwargs)
