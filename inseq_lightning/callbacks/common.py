"""What both training callbacks share: the monitor, the standard sinks, timing and closing."""

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..monitor import ProbeMonitor
from ..monitor.report import MonitorReport
from ..sinks import FileSink, Sink, TensorBoardSink

KEEP_REPORTS = 20  # the newest reports stay on the callback, for notebooks and tests


def unwrap_for_attribution(model):
    """The Hugging Face model inside the wrappers training puts around it, attributed eagerly with the
    same weights: ``torch.compile``'s ``_orig_mod``, PEFT's ``get_base_model()`` (adapters on, in
    place), DDP / FSDP1 ``.module``. Stops at the first ``PreTrainedModel`` (or when nothing unwraps)."""
    from transformers import PreTrainedModel

    while model is not None and not isinstance(model, PreTrainedModel):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


class MonitorCallbackBase:
    """Mixin of the Lightning and HF callbacks; they only decide when to call :meth:`_attribute`."""

    def _init_monitor(self, probes, method: str, step_scores: Sequence[str], method_kwargs: dict[str, Any] | None,
                      batch_size: int, strict: bool, prefix: str | None, log_options: dict[str, bool],
                      save_files: bool | None, sinks: Sequence[Sink], extra_values=None,
                      faithfulness: dict[str, Any] | None = None, alerts: dict[str, Any] | None = None) -> None:
        self.monitor = ProbeMonitor(probes, method, step_scores, method_kwargs, batch_size, strict, prefix,
                                    extra_values, **(faithfulness or {}), **(alerts or {}))
        self.log_options = dict(log_options)
        self.save_files = save_files
        self.extra_sinks = list(sinks)
        self.sinks: list[Sink] = []
        self.reports: list[MonitorReport] = []  # this process's reports, newest last
        self.seconds_spent = 0.0  # wall time inside the monitor (attribution + sinks), this process

    @property
    def history(self):
        """The drift history: ``history.probes[name].rows`` holds one row of scalars per pass."""
        return self.monitor.history

    def _standard_sinks(self, tb_writer=None, tb_log_dir=None, wandb_run=None, step_key: str = "trainer/global_step",
                        files_root: str | Path | None = None) -> list[Sink]:
        """TensorBoard and W&B when there are; files when asked for, or when there is nothing else."""
        sinks: list[Sink] = []
        if tb_writer is not None:
            sinks.append(TensorBoardSink(tb_writer, tb_log_dir, self.log_options["log_text"],
                                         self.log_options["log_figures"], self.log_options["log_html"]))
        if wandb_run is not None:
            from ..sinks.wandb import WandbSink

            sinks.append(WandbSink(wandb_run, step_key, self.log_options["log_html"], self.log_options["log_figures"],
                                   self.log_options["log_table"]))
        save_files = self.save_files if self.save_files is not None else not sinks
        if save_files and files_root is not None:
            sinks.append(FileSink(Path(files_root) / "attributions" / self.monitor.prefix.replace("/", "_")))
        return sinks + self.extra_sinks

    def _attribute(self, model, tokenizer, step: int, epoch: int | None, stage: str,
                   sharded_root=None) -> MonitorReport | None:
        """One pass, on every rank (the monitor splits or runs in lockstep); never twice for a step."""
        if self.monitor.already_logged(step, stage):
            return None
        started = time.perf_counter()
        report = self.monitor.run(model, tokenizer, step, epoch, stage, self.sinks, sharded_root)
        self.seconds_spent += time.perf_counter() - started
        if report is not None:
            self.reports = (self.reports + [report])[-KEEP_REPORTS:]
        return report

    def summary(self) -> str:
        """One line: training passes, the stabilization point and the alerts fired (printed at the end of fit)."""
        return self.monitor.summary()

    def _print_summary(self) -> None:
        if self.monitor.stabilization.passes or self.monitor.alerts.fired:
            print(self.summary())  # the one line a run ends with

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001 - never fail the run while closing
                self.monitor._fail(f"sink:{type(sink).__name__}", f"Sink {type(sink).__name__} failed to close", error)
