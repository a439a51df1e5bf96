"""The paper-style tables of a sweep (or of several run directories): collection, aggregation, files.

Every run of ``mcad.train`` writes ``results.json`` into its run directory; a job of a multirun that raised
writes ``failed.json`` there instead (see :func:`record_failure`). This module collects the runs under the
given paths, groups them into rows (the swept values other than the seed and the dataset; by default the
method) and columns (dataset × metric), and writes

* ``report.md`` / ``report.csv``: mean ± std over seeds per row and dataset;
* ``report_per_class.md`` / ``report_per_class.csv``: the same per class;

plus, with ``--wandb``, both tables as W&B tables, and with ``--html`` one self-contained ``report.html``
(both tables, each run's ROC / PRO curves and map overlays; see :mod:`mcad.reporting.html`). Runs
that failed, and jobs of a sweep that left no result (killed, still running, never started), are counted and
marked in the tables (``FAILED`` / ``MISSING`` when no run of a cell succeeded, ``(k/n)`` when only k of n
did) and listed under the table with their error.

Statistics: values are fractions in the files' CSV and percent with one decimal in Markdown (as papers
print them); ``std`` is the sample standard deviation (n - 1) over the successful runs of a cell, empty for
a single run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcad.evaluation.results import METRIC_COLUMNS
from mcad.runs import FAILED_FILE, RESULTS_FILE
from mcad.utils.files import atomic_write_text

log = logging.getLogger(__name__)

# Overrides that never define a row: seeds are aggregated, datasets are columns.
SEED_KEYS = ("seed",)
DATA_KEYS = ("data",)
# Overrides that differ between datasets or machines, not between compared settings.
NON_ROW_PREFIXES = ("data.root", "paths.", "hydra.", "trainer.devices", "trainer.num_nodes")
# Folders of a run directory that never hold another run.
_SKIP_DIRS = {".hydra", "checkpoints", "csv", "tensorboard", "wandb", ".submitit", "visualizations", "maps"}
# Error of a job that a sweep defined but that has no directory (its Run's path is the sweep folder).
NEVER_STARTED = "never started (no job directory)"


# ----------------------------------------------------------------------------------------- collecting
@dataclass
class Run:
    """One job: its directory, status (``ok``, ``failed`` or ``missing``), overrides and results."""

    path: Path
    status: str
    overrides: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = None
    error: str | None = None
    dataset: str | None = None

    def override_map(self) -> dict[str, str]:
        """``{key: value}`` of the job's overrides (``+``/``~`` prefixes dropped)."""
        out = {}
        for item in self.overrides:
            key, _, value = item.partition("=")
            out[key.lstrip("+~")] = value
        return out


def _read_yaml_list(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        container = OmegaConf.to_container(OmegaConf.load(path))
        assert isinstance(container, (list, dict))  # the container of a ListConfig / DictConfig
        return [str(x) for x in container]
    except Exception:  # noqa: BLE001 - a corrupt file must not stop the report
        return []


def _dataset_of(run_dir: Path, overrides: dict[str, str]) -> str | None:
    """The dataset name of a run without results: its saved config's ``data.name``, else the override."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        try:
            name = OmegaConf.select(OmegaConf.load(config), "data.name", throw_on_resolution_failure=False)
            if isinstance(name, str):
                return name
        except Exception:  # noqa: BLE001
            pass
    return overrides.get("data")


def load_run(run_dir: Path) -> Run:
    """Reads one run directory (results, failure record or neither)."""
    overrides = _read_yaml_list(run_dir / ".hydra" / "overrides.yaml")
    results_path, failed_path = run_dir / RESULTS_FILE, run_dir / FAILED_FILE
    results = failed = None
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            failed = {"error_type": type(err).__name__, "message": f"unreadable {RESULTS_FILE}: {err}"}
    if failed_path.is_file() and (results is None or failed_path.stat().st_mtime > results_path.stat().st_mtime):
        try:
            failed = json.loads(failed_path.read_text())
        except (OSError, json.JSONDecodeError):
            failed = {"error_type": "unknown", "message": f"unreadable {FAILED_FILE}"}
        results = None
    if results is not None:
        if not overrides:
            overrides = [f"method={results.get('method')}"] if results.get("method") else []
        return Run(run_dir, "ok", overrides, results, dataset=results.get("data"))
    run = Run(run_dir, "failed" if failed else "missing", overrides)
    run.dataset = _dataset_of(run_dir, run.override_map())
    if failed:
        run.error = f"{failed.get('error_type')}: " + (str(failed.get("message", "")).strip().splitlines() or [""])[0]
    else:
        run.error = "no results (killed, still running, or never finished)"
    return run


def _is_run_dir(path: Path) -> bool:
    return (path / RESULTS_FILE).is_file() or (path / FAILED_FILE).is_file() or (path / ".hydra").is_dir()


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """All runs under ``paths`` (run directories or folders holding them, e.g. a multirun directory).

    Includes the jobs a basic-sweeper multirun defined but that left no directory (status ``missing``).
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"No such run or multirun directory: {root}")
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            if _is_run_dir(here) and here.resolve() not in seen:
                seen.add(here.resolve())
                runs.append(load_run(here))
        runs.extend(_never_started(root, runs))
    return runs


def _never_started(sweep_dir: Path, runs: list[Run]) -> list[Run]:
    """Jobs of the sweep in ``sweep_dir/multirun.yaml`` that have no directory under it.

    The sweep is re-expanded as Hydra's basic sweeper does it (``hydra.sweeper.params``, then the command
    line's task overrides, Cartesian product), and compared by override set with the jobs found.
    """
    spec = sweep_dir / "multirun.yaml"
    if not spec.is_file():
        return []
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(spec)
        sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None) or {}
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return []  # e.g. Optuna: the number of trials is not a product of sweeps
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        task = [str(x) for x in OmegaConf.select(cfg, "hydra.overrides.task", default=[])]
        parsed = OverridesParser.create().parse_overrides(params + task)
        expected = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as err:  # noqa: BLE001 - missing-job detection is best effort
        log.warning("Could not expand the sweep of %s (%s); never-started jobs are not listed.", spec, err)
        return []
    root = sweep_dir.resolve()
    present = {frozenset(r.overrides) for r in runs if r.path.resolve().is_relative_to(root)}
    missing = []
    for job in expected:
        if frozenset(job) not in present:
            run = Run(sweep_dir, "missing", list(job), error=NEVER_STARTED)
            run.dataset = run.override_map().get("data")
            missing.append(run)
    return missing


# ----------------------------------------------------------------------------------------- grouping
def row_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys that vary across the runs, minus seeds, datasets and paths (the default rows)."""
    values: dict[str, set[str]] = OrderedDict()
    maps = [r.override_map() for r in runs]
    for m in maps:
        for key in m:
            values.setdefault(key, set())
    for key in values:
        values[key] = {m.get(key, "") for m in maps}
    keys = [
        k
        for k, v in values.items()
        if len(v) > 1 and k not in SEED_KEYS and k not in DATA_KEYS and not k.startswith(NON_ROW_PREFIXES)
    ]
    # `method` first: it is the usual row of a paper table.
    return sorted(keys, key=lambda k: (k != "method", list(values).index(k)))


def row_label(run: Run, keys: Sequence[str]) -> str:
    """The row a run belongs to: the values of ``keys`` (or the method name if there are none)."""
    if not keys:
        if run.results and run.results.get("method"):
            return str(run.results["method"])
        return run.override_map().get("method", "run")
    m = run.override_map()
    return ", ".join(m.get(k, "–") for k in keys)


@dataclass
class Cell:
    """The runs of one (row, dataset) pair."""

    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    per_class: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    ok: int = 0
    failed: int = 0
    missing: int = 0

    @property
    def total(self) -> int:
        """All runs of the cell."""
        return self.ok + self.failed + self.missing


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def aggregate(runs: Sequence[Run], keys: Sequence[str]) -> tuple[dict[str, dict[str, Cell]], list[str]]:
    """Groups the runs into ``{row: {dataset: Cell}}``; returns it and the datasets in order of appearance."""
    table: dict[str, dict[str, Cell]] = OrderedDict()
    datasets: list[str] = []
    for run in runs:
        row = row_label(run, keys)
        data = run.dataset or "?"
        if data not in datasets:
            datasets.append(data)
        cell = table.setdefault(row, OrderedDict()).setdefault(data, Cell())
        if run.status != "ok":
            setattr(cell, run.status, getattr(cell, run.status) + 1)
            continue
        cell.ok += 1
        assert run.results is not None
        for metric, value in (run.results.get("mean") or {}).items():
            if (v := _finite(value)) is not None:
                cell.values[metric].append(v)
        for cls, metrics in (run.results.get("per_class") or {}).items():
            for metric, value in metrics.items():
                if (v := _finite(value)) is not None:
                    cell.per_class[cls][metric].append(v)
    return table, datasets


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_cell(values: Sequence[float], cell: Cell) -> str:
    """``98.1 ± 0.3`` in percent; ``FAILED``/``MISSING`` without any value; ``(k/n)`` when runs are lacking."""
    if not values:
        if cell.ok:
            return "–"  # the metric is undefined for this data (e.g. no anomalous pixel)
        return "FAILED" if cell.failed else "MISSING"
    mean, std = mean_std(values)
    text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    if cell.ok < cell.total:
        text += f" ({cell.ok}/{cell.total})"
    return text


def _runs_text(cells: Iterable[Cell]) -> str:
    cells = list(cells)
    ok, total = sum(c.ok for c in cells), sum(c.total for c in cells)
    failed, missing = sum(c.failed for c in cells), sum(c.missing for c in cells)
    text = f"{ok}/{total}"
    extra = [f"{failed} failed" if failed else "", f"{missing} missing" if missing else ""]
    extra = [e for e in extra if e]
    return text + (f" ({', '.join(extra)})" if extra else "")


# ----------------------------------------------------------------------------------------- writing
@dataclass
class Report:
    """The tables of a set of runs."""

    runs: list[Run]
    keys: list[str]
    table: dict[str, dict[str, Cell]]
    datasets: list[str]
    metrics: list[str]

    @property
    def row_header(self) -> str:
        """Header of the row column: the row keys, or ``method``."""
        return ", ".join(self.keys) if self.keys else "method"

    def summary_rows(self) -> list[list[str]]:
        """Rows of the main table as display strings (header first)."""
        header = [self.row_header, "runs"] + [f"{d} {m}" for d in self.datasets for m in self.metrics]
        rows = [header]
        for row, cells in self.table.items():
            line = [row, _runs_text(cells.values())]
            for data in self.datasets:
                cell = cells.get(data)
                for metric in self.metrics:
                    line.append("MISSING" if cell is None else format_cell(cell.values.get(metric, []), cell))
            rows.append(line)
        return rows

    def per_class_rows(self) -> list[list[str]]:
        """Rows of the per-class table as display strings (header first)."""
        rows = [["dataset", "class", self.row_header, *self.metrics]]
        for data in self.datasets:
            classes: list[str] = []
            for cells in self.table.values():
                for cls in cells.get(data, Cell()).per_class:
                    if cls not in classes:
                        classes.append(cls)
            for cls in classes:
                for row, cells in self.table.items():
                    cell = cells.get(data)
                    if cell is None:
                        continue
                    values = cell.per_class.get(cls, {})
                    rows.append([data, cls, row, *(format_cell(values.get(m, []), cell) for m in self.metrics)])
        return rows

    def problems(self) -> list[str]:
        """One line per failed or missing run."""
        lines = []
        for run in self.runs:
            if run.status == "ok":
                continue
            label = " ".join(run.overrides) or str(run.path)
            lines.append(f"- **{run.status.upper()}** `{label}` ({run.path}): {run.error}")
        return lines

    def markdown(self) -> str:
        """The main table, a legend and the list of failed/missing runs."""
        text = _markdown_table(self.summary_rows())
        text += (
            "\nMean ± sample std over seeds, in %. `(k/n)`: only k of the n runs of the cell succeeded; "
            "`FAILED` / `MISSING`: none did.\n"
        )
        problems = self.problems()
        if problems:
            text += "\nFailed or missing runs:\n\n" + "\n".join(problems) + "\n"
        return text

    def per_class_markdown(self) -> str:
        """The per-class table."""
        return _markdown_table(self.per_class_rows())

    def csv(self) -> str:
        """Main table as CSV fractions: mean and std per dataset and metric, run counts per dataset."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = [self.row_header]
        for data in self.datasets:
            header += [f"{data}/runs_ok", f"{data}/runs_failed", f"{data}/runs_missing"]
            for metric in self.metrics:
                header += [f"{data}/{metric}", f"{data}/{metric}_std"]
        writer.writerow(header)
        for row, cells in self.table.items():
            line: list[Any] = [row]
            for data in self.datasets:
                cell = cells.get(data, Cell())
                line += [cell.ok, cell.failed, cell.missing]
                for metric in self.metrics:
                    line += _csv_stats(cell.values.get(metric, []))
            writer.writerow(line)
        return buf.getvalue()

    def per_class_csv(self) -> str:
        """Per-class table as CSV fractions."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        columns = [f"{m}{s}" for m in self.metrics for s in ("", "_std")]
        writer.writerow(["dataset", "class", self.row_header, "runs_ok", *columns])
        for data in self.datasets:
            for row, cells in self.table.items():
                cell = cells.get(data)
                if cell is None:
                    continue
                for cls, values in cell.per_class.items():
                    line: list[Any] = [data, cls, row, cell.ok]
                    for metric in self.metrics:
                        line += _csv_stats(values.get(metric, []))
                    writer.writerow(line)
        return buf.getvalue()

    def write(self, output_dir: str | Path) -> dict[str, Path]:
        """Writes the four files; returns their paths by name."""
        out = Path(output_dir)
        paths = {
            "md": out / "report.md",
            "csv": out / "report.csv",
            "per_class_md": out / "report_per_class.md",
            "per_class_csv": out / "report_per_class.csv",
        }
        atomic_write_text(paths["md"], self.markdown())
        atomic_write_text(paths["csv"], self.csv())
        atomic_write_text(paths["per_class_md"], self.per_class_markdown())
        atomic_write_text(paths["per_class_csv"], self.per_class_csv())
        return paths

    def to_wandb(
        self, project: str, name: str | None = None, group: str | None = None, directory: str | None = None
    ) -> None:
        """Uploads both tables as W&B tables (a run of job type ``report``; its local files under ``directory``)."""
        import wandb

        run = wandb.init(project=project, name=name, group=group, job_type="report", dir=directory,
                         reinit="finish_previous")  # fmt: skip
        summary, per_class = self.summary_rows(), self.per_class_rows()
        # Unpacked into fresh lists: wandb annotates ``columns`` as ``list[str | int]``, which list[str] is not.
        run.log({
            "report/summary": wandb.Table(columns=[*summary[0]], data=summary[1:]),
            "report/per_class": wandb.Table(columns=[*per_class[0]], data=per_class[1:]),
        })  # fmt: skip
        run.finish()


def _csv_stats(values: Sequence[float]) -> list[Any]:
    if not values:
        return ["", ""]
    mean, std = mean_std(values)
    return [repr(mean), "" if std is None else repr(std)]


def _markdown_table(rows: list[list[str]]) -> str:
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def build_report(
    paths: Sequence[str | Path], rows: Sequence[str] | None = None, metrics: Sequence[str] | None = None
) -> Report:
    """Collects and aggregates the runs under ``paths``.

    Args:
        paths: Multirun directories, run directories, or folders holding them.
        rows: Override keys that define the rows (default: every swept key except seeds and datasets,
            which gives the method for ``-m method=a,b data=x,y seed=0,1,2``).
        metrics: Metric columns (default: the seven metrics and mAD).

    Raises:
        FileNotFoundError: A path does not exist, or no run was found.
    """
    runs = find_runs(paths)
    if not runs:
        where = ", ".join(map(str, paths))
        raise FileNotFoundError(f"No run directory (results.json, failed.json or .hydra/) under {where}.")
    return report_of_runs(runs, rows, metrics)


def report_of_runs(runs: Sequence[Run], rows: Sequence[str] | None = None,
                   metrics: Sequence[str] | None = None) -> Report:  # fmt: skip
    """Aggregates already loaded runs (see :func:`build_report` for ``rows`` and ``metrics``)."""
    runs = list(runs)
    keys = list(rows) if rows else row_keys(runs)
    table, datasets = aggregate(runs, keys)
    return Report(runs, keys, table, datasets, list(metrics or METRIC_COLUMNS))
