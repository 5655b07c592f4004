"""Weights & Biases: the HTML as ``wandb.Html``, heatmap images, an incremental table, scalars.

Everything goes through one ``run.log`` call per pass with the key ``trainer/global_step``
(never ``step=``: W&B drops non-monotonic steps, and the trainer owns the step counter).
"""

from ..monitor.report import MonitorReport
from ..monitor.values import HIGHER, definition
from .base import Sink
from .render import result_html, result_image, table_columns, table_rows


class WandbSink(Sink):
    """Logs into an active W&B run (for Lightning: ``WandbLogger.experiment``).

    Args:
        run: the ``wandb`` run.
        step_key: the step metric logged with every entry (Lightning: ``trainer/global_step``;
            the HF Trainer: ``train/global_step``).
        log_html, log_figures, log_table: what to log besides scalars.
    """

    def __init__(self, run, step_key: str = "trainer/global_step", log_html: bool = True, log_figures: bool = True,
                 log_table: bool = True):
        self.run = run
        self.step_key = step_key
        self.log_html, self.log_figures, self.log_table = log_html, log_figures, log_table
        self._tables: dict[str, dict] = {}  # per monitor prefix: its table and columns
        self._defined: set[str] = set()

    def log_report(self, report: MonitorReport) -> None:
        import wandb

        entry: dict = dict(report.scalars())
        if report.prefix not in self._defined:
            self._defined.add(report.prefix)
            self.run.define_metric(f"{report.prefix}/*", step_metric=self.step_key)  # plot against the trainer's step
            for name in report.value_names:  # the run summary keeps each mean's best value, as defined
                better = definition(name).better
                if better is not None:
                    self.run.define_metric(f"{report.prefix}/mean/{name}", step_metric=self.step_key,
                                           summary="max" if better == HIGHER else "min")
            if report.results:  # the probe set itself, once, for reference next to the per-step table
                entry[f"{report.prefix}/probes"] = wandb.Table(
                    columns=["probe", "prompt", "target", "evidence"],
                    data=[[r.probe.name, r.probe.display_prompt, r.probe.target or "", " | ".join(map(str, r.probe.evidence))]
                          for r in report.results])
        for result in report.results:
            base = f"{report.prefix}/{result.probe.name}"
            if self.log_html:
                entry[f"{base}/html"] = wandb.Html(result_html(result, report), inject=False, data_is_not_path=True)
            if self.log_figures and report.maps:  # method="dummy": no map to draw
                entry[f"{base}/heatmap"] = wandb.Image(result_image(result, report))
        if self.log_table and report.results:
            tables = self._tables.setdefault(report.prefix, {})
            if "table" not in tables:  # the monitor declares every value up front: columns never change
                tables["columns"] = table_columns(report)
                tables["table"] = wandb.Table(columns=tables["columns"], log_mode="INCREMENTAL")
            for row in table_rows(report, tables["columns"]):
                tables["table"].add_data(*row)
            entry[f"{report.prefix}/table"] = tables["table"]
        entry[self.step_key] = report.step
        self.run.log(entry)
