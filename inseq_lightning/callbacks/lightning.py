"""``AttributionMonitor``: the Lightning callback, a thin adapter onto :class:`ProbeMonitor`.

It decides when to attribute (cadence, accumulation boundaries, sanity check, validate/test),
where results go (sinks found from ``trainer.loggers``) and what a checkpoint keeps (the drift
history). Everything else lives in :mod:`inseq_lightning.monitor`.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import PreTrainedModel

from ..sinks import Sink
from .common import MonitorCallbackBase, unwrap_for_attribution


class AttributionMonitor(MonitorCallbackBase, Callback):
    r"""Attribute a fixed probe set on the live model during training and log it to the run's trackers.

    Args:
        probes: a :class:`~inseq_lightning.monitor.ProbeSet`, a ``.jsonl``/``.csv`` path, or a list of
            ``(prompt, target[, evidence])`` tuples, dicts or ``Probe`` objects.
        method: attribution method name. ``"dummy"`` tracks the step scores only (no attribution map,
            no backward: the cheapest monitor); map-based values, heatmaps and the plugin's map
            records are then absent, and ``faithfulness=True``, alert rules on map-based values and the
            canary of probes with a cue are refused (see :class:`~inseq_lightning.monitor.ProbeMonitor`).
        step_scores: step functions computed alongside (their means are logged as scalars).
        every_n_train_steps: attribute every N optimizer steps (at gradient-accumulation boundaries).
        every_n_epochs: attribute at the end of every N training epochs. Mutually exclusive with
            ``every_n_train_steps``; when neither is given, ``every_n_epochs=1``.
        attribute_on_fit_start: attribute once before the first step: the drift reference.
        attribute_on_validate, attribute_on_test: attribute at the end of ``trainer.validate()`` /
            ``trainer.test()`` (snapshots: they do not move the drift history).
        method_kwargs: extra attribution arguments (e.g. ``{"n_steps": 20}``).
        model: the Hugging Face model, a name of an attribute of the LightningModule holding it, or
            None to find it (``pl_module.model``, or the module itself).
        tokenizer: the tokenizer, or None for ``pl_module.tokenizer``.
        log_text, log_figures, log_html, log_table: what to log besides scalars.
        save_files: also write HTML, attribution JSON and a drift CSV under ``<log_dir>/attributions``.
            None: only when no TensorBoard or W&B logger is attached.
        batch_size: probes per forward pass.
        strict: raise when a probe or sink fails instead of warning once and skipping it.
        prefix: tag prefix (default ``attribution/<method>``); give two monitors different ones.
        sinks: extra :class:`~inseq_lightning.sinks.Sink` objects (MLflow, a database, ...), fed on rank zero.
        extra_values: ``{name: fn(result) -> float}``, values of your own computed per probe and logged
            like the built-in ones (see :class:`~inseq_lightning.monitor.ProbeMonitor`).
        faithfulness: measure comprehensiveness and sufficiency of every probe's map each pass (AOPC over
            ``faithfulness_fractions``, soft variants, a random-ranking baseline; docs/monitoring.md).
            Off by default: on CPU it costs 1-1.4 times the attribution itself (docs/monitoring.md).
        faithfulness_fractions: shares of the context removed/kept.
        faithfulness_ranking: ``"aggregated"`` (the map summed over the answer's tokens) or ``"per_step"``.
        faithfulness_scope: ``"content"`` (a chat probe's template tokens are never removed) or ``"context"``.
        alerts: :class:`~inseq_lightning.monitor.alerts.AlertRule` objects checked after every training
            pass (below/above a threshold, change against the first or previous pass, with patience);
            a rule with ``stop_training=True`` sets ``trainer.should_stop`` when it fires.
        canary_alert: when a probe has a cue, warn when its ``cue_mass`` rises above its ``evidence_mass``.
        stabilization_metric, stabilization_tolerance: the stabilization point (``mean/stabilization_step``):
            the first pass after which ``mean/drift_prev/<metric>`` stayed within the tolerance.

    After each pass the means over probes are in ``trainer.callback_metrics`` as
    ``<prefix>/mean/<name>`` (e.g. ``attribution/saliency/mean/evidence_mass``), on every rank, so
    ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them, placed before or after this callback:
    step passes run in ``on_train_batch_end`` and epoch passes after the epoch's last batch, both
    before Lightning's epoch-end and validation-end checks. ``LOGGED_VALUES`` in
    :mod:`inseq_lightning.monitor.values` gives each value's better direction (the ``mode``).

    Example::

        monitor = AttributionMonitor([("Paris is the capital of", " France")], every_n_train_steps=50)
        Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs")).fit(module)
    """

    def __init__(
        self,
        probes,
        method: str = "saliency",
        step_scores: Sequence[str] = ("probability",),
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        attribute_on_fit_start: bool = True,
        attribute_on_validate: bool = True,
        attribute_on_test: bool = True,
        method_kwargs: dict[str, Any] | None = None,
        model: PreTrainedModel | str | None = None,
        tokenizer=None,
        log_text: bool = True,
        log_figures: bool = True,
        log_html: bool = True,
        log_table: bool = True,
        save_files: bool | None = None,
        batch_size: int = 8,
        strict: bool = False,
        prefix: str | None = None,
        sinks: Sequence[Sink] = (),
        extra_values: dict[str, Any] | None = None,
        faithfulness: bool = False,
        faithfulness_fractions: Sequence[float] = (0.1, 0.2, 0.5),
        faithfulness_ranking: str = "aggregated",
        faithfulness_scope: str = "content",
        alerts: Sequence = (),
        canary_alert: bool = True,
        stabilization_metric: str = "cosine",
        stabilization_tolerance: float = 0.05,
    ):
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise MisconfigurationException(
                "AttributionMonitor: give every_n_train_steps or every_n_epochs, not both "
                f"(got {every_n_train_steps} and {every_n_epochs})"
            )
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MisconfigurationException(f"AttributionMonitor: {name} must be a positive integer, got {value!r}")
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self._init_monitor(probes, method, step_scores, method_kwargs, batch_size, strict, prefix,
                           {"log_text": log_text, "log_figures": log_figures, "log_html": log_html,
                            "log_table": log_table}, save_files, sinks, extra_values,
                           {"faithfulness": faithfulness, "faithfulness_fractions": tuple(faithfulness_fractions),
                            "faithfulness_ranking": faithfulness_ranking, "faithfulness_scope": faithfulness_scope},
                           {"alerts": list(alerts), "canary_alert": canary_alert,
                            "stabilization_metric": stabilization_metric,
                            "stabilization_tolerance": stabilization_tolerance})
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.attribute_on_fit_start = attribute_on_fit_start
        self.attribute_on_validate = attribute_on_validate
        self.attribute_on_test = attribute_on_test
        self._model_ref = model
        self._tokenizer = tokenizer
        self._last_seen_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.monitor.prefix, every_n_train_steps=self.every_n_train_steps,
                                        every_n_epochs=self.every_n_epochs)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resolve_model(pl_module)
        self.monitor.check_probes(self.model, self.tokenizer)  # fail before training, never in the middle
        # Directories are resolved on every rank: trainer.log_dir broadcasts, so calling it from
        # rank zero alone would hang a distributed run.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.sinks = self._build_sinks(trainer, log_dir) if trainer.is_global_zero else []

    def _resolve_model(self, pl_module: LightningModule):
        model = self._model_ref
        if isinstance(model, str):
            model = getattr(pl_module, model, None)
        elif model is None:
            model = getattr(pl_module, "model", None)
            if not isinstance(model, PreTrainedModel) and isinstance(pl_module, PreTrainedModel):
                model = pl_module
        model = unwrap_for_attribution(model)
        if not isinstance(model, PreTrainedModel):
            raise MisconfigurationException(
                "AttributionMonitor could not find the Hugging Face model: keep it in `self.model` of your "
                "LightningModule, or pass `model=` (the model or the attribute name holding it)"
            )
        tokenizer = self._tokenizer if self._tokenizer is not None else getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise MisconfigurationException(
                "AttributionMonitor needs the tokenizer: pass `tokenizer=` or set `self.tokenizer` on your LightningModule"
            )
        self.model, self.tokenizer = model, tokenizer

    def _build_sinks(self, trainer: Trainer, log_dir: str) -> list[Sink]:
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        csv_dirs = [lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        files_root = csv_dirs[0] if csv_dirs else log_dir
        if not trainer.loggers and self.save_files is None and Path(files_root).resolve() == Path.cwd().resolve():
            # Nothing configured says where this run's files belong: never litter the working directory.
            warnings.warn("AttributionMonitor: the trainer has no logger and no default_root_dir, so the attributions "
                          "are kept in monitor.reports only; attach a logger, set default_root_dir= or pass "
                          "save_files=True to write them.", UserWarning, stacklevel=2)
            files_root = None
        return self._standard_sinks(
            tb_writer=tensorboard.experiment if tensorboard else None,
            tb_log_dir=tensorboard.log_dir if tensorboard else None,
            wandb_run=wandb_logger.experiment if wandb_logger else None,
            step_key="trainer/global_step",
            files_root=files_root,
        )

    # ---- the pass -----------------------------------------------------------------------------
    def _run(self, trainer: Trainer, stage: str) -> None:
        # Under FSDP, strategy.model is the sharded root wrapping the LightningModule.
        self._attribute(self.model, self.tokenizer, trainer.global_step, trainer.current_epoch, stage,
                        sharded_root=trainer.strategy.model)
        # The means go where EarlyStopping and ModelCheckpoint look, on every rank (the monitor
        # shares them from rank zero), without a second copy in the loggers.
        head = f"{self.monitor.prefix}/mean/"
        for key in [k for k in trainer.callback_metrics if k.startswith(head)]:
            if key[len(head):] not in self.monitor.last_means:  # a value this pass lacks is not kept stale
                del trainer.callback_metrics[key]
        for name, value in self.monitor.last_means.items():
            trainer.callback_metrics[f"{head}{name}"] = torch.tensor(value)
        if stage == "fit" and self.monitor.stop_requested:  # an alert with stop_training fired (every rank)
            trainer.should_stop = True

    def _epoch_due(self, trainer: Trainer) -> bool:
        return self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_seen_step = trainer.global_step
        if self.attribute_on_fit_start:
            self._run(trainer, "fit")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.every_n_train_steps is None:
            # The epoch's pass runs after its last optimizer step, before any on_train_epoch_end and
            # on_validation_end: EarlyStopping and ModelCheckpoint (which check there) see this
            # epoch's values wherever the monitor is in callbacks=[...].
            if trainer.is_last_batch and self._epoch_due(trainer):
                self._run(trainer, "fit")
            return
        # global_step moves only when the optimizer steps, i.e. at gradient-accumulation boundaries.
        step = trainer.global_step
        if step == self._last_seen_step:
            return
        self._last_seen_step = step
        if step % self.every_n_train_steps == 0:
            self._run(trainer, "fit")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_due(trainer):  # an epoch cut short (max_steps) had no last batch; else a no-op
            self._run(trainer, "fit")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate" or not self.attribute_on_validate:
            return
        self._run(trainer, "validate")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.attribute_on_test:
            self._run(trainer, "test")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._print_summary()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close_sinks()

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)
