"""Weights & Biases: the HTML as ``wandb.Html``, heatmap images, an incremental table, scalars.

Everything goes through one ``run.log`` call per pass with the key ``trainer/global_step``
(never ``step=``: W&B drops non-monotonic steps, and the trainer owns the step counter).
"""

from ..monitor.report import MonitorReport
from .base import Sink
from .render import result_html, result_image, table_columns, table_row


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
        self._table = None
        self._score_names: list[str] | None = None
        self._defined: set[str] = set()

    def log_report(self, report: MonitorReport) -> None:
        import wandb

        entry: dict = dict(report.scalars())
        if report.prefix not in self._defined:
            self._defined.add(report.prefix)
            self.run.define_metric(f"{report.prefix}/*", step_metric=self.step_key)  # plot against the trainer's step
            if report.results:  # the probe set itself, once, for reference next to the per-step table
                entry[f"{report.prefix}/probes"] = wandb.Table(
                    columns=["probe", "prompt", "target", "evidence"],
                    data=[[r.probe.name, r.probe.prompt, r.probe.target or "", " | ".join(map(str, r.probe.evidence))]
                          for r in report.results])
        for result in report.results:
            base = f"{report.prefix}/{result.probe.name}"
            if self.log_html:
                entry[f"{base}/html"] = wandb.Html(result_html(result, report), inject=False, data_is_not_path=True)
            if self.log_figures:
                entry[f"{base}/heatmap"] = wandb.Image(result_image(result, report))
        if self.log_table and report.results:
            if self._table is None:
                self._score_names = sorted(report.results[0].step_scores)
                self._table = wandb.Table(columns=table_columns(self._score_names), log_mode="INCREMENTAL")
            for result in report.results:
                self._table.add_data(*table_row(result, report, self._score_names))
            entry[f"{report.prefix}/table"] = self._table
        entry[self.step_key] = report.step
        self.run.log(entry)
