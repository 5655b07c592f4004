"""An "Attributions" tab for TensorBoard that shows the monitor's real HTML pages (colours included).

TensorBoard's text plugin strips styles, so the heatmap HTML cannot live in the Text tab. The
TensorBoard sink writes each page under ``<run>/plugins/inseq_lightning/step_<N>/<probe>.html``
with an ``index.json``; this plugin (registered through the ``tensorboard_plugins`` entry point)
lists and serves those pages.
"""

from .plugin import AttributionsPlugin

__all__ = ["AttributionsPlugin"]
