"""The framework-free monitor: attribute the probes on the live model, measure drift, feed the sinks.

Both the Lightning callback and the Hugging Face callback are thin adapters onto this class:
they decide *when* to call :meth:`ProbeMonitor.run`; this class decides *what* happens.
"""

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..attr.methods import get_method
from ..attr.step_functions import get_step_function
from ..data.outputs import FeatureAttributionOutput, output_for_sequence
from ..errors import InseqLightningError, InvalidInputError
from ..models.attribution_model import AttributionModel
from ..models.tokenization import tokens_before_char
from ..utils.sharding import has_sharded_parameters
from .alerts import AlertRule, AlertTracker, Stabilization, announce
from .chat import message_label, render_chat
from .distributed import all_gather_objects, broadcast_from_zero, my_share, rank_and_world, root_parameters_gathered
from .drift import AttributionMap, evidence_mass, map_drift
from .evidence import average_precision, context_token_scores, evidence_rows, reciprocal_rank
from .faithfulness import (
    DEFAULT_FRACTIONS,
    PrefixCaches,
    check_fractions,
    check_ranking,
    check_scope,
    faithfulness_seed,
    probe_faithfulness,
)
from .guards import attribution_guard
from .history import DriftHistory
from .probes import Probe, ProbeSet
from .report import MonitorReport, ProbeResult
from .values import LOGGED_VALUES, needs_map, value_names

logger = logging.getLogger(__name__)


class AttributionMonitorWarning(UserWarning):
    """A probe or sink failed during monitoring; training goes on (``strict=False``)."""


class MonitoringError(InseqLightningError, RuntimeError):
    """A probe or sink failed and the monitor was built with ``strict=True``."""


def _reusable_probabilities(wrapper: AttributionModel, seq, output: FeatureAttributionOutput) -> list[float] | None:
    """The attribution's ``probability`` step scores as faithfulness's unmasked probabilities, when they
    are plain probabilities computed in full precision (not ``logprob=True``'s log-probabilities, not a
    half-precision softmax that faithfulness's float32 rows would not match)."""
    probability = seq.step_scores.get("probability")
    if probability is None or (output.info.get("step_scores_args") or {}).get("logprob"):
        return None
    if next(wrapper.model.parameters()).dtype not in (torch.float32, torch.float64):
        return None
    return probability.float().tolist()


def _check_step_scores_only(method: str, step_scores: Sequence[str], faithfulness: bool, alerts: Sequence,
                            canary: bool) -> None:
    """Refuse, when the monitor is built, what a method without maps (``dummy``) cannot give: at a
    pass these would be silently empty, and an alert that never fires looks like a healthy run."""
    instead = "or choose an attribution method (see list_feature_attribution_methods())"
    if not step_scores:
        raise InvalidInputError(f"method={method!r} computes step scores only, and step_scores is empty: there "
                                f"would be nothing to log; give step_scores=('probability', ...), {instead}")
    if faithfulness:
        raise InvalidInputError(f"faithfulness=True measures each probe's attribution map, and method={method!r} "
                                f"computes none: pass faithfulness=False, {instead}")
    for rule in map(AlertRule.coerce, alerts):
        read = [name for name in (rule.value, rule.other) if name is not None and needs_map(name)]
        if read:
            raise InvalidInputError(f"alert rule {rule.key!r} reads {', '.join(read)}, a value of the attribution map, "
                                    f"and method={method!r} computes none: watch a step score instead (e.g. "
                                    f"AlertRule('step_score/probability', 'below', 0.5)), {instead}")
    if canary:
        raise InvalidInputError(f"probes with a cue add the canary alert (cue_mass above evidence_mass, both read off "
                                f"the attribution map), and method={method!r} computes none: pass canary_alert=False, "
                                f"{instead}")


class ProbeMonitor:
    """Attributes a fixed probe set on a live model and hands the results to sinks.

    Args:
        probes: a :class:`ProbeSet`, a ``.jsonl``/``.csv`` path, or a list of ``(prompt, target)``
            pairs, dicts or :class:`Probe` objects.
        method: attribution method (see ``list_feature_attribution_methods()``). ``"dummy"`` computes
            no attribution map, only the step scores: a cheap way to track each probe's probability,
            entropy, ... during training (one forward per batch of probes, no backward). Every step-score
            value is logged as with any method (``step_score/*``, ``step_score_change_{ref,prev}/*``);
            the values read off a map (drift, evidence, cue and message mass, plausibility,
            faithfulness, the stabilization point), heatmaps and the TensorBoard plugin's map records
            are absent, and the HTML pages show the attributed tokens with their step scores. Settings
            that read a map are refused with :class:`InvalidInputError` (``faithfulness=True``, an alert
            rule on a map-based value, the canary of probes with a cue).
        step_scores: step functions computed alongside (see ``list_step_functions()``); with
            ``method="dummy"``, all there is to log, so at least one.
        method_kwargs: extra arguments of ``AttributionModel.attribute`` (e.g. ``n_steps``).
        batch_size: probes per forward pass.
        strict: raise :class:`MonitoringError` instead of warning when a probe or sink fails.
        prefix: tag prefix of every logged value (default ``attribution/<method>``).
        extra_values: ``{name: fn(result) -> float}``: values of your own, computed for every probe
            from its :class:`ProbeResult` and logged like the built-in ones (every sink, the means,
            ``callback_metrics`` / evaluation metrics). See :mod:`.values` for the built-in ones.
        faithfulness: after attributing each probe, measure how faithful its map is
            (comprehensiveness, sufficiency, their soft variants and a random baseline; see
            :mod:`.faithfulness`): one extra batched forward per probe (14 masked rows at the defaults),
            no backward; on a decoder-only model the rows run only the positions after the first
            removable token (a chat template's system prompt is computed once per batch). Off by
            default (docs/monitoring.md has its cost).
        faithfulness_fractions: the top-k fractions of the context tokens averaged over (AOPC).
        faithfulness_ranking: ``"aggregated"`` (default) ranks the context tokens by their scores
            summed over the attributed tokens; ``"per_step"`` ranks them for each attributed token by
            its own scores (one row per attributed token in each forward).
        faithfulness_scope: which context tokens faithfulness may remove (the fractions count them):
            ``"content"`` (default) keeps a chat probe's template tokens (role headers, the
            template's system prompt, end-of-turn markers) and removes only its messages' content;
            ``"context"`` removes any context token. Plain-text probes are the same either way.
        alerts: :class:`~.alerts.AlertRule` objects checked after every training pass (see
            :mod:`.alerts`); fired alerts are in ``report.alerts`` and :attr:`fired_alerts`.
        canary_alert: when a probe has a cue, add the default rule that warns when a probe's
            ``cue_mass`` rises above its ``evidence_mass`` (:func:`~.alerts.canary_rule`).
        stabilization_metric, stabilization_tolerance: the stabilization point (logged as
            ``mean/stabilization_step``): the first pass after which ``mean/drift_prev/<metric>``
            stayed within the tolerance (see :class:`~.alerts.Stabilization`).

    After each pass, :attr:`last_means` holds the mean values over probes on every rank (what the
    callbacks hand to the frameworks' early stopping and checkpoint selection).
    """

    def __init__(self, probes, method: str = "saliency", step_scores: Sequence[str] = ("probability",),
                 method_kwargs: dict[str, Any] | None = None, batch_size: int = 8, strict: bool = False,
                 prefix: str | None = None, extra_values: Mapping[str, Callable[[ProbeResult], float]] | None = None,
                 faithfulness: bool = False, faithfulness_fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 faithfulness_ranking: str = "aggregated", faithfulness_scope: str = "content",
                 alerts: Sequence = (), canary_alert: bool = True,
                 stabilization_metric: str = "cosine", stabilization_tolerance: float = 0.05):
        self.probes = ProbeSet.coerce(probes)
        # Unknown names fail in get_method, listing the valid ones; "dummy" computes no map.
        self.maps = get_method(method).granularity != "none"
        for name in step_scores:
            get_step_function(name)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.method = method
        self.step_scores = tuple(step_scores)
        self.method_kwargs = dict(method_kwargs or {})
        self.batch_size = batch_size
        self.strict = strict
        self.prefix = prefix or f"attribution/{method}"
        self.faithfulness = bool(faithfulness)
        self.faithfulness_fractions = check_fractions(faithfulness_fractions)
        self.faithfulness_ranking = check_ranking(faithfulness_ranking)
        self.faithfulness_scope = check_scope(faithfulness_scope)
        self.set_extra_values(extra_values)
        self.last_means: dict[str, float] = {}
        self.history = DriftHistory()
        canary = canary_alert and any(p.cue for p in self.probes)
        if not self.maps:  # before anything is built on settings that cannot work
            _check_step_scores_only(method, self.step_scores, self.faithfulness, alerts, canary)
        self.alerts = AlertTracker(alerts, canary=canary)
        self.stabilization = Stabilization(stabilization_metric, float(stabilization_tolerance))
        self.stop_requested = False  # an alert with stop_training fired at the last pass (on every rank)
        self._warned: set[str] = set()
        self._wrapper_cache: AttributionModel | None = None

    def set_extra_values(self, extra_values: Mapping[str, Callable[[ProbeResult], float]] | None) -> None:
        """Replace the user values (see the class docstring); the drift history is kept."""
        extra = dict(extra_values or {})
        for name, fn in extra.items():
            if not callable(fn) or not name or name.startswith("/") or name in LOGGED_VALUES:
                raise ValueError(f"extra_values[{name!r}] must map a new relative name (not a built-in value) to a "
                                 "function of a ProbeResult returning a float")
        self.extra_values = extra
        labels = [message_label(i, m["role"]) for probe in self.probes for i, m in enumerate(probe.messages)]
        self.value_names = tuple(value_names(self.step_scores, self.probes.generate, extra, dict.fromkeys(labels),
                                             faithfulness=self.faithfulness, cue=any(p.cue for p in self.probes),
                                             maps=self.maps))

    def check_probes(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check, before training, what only the model and tokenizer can tell: conversations need a chat
        template (a :class:`TokenizerError` otherwise), and every probe must fit the model's positions
        (a :class:`MonitoringError` with ``strict=True``; otherwise one warning now, and the probe is
        skipped at every pass)."""
        wrapper = self._wrapper(model, tokenizer)
        limit = next((v for k in ("n_positions", "max_position_embeddings")
                      if isinstance(v := getattr(model.config, k, None), int) and v > 0), None)
        too_long = []
        for probe in self.probes:
            prompts, targets, _ = self._texts(wrapper, [probe])  # renders conversations: template errors raise here
            text = (targets or prompts)[0]
            length = len(tokenizer(text)["input_ids"])
            if self.probes.generate:
                length += int(self.probes.generation_args.get("max_new_tokens", 0))
            if limit is not None and length > limit:
                too_long.append(f"{probe.name} ({length} tokens)")
        if too_long:
            message = (f"Probes longer than the model's {limit} positions: {', '.join(too_long)}; shorten them or "
                       "split them into several probes")
            if self.strict:
                raise MonitoringError(message)
            warnings.warn(f"{message}. They are skipped at every pass (strict=False).", AttributionMonitorWarning,
                          stacklevel=2)
            self._warned.update(f"probe:{name.split(' ')[0]}" for name in too_long)

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.method, "prefix": self.prefix, "history": self.history.state_dict(),
                "alerts": self.alerts.state_dict(), "stabilization": self.stabilization.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("method", self.method)
        if saved != self.method:  # its references are another method's maps (or none, for dummy)
            raise InvalidInputError(f"this monitor state was saved by a {saved!r} monitor; a {self.method!r} monitor "
                                    "cannot continue its drift history: resume with method="
                                    f"{saved!r}, or give this monitor another prefix to start a history of its own")
        self.history = DriftHistory.from_state_dict(state["history"])
        if "alerts" in state:  # states saved before alerts existed have none
            self.alerts.load_state_dict(state["alerts"])
        if "stabilization" in state:
            self.stabilization.load_state_dict(state["stabilization"])

    @property
    def fired_alerts(self) -> list:
        """Every alert fired in this run (resumed runs included), oldest first."""
        return list(self.alerts.fired)

    def summary(self) -> str:
        """One line for the end of a run: passes, the stabilization point and the alerts fired."""
        passes = len(self.stabilization.passes)
        stable = self.stabilization.step
        stable = (f"stable since step {stable} ({self.stabilization.describe()})" if stable is not None else
                  f"not stable ({self.stabilization.describe()} not reached at the last pass)")
        if not self.maps:  # no map, no drift: "not stable" would read as a finding
            stable = "step scores only (no attribution maps)"
        fired = self.alerts.fired
        alerts = ("no alert" if not fired else
                  f"{len(fired)} alert(s): " + "; ".join(f"{a.rule} on {a.probe} at step {a.step}" for a in fired))
        return f"[{self.prefix}] {passes} training passes, {stable}, {alerts}"

    def already_logged(self, step: int, stage: str = "fit") -> bool:
        return self.history.last_step.get(stage) == step

    # ---- failure isolation --------------------------------------------------------------------
    def _fail(self, key: str, message: str, error: BaseException) -> None:
        if self.strict:
            raise MonitoringError(f"{message}: {type(error).__name__}: {error}") from error
        if key not in self._warned:  # once per probe/sink, not once per step
            self._warned.add(key)
            warnings.warn(f"{message}; it is skipped (strict=False). {type(error).__name__}: {error}",
                          AttributionMonitorWarning, stacklevel=3)
        logger.debug("%s", message, exc_info=error)

    # ---- the pass -----------------------------------------------------------------------------
    def _wrapper(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> AttributionModel:
        # One slot: a training run attributes the same live model every time, and a run over saved
        # checkpoints must not keep earlier checkpoints alive through this cache.
        cached = self._wrapper_cache
        if cached is None or cached.model is not model or cached.tokenizer is not tokenizer:
            self._wrapper_cache = AttributionModel(model, tokenizer, self.method)
        return self._wrapper_cache

    def _texts(self, wrapper: AttributionModel, probes: list[Probe]) -> tuple[list[str], list[str] | None, list | None]:
        """Prompts, targets (None: generate) and per-probe ``attr_pos_end`` (None: to the end) to attribute."""
        prompts, targets, ends = [], [], []
        for probe in probes:
            if probe.is_chat:
                if not wrapper.architecture.renders_chat:
                    raise InvalidInputError(f"Probe {probe.name!r} is a conversation; chat templates render "
                                            "decoder-only prompts: give an encoder-decoder model plain texts")
                rendered = render_chat(wrapper.tokenizer, probe.messages, None if self.probes.generate else probe.target)
                prompts.append(rendered.prompt_text)
                targets.append(rendered.full_text)
                # Only the answer's content tokens are steps: the template's closing tokens stay out.
                closed = self.probes.generate or self.probes.include_template_tokens
                ends.append(None if closed else tokens_before_char(wrapper, rendered.full_text, rendered.answer_span[1]))
            else:  # decoder-only targets may omit their prompt
                prompts.append(probe.prompt)
                targets.append(wrapper.architecture.target_with_prompt(probe.prompt, probe.target))
                ends.append(None)
        if self.probes.generate:
            targets = None  # attribute() generates and keeps the generated ids
        return prompts, targets, ends if any(e is not None for e in ends) else None

    def _attribute(self, wrapper: AttributionModel, probes: list[Probe]) -> FeatureAttributionOutput:
        generation = {"generation_args": dict(self.probes.generation_args)} if self.probes.generate else {}
        prompts, targets, ends = self._texts(wrapper, probes)
        positions = {"attr_pos_end": ends} if ends is not None else {}
        return wrapper.attribute(
            prompts, targets, method=self.method, step_scores=self.step_scores, show_progress=False,
            batch_size=self.batch_size, **generation, **positions, **self.method_kwargs,
        )

    def attribute_probes(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         probes: list[Probe] | None = None, sharded_root: torch.nn.Module | None = None,
                         step: int = 0) -> tuple[dict[str, FeatureAttributionOutput], dict[str, str]]:
        """Attribute ``probes`` (default: all) on the live model, under :func:`attribution_guard`.

        All probes go in batches; when a batch fails, its probes are retried one by one so a single
        bad probe (too long, say) is skipped and the others still log. With ``faithfulness`` on, each
        output's ``info["faithfulness"]`` holds its faithfulness values (``step`` seeds the random
        ranking).
        """
        probes = list(self.probes) if probes is None else probes
        outputs: dict[str, FeatureAttributionOutput] = {}
        skipped: dict[str, str] = {}
        with attribution_guard(model), root_parameters_gathered(model, sharded_root):
            wrapper = self._wrapper(model, tokenizer)
            for start in range(0, len(probes), self.batch_size):
                chunk = probes[start : start + self.batch_size]
                try:
                    out = self._attribute(wrapper, chunk)
                except Exception:  # noqa: BLE001 - retried below probe by probe, which reports the culprit
                    out = None
                if out is not None:
                    outputs.update({p.name: output_for_sequence(out, i) for i, p in enumerate(chunk)})
                else:
                    for probe in chunk:
                        try:
                            outputs[probe.name] = self._attribute(wrapper, [probe])
                        except Exception as error:  # noqa: BLE001 - a probe must not kill training
                            skipped[probe.name] = f"{type(error).__name__}: {error}"
                            self._fail(f"probe:{probe.name}", f"Probe {probe.name!r} could not be attributed", error)
                if self.faithfulness:
                    # The chat template's system prompt, the same for every probe, runs once per batch
                    # (its cache is dropped before the next batch is attributed).
                    prefixes = PrefixCaches()
                    for probe in chunk:
                        if probe.name in outputs:
                            self._faithfulness(wrapper, probe, outputs[probe.name], step, prefixes)
        return outputs, skipped

    def _faithfulness(self, wrapper: AttributionModel, probe: Probe, output: FeatureAttributionOutput,
                      step: int, prefixes: PrefixCaches) -> None:
        """``output.info["faithfulness"]``: the probe's faithfulness values (on the model as attributed)."""
        seq = output.sequence_attributions[0]
        try:
            candidates = self._removable_content(wrapper, probe, output)
            measured = probe_faithfulness(
                wrapper, seq, self.faithfulness_fractions, self.faithfulness_ranking,
                seed=faithfulness_seed(probe.name, step),
                include_eos_baseline=bool(output.info.get("include_eos_baseline", False)), candidates=candidates,
                probabilities=_reusable_probabilities(wrapper, seq, output), prefixes=prefixes)
        except Exception as error:  # noqa: BLE001 - a probe's faithfulness must not kill training
            self._fail(f"faithfulness:{probe.name}", f"Probe {probe.name!r}: faithfulness could not be measured", error)
            return
        output.info["faithfulness"] = measured.values

    def _removable_content(self, wrapper: AttributionModel, probe: Probe,
                           output: FeatureAttributionOutput) -> list[int] | None:
        """The context rows faithfulness may remove: a chat probe's message content (scope
        ``"content"``), located as evidence is; None: every context token."""
        if self.faithfulness_scope != "content" or not probe.is_chat:
            return None
        rendered = render_chat(wrapper.tokenizer, probe.messages, None)
        spans = [(start, end) for _, start, end in rendered.message_spans]
        full_text = (output.info.get("generated_texts") or [None])[0]
        source_ids = [t.id for t in output.sequence_attributions[0].source]
        rows = evidence_rows(wrapper.tokenizer, rendered.prompt_text, source_ids, spans, full_text)
        key = f"faithfulness_scope:{probe.name}"
        if rows is None and key not in self._warned:  # measured on the whole context, and said once
            self._warned.add(key)
            warnings.warn(f"Probe {probe.name!r}: the chat messages' content could not be located in the tokens "
                          "(the tokenizer gives no matching offsets), so faithfulness removes any context token "
                          "(faithfulness_scope='context') for it", AttributionMonitorWarning, stacklevel=3)
        return rows

    def run(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, step: int, epoch: int | None = None,
            stage: str = "fit", sinks: Sequence = (), sharded_root: torch.nn.Module | None = None,
            ) -> MonitorReport | None:
        """One monitoring pass: attribute, measure drift against the history, publish to ``sinks``.

        Call it on every rank of a distributed job (see :mod:`.distributed`): replicated models
        split the probes across ranks, sharded ones attribute all probes on every rank in lockstep;
        rank zero gathers, keeps the drift history, publishes and returns the report; other ranks
        return None. ``sharded_root``: the outermost FSDP module when it wraps ``model``.
        """
        started = time.perf_counter()
        rank, world = rank_and_world()
        if world == 1:
            outputs, skipped = self.attribute_probes(model, tokenizer, sharded_root=sharded_root, step=step)
            report = self.build_report(outputs, skipped, step, epoch, stage, time.perf_counter() - started,
                                       tokenizer)
            self.publish(report, sinks)
            self.last_means = report.means()
            self.stop_requested = any(a.stop_training for a in report.alerts)
            return report
        if has_sharded_parameters(model) or (sharded_root is not None and has_sharded_parameters(sharded_root)):
            outputs, skipped = self.attribute_probes(model, tokenizer, sharded_root=sharded_root, step=step)
            if rank != 0:
                self._follow_rank_zero(step, stage)
                return None
        else:
            share = [self.probes[i] for i in my_share(len(self.probes), rank, world)]
            try:
                mine, error = (self.attribute_probes(model, tokenizer, share, step=step) if share else ({}, {})), None
            except MonitoringError as strict_error:  # raise on every rank after the gather, never hang one
                mine, error = ({}, {}), str(strict_error)
            gathered = all_gather_objects((*_to_cpu(mine), error))
            errors = [e for _, _, e in gathered if e]
            if errors:
                raise MonitoringError(errors[0])
            if rank != 0:
                self._follow_rank_zero(step, stage)
                return None
            outputs = {name: out for part, _, _ in gathered for name, out in part.items()}
            skipped = {name: why for _, part, _ in gathered for name, why in part.items()}
        failure = None
        try:
            report = self.build_report(outputs, skipped, step, epoch, stage, time.perf_counter() - started,
                                       tokenizer)
            self.publish(report, sinks)
        except MonitoringError as strict_error:  # strict mode: the other ranks must hear of it, not wait
            failure = strict_error
        # Every rank gets the means (a framework's early stopping decides on each rank), the error and
        # whether an alert asks to stop training.
        stop = failure is None and any(a.stop_training for a in report.alerts)
        self.last_means, _, self.stop_requested = broadcast_from_zero(
            ({} if failure else report.means(), str(failure or ""), stop))
        if failure is not None:
            raise failure
        return report

    def _follow_rank_zero(self, step: int, stage: str) -> None:
        """A non-zero rank after the attribution: record the step, take rank zero's means (or its error)."""
        self.history.last_step[stage] = step  # every rank agrees on what was logged
        self.last_means, error, self.stop_requested = broadcast_from_zero(None)
        if error:
            raise MonitoringError(error)

    def build_report(self, outputs: dict[str, FeatureAttributionOutput], skipped: dict[str, str], step: int,
                     epoch: int | None, stage: str, seconds: float, tokenizer: PreTrainedTokenizerBase) -> MonitorReport:
        """Aggregate, compare with the history (then update it) and collect the results in probe order."""
        results = []
        for probe in self.probes:
            if probe.name not in outputs:
                continue
            try:
                results.append(self._probe_result(probe, outputs[probe.name], step, stage, tokenizer))
            except Exception as error:  # noqa: BLE001
                skipped[probe.name] = f"{type(error).__name__}: {error}"
                self._fail(f"probe:{probe.name}", f"Probe {probe.name!r} could not be summarised", error)
        self.history.last_step[stage] = step
        report = MonitorReport(step, epoch, stage, self.method, self.prefix, results, skipped, seconds,
                               value_names=self.value_names, maps=self.maps)
        if stage == "fit" and results:  # validate/test passes are snapshots: they move no counter
            report.stabilization_step = self.stabilization.add(step, report.means())
            report.alerts = self.alerts.evaluate(report)
            announce(report.alerts, self.prefix)
        return report

    def _probe_result(self, probe: Probe, output: FeatureAttributionOutput, step: int, stage: str,
                      tokenizer: PreTrainedTokenizerBase) -> ProbeResult:
        seq = output.sequence_attributions[0]
        aggregated = seq.aggregate()
        scores = {name: float(values.float().mean()) for name, values in aggregated.step_scores.items()}
        result = ProbeResult(probe, output, aggregated, scores)
        # A method without maps (dummy) gives step scores only: no value below is read off a map for it.
        current = AttributionMap.from_sequence(aggregated) if self.maps else None
        if current is not None:
            self._map_values(result, current, tokenizer)
        result.faithfulness = dict(output.info.get("faithfulness") or {})
        if stage != "fit":  # validate/test passes are snapshots; the drift history belongs to training
            self._extra_values(result)
            return result
        history = self.history.probe(probe.name)
        if history.reference_step is not None:
            result.reference_step, result.previous_step = history.reference_step, history.previous_step
            if current is not None and history.reference is not None and history.previous is not None:
                result.drift_reference = self._drift(current, history.reference)
                result.drift_previous = self._drift(current, history.previous)
            result.score_change_reference = _changes(scores, history.reference_scores)
            result.score_change_previous = _changes(scores, history.previous_scores)
        else:
            history.reference, history.reference_step, history.reference_scores = current, step, scores
        history.previous, history.previous_step, history.previous_scores = current, step, scores
        self._extra_values(result)
        history.rows.append({"step": step, **{k: round(v, 6) for k, v in result.scalars().items()}})
        return result

    def _map_values(self, result: ProbeResult, current: AttributionMap, tokenizer: PreTrainedTokenizerBase) -> None:
        """The values read off the probe's map: which message the answer comes from (conversations), the
        evidence's mass and plausibility, the cue's mass."""
        probe, output = result.probe, result.output
        full_text = (output.info.get("generated_texts") or [None])[0]
        source_ids = [t.id for t in output.sequence_attributions[0].source]
        if probe.is_chat:
            rendered = render_chat(tokenizer, probe.messages, None)
            prompt_text = rendered.prompt_text
            spans = probe.evidence_spans(prompt_text, [(start, end) for _, start, end in rendered.message_spans])
            for label, start, end in rendered.message_spans:  # which message the answer comes from
                rows = evidence_rows(tokenizer, prompt_text, source_ids, [(start, end)], full_text)
                if rows:
                    result.message_mass[label] = evidence_mass(current, rows)
            cue_spans = probe.cue_spans(prompt_text, [(start, end) for _, start, end in rendered.message_spans])
        else:
            prompt_text, spans, cue_spans = probe.prompt, probe.evidence_spans(), probe.cue_spans()
        if spans:
            rows = evidence_rows(tokenizer, prompt_text, source_ids, spans, full_text)
            if rows is None:
                self._fail(f"evidence:{probe.name}", f"Probe {probe.name!r}: evidence could not be located in tokens",
                           ValueError("the tokenizer gives no offsets that match the attributed tokens"))
            else:
                result.evidence_mass = evidence_mass(current, rows)
                result.evidence_rows = tuple(rows)
                token_scores = context_token_scores(current.scores, current.n_source)
                result.evidence_average_precision = average_precision(token_scores, rows)
                result.evidence_reciprocal_rank = reciprocal_rank(token_scores, rows)
        if cue_spans:
            rows = evidence_rows(tokenizer, prompt_text, source_ids, cue_spans, full_text)
            if rows is None:
                self._fail(f"cue:{probe.name}", f"Probe {probe.name!r}: the cue could not be located in tokens",
                           ValueError("the tokenizer gives no offsets that match the attributed tokens"))
            else:
                result.cue_mass = evidence_mass(current, rows)
                result.cue_rows = tuple(rows)

    def _extra_values(self, result: ProbeResult) -> None:
        # Computed last, so a user value can read the drift and evidence of the same pass.
        result.extra_values = {name: float(fn(result)) for name, fn in self.extra_values.items()}

    def _drift(self, current: AttributionMap, other: AttributionMap) -> dict[str, float]:
        drift = map_drift(current, other)
        if not self.probes.generate:  # teacher-forced continuations never change
            drift.pop("continuation_changed")
        return drift

    def publish(self, report: MonitorReport, sinks: Sequence) -> None:
        """Hand the report to each sink; a sink that raises is reported once and skipped. The sinks
        share one rendering of each heatmap and HTML page, dropped when they are done."""
        from ..sinks.render import shared_renderings  # the sinks import the monitor's report module

        with shared_renderings():
            for sink in sinks:
                try:
                    sink.log_report(report)
                except Exception as error:  # noqa: BLE001 - a sink must not kill training
                    self._fail(f"sink:{type(sink).__name__}", f"Sink {type(sink).__name__} failed", error)


def _to_cpu(result: tuple[dict, dict]) -> tuple[dict, dict]:
    """Outputs moved to CPU before pickling them across ranks (NCCL cannot gather CUDA pickles)."""
    outputs, skipped = result
    moved = {}
    for name, out in outputs.items():
        for seq in out.sequence_attributions:
            for attr in ("source_attributions", "target_attributions"):
                value = getattr(seq, attr)
                if value is not None:
                    setattr(seq, attr, value.detach().cpu())
            seq.step_scores = {k: v.detach().cpu() for k, v in seq.step_scores.items()}
        moved[name] = out
    return moved, skipped


def _changes(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: now[k] - before[k] for k in now if k in before and not math.isnan(before[k])}


__all__ = ["AttributionMonitorWarning", "MonitoringError", "ProbeMonitor"]
