"""Raw scores with extra dimensions (embedding dimensions, layers, heads) cut into 2-D panels for the granular
views (inseq's ``show_granular``), and the per-token panels of the token view (inseq's ``show_tokens``)."""

from dataclasses import dataclass

import torch

from ..data.outputs import FeatureAttributionSequenceOutput
from .tokens import readable_labels

DEFAULT_MAX_SHOW_SIZE = 20
_BASE_DIM_NAMES = {0: "Input Tokens", 1: "Generated Tokens"}


@dataclass
class Panel:
    """One 2-D heatmap: ``scores[rows, columns]`` with its labels and a title."""

    title: str
    scores: torch.Tensor
    row_labels: list[str]
    column_labels: list[str]


def dim_names(seq: FeatureAttributionSequenceOutput, ndim: int) -> dict[int, str]:
    """inseq's names of a score tensor's dimensions (``show_dim`` / ``slice_dims`` take a name or an index)."""
    names = dict(_BASE_DIM_NAMES)
    extra = {"granular": ["Embedding Dimension"], "multidimensional": ["Model Layer", "Attention Head"]}
    labels = extra.get(seq.granularity, [])
    for dim in range(2, ndim):
        names[dim] = labels[dim - 2] if dim - 2 < len(labels) else f"Dimension {dim}"
    return names


def _resolve_dim(dim: int | str, names: dict[int, str], ndim: int) -> int:
    if isinstance(dim, str):
        lookup = {v.lower(): k for k, v in names.items()}
        if dim.lower() not in lookup:
            raise ValueError(f"Invalid dimension name {dim!r}: valid names are {[names[d] for d in range(2, ndim)]}")
        dim = lookup[dim.lower()]
    if not isinstance(dim, int) or dim <= 1 or dim >= ndim:
        raise ValueError(f"Invalid dimension {dim}: valid indices are {list(range(2, ndim))}")
    return dim


def granular_panels(seq: FeatureAttributionSequenceOutput, max_show_size: int | None = None,
                    show_dim: int | str | None = None, slice_dims: dict | None = None) -> list[Panel]:
    """The panels of one sequence: for each side with scores, one panel per index of the shown extra dimension
    (``show_dim``, else the first extra dimension of at most ``max_show_size`` indices, default 20); any other
    extra dimension is shown at its first index (``slice_dims={dim: (i, i + 1)}`` picks another). Scores that
    are already one per (token, step) give one panel per side."""
    max_show_size = DEFAULT_MAX_SHOW_SIZE if max_show_size is None else max_show_size
    target_labels = readable_labels([t.token for t in seq.target])
    columns = target_labels[seq.attr_pos_start : seq.attr_pos_end]
    panels = []
    for side, scores, rows in (("Source", seq.source_attributions, readable_labels([t.token for t in seq.source])),
                               ("Target", seq.target_attributions, target_labels)):
        if scores is None:
            continue
        names = dim_names(seq, scores.ndim)
        for dim, (start, end) in (slice_dims or {}).items():
            index = [slice(None)] * scores.ndim
            index[_resolve_dim(dim, names, scores.ndim)] = slice(start, end)
            scores = scores[tuple(index)]
        panel_dim = None
        if show_dim is not None:
            panel_dim = _resolve_dim(show_dim, names, scores.ndim)
            if scores.shape[panel_dim] > max_show_size:
                raise ValueError(f"Dimension {panel_dim} has size {scores.shape[panel_dim]} which is greater than the "
                                 f"maximum show size {max_show_size}. Please choose a different dimension or slice it "
                                 "with slice_dims.")
        else:
            panel_dim = next((d for d in range(2, scores.ndim) if scores.shape[d] <= max_show_size), None)
        fixed = [d for d in range(2, scores.ndim) if d != panel_dim]
        note = "".join(f", {names[d]} #0 of {scores.shape[d]}" for d in fixed)
        for i in range(scores.shape[panel_dim] if panel_dim is not None else 1):
            index = [slice(None), slice(None)] + [0] * (scores.ndim - 2)
            if panel_dim is not None:
                index[panel_dim] = i
            title = side + (f" · {names[panel_dim]} #{i}" if panel_dim is not None else "") + note
            panels.append(Panel(title, scores[tuple(index)].float(), rows[: scores.shape[0]], columns))
    return panels
