"""A real multirun through the entry point (default launcher): 2 methods x 2 seeds, one job failing."""

import json

import pytest
from hydra.core.hydra_config import HydraConfig
from workflow_helpers import TINY, run_cli

import mcad.train
from mcad.report import main as report_main
from mcad.reporting.tables import build_report


@pytest.fixture
def inject_failure(monkeypatch):
    """Makes the job `method=ccl_rd seed=1` raise inside train() (after config validation)."""
    original = mcad.train.build_components

    def failing(cfg):
        if cfg.seed == 1 and HydraConfig.get().runtime.choices["method"] == "ccl_rd":
            raise RuntimeError("injected failure for the test")
        return original(cfg)

    monkeypatch.setattr(mcad.train, "build_components", failing)


def test_multirun_with_a_failed_job_and_report(monkeypatch, inject_failure, tmp_path, cache_dir, capsys):
    sweep = tmp_path / "multirun"
    run_cli(monkeypatch, ["-m", "method=rd,ccl_rd", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}",
                           f"paths.cache_dir={cache_dir}"])  # fmt: skip
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    ok = [j for j in jobs if (j / "results.json").is_file()]
    failed = [j for j in jobs if (j / "failed.json").is_file()]
    assert len(ok) == 3 and len(failed) == 1
    record = json.loads((failed[0] / "failed.json").read_text())
    assert record["error_type"] == "RuntimeError" and "injected failure" in record["message"]
    assert "seed=1" in record["overrides"] and "method=ccl_rd" in record["overrides"]
    assert "Traceback" in record["traceback"]

    capsys.readouterr()
    assert report_main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "**FAILED**" in printed and "injected failure" in printed
    report = build_report([sweep])
    header, *rows = report.summary_rows()
    rows = {r[0]: r for r in rows}
    assert set(rows) == {"rd", "ccl_rd"}
    col = header.index("synthetic I-AUROC")
    assert "±" in rows["rd"][col]  # two seeds: mean ± std
    assert rows["ccl_rd"][col].endswith("(1/2)")  # one of two seeds failed
    assert rows["ccl_rd"][1] == "1/2 (1 failed)"
    for name in ("report.md", "report.csv", "report_per_class.md", "report_per_class.csv"):
        assert (sweep / name).is_file()


def test_single_run_still_raises(monkeypatch, inject_failure, tmp_path, cache_dir):
    run = tmp_path / "run"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra re-raises instead of printing and exiting
    with pytest.raises(RuntimeError, match="injected failure"):
        run_cli(monkeypatch, ["method=ccl_rd", "seed=1", *TINY, f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}",
                               "hydra.job_logging.root.handlers=[console]"])  # fmt: skip
    assert not (run / "failed.json").exists()
