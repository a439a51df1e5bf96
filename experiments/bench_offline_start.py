"""How long a run asking for paper weights takes to fail on a machine that cannot fetch them.

Question: with the weights in no local cache and no weight host reachable, how many seconds pass between
constructing ``TimmBackbone(pretrained=True)`` and the actionable ``WeightsError``, with and without
``HF_HUB_OFFLINE=1``? (timm's own download retries for about a minute before it gives up.)

Usage:
    .venv/bin/python experiments/bench_offline_start.py [--model wide_resnet50_2.racm_in1k]

Each case runs in a fresh child process with empty Hugging Face and torch hub caches (temporary folders).
The child replaces ``timm.create_model`` before importing mcad, so no download can start: if a weight host
answers, the child prints ``reachable`` instead of a time (nothing to fail fast on from that machine).
Prints one line per case: seconds from construction to the error (imports excluded) and the error's reason.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
import timm

def no_download(*args, **kwargs):
    print("reachable"); raise SystemExit(0)

timm.create_model = no_download
from mcad.models.backbones import TimmBackbone, WeightsError

start = time.perf_counter()
try:
    TimmBackbone(sys.argv[1], [1, 2, 3], pretrained=True)
except WeightsError as err:
    reason = str(err).split("(", 1)[-1].split(")", 1)[0]
    print(f"{time.perf_counter() - start:.2f} s  {reason}")
"""


def run_case(model: str, offline_flag: bool) -> str:
    with tempfile.TemporaryDirectory() as caches:
        env = {**os.environ, "HF_HOME": str(Path(caches) / "hf"), "TORCH_HOME": str(Path(caches) / "torch")}
        env.pop("HF_HUB_OFFLINE", None)
        if offline_flag:
            env["HF_HUB_OFFLINE"] = "1"
        done = subprocess.run([sys.executable, "-c", CHILD, model], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    if done.returncode != 0:
        return f"child failed: {done.stderr.strip().splitlines()[-1:]}"
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wide_resnet50_2.racm_in1k", help="a timm tag with pretrained weights")
    args = parser.parse_args()
    for offline_flag in (False, True):
        label = "HF_HUB_OFFLINE=1" if offline_flag else "network probe"
        print(f"{args.model}, {label}: {run_case(args.model, offline_flag)}")


if __name__ == "__main__":
    main()
