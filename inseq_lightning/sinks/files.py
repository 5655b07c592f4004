"""Plain files, for CSVLogger, MLflow or no logger: HTML pages, attribution JSON and a drift CSV."""

import csv
import math
from pathlib import Path

from ..monitor.drift import DRIFT_COVERAGE, DRIFT_METRICS
from ..monitor.report import MonitorReport
from .base import Sink
from .render import result_html


class FileSink(Sink):
    """Writes ``<root>/step_<N>/<probe>.html`` and ``<probe>.json`` (``FeatureAttributionOutput.load``
    reads it back) and appends one row per probe and pass to ``<root>/drift.csv``."""

    def __init__(self, root: str | Path, save_json: bool = True, save_html: bool = True):
        self.root = Path(root)
        self.save_json, self.save_html = save_json, save_html

    def log_report(self, report: MonitorReport) -> None:
        folder = self.root / f"step_{report.step}"
        folder.mkdir(parents=True, exist_ok=True)
        for result in report.results:
            if self.save_html:
                (folder / f"{result.probe.name}.html").write_text(result_html(result, report), encoding="utf-8")
            if self.save_json:
                result.output.save(folder / f"{result.probe.name}.json", overwrite=True)
        self._append_csv(report)

    def _append_csv(self, report: MonitorReport) -> None:
        path = self.root / "drift.csv"
        scores = sorted({name for r in report.results for name in r.step_scores})
        drift = (*DRIFT_METRICS, *DRIFT_COVERAGE)
        columns = ["step", "epoch", "stage", "method", "probe", *scores,
                   *[f"drift_ref/{m}" for m in drift], *[f"drift_prev/{m}" for m in drift], "evidence_mass"]
        new_file = not path.is_file()
        if not new_file:
            with path.open(newline="") as handle:
                existing = next(csv.reader(handle), [])
            columns = existing  # the header is written once; later rows follow it
        rows = []
        for r in report.results:
            row = {"step": report.step, "epoch": report.epoch, "stage": report.stage, "method": report.method,
                   "probe": r.probe.name, "evidence_mass": r.evidence_mass, **r.step_scores,
                   **{f"drift_ref/{m}": r.drift_reference.get(m, math.nan) for m in drift},
                   **{f"drift_prev/{m}": r.drift_previous.get(m, math.nan) for m in drift}}
            rows.append({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
