"""Views of attributions: console tables, HTML heatmaps (notebooks, files) and matplotlib figures (PNG, SVG).

In a notebook (Jupyter, JupyterLab, VS Code, Colab: any IPython shell other than the terminal one) views are
shown as HTML; elsewhere as rich console tables.
"""

from ..data.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput
from .console import print_attributions, print_panels, print_tokens
from .html import attributions_fragment, attributions_html, granular_fragment, html_document, tokens_fragment


def in_notebook() -> bool:
    """Whether code runs in a notebook front end that renders HTML: an IPython shell with a kernel (Jupyter,
    JupyterLab, VS Code, Colab, qtconsole) rather than IPython in a terminal or plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    name, module = type(shell).__name__, type(shell).__module__
    if name == "TerminalInteractiveShell":
        return False
    return (name == "ZMQInteractiveShell" or module.startswith("google.colab")
            or getattr(shell, "kernel", None) is not None)


_in_notebook = in_notebook  # the name earlier versions used


def _display_html(fragment: str) -> None:
    from IPython.display import HTML
    from IPython.display import display as ipy_display

    ipy_display(HTML(fragment))


def _sequences(attributions) -> list[FeatureAttributionSequenceOutput]:
    if isinstance(attributions, FeatureAttributionOutput):
        return list(attributions.sequence_attributions)
    if isinstance(attributions, FeatureAttributionSequenceOutput):
        return [attributions]
    return list(attributions)


def _is_flat(seq: FeatureAttributionSequenceOutput) -> bool:
    return all(t is None or t.ndim <= 2 for t in (seq.source_attributions, seq.target_attributions))


def notebook_html(sequences: list[FeatureAttributionSequenceOutput]) -> str | None:
    """The HTML a notebook shows for a bare output (``_repr_html_``): its aggregated heatmaps; None (the text
    repr is shown instead) when the scores cannot be aggregated."""
    try:
        shown = [s if (s.aggregated or s.granularity == "coarse") else s.aggregate() for s in sequences]
        if all(_is_flat(s) for s in shown):
            return attributions_fragment(shown)
        from .granular import granular_panels

        return granular_fragment([granular_panels(s) for s in shown])
    except Exception:  # noqa: BLE001 - a repr must never raise in a notebook
        return None


def show_attributions(
    attributions: FeatureAttributionOutput | FeatureAttributionSequenceOutput | list[FeatureAttributionSequenceOutput],
    min_val: float | None = None,
    max_val: float | None = None,
    display: bool = True,
    return_html: bool = False,
    **aggregate_kwargs,
) -> str | None:
    """Show attributions: an HTML heatmap in a notebook, a rich table elsewhere.

    Args:
        attributions: an attribution output, one sequence output or a list of them.
        min_val, max_val: colour-scale bounds (default: from the data).
        display: print/display the view.
        return_html: return the HTML document as a string.
        **aggregate_kwargs: passed to ``aggregate()`` (e.g. ``aggregator="subwords"``); outputs not aggregated
            yet get their default aggregation.
    """
    sequences = _sequences(attributions)
    sequences = [s.aggregate(**aggregate_kwargs) if (aggregate_kwargs or not s.aggregated) else s for s in sequences]
    return _show_flat(sequences, min_val, max_val, display, return_html)


def _show_flat(sequences, min_val, max_val, display: bool, return_html: bool) -> str | None:
    notebook = display and in_notebook()
    fragment = attributions_fragment(sequences, min_val, max_val) if (return_html or notebook) else None
    if display:
        if notebook:
            _display_html(fragment)
        else:
            print_attributions(sequences, min_val, max_val)
    return html_document(fragment) if return_html else None


def show_sequences(sequences: list[FeatureAttributionSequenceOutput], single: bool, min_val=None, max_val=None,
                   max_show_size=None, show_dim=None, slice_dims=None, display: bool = True,
                   return_html: bool | None = False, return_figure: bool = False, aggregator=None,
                   do_aggregation: bool = True, **kwargs):
    """What ``show()`` of the outputs does (see :meth:`FeatureAttributionSequenceOutput.show`)."""
    if return_html and return_figure:
        raise ValueError("Only one of `return_html` and `return_figure` can be set to True.")
    shown = [s.aggregate(aggregator, **kwargs) if do_aggregation else s for s in sequences]
    if not all(_is_flat(s) for s in shown):
        return show_granular_attributions(shown[0] if single else shown, max_show_size=max_show_size,
                                          min_val=min_val, max_val=max_val, show_dim=show_dim,
                                          slice_dims=slice_dims, display=display, return_html=return_html,
                                          return_figure=return_figure)
    html = _show_flat(shown, min_val, max_val, display, bool(return_html))
    if return_figure:
        from .figure import attribution_figure

        figures = [attribution_figure(s, min_val, max_val) for s in shown]
        return figures[0] if single else figures
    return html


def show_granular_attributions(
    attributions: FeatureAttributionOutput | FeatureAttributionSequenceOutput | list[FeatureAttributionSequenceOutput],
    max_show_size: int | None = 20,
    min_val: float | None = None,
    max_val: float | None = None,
    show_dim: int | str | None = None,
    slice_dims: dict[int | str, tuple[int, int]] | None = None,
    display: bool = True,
    return_html: bool | None = False,
    return_figure: bool = False,
):
    """Heatmaps of raw scores with extra dimensions, no aggregation (inseq's ``show_granular_attributions``).

    Each side's scores are cut into 2-D panels: one per index of ``show_dim`` (a dimension index >= 2 or its
    name, e.g. ``"Attention Head"``, ``"Model Layer"``, ``"Embedding Dimension"``), by default of the first extra
    dimension with at most ``max_show_size`` indices (20); other extra dimensions are shown at index 0
    (``slice_dims={dim: (start, end)}`` restricts any extra dimension first). Shown as HTML in a notebook, as
    console tables elsewhere (inseq refuses outside notebooks).

    Returns:
        the HTML document with ``return_html``, a matplotlib figure of the panels with ``return_figure`` (a list
        for several sequences), else None.
    """
    from .granular import granular_panels

    if return_html and return_figure:
        raise ValueError("Only one of `return_html` and `return_figure` can be set to True.")
    sequences = _sequences(attributions)
    panels = [granular_panels(s, max_show_size, show_dim, slice_dims) for s in sequences]
    notebook = display and in_notebook()
    fragment = granular_fragment(panels, min_val, max_val) if (return_html or notebook) else None
    if display:
        if notebook:
            _display_html(fragment)
        else:
            print_panels(panels, min_val, max_val)
    if return_figure:
        from .figure import panels_figure

        figures = [panels_figure(p, min_val, max_val, title=f"Sequence {i}") for i, p in enumerate(panels)]
        return figures[0] if isinstance(attributions, FeatureAttributionSequenceOutput) else figures
    return html_document(fragment) if return_html else None


class HTMLView:
    """An HTML view that a notebook renders (``_repr_html_``); ``.html`` is the fragment, :meth:`save` writes a
    page. What ``show_tokens(return_figure=True)`` returns (inseq returns a treescope figure)."""

    def __init__(self, fragment: str):
        self.html = fragment

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path):
        from pathlib import Path

        path = Path(path)
        path.write_text(html_document(self.html), encoding="utf-8")
        return path


def show_token_attributions(
    attributions: FeatureAttributionOutput | FeatureAttributionSequenceOutput | list[FeatureAttributionSequenceOutput],
    min_val: float | None = None,
    max_val: float | None = None,
    display: bool = True,
    return_html: bool | None = False,
    return_figure: bool = False,
    replace_char: dict[str, str] | None = None,
    wrap_after: int | str | list[str] | tuple[str] | None = None,
    step_score_highlight: str | None = None,
):
    """The generated text, each token unfolding (no scripts: HTML ``<details>``) into the source and prefix tokens
    coloured by their scores for that step (inseq's ``show_token_attributions``); scores must be aggregated.

    Args:
        replace_char: strings to replace in the shown tokens.
        wrap_after: break the line after every N tokens (int), after a token (str), or after any of several.
        step_score_highlight: colour the generated tokens by this step score.

    Returns:
        the HTML document with ``return_html``, an :class:`HTMLView` with ``return_figure``, else None. Outside a
        notebook the view is printed as coloured console lines.
    """
    if return_html and return_figure:
        raise ValueError("Only one of `return_html` and `return_figure` can be set to True.")
    sequences = _sequences(attributions)
    if step_score_highlight is not None and any(step_score_highlight not in s.step_scores for s in sequences):
        raise ValueError(f'The requested step score "{step_score_highlight}" is not available for highlights; '
                         f'attribute with step_scores=["{step_score_highlight}"] or set step_score_highlight=None.')
    for s in sequences:
        if not _is_flat(s):
            raise ValueError("show_tokens needs one score per (token, step): aggregate first")
    notebook = display and in_notebook()
    fragment = tokens_fragment(sequences, min_val, max_val, replace_char, wrap_after, step_score_highlight) \
        if (return_html or return_figure or notebook) else None
    if display:
        if notebook:
            _display_html(fragment)
        else:
            print_tokens(sequences, min_val, max_val)
    if return_figure:
        return HTMLView(fragment)
    return html_document(fragment) if return_html else None


__all__ = [
    "HTMLView",
    "attributions_html",
    "in_notebook",
    "print_attributions",
    "show_attributions",
    "show_granular_attributions",
    "show_token_attributions",
]
