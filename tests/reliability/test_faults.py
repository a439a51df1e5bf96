"""Faults while writing results: a SIGKILL at any moment never leaves a truncated results.json (temp file + rename)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from reliability_helpers import REPO_ROOT

# Rewrites the results files in a loop with ~4 MB of config, each version tagged; prints once it is writing.
WRITER = """
import sys
from mcad.evaluation.results import write_results
out = sys.argv[1]
blob = {"k%05d" % i: "x" * 64 for i in range(60000)}
print("ready", flush=True)
version = 0
while True:
    version += 1
    metrics = {"I-AUROC": version / 1e6, "mAD": 0.5}
    write_results(out, {"version": version, "per_class": {"a": metrics}, "mean": metrics, "config": blob})
"""


def test_sigkill_during_results_writing_never_leaves_a_truncated_file(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "run"
    versions = []
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        path = out / "results.json"
        if not path.exists():  # killed before the first rename
            continue
        data = json.loads(path.read_text())  # complete, valid JSON
        assert set(data) == {"version", "per_class", "mean", "config"} and len(data["config"]) == 60000
        versions.append(data["version"])
        # results.json is renamed into place last: the table files are at least as new.
        csv_rows = (out / "metrics.csv").read_text().splitlines()
        assert csv_rows[0].startswith("class,") and csv_rows[-1].startswith("mean,")
        assert (out / "metrics.md").read_text().rstrip().endswith("|")
    assert versions, "no kill landed after a completed write; increase the delays"
    # Temporary files of interrupted writes are hidden (dot-prefixed) and never named results.json.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "metrics.csv",
        "metrics.md",
        "results.json",
    ]
