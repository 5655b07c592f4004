"""Where monitoring results go: TensorBoard, Weights & Biases, plain files. One interface: :class:`Sink`."""

from .base import Sink
from .files import FileSink
from .tensorboard import TensorBoardSink, write_plugin_html

__all__ = ["FileSink", "Sink", "TensorBoardSink", "WandbSink", "write_plugin_html"]


def __getattr__(name):  # wandb is optional: import it only when asked for
    if name == "WandbSink":
        from .wandb import WandbSink

        return WandbSink
    raise AttributeError(name)
