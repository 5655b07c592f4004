"""``AttributionCallback``: the Hugging Face ``TrainerCallback``, a thin adapter onto :class:`ProbeMonitor`.

Same probes, methods, step scores, drift and sinks as the Lightning callback, with HF-style
arguments. The default ``attribution_strategy="eval"`` attributes right after each evaluation,
so the attributions describe exactly the weights the next checkpoint stores (``on_evaluate``
runs before ``on_save``).
"""

import os
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..monitor import AttributionMonitorWarning
from ..monitor.alerts import AlertRule
from ..monitor.probes import ProbeSet
from ..sinks import Sink
from .common import MonitorCallbackBase, unwrap_for_attribution

STRATEGIES = ("steps", "epoch", "eval", "no")

# The live objects (tokenizer, writer, extra sinks) of the callbacks attached to each trainer, by
# monitor prefix. Keyed weakly: an entry goes with its trainer, and nothing here refers to one.
_LIVE_OBJECTS: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]]" = weakref.WeakKeyDictionary()


class EvaluationCadenceWarning(AttributionMonitorWarning):
    """``attribution_strategy="eval"`` on a trainer that never evaluates: no pass during training."""


def _evaluation_prefixes(logs: dict) -> list[str]:
    """The metric-key prefixes of the evaluations in ``logs`` (``eval``, ``eval_<dataset>``): every
    evaluation logs ``<prefix>_samples_per_second``; training's own summary uses ``train``."""
    suffix = "_samples_per_second"
    return [k[: -len(suffix)] for k in logs if k.endswith(suffix) and k[: -len(suffix)] != "train"]


class AttributionCallback(MonitorCallbackBase, TrainerCallback, ExportableState):
    r"""Attribute a fixed probe set on the live model during ``Trainer.train`` and log it.

    Args:
        probes: a :class:`~inseq_lightning.monitor.ProbeSet`, a ``.jsonl``/``.csv`` path, or a list of
            ``(prompt, target[, evidence])`` tuples, dicts or ``Probe`` objects.
        method, step_scores, method_kwargs, batch_size, strict, prefix: as for
            :class:`~inseq_lightning.monitor.ProbeMonitor`; ``method="dummy"`` tracks the step scores
            only (no attribution map: no map-based values, heatmaps or plugin map records, and
            ``faithfulness=True``, alert rules on map-based values and the canary are refused).
        attribution_strategy: ``"eval"`` (default: right after each evaluation; warns with
            :class:`EvaluationCadenceWarning` when the trainer's ``eval_strategy`` is ``"no"``), ``"steps"``
            (every ``attribution_steps`` optimizer steps), ``"epoch"`` or ``"no"``.
        attribution_steps: the cadence of ``"steps"``.
        attribute_on_train_begin: attribute once before the first step: the drift reference.
        trainer: the ``Trainer``. Needed to share the TensorBoard writer of its ``TensorBoardCallback``
            (so attributions land in the same run) and for wrapped models (FSDP, DeepSpeed); see
            :meth:`attach`.
        tokenizer: default: the event's ``processing_class``.
        tb_writer: a ``SummaryWriter`` to log into (default: the trainer's, else one in
            ``$TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/runs/attributions``).
        log_text, log_figures, log_html, log_table: what to log besides scalars.
        save_files: also write HTML, JSON and a drift CSV under ``<output_dir>/attributions``;
            None: only when neither TensorBoard nor W&B is in ``report_to``.
        sinks: extra :class:`~inseq_lightning.sinks.Sink` objects.
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
            a rule with ``stop_training=True`` sets ``control.should_training_stop`` when it fires.
        canary_alert: when a probe has a cue, warn when its ``cue_mass`` rises above its ``evidence_mass``.
        stabilization_metric, stabilization_tolerance: the stabilization point (``mean/stabilization_step``):
            the first pass after which ``mean/drift_prev/<metric>`` stayed within the tolerance.

    With ``attribution_strategy="eval"`` each pass runs as the evaluation logs its metrics, and the
    means over probes are added to those metrics as ``eval_<prefix>/mean/<name>`` (the Trainer's own
    prefix convention): ``metric_for_best_model="attribution/saliency/mean/evidence_mass"`` (with
    ``greater_is_better`` from ``LOGGED_VALUES``) and ``EarlyStoppingCallback`` act on them, in any
    callback order. ``trainer.evaluate()`` returns them too.

    With ``bf16``/``fp16`` training, passes bypass accelerate's autocast wrapper of ``forward`` (see
    :func:`~inseq_lightning.monitor.guards.original_forwards`): the values are those of the same
    weights attributed offline, and training keeps its mixed precision.

    Resume with ``TrainingArguments(restore_callback_states_from_checkpoint=True)``: the trainer
    rebuilds the callback from :meth:`state` (JSON), which keeps the drift history; live objects
    (trainer, tokenizer, writer, sinks) are taken over from the callback it replaces.
    """

    def __init__(
        self,
        probes,
        method: str = "saliency",
        step_scores: Sequence[str] = ("probability",),
        attribution_strategy: str = "eval",
        attribution_steps: int | None = None,
        attribute_on_train_begin: bool = True,
        method_kwargs: dict[str, Any] | None = None,
        batch_size: int = 8,
        strict: bool = False,
        prefix: str | None = None,
        log_text: bool = True,
        log_figures: bool = True,
        log_html: bool = True,
        log_table: bool = True,
        save_files: bool | None = None,
        trainer=None,
        tokenizer=None,
        tb_writer=None,
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
        if attribution_strategy not in STRATEGIES:
            raise ValueError(f"attribution_strategy must be one of {STRATEGIES}, got {attribution_strategy!r}")
        if attribution_strategy == "steps" and (not isinstance(attribution_steps, int) or attribution_steps < 1):
            raise ValueError(f"attribution_strategy='steps' needs attribution_steps >= 1, got {attribution_steps!r}")
        probe_set = ProbeSet.coerce(probes)
        log_options = {"log_text": log_text, "log_figures": log_figures, "log_html": log_html, "log_table": log_table}
        faithfulness_options = {"faithfulness": faithfulness, "faithfulness_fractions": tuple(faithfulness_fractions),
                            "faithfulness_ranking": faithfulness_ranking, "faithfulness_scope": faithfulness_scope}
        alert_options = {"alerts": [AlertRule.coerce(rule) for rule in alerts], "canary_alert": canary_alert,
                         "stabilization_metric": stabilization_metric,
                         "stabilization_tolerance": float(stabilization_tolerance)}
        self._init_monitor(probe_set, method, step_scores, method_kwargs, batch_size, strict, prefix, log_options,
                           save_files, (), extra_values, faithfulness_options, alert_options)
        self.attribution_strategy = attribution_strategy
        self.attribution_steps = attribution_steps
        self.attribute_on_train_begin = attribute_on_train_begin
        self._args = {"probes": probe_set.to_state(), "method": method, "step_scores": list(step_scores),
                      "attribution_strategy": attribution_strategy, "attribution_steps": attribution_steps,
                      "attribute_on_train_begin": attribute_on_train_begin, "method_kwargs": dict(method_kwargs or {}),
                      "batch_size": batch_size, "strict": strict, "prefix": prefix, "save_files": save_files,
                      **self.log_options, **faithfulness_options,
                                             "faithfulness_fractions": list(faithfulness_options["faithfulness_fractions"]),
                      **alert_options, "alerts": [rule.to_state() for rule in alert_options["alerts"]]}
        # The trainer is held weakly: a callback kept by the user must not keep a finished run alive.
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        self._tokenizer, self._tb_writer, self.extra_sinks = tokenizer, tb_writer, list(sinks)
        if trainer is not None:
            attached = [cb for cb in trainer.callback_handler.callbacks
                        if isinstance(cb, AttributionCallback) and cb.monitor.prefix == self.monitor.prefix]
            if attached:  # their tags, pages and states would land on one another
                raise ValueError(f"This trainer already has an AttributionCallback with prefix "
                                 f"{self.monitor.prefix!r}; give each monitor its own prefix= (e.g. one per method)")
            _LIVE_OBJECTS.setdefault(trainer, {})[self.monitor.prefix] = {
                "tokenizer": tokenizer, "tb_writer": tb_writer, "sinks": list(sinks), "extra_values": extra_values}
        self.checkpoints: dict[str, str] = {}  # logged step -> the checkpoint that stores those weights
        self._since_save: list[int] = []
        self._in_training = False

    @property
    def trainer(self):
        """The ``Trainer`` this callback was attached to (None when it was not given or is gone)."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    def _adopt_live_objects(self) -> None:
        """A callback rebuilt from a checkpoint's JSON (``restore_callback_states_from_checkpoint``)
        knows no live objects: take over those of the callback it replaced, found through the trainer
        whose callback list now holds this very object (never another trainer's with the same prefix)."""
        if self._trainer_ref is not None:
            return
        for trainer, by_prefix in list(_LIVE_OBJECTS.items()):
            handler = getattr(trainer, "callback_handler", None)
            if handler is not None and any(cb is self for cb in handler.callbacks) and self.monitor.prefix in by_prefix:
                live = by_prefix[self.monitor.prefix]
                self._trainer_ref = weakref.ref(trainer)
                self._tokenizer = self._tokenizer or live["tokenizer"]
                self._tb_writer = self._tb_writer or live["tb_writer"]
                self.extra_sinks = self.extra_sinks or list(live["sinks"])
                if live["extra_values"] and not self.monitor.extra_values:  # functions cannot travel in JSON
                    self.monitor.set_extra_values(live["extra_values"])
                return

    @classmethod
    def attach(cls, trainer, probes, **kwargs) -> "AttributionCallback":
        """Build the callback with ``trainer=trainer`` and add it to the trainer."""
        callback = cls(probes, trainer=trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    # ---- state (ExportableState): JSON only -----------------------------------------------------
    def state(self) -> dict:
        return {"args": self._args,
                "attributes": {"history_state": self.monitor.state_dict(), "checkpoints": dict(self.checkpoints)}}

    @property
    def history_state(self) -> dict:
        return self.monitor.state_dict()

    @history_state.setter
    def history_state(self, value: dict) -> None:  # called by restore_callback_states_from_checkpoint
        self.monitor.load_state_dict(value)

    # ---- set-up -------------------------------------------------------------------------------
    def _model(self, kwargs):
        if self.trainer is not None:  # FSDP/DeepSpeed wrap trainer.model: attribute the model inside
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        else:
            model = kwargs.get("model")
        if model is None:
            raise ValueError("AttributionCallback got no model from the Trainer; pass trainer= (see attach())")
        # Compiled or PEFT-wrapped models: the HF model inside, same weights, adapters on, eager.
        return unwrap_for_attribution(model)

    def _tokenizer_from(self, kwargs):
        tokenizer = self._tokenizer or kwargs.get("processing_class")
        if tokenizer is None and self.trainer is not None:
            tokenizer = getattr(self.trainer, "processing_class", None)
        if tokenizer is None:
            raise ValueError("AttributionCallback needs the tokenizer: pass processing_class= to the Trainer or "
                             "tokenizer= to the callback")
        return tokenizer

    def _build_sinks(self, args) -> list[Sink]:
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        writer = self._tb_writer or self._trainer_tb_writer()
        if writer is None and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "attributions")
            if not os.getenv("TENSORBOARD_LOGGING_DIR"):
                warnings.warn(
                    f"AttributionCallback cannot see the Trainer's TensorBoard writer, so attributions go to their own "
                    f"run in {log_dir}. Use AttributionCallback.attach(trainer, probes) (or tb_writer=) to log into "
                    "the trainer's run.", UserWarning, stacklevel=2)
            writer = SummaryWriter(log_dir=log_dir)
        wandb_run = None
        if "wandb" in report_to:
            import wandb

            wandb_run = wandb.run  # WandbCallback opened it in its on_train_begin, before ours
        return self._standard_sinks(tb_writer=writer, wandb_run=wandb_run, step_key="train/global_step",
                                    files_root=args.output_dir)

    def _trainer_tb_writer(self):
        if self.trainer is None:
            return None
        from transformers.integrations import TensorBoardCallback

        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                return callback.tb_writer
        return None

    # ---- the pass -----------------------------------------------------------------------------
    def _run(self, args, state, kwargs, stage: str = "fit", control=None) -> None:
        epoch = int(state.epoch) if state.epoch is not None else None
        if stage == "fit" and not self.monitor.already_logged(state.global_step, stage):
            self._since_save.append(state.global_step)
        root = getattr(self.trainer, "model_wrapped", None) if self.trainer is not None else None
        self._attribute(self._model(kwargs), self._tokenizer_from(kwargs), state.global_step, epoch, stage,
                        sharded_root=root)
        # An alert with stop_training fired at the last pass (every rank hears of it from rank zero).
        if stage == "fit" and control is not None and self.monitor.stop_requested:
            control.should_training_stop = True

    def _warn_if_never_evaluated(self, args) -> None:
        eval_strategy = getattr(args, "eval_strategy", None)
        if self.attribution_strategy != "eval" or getattr(eval_strategy, "value", eval_strategy) != "no":
            return
        runs = "only the reference pass before the first step runs" if self.attribute_on_train_begin else \
            "no pass runs"
        warnings.warn(
            f"AttributionCallback(attribution_strategy='eval') attributes after each evaluation, but the Trainer "
            f"has eval_strategy='no' and never evaluates, so {runs}. Set eval_strategy='steps' or 'epoch' (with an "
            "eval_dataset), or attribute on a cadence of your own: attribution_strategy='steps' (with "
            "attribution_steps=N) or 'epoch'.", EvaluationCadenceWarning, stacklevel=2)

    def on_train_begin(self, args, state, control, **kwargs):
        self._adopt_live_objects()
        self._warn_if_never_evaluated(args)
        self.monitor.check_probes(self._model(kwargs), self._tokenizer_from(kwargs))  # before the first step
        self._in_training = True
        # Directories and sinks are resolved on every rank; only the world's process zero writes.
        sinks = self._build_sinks(args) if state.is_world_process_zero else []
        self.sinks = sinks
        if self.attribute_on_train_begin:
            self._run(args, state, kwargs, control=control)

    def on_step_end(self, args, state, control, **kwargs):
        # on_step_end fires after the optimizer step: only at gradient-accumulation boundaries.
        if self.attribution_strategy == "steps" and state.global_step % self.attribution_steps == 0:
            self._run(args, state, kwargs, control=control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.attribution_strategy == "epoch":
            self._run(args, state, kwargs, control=control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer.evaluate() logs its metrics (on_log) before on_evaluate, with the very dict it then
        # hands to every on_evaluate and returns to the training loop. Attributing here and adding
        # the means to that dict puts them where EarlyStoppingCallback and metric_for_best_model look,
        # wherever this callback sits in the list, and on the weights the next checkpoint stores.
        prefixes = _evaluation_prefixes(logs or {})
        if not prefixes or (self._in_training and self.attribution_strategy != "eval"):
            return
        self._run(args, state, kwargs, "fit" if self._in_training else "validate", control)
        added = {f"{prefix}_{self.monitor.prefix}/mean/{name}": value
                 for prefix in prefixes for name, value in self.monitor.last_means.items()}
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)  # the copy trainer_state.json keeps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Usually a no-op (on_log attributed this step already): for trainers that log differently.
        if self.attribution_strategy == "eval" or not self._in_training:
            self._run(args, state, kwargs, "fit" if self._in_training else "validate", control)
            if metrics is not None:
                for prefix in _evaluation_prefixes(metrics) or ["eval"]:
                    metrics.update({f"{prefix}_{self.monitor.prefix}/mean/{name}": value
                                    for name, value in self.monitor.last_means.items()})

    def on_save(self, args, state, control, **kwargs):
        # on_save comes after on_evaluate: the steps logged since the last save are in this checkpoint's
        # lineage; the step equal to global_step holds exactly the weights it stores.
        for step in self._since_save:
            self.checkpoints[str(step)] = f"checkpoint-{state.global_step}"
        self._since_save = []

    def on_train_end(self, args, state, control, **kwargs):
        self._in_training = False
        if state.is_world_process_zero:
            self._print_summary()
        self._close_sinks()
