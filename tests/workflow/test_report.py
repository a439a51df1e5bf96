"""mcad-report on fabricated run folders: grouping, mean ± std, failed / missing marks, per-class tables."""

import csv
import json
import math

import pytest
from omegaconf import OmegaConf

from mcad.report import main
from mcad.reporting.tables import build_report, mean_std
from mcad.runs import record_failure

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")


def _metrics(value):
    return {m: value for m in METRICS}


def _job(root, num, overrides, results=None, error=None):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    data = next((o.split("=")[1] for o in overrides if o.startswith("data=")), "synthetic")
    OmegaConf.save(OmegaConf.create({"data": {"name": data}}), job / ".hydra" / "config.yaml")
    if results is not None:
        method = next(o.split("=")[1] for o in overrides if o.startswith("method="))
        body = {
            "method": method,
            "data": data,
            "per_class": {"a": _metrics(results), "b": _metrics(results / 2)},
            "mean": _metrics(0.75 * results),
        }
        (job / "results.json").write_text(json.dumps(body))
    if error is not None:
        record_failure(job, error)
    return job


@pytest.fixture
def sweep(tmp_path):
    """A 2 methods x 2 datasets x 3 seeds sweep: one failed job, one job killed before any result."""
    root = tmp_path / "multirun"
    num = 0
    values = {("rd", "mvtec"): [0.90, 0.92, 0.94], ("crr", "mvtec"): [0.80, 0.84, None],
              ("rd", "visa"): [0.70, 0.72, 0.74], ("crr", "visa"): [0.60, 0.62, "killed"]}  # fmt: skip
    for (method, data), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            overrides = [f"method={method}", f"data={data}", f"seed={seed}", "trainer.max_epochs=1"]
            if value is None:
                _job(root, num, overrides, error=RuntimeError("CUDA out of memory"))
            elif value == "killed":
                _job(root, num, overrides)
            else:
                _job(root, num, overrides, results=value)
            num += 1
    task = ["method=rd,crr", "data=mvtec,visa", "seed=0,1,2", "trainer.max_epochs=1"]
    spec = {"hydra": {"sweeper": {"_target_": BASIC, "params": None}, "overrides": {"task": task}}}
    OmegaConf.save(OmegaConf.create(spec), root / "multirun.yaml")
    return root


def test_failure_record_holds_type_message_and_traceback(tmp_path):
    try:
        raise ValueError("bad value")
    except ValueError as err:
        path = record_failure(tmp_path, err)
    record = json.loads(path.read_text())
    assert record["error_type"] == "ValueError" and record["message"] == "bad value"
    assert "Traceback" in record["traceback"] and "raise ValueError" in record["traceback"]


def test_report_rows_are_methods_with_mean_std_over_seeds(sweep):
    report = build_report([sweep])
    assert report.keys == ["method"]
    assert report.datasets == ["mvtec", "visa"]
    rows = {r[0]: r for r in report.summary_rows()[1:]}
    header = report.summary_rows()[0]
    rd_mvtec = rows["rd"][header.index("mvtec mAD")]
    mean, std = mean_std([0.75 * v for v in (0.90, 0.92, 0.94)])
    assert rd_mvtec == f"{100 * mean:.1f} ± {100 * std:.1f}"
    assert math.isclose(std, 0.75 * 0.02, rel_tol=1e-9)  # sample std (n - 1)
    # crr on mvtec: one seed failed -> 2 of 3 runs, marked
    assert rows["crr"][header.index("mvtec I-AUROC")].endswith("(2/3)")
    assert rows["crr"][1] == "4/6 (1 failed, 1 missing)"
    markdown = report.markdown()
    assert "**FAILED**" in markdown and "RuntimeError: CUDA out of memory" in markdown
    assert "**MISSING**" in markdown


def test_failed_cell_without_any_success_shows_failed(tmp_path):
    root = tmp_path / "m"
    _job(root, 0, ["method=rd", "seed=0"], results=0.9)
    _job(root, 1, ["method=rd", "seed=1"], results=0.8)
    _job(root, 2, ["method=crr", "seed=0"], error=KeyError("x"))
    _job(root, 3, ["method=crr", "seed=1"], error=KeyError("x"))
    rows = {r[0]: r for r in build_report([root]).summary_rows()[1:]}
    assert rows["crr"][2] == "FAILED"
    assert "±" in rows["rd"][2]


def test_never_started_jobs_of_a_sweep_are_listed(tmp_path):
    root = tmp_path / "m"
    _job(root, 0, ["method=rd", "seed=0"], results=0.9)
    spec = {"hydra": {"sweeper": {"_target_": BASIC, "params": {"seed": "0,1"}}, "overrides": {"task": ["method=rd"]}}}
    OmegaConf.save(OmegaConf.create(spec), root / "multirun.yaml")
    report = build_report([root])
    missing = [r for r in report.runs if r.status == "missing"]
    assert [r.overrides for r in missing] == [["seed=1", "method=rd"]]
    assert "never started" in report.markdown()


def test_files_csv_and_per_class(sweep, tmp_path):
    out = tmp_path / "out"
    assert main([str(sweep), "-o", str(out)]) == 0
    rows = list(csv.DictReader((out / "report.csv").read_text().splitlines()))
    rd = next(r for r in rows if r["method"] == "rd")
    assert float(rd["mvtec/I-AUROC"]) == pytest.approx(0.75 * 0.92)
    assert float(rd["mvtec/I-AUROC_std"]) == pytest.approx(0.75 * 0.02)
    assert rd["mvtec/runs_ok"] == "3" and rd["mvtec/runs_failed"] == "0"
    crr = next(r for r in rows if r["method"] == "crr")
    assert crr["mvtec/runs_failed"] == "1" and crr["visa/runs_missing"] == "1"
    per_class = list(csv.DictReader((out / "report_per_class.csv").read_text().splitlines()))
    row = next(r for r in per_class if r["dataset"] == "visa" and r["class"] == "b" and r["method"] == "rd")
    assert float(row["P-AUROC"]) == pytest.approx(0.72 / 2)
    assert "| mvtec | a | rd |" in (out / "report_per_class.md").read_text()


def test_rows_by_swept_value_for_ablations(tmp_path):
    root = tmp_path / "m"
    num = 0
    for ratio, value in (("0.0", 0.7), ("0.4", 0.9)):
        for seed in (0, 1):
            _job(root, num, ["method=crr", f"decoder.mask_ratio={ratio}", f"seed={seed}"], results=value + seed / 100)
            num += 1
    report = build_report([root])
    assert report.keys == ["decoder.mask_ratio"]
    assert [r[0] for r in report.summary_rows()[1:]] == ["0.0", "0.4"]


def test_unknown_path_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such run"):
        build_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No run directory"):
        build_report([tmp_path / "empty"])


def test_report_uploads_wandb_tables_offline(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert main([str(sweep), "-o", str(out), "--wandb"]) == 0
    run = next((out / "wandb").glob("offline-run-*"))
    tables = {p.name.split("_")[0] for p in (run / "files" / "media" / "table" / "report").glob("*.table.json")}
    assert tables == {"summary", "per"}
    summary = json.loads(next((run / "files" / "media" / "table" / "report").glob("summary_*.table.json")).read_text())
    assert summary["columns"][:2] == ["method", "runs"] and len(summary["data"]) == 2


def test_wandb_settings_group_a_sweep(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write
    from workflow_helpers import compose_entry

    from mcad.logging import logger_settings

    cfg = compose_entry("train", ["logger=wandb", "method=rd", f"hydra.run.dir={tmp_path}"])
    hydra_node = HydraConfig.instance().cfg.hydra
    with read_write(hydra_node):
        hydra_node.mode = RunMode.MULTIRUN
        hydra_node.sweep.dir = str(tmp_path / "sweep")
        hydra_node.job.num = 3
        hydra_node.job.override_dirname = "method=rd,seed=1"
    settings = logger_settings(cfg, cfg.logger.wandb)
    assert settings["group"] == str(tmp_path / "sweep")
    assert settings["name"] == "3:method=rd,seed=1"
    assert {"method=rd", "data=synthetic", "backbone=wide_resnet50_2"} <= set(settings["tags"])
    assert logger_settings(cfg, OmegaConf.create({"_target_": "lightning.pytorch.loggers.CSVLogger"})) == {}
