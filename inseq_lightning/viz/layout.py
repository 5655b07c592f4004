"""The grid every view draws: rows (source and target-prefix tokens), columns (generated tokens),
scores and the step-score rows, taken from an aggregated sequence output."""

from dataclasses import dataclass

import torch

from ..data.outputs import FeatureAttributionSequenceOutput


@dataclass
class Grid:
    row_labels: list[str]
    row_groups: list[str]  # "source" or "target" per row
    column_labels: list[str]
    scores: list[list[float]]  # [rows][columns], NaN where no score
    step_scores: dict[str, list[float]]


def build_grid(seq: FeatureAttributionSequenceOutput) -> Grid:
    if not seq.aggregated and seq.granularity != "coarse":
        seq = seq.aggregate()
    rows, groups, blocks = [], [], []
    if seq.source_attributions is not None:
        rows += [t.token for t in seq.source]
        groups += ["source"] * len(seq.source)
        blocks.append(seq.source_attributions)
    if seq.target_attributions is not None:
        n_rows = seq.target_attributions.shape[0]
        rows += [t.token for t in seq.target[:n_rows]]
        groups += ["target"] * n_rows
        blocks.append(seq.target_attributions)
    columns = [t.token for t in seq.generated]
    if blocks:
        scores = torch.cat([b.reshape(b.shape[0], b.shape[1]) for b in blocks], 0).tolist()
    else:
        scores = []
    return Grid(rows, groups, columns, scores, {k: v.tolist() for k, v in seq.step_scores.items()})
