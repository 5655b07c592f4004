"""Views of attributions: console tables, HTML heatmaps and matplotlib figures."""

from ..data.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput
from .console import print_attributions
from .html import attributions_html


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def show_attributions(
    attributions: FeatureAttributionOutput | FeatureAttributionSequenceOutput | list[FeatureAttributionSequenceOutput],
    min_val: float | None = None,
    max_val: float | None = None,
    display: bool = True,
    return_html: bool = False,
    **aggregate_kwargs,
) -> str | None:
    """Show attributions: a rich table in a terminal, an HTML heatmap in a notebook.

    Args:
        attributions: an attribution output, one sequence output or a list of them.
        min_val, max_val: colour-scale bounds (default: from the data).
        display: print/display the view.
        return_html: return the HTML document as a string.
        **aggregate_kwargs: passed to ``aggregate()`` (e.g. ``aggregator="subwords"``).
    """
    if isinstance(attributions, FeatureAttributionOutput):
        sequences = list(attributions.sequence_attributions)
    elif isinstance(attributions, FeatureAttributionSequenceOutput):
        sequences = [attributions]
    else:
        sequences = list(attributions)
    sequences = [s.aggregate(**aggregate_kwargs) if (aggregate_kwargs or not s.aggregated) else s for s in sequences]
    html = attributions_html(sequences, min_val, max_val) if (return_html or (display and _in_notebook())) else None
    if display:
        if _in_notebook():
            from IPython.display import HTML
            from IPython.display import display as ipy_display

            ipy_display(HTML(html))
        else:
            print_attributions(sequences, min_val, max_val)
    return html if return_html else None


__all__ = ["attributions_html", "print_attributions", "show_attributions"]
