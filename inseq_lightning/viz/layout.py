"""The grid every view draws: rows (source and target-prefix tokens), columns (generated tokens),
scores and the step-score rows, taken from an aggregated sequence output."""

from dataclasses import dataclass

import torch

from ..data.outputs import FeatureAttributionSequenceOutput
from .tokens import CONTINUATION, readable_tokens


@dataclass
class Grid:
    """Labels are readable text (:func:`.tokens.readable_tokens`), :data:`.tokens.CONTINUATION` on a token
    that only continues a character shown on an earlier one (flagged in ``*_continues``, for views to
    draw it faint); the outputs keep the raw tokens."""

    row_labels: list[str]
    row_groups: list[str]  # "source" or "target" per row
    column_labels: list[str]
    scores: list[list[float]]  # [rows][columns], NaN where no score
    step_scores: dict[str, list[float]]
    row_continues: list[bool]
    column_continues: list[bool]


def build_grid(seq: FeatureAttributionSequenceOutput) -> Grid:
    if not seq.aggregated and seq.granularity != "coarse":
        seq = seq.aggregate()
    # The target is decoded whole: decoder-only rows (the prompt and the prefix) and columns (the
    # continuation) are slices of it, and a character may be split across the prompt's end.
    target = readable_tokens([t.token for t in seq.target])
    rows, groups, blocks = [], [], []
    if seq.source_attributions is not None:
        rows += readable_tokens([t.token for t in seq.source])
        groups += ["source"] * len(seq.source)
        blocks.append(seq.source_attributions)
    if seq.target_attributions is not None:
        n_rows = seq.target_attributions.shape[0]
        rows += target[:n_rows]
        groups += ["target"] * n_rows
        blocks.append(seq.target_attributions)
    columns = target[seq.attr_pos_start : seq.attr_pos_end]
    if blocks:
        scores = torch.cat([b.reshape(b.shape[0], b.shape[1]) for b in blocks], 0).tolist()
    else:
        scores = []
    return Grid(_labels(rows), groups, _labels(columns), scores, {k: v.tolist() for k, v in seq.step_scores.items()},
                row_continues=[text is None for text in rows], column_continues=[text is None for text in columns])


def _labels(texts: list[str | None]) -> list[str]:
    return [CONTINUATION if text is None else text for text in texts]
