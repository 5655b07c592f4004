"""TensorBoard: scalars, a Markdown table and a heatmap per probe, and the HTML for the plugin tab."""

import io
import json
from pathlib import Path

from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

from ..monitor.report import MonitorReport
from ..tensorboard_plugin.layout import INDEX_FILE, PLUGIN_NAME, map_path, page_path  # torch-free, for the server
from .base import Sink
from .render import map_record, markdown_table, result_html, result_image


def write_plugin_html(log_dir: str | Path, report: MonitorReport, pages: dict[str, str],
                      maps: dict[str, dict] | None = None) -> list[Path]:
    """Write ``<log_dir>/plugins/inseq_lightning/<prefix folder>/step_<N>/<probe>.html`` and update
    ``index.json``, the list of pages the plugin serves (it never joins a request path itself).

    The prefix folder is ``report.prefix`` made file-safe (``attribution_saliency``), so two
    monitors on one run never overwrite each other's pages (see
    :func:`~inseq_lightning.tensorboard_plugin.layout.page_path`). ``pages``: ``{probe name: HTML}``;
    ``maps``: ``{probe name: map record}`` (:func:`.render.map_record`), each written beside its page
    as ``<probe>.map.json`` and listed as the entry's ``map`` (what the compare view reads).
    """
    root = Path(log_dir) / "plugins" / PLUGIN_NAME
    index_path = root / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"pages": []}
    entries = {(p["step"], p["probe"], p.get("prefix")): p for p in index["pages"]}
    written = []
    for probe, page in pages.items():
        relative = page_path(report.prefix, report.step, probe, index["pages"])
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        written.append(path)
        entry = {"step": report.step, "probe": probe, "prefix": report.prefix, "method": report.method,
                 "path": relative}
        if maps and probe in maps:
            entry["map"] = map_path(relative)
            (root / entry["map"]).write_text(json.dumps(maps[probe], allow_nan=False), encoding="utf-8")
            written.append(root / entry["map"])
        known = entries.get((report.step, probe, report.prefix))
        if known is None:
            index["pages"].append(entry)
        else:  # a repeated step, or an entry of an older layout: point it at the page just written
            known.pop("map", None)
            known.update(entry)
    index_path.write_text(json.dumps(index, indent=1))
    return written


class TensorBoardSink(Sink):
    """Logs into a ``SummaryWriter`` (for Lightning: ``TensorBoardLogger.experiment``).

    Args:
        writer: the run's ``torch.utils.tensorboard.SummaryWriter``.
        log_dir: the run's directory (default: ``writer.log_dir``), where the plugin HTML goes.
        log_text, log_figures, log_html: what to log besides scalars.
    """

    def __init__(self, writer, log_dir: str | Path | None = None, log_text: bool = True, log_figures: bool = True,
                 log_html: bool = True):
        self.writer = writer
        self.log_dir = Path(log_dir or writer.log_dir)
        self.log_text, self.log_figures, self.log_html = log_text, log_figures, log_html

    def log_report(self, report: MonitorReport) -> None:
        step = report.step
        for tag, value in report.scalars().items():
            self.writer.add_scalar(tag, value, step)
        pages, maps = {}, {}
        for result in report.results:
            base = f"{report.prefix}/{result.probe.name}"
            if self.log_text:
                self.writer.add_text(f"{base}/table", markdown_table(result, step), step)
            if self.log_figures and report.maps:  # method="dummy": no map to draw
                self._add_png(f"{base}/heatmap", result_image(result, report), step)
            if self.log_html:  # without maps, the page shows the tokens and their step scores
                pages[result.probe.name] = result_html(result, report)
                if report.maps:  # the compare view compares maps: a page without one has no record
                    maps[result.probe.name] = map_record(result, report)
        if pages:
            write_plugin_html(self.log_dir, report, pages, maps)
        if report.alerts:  # the Text tab, whatever log_text says: an alert is never optional
            self.writer.add_text(f"{report.prefix}/alerts", "\n\n".join(a.message for a in report.alerts), step)
        self.writer.flush()

    def _add_png(self, tag: str, pixels, step: int) -> None:
        """``add_image`` for ``[H, W, 3]`` uint8 pixels, encoded once with fast PNG settings.

        ``SummaryWriter.add_image`` converts the pixels to float, rescales them and encodes at PNG's
        default level: most of a heatmap's cost. The summary written is the one it writes.
        """
        get_writer = getattr(self.writer, "_get_file_writer", None)
        if get_writer is None:  # a writer of another kind: its own add_image
            self.writer.add_image(tag, pixels, step, dataformats="HWC")
            return
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        height, width = pixels.shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        get_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        self.writer.flush()
