"""Plain files, for CSVLogger, MLflow or no logger: HTML pages, attribution JSON and a drift CSV."""

import csv
import math
from pathlib import Path

from ..monitor.report import MonitorReport
from ..monitor.values import mean_only_names
from .base import Sink
from .render import result_html


class FileSink(Sink):
    """Writes ``<root>/step_<N>/<probe>.html`` and ``<probe>.json`` (``FeatureAttributionOutput.load``
    reads it back) and appends one row per probe, and a ``mean`` row, per pass to ``<root>/drift.csv``
    (columns: ``step, epoch, stage, method, probe`` and every logged value, named as in the scalars)."""

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
        """One row per probe and a ``mean`` row per pass, under the names the scalars use. A value that
        appears after the header was written (a user value, a step score) rewrites the file with the
        wider header: no column is ever dropped."""
        path = self.root / "drift.csv"
        rows = [{k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                for row in report.rows()]
        columns = [*_KEYS, *report.value_names, *mean_only_names(report.maps), "seconds"]
        columns += [k for row in rows for k in row if k not in columns]
        columns = list(dict.fromkeys(columns))
        existing: list[dict] = []
        header: list[str] = []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                if not set(columns) <= set(header):
                    existing = list(reader)
        if header and set(columns) <= set(header):
            with path.open("a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=header).writerows(rows)
            return
        header = header + [c for c in columns if c not in header]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(existing + rows)


_KEYS = ("step", "epoch", "stage", "method", "probe")
