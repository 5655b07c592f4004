"""Attribution outputs: per-sequence raw scores with tokens and step scores, and the batch container."""

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..attr.step_functions import step_function_aggregate_map
from .aggregation import (
    AGGREGATION_FUNCTIONS,
    DEFAULT_AGGREGATORS,
    get_aggregation_function,
    merge_cell_spans,
    merge_spans,
    normalize_columns,
    rescale_global,
    split_spans,
    subword_spans,
    validate_spans,
)


@dataclass(frozen=True)
class TokenWithId:
    token: str
    id: int

    def __str__(self) -> str:
        return self.token


@dataclass
class FeatureAttributionStepOutput:
    """Scores of one generation step for every sequence of a batch (``output_step_attributions=True``).

    ``source_attributions``: ``[B, S, ...]``; ``target_attributions``: ``[B, T, ...]``;
    ``step_scores``: ``{name: [B]}``; ``target``: the token generated at this step per sequence.
    """

    source_attributions: torch.Tensor | None
    target_attributions: torch.Tensor | None
    step_scores: dict[str, torch.Tensor]
    target: list[TokenWithId]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_attributions": self.source_attributions,
            "target_attributions": self.target_attributions,
            "step_scores": dict(self.step_scores),
            "target": [[t.token, t.id] for t in self.target],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureAttributionStepOutput":
        return cls(data["source_attributions"], data["target_attributions"], dict(data["step_scores"]),
                   [TokenWithId(t, i) for t, i in data["target"]])

    def row(self, index: int, source_len: int | None = None, target_len: int | None = None,
            ) -> "FeatureAttributionStepOutput":
        """The same step for one sequence of the batch (``index``: its row in this step), its token
        dimension cut to ``source_len`` / ``target_len`` (the batch pads it with NaN)."""
        def pick(t: torch.Tensor | None, length: int | None) -> torch.Tensor | None:
            return t[index : index + 1, :length] if t is not None else None

        return FeatureAttributionStepOutput(pick(self.source_attributions, source_len),
                                            pick(self.target_attributions, target_len),
                                            {k: v[index : index + 1] for k, v in self.step_scores.items()},
                                            [self.target[index]])


@dataclass
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
        if self.attr_pos_end is None:
            self.attr_pos_end = len(self.target)

    @property
    def generated(self) -> list[TokenWithId]:
        """The target tokens that were attributed, one per step (column)."""
        return self.target[self.attr_pos_start : self.attr_pos_end]

    # ---- aggregation ------------------------------------------------------------------------
    def aggregate(
        self,
        aggregator: str | Sequence[str] | None = None,
        aggregate_fn: str | Callable | None = None,
        normalize: bool | None = None,
        rescale: bool = False,
        source_spans: Sequence[tuple[int, int]] | None = None,
        target_spans: Sequence[tuple[int, int]] | None = None,
    ) -> "FeatureAttributionSequenceOutput":
        """Reduce raw scores to one score per (token, step), inseq's way.

        Args:
            aggregator: ``None`` for the method's default (gradients: ``vnorm``; attention: ``mean``
                over heads then ``mean`` over layers; occlusion: nothing), an aggregation function
                name (``mean max min sum prod absmax vnorm``), ``"spans"`` (merge ``source_spans`` /
                ``target_spans`` with ``absmax``), ``"subwords"`` (merge the tokens of each word), or a
                list of these applied in order. A span or word that crosses ``attr_pos_start`` or
                ``attr_pos_end`` is split there (a prompt token is never a step); on decoder-only outputs
                the source is the prompt and follows the target, so ``source_spans`` are refused.
            aggregate_fn: function used by ``"spans"``/``"subwords"`` (default ``absmax``).
            normalize: divide each step's column by its L1 norm (default True unless ``rescale``).
            rescale: divide by the global absolute maximum instead.

        Returns:
            A new output; this one is not modified.
        """
        if normalize and rescale:
            raise ValueError("normalize and rescale cannot both be True")
        if normalize is None:
            normalize = not rescale
        if aggregator is None:
            steps = list(DEFAULT_AGGREGATORS[self.granularity]) if not self.aggregated else []
            scores = self.source_attributions if self.source_attributions is not None else self.target_attributions
            if self.granularity == "multidimensional" and scores is not None:
                # inseq: one mean per extra dimension (value_zeroing's layers; attention's layers x heads)
                steps = steps[: max(scores.ndim - 2, 0)]
        elif isinstance(aggregator, str):
            steps = [aggregator]
        else:
            steps = list(aggregator)
        out = self
        for name in steps:
            if name in AGGREGATION_FUNCTIONS:
                out = out._reduce_last_dim(name, normalize, rescale)
            elif name == "spans":
                out = out._merge_spans(source_spans, target_spans, aggregate_fn or "absmax")
            elif name == "subwords":
                out = out._merge_spans(
                    subword_spans([t.token for t in out.source]) if out.source_attributions is not None else None,
                    subword_spans([t.token for t in out.target]),
                    aggregate_fn or "absmax",
                )
            else:
                raise ValueError(
                    f"Unknown aggregator {name!r}. Choose one of: spans, subwords, {', '.join(AGGREGATION_FUNCTIONS)}."
                )
        return out

    def _reduce_last_dim(self, fn_name: str, normalize: bool, rescale: bool) -> "FeatureAttributionSequenceOutput":
        fn = get_aggregation_function(fn_name)
        src, tgt = self.source_attributions, self.target_attributions
        if (src if src is not None else tgt) is None:
            return self
        if (src if src is not None else tgt).ndim <= 2:
            raise ValueError("Scores are already one per (token, step); there is no dimension left to aggregate.")
        src = fn(src, -1) if src is not None else None
        tgt = fn(tgt, -1) if tgt is not None else None
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

    # ---- conveniences -----------------------------------------------------------------------
    def show(self, min_val=None, max_val=None, display: bool = True, return_html: bool = False, **aggregate_kwargs):
        from ..viz import show_attributions

        return show_attributions(self, min_val=min_val, max_val=max_val, display=display, return_html=return_html,
                                 **aggregate_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": [[t.token, t.id] for t in self.source],
            "target": [[t.token, t.id] for t in self.target],
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


def _merge_tokens(tokens: list[TokenWithId], spans: list[tuple[int, int]]) -> list[TokenWithId]:
    out, cursor = [], 0
    for start, end in spans:
        out.extend(tokens[cursor:start])
        out.append(TokenWithId("".join(t.token for t in tokens[start:end]), -1))
        cursor = end
    out.extend(tokens[cursor:])
    return out


@dataclass
class FeatureAttributionOutput:
    """The result of :meth:`AttributionModel.attribute`: one sequence output per input text, the
    optional per-step outputs and an ``info`` dict (method, texts, arguments, timing)."""

    sequence_attributions: list[FeatureAttributionSequenceOutput]
    step_attributions: list[FeatureAttributionStepOutput] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequence_attributions)

    def __getitem__(self, index: int) -> FeatureAttributionSequenceOutput:
        return self.sequence_attributions[index]

    def __iter__(self):
        return iter(self.sequence_attributions)

    def __add__(self, other: "FeatureAttributionOutput") -> "FeatureAttributionOutput":
        return merge_attributions([self, other])

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)

    def aggregate(self, *args, **kwargs) -> "FeatureAttributionOutput":
        """:meth:`FeatureAttributionSequenceOutput.aggregate` applied to every sequence."""
        return replace(self, sequence_attributions=[s.aggregate(*args, **kwargs) for s in self.sequence_attributions])

    def show(self, min_val=None, max_val=None, display: bool = True, return_html: bool = False, **aggregate_kwargs):
        from ..viz import show_attributions

        return show_attributions(self, min_val=min_val, max_val=max_val, display=display, return_html=return_html,
                                 **aggregate_kwargs)

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


def output_for_sequence(output: FeatureAttributionOutput, index: int) -> FeatureAttributionOutput:
    """A :class:`FeatureAttributionOutput` holding sequence ``index`` of ``output`` alone, with its own
    ``info`` (method, arguments, that sequence's texts) and, when present, its per-step outputs."""
    info = {key: ([value[index]] if key in _PER_SEQUENCE_INFO and isinstance(value, list) else copy.deepcopy(value))
            for key, value in output.info.items()}
    steps = None
    if output.step_attributions is not None:
        # Step k holds one row per sequence that has a k-th step, in batch order.
        n_steps = [s.attr_pos_end - s.attr_pos_start for s in output.sequence_attributions]
        seq = output.sequence_attributions[index]
        steps = []
        for k, step in enumerate(output.step_attributions):
            if k < n_steps[index]:
                steps.append(step.row(sum(1 for n in n_steps[:index] if n > k), len(seq.source), len(seq.target)))
    return FeatureAttributionOutput([output.sequence_attributions[index]], steps, info)


def _cat_rows(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """``[b_i, L_i, ...]`` tensors stacked along the batch, token dimension NaN-padded to the longest."""
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    length = max(t.shape[1] for t in present)
    padded = [torch.nn.functional.pad(t.float(), [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]], value=float("nan"))
              for t in present]
    return torch.cat(padded, 0)


def _merge_steps(step_lists: list[list[FeatureAttributionStepOutput]]) -> list[FeatureAttributionStepOutput]:
    """Step k of the merged output holds step k of every part that has it, rows in part order (what
    :func:`output_for_sequence` expects), so step outputs of several batches stay one row per sequence."""
    merged = []
    for k in range(max((len(steps) for steps in step_lists), default=0)):
        parts = [steps[k] for steps in step_lists if k < len(steps)]
        merged.append(FeatureAttributionStepOutput(
            _cat_rows([p.source_attributions for p in parts]),
            _cat_rows([p.target_attributions for p in parts]),
            {name: torch.cat([p.step_scores[name] for p in parts]) for name in parts[0].step_scores},
            [token for p in parts for token in p.target],
        ))
    return merged


def merge_attributions(outputs: Sequence[FeatureAttributionOutput]) -> FeatureAttributionOutput:
    """Concatenate the sequences of several outputs; ``info`` values that differ become lists."""
    if not outputs:
        raise ValueError("merge_attributions needs at least one output")
    sequences, info = [], {}
    steps = _merge_steps([o.step_attributions for o in outputs]) \
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
            info[key] = values[0] if all(v == values[0] for v in values) else values
    return FeatureAttributionOutput(sequences, steps, info)
