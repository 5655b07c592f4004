"""An "Attributions" tab for TensorBoard that shows the monitor's real HTML pages (colours included).

TensorBoard's text plugin strips styles, so the heatmap HTML cannot live in the Text tab. The
TensorBoard sink writes each page under
``<run>/plugins/inseq_lightning/<prefix folder>/step_<N>/<probe>.html`` (see :mod:`.layout`) with
an ``index.json``; this plugin (registered through the ``tensorboard_plugins`` entry point) lists
and serves those pages.
"""

__all__ = ["AttributionsPlugin"]


def __getattr__(name):  # the sink imports .layout: it should not load TensorBoard's backend with it
    if name == "AttributionsPlugin":
        from .plugin import AttributionsPlugin

        return AttributionsPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
