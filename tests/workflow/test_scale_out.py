"""Scale-out: a 2-job sweep through the submitit_local launcher (separate processes) and a 2-trial Optuna
search returning the optimised metric."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from workflow_helpers import REPO, TINY, run_cli

from mcad.reporting.tables import build_report


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path, cache_dir):
    sweep = tmp_path / "multirun"
    command = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15",
               "method=rd", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2 and all((j / "results.json").is_file() for j in jobs)
    assert list((sweep / ".submitit").iterdir()), "the jobs ran through submitit"
    seeds = sorted(json.loads((j / "results.json").read_text())["seed"] for j in jobs)
    assert seeds == [0, 1]
    header, row = build_report([sweep]).summary_rows()
    assert row[0] == "rd" and row[1] == "2/2" and "±" in row[header.index("synthetic mAD")]


@pytest.mark.slow
def test_optuna_search_optimises_the_returned_metric(monkeypatch, tmp_path, cache_dir):
    sweep = tmp_path / "optuna"
    run_cli(monkeypatch, ["hparams_search=rd_optuna", "method=rd", *TINY, "hydra.sweeper.n_trials=2",
                          "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}",
                          f"paths.cache_dir={cache_dir}"])  # fmt: skip
    values = [json.loads((sweep / str(i) / "results.json").read_text())["mean"]["mAD"] for i in range(2)]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(values))
    assert set(best.best_params) == {"method.optimizer.lr", "method.ocbe.base_width"}
