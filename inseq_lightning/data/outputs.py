"""Attribution outputs: per-sequence raw scores with tokens and step scores, the per-step outputs, and the batch
container, with inseq 0.7.1's API (aggregators, slicing, ``-``, ``==``, views) and exports (HTML, PNG/SVG,
long-form records)."""

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..attr.step_functions import step_function_aggregate_map
from .aggregation import (
    AGGREGATION_FUNCTIONS,
    AGGREGATORS,
    DEFAULT_AGGREGATORS,
    check_spans,
    contiguous_fields,
    default_scores_function,
    filter_scores,
    format_spans,
    inseq_subword_spans,
    merge_cell_spans,
    merge_spans,
    normalize_columns,
    pair_fields,
    rescale_global,
    scores_function,
    slice_fields,
    split_pattern_spans,
    split_spans,
    subword_spans,
    validate_spans,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenWithId:
    """A token string and its vocabulary id (-1 for tokens made by merging). As in inseq, it equals a string
    with the same token and an int with the same id."""

    token: str
    id: int

    def __str__(self) -> str:
        return self.token

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return self.token == other
        if isinstance(other, int) and not isinstance(other, bool):
            return self.id == other
        if isinstance(other, TokenWithId):
            return self.token == other.token and self.id == other.id
        return False

    def __hash__(self) -> int:
        return hash((self.token, self.id))


class TokenRow(list):
    """One row of a step output's ``target``: inseq's one-token list (``step.target[i][0]``), which also reads as
    its token (``step.target[i].token``, ``.id``, ``== token``) as step outputs of earlier versions did."""

    @property
    def token(self) -> str:
        return self[0].token

    @property
    def id(self) -> int:
        return self[0].id

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenWithId | str | int) and not isinstance(other, bool):
            return len(self) == 1 and self[0] == other
        return list.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    __hash__ = None


def _values_equal(a, b) -> bool:
    """inseq's equality of output fields: tensors within ``atol=1e-5`` (NaN equal to NaN, shapes equal), dicts
    key by key, anything else with ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        return bool(torch.allclose(a.float(), b.float(), equal_nan=True, atol=1e-5))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, ValueError, TypeError):
        return False


def _token_rows(rows) -> list[list[TokenWithId]] | None:
    if rows is None:
        return None
    return [[t if isinstance(t, TokenWithId) else TokenWithId(*t) for t in row] for row in rows]


def _pairs(tokens) -> list[list]:
    return [[t.token, t.id] for t in tokens]


@dataclass(eq=False)
class FeatureAttributionStepOutput:
    """One generation step for every sequence of an attributed batch (``output_step_attributions=True``), with
    inseq 0.7.1's fields and shapes.

    Decoder-only models give one step output per step of each sequence (inseq attributes them one at a time);
    encoder-decoder batches one per step of the batch, with a row per sequence (a sequence that has ended
    has NaN scores and pad tokens there, as in inseq).

    Attributes:
        source_attributions: ``[B, S, ...]`` scores of the source tokens (encoder-decoder; pad rows NaN).
        step_scores: ``{name: [B]}``.
        target_attributions: ``[B, P, ...]`` scores of the ``P`` prefix tokens the step sees (decoder-only:
            prompt and generated tokens so far; encoder-decoder with ``attribute_target``: decoder start and
            target so far).
        sequence_scores: ``{}`` (inseq's attention self-scores are not produced here).
        source: per row, the source tokens (encoder-decoder, padded with the pad token; None for decoder-only).
        prefix: per row, the prefix tokens.
        target: per row, a one-token list with the token generated at this step (:class:`TokenRow`).
    """

    # Positional order of earlier versions (inseq's is source_attributions, step_scores, target_attributions,
    # sequence_scores, source, prefix, target); by keyword both construct the same output.
    source_attributions: torch.Tensor | None = None
    target_attributions: torch.Tensor | None = None
    step_scores: dict[str, torch.Tensor] | None = None
    target: list[TokenRow] | None = None
    sequence_scores: dict[str, torch.Tensor] | None = None
    source: list[list[TokenWithId]] | None = None
    prefix: list[list[TokenWithId]] | None = None

    def __post_init__(self):
        if self.step_scores is None:
            self.step_scores = {}
        if self.sequence_scores is None:
            self.sequence_scores = {}
        rows = []
        for row in self.target or []:
            if isinstance(row, TokenWithId):
                rows.append(TokenRow([row]))
            elif isinstance(row, list | tuple) and len(row) == 2 and isinstance(row[0], str):
                rows.append(TokenRow([TokenWithId(*row)]))  # a [token, id] pair
            else:
                rows.append(TokenRow(t if isinstance(t, TokenWithId) else TokenWithId(*t) for t in row))
        self.target = rows
        self.source = _token_rows(self.source)
        self.prefix = _token_rows(self.prefix)

    def __eq__(self, other) -> bool:
        if not isinstance(other, FeatureAttributionStepOutput):
            return NotImplemented
        return all(_values_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None

    def to_dict(self) -> dict[str, Any]:
        def rows(value):
            return None if value is None else [_pairs(row) for row in value]

        return {
            "source_attributions": self.source_attributions,
            "step_scores": dict(self.step_scores),
            "target_attributions": self.target_attributions,
            "sequence_scores": dict(self.sequence_scores),
            "source": rows(self.source),
            "prefix": rows(self.prefix),
            "target": rows(self.target),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureAttributionStepOutput":
        data = dict(data)
        target = data.get("target") or []
        # Files of earlier versions hold one [token, id] pair per row instead of a one-token row.
        data["target"] = [TokenWithId(*row) if len(row) == 2 and isinstance(row[0], str) else
                          [TokenWithId(*t) for t in row] for row in target]
        return cls(**data)

    def row(self, index: int, source_len: int | None = None, target_len: int | None = None,
            ) -> "FeatureAttributionStepOutput":
        """The same step for one sequence of the batch (``index``: its row), the token dimension of its scores
        (and its source / prefix tokens) cut to ``source_len`` / ``target_len`` when given."""
        def pick(t: torch.Tensor | None, length: int | None) -> torch.Tensor | None:
            return t[index : index + 1, :length] if t is not None else None

        def pick_rows(rows, length):
            return None if rows is None else [list(rows[index][:length])]

        return FeatureAttributionStepOutput(
            source_attributions=pick(self.source_attributions, source_len),
            step_scores={k: v[index : index + 1] for k, v in self.step_scores.items()},
            target_attributions=pick(self.target_attributions, target_len),
            sequence_scores={k: v[index : index + 1] for k, v in self.sequence_scores.items()},
            source=pick_rows(self.source, source_len),
            prefix=pick_rows(self.prefix, target_len),
            target=[self.target[index]],
        )


# Keyword arguments of aggregate() beyond its named parameters: inseq's aggregators' own options.
_AGGREGATOR_OPTIONS = {"special_chars", "is_suffix_symbol", "aggregate_source", "aggregate_target", "split_pattern",
                       "split_mode", "paired_attr", "vnorm_ord"}


@dataclass(eq=False)
class FeatureAttributionSequenceOutput:
    """Attributions of one sequence.

    Attributes:
        source: source tokens (decoder-only: the prompt tokens).
        target: target tokens (decoder-only: prompt + continuation; encoder-decoder: decoder start + target).
        source_attributions: ``[S, N, ...]`` raw scores of source tokens for each of the N steps.
        target_attributions: ``[T, N, ...]`` raw scores of target-prefix tokens; NaN where a token
            was not generated yet at that step.
        step_scores: ``{name: [N]}``.
        attr_pos_start, attr_pos_end: the target positions ``[start, end)`` that were attributed.
        granularity: ``granular``, ``coarse``, ``multidimensional`` or ``none``; decides the default
            aggregation (see :meth:`aggregate`).
        aggregated: True once scores are one per (token, step): the default aggregation then does nothing.

    ``seq[a:b]`` keeps tokens ``a..b-1`` (inseq's ``slices``), ``a == b`` compares tokens, positions and scores
    (``atol=1e-5``), ``a - b`` is the difference of two attributions of the same tokens, and a bare ``seq`` in a
    notebook shows its heatmap.
    """

    source: list[TokenWithId]
    target: list[TokenWithId]
    source_attributions: torch.Tensor | None = None
    target_attributions: torch.Tensor | None = None
    step_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    attr_pos_start: int = 0
    attr_pos_end: int | None = None
    granularity: str = "granular"
    aggregated: bool = False

    def __post_init__(self):
        if self.step_scores is None:
            self.step_scores = {}
        if self.attr_pos_end is None or self.attr_pos_end > len(self.target):
            self.attr_pos_end = len(self.target)

    @property
    def generated(self) -> list[TokenWithId]:
        """The target tokens that were attributed, one per step (column)."""
        return self.target[self.attr_pos_start : self.attr_pos_end]

    @property
    def sequence_scores(self) -> None:
        """inseq's attention self-scores: not produced here (always None)."""
        return None

    # ---- comparison, slicing, difference ------------------------------------------------------
    def __eq__(self, other) -> bool:
        if not isinstance(other, FeatureAttributionSequenceOutput):
            return NotImplemented
        return all(_values_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None

    def __getitem__(self, s: slice) -> "FeatureAttributionSequenceOutput":
        """inseq's slicing: ``seq[a:b]`` keeps source tokens ``a..b-1`` (decoder-only: target tokens) with their
        scores; the attributed steps are always kept."""
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("Index a sequence output with a slice seq[start:stop] (its tokens); "
                            "FeatureAttributionOutput[i] gives sequence i")
        tokens = self.source if self.source_attributions is not None else self.target
        start, stop, _ = s.indices(len(tokens))
        span = (start, stop)
        source_spans = None if self.source_attributions is None else span
        target_spans = None if self.source_attributions is not None else span
        return self.aggregate("slices", source_spans=source_spans, target_spans=target_spans)

    def __sub__(self, other: "FeatureAttributionSequenceOutput") -> "FeatureAttributionSequenceOutput":
        """``a - b``: every score of ``a`` minus the same score of ``b`` (two attributions of the same tokens);
        tokens that differ are labelled ``"a → b"``. inseq 0.7.1 computes ``b - a`` here (its ``pair`` default,
        which ``aggregate("pair", paired_attr=b)`` keeps)."""
        if not isinstance(other, FeatureAttributionSequenceOutput):
            raise ValueError(f"Cannot compare {type(other)} with {type(self)}")  # noqa: TRY004 (inseq's error)
        return self.aggregate("pair", paired_attr=other, aggregate_fn=lambda x, y: x - y,
                              do_post_aggregation_checks=False)

    # ---- aggregation ------------------------------------------------------------------------
    def aggregate(
        self,
        aggregator: str | Sequence | None = None,
        aggregate_fn: str | Callable | Sequence | None = None,
        normalize: bool | None = None,
        rescale: bool = False,
        source_spans: Sequence | None = None,
        target_spans: Sequence | None = None,
        select_idx: int | tuple[int, int] | list[int] | None = None,
        do_pre_aggregation_checks: bool = True,
        do_post_aggregation_checks: bool = True,
        **kwargs,
    ) -> "FeatureAttributionSequenceOutput":
        """Aggregate scores with inseq 0.7.1's aggregators and numbers.

        Args:
            aggregator: ``None`` for the method's default (gradients: ``vnorm``; attention: ``mean`` over heads
                then ``mean`` over layers; occlusion: nothing; nothing once aggregated), one name, or a list of
                names (or of ``(name, aggregate_fn)`` pairs) applied in order. Names:

                - an aggregation function (``mean max min sum prod absmax vnorm``, see
                  :func:`list_aggregation_functions`) or ``"scores"`` (the method's function, or ``aggregate_fn``):
                  reduce the last dimension of the scores, then normalize each step's column. ``select_idx``
                  keeps some indices of that dimension first (an int: that one, no reduction; ``(start, end)``; a
                  list), e.g. attention heads;
                - ``"subwords"``: merge word pieces as inseq does: a token starting with one of ``special_chars``
                  (default ``"▁"``; byte-level BPE: ``("Ġ", "Ċ")``) starts a word (ends one with
                  ``is_suffix_symbol=True``); ``aggregate_source`` / ``aggregate_target`` (True) choose the sides;
                - ``"split"``: merge the tokens between matches of ``split_pattern`` (``split_mode`` ``single``,
                  ``start`` or ``end``);
                - ``"slices"``: keep the tokens of ``source_spans`` / ``target_spans`` (``seq[a:b]``);
                - ``"pair"``: ``aggregate_fn(seq, paired_attr)`` elementwise, by default ``paired_attr - seq``;
                - ``"spans"``: merge ``source_spans`` / ``target_spans`` (``(start, end)`` or a list of them);
                - ``"words"`` (this library's, not inseq's): merge words by the word-start markers of every
                  tokenizer family (``▁``, ``Ġ``, a space; special tokens kept apart).

                ``spans`` and ``words`` split a span crossing ``attr_pos_start`` or ``attr_pos_end`` there (a prompt
                token is never a step) and keep a decoder-only source equal to the target's prompt part; inseq's
                ``subwords`` and ``split`` merge across them as inseq does. Merged scores are ``aggregate_fn`` over
                the merged cells (default ``absmax``); step scores merge with their step function's rule
                (probabilities multiply, entropies add).
            aggregate_fn: the function of a ``scores``/``spans``/``subwords``/``split``/``words``/``pair`` step
                (a name or a callable ``fn(x, dim)``; ``pair``: ``fn(x, y)``); one per step for a list.
            normalize: divide each step's column by its L1 norm after a ``scores`` step (default True unless
                ``rescale``).
            rescale: divide by the global absolute maximum instead.
            select_idx: see ``scores`` above.
            do_pre_aggregation_checks, do_post_aggregation_checks: accepted for inseq compatibility (checks always
                run; a partial aggregation is allowed).
            **kwargs: the aggregators' options above (``special_chars``, ``is_suffix_symbol``,
                ``aggregate_source``, ``aggregate_target``, ``split_pattern``, ``split_mode``, ``paired_attr``,
                ``vnorm_ord``).

        Returns:
            A new output; this one is not modified.
        """
        unknown = set(kwargs) - _AGGREGATOR_OPTIONS
        if unknown:
            raise TypeError(f"aggregate() got unexpected keyword arguments {sorted(unknown)}; "
                            f"aggregator options are {sorted(_AGGREGATOR_OPTIONS)}")
        if normalize and rescale:
            raise ValueError("normalize and rescale cannot both be True")
        if normalize is None:
            normalize = not rescale
        out = self
        for name, fn in self._pipeline(aggregator, aggregate_fn):
            out = out._aggregate_step(name, fn, normalize, rescale, source_spans, target_spans, select_idx, kwargs)
        return out

    def _pipeline(self, aggregator, aggregate_fn) -> list[tuple[str, Any]]:
        """``(aggregator, function)`` steps; an aggregation function name ``f`` is the step ``("scores", f)``."""
        if aggregator is None:
            if aggregate_fn is not None:
                raise ValueError("aggregate_fn needs an aggregator: pass aggregator='scores' (or a list) with it")
            steps = list(DEFAULT_AGGREGATORS[self.granularity]) if not self.aggregated else []
            scores = self.source_attributions if self.source_attributions is not None else self.target_attributions
            if self.granularity == "multidimensional" and scores is not None:
                # inseq: one mean per extra dimension (value_zeroing's layers; attention's layers x heads)
                steps = steps[: max(scores.ndim - 2, 0)]
            return [("scores", name) for name in steps]
        if isinstance(aggregator, str):
            if isinstance(aggregate_fn, list | tuple):
                raise ValueError(  # noqa: TRY004 (inseq's error)
                    "If a single aggregator is used, aggregate_fn should also be a single function")
            return [_aggregator_step(aggregator, aggregate_fn)]
        items = list(aggregator)
        if items and all(isinstance(a, tuple) for a in items):
            return [_aggregator_step(*pair) for pair in items]
        if isinstance(aggregate_fn, list | tuple):
            if len(aggregate_fn) != len(items):
                raise ValueError("If custom aggregate_fn are provided, their number should match the number of "
                                 "aggregators.")
            fns = list(aggregate_fn)
        else:  # one function for every step that is not itself a function name
            fns = [None if a in AGGREGATION_FUNCTIONS else aggregate_fn for a in items]
        return [_aggregator_step(a, f) for a, f in zip(items, fns)]

    def _aggregate_step(self, name, fn, normalize, rescale, source_spans, target_spans, select_idx, options):
        if name == "scores":
            return self._reduce_last_dim(fn or default_scores_function(self.granularity), normalize, rescale,
                                         select_idx, options.get("vnorm_ord"))
        if name == "spans":
            return self._merge_spans(source_spans, target_spans, fn or "absmax")
        if name == "words":
            return self._merge_spans(
                subword_spans([t.token for t in self.source]) if self.source_attributions is not None else None,
                subword_spans([t.token for t in self.target]),
                fn or "absmax",
            )
        if name in ("subwords", "split"):
            def spans(tokens, side):
                if not options.get(f"aggregate_{side}", True):
                    return []
                strings = [t.token for t in tokens]
                if name == "subwords":
                    return inseq_subword_spans(strings, options.get("special_chars", "▁"),
                                               options.get("is_suffix_symbol", False))
                return split_pattern_spans(strings, options.get("split_pattern"), options.get("split_mode", "single"))

            return self._inseq_spans(spans(self.source, "source"), spans(self.target, "target"), fn)
        if name == "slices":
            return replace(self, **slice_fields(self, source_spans, target_spans))
        if name == "pair":
            paired = options.get("paired_attr")
            if not isinstance(paired, FeatureAttributionSequenceOutput):
                raise ValueError("The 'pair' aggregator needs paired_attr=<a FeatureAttributionSequenceOutput>")
            return replace(self, **pair_fields(self, paired, get_pair_function(fn)))
        raise ValueError(f"Unknown aggregator {name!r}")  # unreachable: _aggregator_step checks names

    def _inseq_spans(self, source_spans, target_spans, fn) -> "FeatureAttributionSequenceOutput":
        source_spans, target_spans = format_spans(source_spans) or [], format_spans(target_spans) or []
        check_spans(self.source, source_spans, "source")
        check_spans(self.target, target_spans, "target")
        fields_ = contiguous_fields(self, source_spans, target_spans, fn,
                                    lambda n: step_function_aggregate_map(n).get("spans", "absmax"))
        return replace(self, **fields_)

    def _reduce_last_dim(self, fn_name, normalize: bool, rescale: bool, select_idx=None, vnorm_ord=None,
                         ) -> "FeatureAttributionSequenceOutput":
        fn = scores_function(fn_name, vnorm_ord)
        src, tgt = self.source_attributions, self.target_attributions
        if (src if src is not None else tgt) is None:
            return self
        if (src if src is not None else tgt).ndim <= 2:
            raise ValueError("Scores are already one per (token, step); there is no dimension left to aggregate.")
        if select_idx is not None:
            src = filter_scores(src, -1, select_idx) if src is not None else None
            tgt = filter_scores(tgt, -1, select_idx) if tgt is not None else None
        if not isinstance(select_idx, int):  # one index selects without reducing (inseq)
            src = fn(src, dim=-1) if src is not None else None
            tgt = fn(tgt, dim=-1) if tgt is not None else None
        if normalize:
            src, tgt = normalize_columns(src, tgt)
        if rescale:
            src, tgt = rescale_global(src, tgt)
        done = (src if src is not None else tgt).ndim == 2
        return replace(self, source_attributions=src, target_attributions=tgt, aggregated=done)

    def _merge_spans(self, source_spans, target_spans, fn) -> "FeatureAttributionSequenceOutput":
        """Merge each span ``[start, end)`` of tokens into one token (their strings joined) whose scores are
        ``fn`` over the merged rows; a target span of attributed positions also merges its step columns
        (and step scores, with the step function's ``spans`` aggregation).

        A target span that crosses ``attr_pos_start`` or ``attr_pos_end`` (a word cut by the prompt's end,
        say) is split there and its pieces merged separately; user spans follow the same rule. Decoder-only
        outputs take no ``source_spans``: their source is ``target[:attr_pos_start]`` and is merged with it.
        """
        start, end = self.attr_pos_start, self.attr_pos_end
        decoder_only = self.source_attributions is None and self.source == self.target[:start]
        if decoder_only and source_spans:
            raise ValueError(
                "This decoder-only output's source is the prompt, target[:attr_pos_start]: pass the prompt's "
                "spans as target_spans."
            )
        # A prompt token is context, never a step: merging it into a step's column would give that column
        # the prompt token's label and move attr_pos_start into the prompt. Splitting at attr_pos_start keeps
        # the prompt piece one context row and the continuation piece one step span (likewise at attr_pos_end,
        # past which tokens are neither steps nor scored rows).
        t_spans = split_spans(validate_spans(target_spans, len(self.target), "target"), (start, end))
        s_spans = validate_spans(source_spans, len(self.source), "source")
        step_spans = [(s - start, e - start) for s, e in t_spans if start <= s and e <= end]
        tgt = self.target_attributions
        rows = tgt.shape[0] if tgt is not None else 0
        merged_target = _merge_tokens(self.target, t_spans)
        merged_start = start - sum(e - s - 1 for s, e in t_spans if e <= start)
        return replace(
            self,
            source=merged_target[:merged_start] if decoder_only else _merge_tokens(self.source, s_spans),
            target=merged_target,
            source_attributions=merge_cell_spans(self.source_attributions, s_spans, step_spans, fn),
            target_attributions=merge_cell_spans(tgt, [(s, e) for s, e in t_spans if e <= rows], step_spans, fn),
            step_scores={
                name: merge_spans(v, step_spans, 0, step_function_aggregate_map(name).get("spans", "absmax"))
                for name, v in self.step_scores.items()
            },
            attr_pos_start=merged_start,
            attr_pos_end=end - sum(e - s - 1 for s, e in t_spans if e <= end),
        )

    # ---- scores -------------------------------------------------------------------------------
    @property
    def minimum(self) -> float:
        """The lowest score (0 if all are higher), NaN counted as 0 (inseq's)."""
        values = [0.0] + [float(torch.nan_to_num(t).min()) for t in (self.source_attributions,
                                                                     self.target_attributions) if t is not None]
        return min(values)

    @property
    def maximum(self) -> float:
        """The highest score (0 if all are lower), NaN counted as 0 (inseq's)."""
        values = [0.0] + [float(torch.nan_to_num(t).max()) for t in (self.source_attributions,
                                                                     self.target_attributions) if t is not None]
        return max(values)

    def weight_attributions(self, step_fn_id: str) -> "FeatureAttributionSequenceOutput":
        """Aggregate (default aggregation), then multiply each step's column by that step's ``step_fn_id`` score,
        in place (inseq's); the output then counts as aggregated. Returns this output."""
        if step_fn_id not in self.step_scores:
            raise KeyError(f"No step score {step_fn_id!r} (available: {', '.join(self.step_scores) or 'none'}); "
                           f"attribute with step_scores=[{step_fn_id!r}]")
        aggregated = self.aggregate()
        weights = self.step_scores[step_fn_id].float().unsqueeze(0)  # [1, steps]
        if self.source_attributions is not None:
            self.source_attributions = aggregated.source_attributions.float() * weights
        if self.target_attributions is not None:
            self.target_attributions = aggregated.target_attributions.float() * weights
        self.aggregated = True
        return self

    def decode_tokens(self, tokenizer) -> "FeatureAttributionSequenceOutput":
        """Replace each token string by ``tokenizer.decode([id])`` (merged tokens, id -1, are kept), in place
        (inseq's). Returns this output."""
        def decode(tokens):
            return [TokenWithId(tokenizer.decode([t.id]), t.id) if t.id >= 0 else t for t in tokens]

        self.source, self.target = decode(self.source), decode(self.target)
        return self

    def get_scores_dicts(self, aggregator=None, do_aggregation: bool = True, **kwargs) -> dict[str, dict]:
        """inseq's nested dicts of the (aggregated) scores: ``{"source_attributions": {(step position, generated
        token): {(source index, source token): score}}, "target_attributions": ..., "step_scores": {(position,
        token): {name: score}}}``; ``pd.DataFrame(d["source_attributions"])`` gives the heatmap's table. For a
        flat table see :meth:`to_records`."""
        aggr = self.aggregate(aggregator, **kwargs) if do_aggregation else self
        out = {"source_attributions": {}, "target_attributions": {}, "step_scores": {}}
        for tgt_idx in range(aggr.attr_pos_start, aggr.attr_pos_end):
            key = (tgt_idx, aggr.target[tgt_idx].token)
            column = tgt_idx - aggr.attr_pos_start
            if aggr.source_attributions is not None:
                out["source_attributions"][key] = {
                    (i, tok.token): aggr.source_attributions[i, column].item() for i, tok in enumerate(aggr.source)}
            if aggr.target_attributions is not None:
                out["target_attributions"][key] = {
                    (i, aggr.target[i].token): aggr.target_attributions[i, column].item()
                    for i in range(min(aggr.attr_pos_end, aggr.target_attributions.shape[0]))}
            out["step_scores"][key] = {name: v[column].item() for name, v in aggr.step_scores.items()}
        return out

    # ---- long-form table --------------------------------------------------------------------
    def to_records(self, aggregator=None, do_aggregation: bool = True, sequence: int = 0,
                   **kwargs) -> list[dict[str, Any]]:
        """One dict per (step, attributed token) score of the aggregated output, for pandas, Arrow or a CSV:
        ``sequence`` (index), ``step`` (0-based), ``generated_position`` and ``generated_token`` (the token the
        step generated), ``side`` (``"source"`` or ``"target"``), ``position`` and ``token`` (the attributed
        token), ``score``, then one column per step score (named after it; ``step_<name>`` if that clashes).
        Cells without a score (target tokens not generated yet) are left out.
        ``pyarrow.Table.from_pylist(records)`` or ``pandas.DataFrame(records)`` make a table to write to Parquet.
        """
        aggr = self.aggregate(aggregator, **kwargs) if do_aggregation else self
        for name in ("source_attributions", "target_attributions"):
            scores = getattr(aggr, name)
            if scores is not None and scores.ndim != 2:
                raise ValueError(f"{name} has shape {list(scores.shape)}: records need one score per (token, step); "
                                 "aggregate first (do_aggregation=True, or aggregator=...)")
        fixed = {"sequence", "step", "generated_position", "generated_token", "side", "position", "token", "score"}
        score_columns = {name: (f"step_{name}" if name in fixed else name) for name in aggr.step_scores}
        records = []
        for step, gen_pos in enumerate(range(aggr.attr_pos_start, aggr.attr_pos_end)):
            extra = {column: float(aggr.step_scores[name][step]) for name, column in score_columns.items()}
            base = {"sequence": sequence, "step": step, "generated_position": gen_pos,
                    "generated_token": aggr.target[gen_pos].token}
            for side, tokens, scores in (("source", aggr.source, aggr.source_attributions),
                                         ("target", aggr.target, aggr.target_attributions)):
                if scores is None:
                    continue
                column = scores[:, step].tolist()
                for position, value in enumerate(column):
                    if not math.isnan(value):
                        records.append({**base, "side": side, "position": position, "token": tokens[position].token,
                                        "score": value, **extra})
        return records

    def to_dataframe(self, aggregator=None, do_aggregation: bool = True, **kwargs):
        """:meth:`to_records` as a pandas ``DataFrame`` (``df.to_parquet(path)`` writes it)."""
        return _dataframe(self.to_records(aggregator, do_aggregation, **kwargs))

    # ---- views ------------------------------------------------------------------------------
    def show(self, min_val: float | None = None, max_val: float | None = None, max_show_size: int | None = None,
             show_dim: int | str | None = None, slice_dims: dict | None = None, display: bool = True,
             return_html: bool | None = False, return_figure: bool = False, aggregator=None,
             do_aggregation: bool = True, **kwargs):
        """Show the heatmap: HTML in a notebook (Jupyter, JupyterLab, VS Code, Colab), a rich table elsewhere.

        Scores that are one per (token, step) after ``aggregate(aggregator, **kwargs)`` (skipped with
        ``do_aggregation=False``) are shown as one heatmap; scores with extra dimensions (``do_aggregation=False``
        on raw scores) as :meth:`show_granular` shows them (``max_show_size``, ``show_dim``, ``slice_dims``).

        Returns:
            the HTML document with ``return_html``, the matplotlib figure with ``return_figure`` (``savefig`` it as
            PNG, SVG or PDF), else None.
        """
        from ..viz import show_sequences

        return show_sequences([self], single=True, min_val=min_val, max_val=max_val, max_show_size=max_show_size,
                              show_dim=show_dim, slice_dims=slice_dims, display=display, return_html=return_html,
                              return_figure=return_figure, aggregator=aggregator, do_aggregation=do_aggregation,
                              **kwargs)

    def show_granular(self, min_val: float | None = None, max_val: float | None = None,
                      max_show_size: int | None = None, show_dim: int | str | None = None,
                      slice_dims: dict | None = None, display: bool = True, return_html: bool | None = False,
                      return_figure: bool = False):
        """Heatmaps of the raw scores, one per index of an extra dimension (see
        :func:`~inseq_lightning.viz.show_granular_attributions`)."""
        from ..viz import show_granular_attributions

        return show_granular_attributions(self, max_show_size=max_show_size, min_val=min_val, max_val=max_val,
                                          show_dim=show_dim, slice_dims=slice_dims, display=display,
                                          return_html=return_html, return_figure=return_figure)

    def show_tokens(self, min_val: float | None = None, max_val: float | None = None, display: bool = True,
                    return_html: bool | None = False, return_figure: bool = False,
                    replace_char: dict[str, str] | None = None, wrap_after=None,
                    step_score_highlight: str | None = None, aggregator=None, do_aggregation: bool = True,
                    **kwargs):
        """The generated text, each token unfolding into its source and prefix tokens coloured by their scores
        (see :func:`~inseq_lightning.viz.show_token_attributions`)."""
        from ..viz import show_token_attributions

        aggregated = self.aggregate(aggregator, **kwargs) if do_aggregation else self
        return show_token_attributions(aggregated, min_val=min_val, max_val=max_val, display=display,
                                       return_html=return_html, return_figure=return_figure,
                                       replace_char=replace_char, wrap_after=wrap_after,
                                       step_score_highlight=step_score_highlight)

    def to_figure(self, min_val: float | None = None, max_val: float | None = None, title: str | None = None,
                  aggregator=None, do_aggregation: bool = True, **kwargs):
        """The heatmap as a matplotlib ``Figure`` (not registered with pyplot: nothing to close)."""
        from ..viz.figure import attribution_figure

        aggregated = self.aggregate(aggregator, **kwargs) if do_aggregation else self
        return attribution_figure(aggregated, min_val, max_val, title=title)

    def save_figure(self, path, dpi: int = 150, min_val: float | None = None, max_val: float | None = None,
                    title: str | None = None, **aggregate_kwargs) -> Path:
        """Write the heatmap as an image; the format follows the suffix (``.png``, ``.svg``, ``.pdf``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_figure(min_val, max_val, title, **aggregate_kwargs).savefig(path, dpi=dpi)
        return path

    def save_html(self, path, min_val: float | None = None, max_val: float | None = None,
                  **aggregate_kwargs) -> Path:
        """Write the heatmap as a self-contained HTML page (no scripts)."""
        html = self.show(min_val, max_val, display=False, return_html=True, **aggregate_kwargs)
        return _write_text(path, html)

    def _repr_html_(self) -> str | None:
        """What a notebook shows for a bare output: its heatmap."""
        from ..viz import notebook_html

        return notebook_html([self])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={_tokens_repr(self.source)}, target={_tokens_repr(self.target)}, "
                f"source_attributions={_tensor_repr(self.source_attributions)}, "
                f"target_attributions={_tensor_repr(self.target_attributions)}, "
                f"step_scores={{{', '.join(f'{k!r}: {_tensor_repr(v)}' for k, v in self.step_scores.items())}}}, "
                f"attr_pos_start={self.attr_pos_start}, attr_pos_end={self.attr_pos_end}, "
                f"granularity={self.granularity!r}, aggregated={self.aggregated})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": _pairs(self.source),
            "target": _pairs(self.target),
            "source_attributions": self.source_attributions,
            "target_attributions": self.target_attributions,
            "step_scores": dict(self.step_scores),
            "attr_pos_start": self.attr_pos_start,
            "attr_pos_end": self.attr_pos_end,
            "granularity": self.granularity,
            "aggregated": self.aggregated,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureAttributionSequenceOutput":
        data = dict(data)
        data["source"] = [TokenWithId(t, i) for t, i in data["source"]]
        data["target"] = [TokenWithId(t, i) for t, i in data["target"]]
        return cls(**data)


def _aggregator_step(name, fn) -> tuple[str, Any]:
    if not isinstance(name, str):
        raise TypeError(f"Aggregators are named by strings (see list_aggregators()), got {name!r}")
    if name in AGGREGATION_FUNCTIONS:
        if fn is not None:
            raise ValueError("If aggregator is a string identifying an aggregation function, aggregate_fn should "
                             "not be provided.")
        return "scores", name
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}. Choose from {', '.join(AGGREGATORS)}, or an aggregation "
                         f"function ({', '.join(AGGREGATION_FUNCTIONS)}).")
    return name, fn


def get_pair_function(fn) -> Callable | None:
    """The elementwise function of a ``pair`` step: a callable ``fn(x, y)``, or an aggregation function name
    applied to the two stacked (e.g. ``"mean"``)."""
    if fn is None or callable(fn):
        return fn
    reduce = AGGREGATION_FUNCTIONS.get(fn)
    if reduce is None:
        raise ValueError(f"Unknown aggregation function {fn!r}. Choose one of: {', '.join(AGGREGATION_FUNCTIONS)}.")
    return lambda x, y: reduce(torch.stack([x, y]), dim=0)


def _merge_tokens(tokens: list[TokenWithId], spans: list[tuple[int, int]]) -> list[TokenWithId]:
    out, cursor = [], 0
    for start, end in spans:
        out.extend(tokens[cursor:start])
        out.append(TokenWithId("".join(t.token for t in tokens[start:end]), -1))
        cursor = end
    out.extend(tokens[cursor:])
    return out


def _tokens_repr(tokens: list, limit: int = 8) -> str:
    shown = [t.token for t in tokens[:limit]]
    more = f", ... {len(tokens) - limit} more" if len(tokens) > limit else ""
    return f"[{', '.join(map(repr, shown))}{more}]"


def _tensor_repr(t) -> str:
    return "None" if t is None else f"tensor{list(t.shape)}"


def _dataframe(records: list[dict]):
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("to_dataframe() needs pandas (pip install pandas); to_records() gives the same rows as "
                          "dicts (pyarrow.Table.from_pylist(records) for Arrow/Parquet)") from err
    columns = ["sequence", "step", "generated_position", "generated_token", "side", "position", "token", "score"]
    frame = pd.DataFrame.from_records(records)
    return frame if records else pd.DataFrame(columns=columns)


def _write_text(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@dataclass(eq=False)
class FeatureAttributionOutput:
    """The result of :meth:`AttributionModel.attribute`: one sequence output per input text, the
    optional per-step outputs and an ``info`` dict (method, texts, arguments, timing).

    ``out[i]`` is sequence ``i``; ``a + b`` merges outputs; ``a == b`` compares every sequence, step output and
    ``info``; a bare ``out`` in a notebook shows the heatmaps.
    """

    sequence_attributions: list[FeatureAttributionSequenceOutput]
    step_attributions: list[FeatureAttributionStepOutput] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequence_attributions)

    def __getitem__(self, index: int) -> FeatureAttributionSequenceOutput:
        return self.sequence_attributions[index]

    def __iter__(self):
        return iter(self.sequence_attributions)

    def __eq__(self, other) -> bool:
        """inseq's equality: same sequences and step outputs (scores within ``atol=1e-5``) and the same ``info``
        (which holds ``exec_time``: two runs differ there). Step outputs are compared when both have them."""
        if not isinstance(other, FeatureAttributionOutput):
            return NotImplemented
        if len(self.sequence_attributions) != len(other.sequence_attributions):
            return False
        if any(a != b for a, b in zip(self.sequence_attributions, other.sequence_attributions)):
            return False
        if self.step_attributions is not None and other.step_attributions is not None and (
                len(self.step_attributions) != len(other.step_attributions)
                or any(a != b for a, b in zip(self.step_attributions, other.step_attributions))):
            return False
        return _values_equal(self.info, other.info)

    __hash__ = None

    def __add__(self, other: "FeatureAttributionOutput") -> "FeatureAttributionOutput":
        return merge_attributions([self, other])

    def __radd__(self, other):
        return self if isinstance(other, int) and other == 0 else self.__add__(other)

    def aggregate(self, *args, **kwargs) -> "FeatureAttributionOutput":
        """:meth:`FeatureAttributionSequenceOutput.aggregate` applied to every sequence."""
        return replace(self, sequence_attributions=[s.aggregate(*args, **kwargs) for s in self.sequence_attributions],
                       info=copy.deepcopy(self.info))

    def weight_attributions(self, step_score_id: str) -> None:
        """:meth:`FeatureAttributionSequenceOutput.weight_attributions` on every sequence, in place."""
        for seq in self.sequence_attributions:
            seq.weight_attributions(step_score_id)

    def get_scores_dicts(self, aggregator=None, do_aggregation: bool = True, **kwargs) -> list[dict]:
        """:meth:`FeatureAttributionSequenceOutput.get_scores_dicts` of every sequence."""
        return [seq.get_scores_dicts(aggregator, do_aggregation, **kwargs) for seq in self.sequence_attributions]

    def decode_tokens(self, tokenizer) -> "FeatureAttributionOutput":
        """:meth:`FeatureAttributionSequenceOutput.decode_tokens` on every sequence. Returns this output."""
        for seq in self.sequence_attributions:
            seq.decode_tokens(tokenizer)
        return self

    def to_records(self, aggregator=None, do_aggregation: bool = True, **kwargs) -> list[dict[str, Any]]:
        """:meth:`FeatureAttributionSequenceOutput.to_records` of every sequence (``sequence``: its index)."""
        return [record for i, seq in enumerate(self.sequence_attributions)
                for record in seq.to_records(aggregator, do_aggregation, sequence=i, **kwargs)]

    def to_dataframe(self, aggregator=None, do_aggregation: bool = True, **kwargs):
        """:meth:`to_records` as a pandas ``DataFrame`` (``df.to_parquet(path)`` writes it)."""
        return _dataframe(self.to_records(aggregator, do_aggregation, **kwargs))

    def show(self, min_val: float | None = None, max_val: float | None = None, max_show_size: int | None = None,
             show_dim: int | str | None = None, slice_dims: dict | None = None, display: bool = True,
             return_html: bool | None = False, return_figure: bool = False, aggregator=None,
             do_aggregation: bool = True, **kwargs):
        """:meth:`FeatureAttributionSequenceOutput.show` for every sequence; ``return_html`` gives one HTML
        document with all of them, ``return_figure`` a list of figures."""
        from ..viz import show_sequences

        return show_sequences(list(self.sequence_attributions), single=False, min_val=min_val, max_val=max_val,
                              max_show_size=max_show_size, show_dim=show_dim, slice_dims=slice_dims,
                              display=display, return_html=return_html, return_figure=return_figure,
                              aggregator=aggregator, do_aggregation=do_aggregation, **kwargs)

    def show_granular(self, min_val: float | None = None, max_val: float | None = None,
                      max_show_size: int | None = None, show_dim: int | str | None = None,
                      slice_dims: dict | None = None, display: bool = True, return_html: bool = False,
                      return_figure: bool = False):
        """:meth:`FeatureAttributionSequenceOutput.show_granular` for every sequence."""
        from ..viz import show_granular_attributions

        return show_granular_attributions(list(self.sequence_attributions), max_show_size=max_show_size,
                                          min_val=min_val, max_val=max_val, show_dim=show_dim,
                                          slice_dims=slice_dims, display=display, return_html=return_html,
                                          return_figure=return_figure)

    def show_tokens(self, min_val: float | None = None, max_val: float | None = None, display: bool = True,
                    return_html: bool = False, return_figure: bool = False,
                    replace_char: dict[str, str] | None = None, wrap_after=None,
                    step_score_highlight: str | None = None, aggregator=None, do_aggregation: bool = True,
                    **kwargs):
        """:meth:`FeatureAttributionSequenceOutput.show_tokens` for every sequence."""
        from ..viz import show_token_attributions

        sequences = [s.aggregate(aggregator, **kwargs) if do_aggregation else s for s in self.sequence_attributions]
        return show_token_attributions(sequences, min_val=min_val, max_val=max_val, display=display,
                                       return_html=return_html, return_figure=return_figure,
                                       replace_char=replace_char, wrap_after=wrap_after,
                                       step_score_highlight=step_score_highlight)

    def save_html(self, path, min_val: float | None = None, max_val: float | None = None,
                  **aggregate_kwargs) -> Path:
        """Write the heatmaps of every sequence as one self-contained HTML page (no scripts)."""
        html = self.show(min_val, max_val, display=False, return_html=True, **aggregate_kwargs)
        return _write_text(path, html)

    def save_figure(self, path, dpi: int = 150, min_val: float | None = None, max_val: float | None = None,
                    **aggregate_kwargs) -> list[Path]:
        """Write each sequence's heatmap as an image (format from the suffix: ``.png``, ``.svg``, ``.pdf``):
        ``path`` itself for one sequence, ``<stem>_<i><suffix>`` for several. Returns the paths written."""
        path = Path(path)
        if len(self.sequence_attributions) == 1:
            return [self.sequence_attributions[0].save_figure(path, dpi, min_val, max_val, **aggregate_kwargs)]
        return [seq.save_figure(path.with_name(f"{path.stem}_{i}{path.suffix}"), dpi, min_val, max_val,
                                title=f"Sequence {i}", **aggregate_kwargs)
                for i, seq in enumerate(self.sequence_attributions)]

    def _repr_html_(self) -> str | None:
        """What a notebook shows for a bare output: the heatmaps."""
        from ..viz import notebook_html

        return notebook_html(list(self.sequence_attributions))

    def __repr__(self) -> str:
        steps = None if self.step_attributions is None else f"[{len(self.step_attributions)} step outputs]"
        method = self.info.get("attribution_method")
        return (f"FeatureAttributionOutput({len(self.sequence_attributions)} sequences"
                f"{f', method={method!r}' if method else ''}, sequence_attributions="
                f"[{', '.join(repr(s) for s in self.sequence_attributions[:2])}"
                f"{', ...' if len(self.sequence_attributions) > 2 else ''}], step_attributions={steps}, "
                f"info keys={sorted(self.info)})")

    def save(self, path, overwrite: bool = False, compress: bool = False, ndarray_compact: bool = True,
             use_primitives: bool = False, split_sequences: bool = False, scores_precision: str = "float32",
             format: str = "inseq_lightning") -> None:
        """Write JSON (gzipped with ``compress``). ``format="inseq_lightning"``: tensors are base64 safetensors (plain
        lists with ``use_primitives``); ``format="inseq"``: the file inseq 0.7.1's ``save`` writes with the same
        arguments, for inseq's ``load`` (see docs/semantics.md, "Files")."""
        from .serialization import save_output

        save_output(self, path, overwrite=overwrite, compress=compress, ndarray_compact=ndarray_compact,
                    use_primitives=use_primitives, split_sequences=split_sequences, scores_precision=scores_precision,
                    format=format)

    @staticmethod
    def load(path, decompress: bool = False, max_decompressed_bytes: int | None = None) -> "FeatureAttributionOutput":
        """Read a file written by :meth:`save` or by inseq 0.7.1's ``save`` (any of its options; gzip is detected,
        ``decompress`` is accepted for inseq's signature). Never unpickles nor imports; a malformed or hostile file
        raises :class:`~inseq_lightning.errors.InvalidFileError`, as does one expanding past
        ``max_decompressed_bytes`` (default ``serialization.MAX_DECOMPRESSED_BYTES``, 256 MiB) when decompressed."""
        from .serialization import load_output

        return load_output(path, max_decompressed_bytes=max_decompressed_bytes)


# Info values that hold one entry per sequence (the rest describe the whole call).
_PER_SEQUENCE_INFO = ("input_texts", "generated_texts", "attr_pos_start", "attr_pos_end")


def _step_groups(output: FeatureAttributionOutput) -> list[tuple[int, int, int]] | None:
    """``(first sequence, first step output, number of step outputs)`` of each attributed batch: a batch's step
    outputs have one row per sequence of the batch and there are as many as its longest sequence has steps
    (decoder-only: one sequence per batch). None when the step outputs do not follow that layout."""
    steps, sequences = output.step_attributions, output.sequence_attributions
    groups, seq_cursor, step_cursor = [], 0, 0
    while step_cursor < len(steps):
        rows = len(steps[step_cursor].target)
        members = sequences[seq_cursor : seq_cursor + rows]
        if rows == 0 or len(members) != rows:
            return None
        count = max(s.attr_pos_end - s.attr_pos_start for s in members)
        if step_cursor + count > len(steps) or any(len(s.target) != rows for s in steps[step_cursor:step_cursor + count]):
            return None
        groups.append((seq_cursor, step_cursor, count))
        seq_cursor, step_cursor = seq_cursor + rows, step_cursor + count
    return groups if seq_cursor == len(sequences) else None


def output_for_sequence(output: FeatureAttributionOutput, index: int) -> FeatureAttributionOutput:
    """A :class:`FeatureAttributionOutput` holding sequence ``index`` of ``output`` alone, with its own
    ``info`` (method, arguments, that sequence's texts) and, when present, its per-step outputs (one row each,
    source padding removed)."""
    info = {key: ([value[index]] if key in _PER_SEQUENCE_INFO and isinstance(value, list) else copy.deepcopy(value))
            for key, value in output.info.items()}
    steps = None
    groups = _step_groups(output) if output.step_attributions is not None else None
    if groups is not None:
        seq = output.sequence_attributions[index]
        first_seq, first_step, _ = next(g for g in groups if g[0] <= index < g[0] + len(output.step_attributions[g[1]].target))
        n_steps = seq.attr_pos_end - seq.attr_pos_start
        source_len = len(seq.source) if seq.source_attributions is not None else None
        steps = [output.step_attributions[first_step + k].row(index - first_seq, source_len)
                 for k in range(n_steps)]
    return FeatureAttributionOutput([output.sequence_attributions[index]], steps, info)


def merge_attributions(outputs: Sequence[FeatureAttributionOutput]) -> FeatureAttributionOutput:
    """Concatenate the sequences (and, as inseq does, the step outputs) of several outputs; ``info`` values that
    differ become lists."""
    if not outputs:
        raise ValueError("merge_attributions needs at least one output")
    sequences, info = [], {}
    steps = [step for o in outputs for step in o.step_attributions] \
        if all(o.step_attributions is not None for o in outputs) else None
    for out in outputs:
        sequences.extend(copy.copy(s) for s in out.sequence_attributions)
    for key in outputs[0].info:
        values = [o.info.get(key) for o in outputs]
        if key in ("input_texts", "generated_texts") or (key in _PER_SEQUENCE_INFO and all(isinstance(v, list)
                                                                                          for v in values)):
            info[key] = [v for vals in values for v in (vals if isinstance(vals, list) else [vals])]
        elif key == "exec_time":
            info[key] = sum(v or 0 for v in values)
        else:
            info[key] = values[0] if all(_values_equal(v, values[0]) for v in values) else values
    return FeatureAttributionOutput(sequences, steps, info)
