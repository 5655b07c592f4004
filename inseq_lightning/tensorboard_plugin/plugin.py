"""The TensorBoard backend of the Attributions tab: it lists runs' pages and serves indexed files only."""

import json
import os
import time
from pathlib import Path

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .layout import INDEX_FILE, PLUGIN_NAME

STATIC = Path(__file__).parent / "static"
RESCAN_SECONDS = 5.0  # walking a large log dir on every request would be slow


class AttributionsPlugin(base_plugin.TBPlugin):
    """Lists ``<run>/plugins/inseq_lightning/index.json`` of every run and serves the pages it names.

    Every response goes through ``http_util.Respond``, as TensorBoard's own plugins do, so it
    carries ``X-Content-Type-Options: nosniff`` and, for HTML, TensorBoard's
    Content-Security-Policy (``default-src 'self'``, no scripts).
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._logdir = Path(context.logdir) if context.logdir else None
        self._scanned_at = -RESCAN_SECONDS
        self._runs: dict[str, Path] = {}

    # ---- discovery ----------------------------------------------------------------------------
    def _plugin_dirs(self) -> dict[str, Path]:
        """``{run name: <run>/plugins/inseq_lightning}`` for every run holding an ``index.json``."""
        if self._logdir is None:
            return {}
        if time.monotonic() - self._scanned_at > RESCAN_SECONDS:
            runs = {}
            for root, dirs, files in os.walk(self._logdir):
                here = Path(root)
                if here.name == PLUGIN_NAME and here.parent.name == "plugins" and INDEX_FILE in files:
                    run = os.path.relpath(here.parent.parent, self._logdir)
                    runs[run] = here
                    dirs[:] = []
            self._runs, self._scanned_at = runs, time.monotonic()
        return self._runs

    @staticmethod
    def _pages(plugin_dir: Path) -> list[dict]:
        """The index's entries, sorted; entries of older indexes lacking a prefix or method get ``""``."""
        try:
            pages = json.loads((plugin_dir / INDEX_FILE).read_text())["pages"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        pages = [{"prefix": "", "method": "", **p} for p in pages
                 if isinstance(p, dict) and {"step", "probe", "path"} <= p.keys()]
        return sorted(pages, key=lambda p: (p["prefix"], p["probe"], p["step"]))

    # ---- TBPlugin -----------------------------------------------------------------------------
    def is_active(self) -> bool:
        return bool(self._plugin_dirs())

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Attributions")

    def get_plugin_apps(self):
        return {"/index.js": self._serve_js, "/pages": self._serve_pages, "/page": self._serve_page}

    @wrappers.Request.application
    def _serve_js(self, request):
        return http_util.Respond(request, (STATIC / "index.js").read_text(encoding="utf-8"), "text/javascript")

    @wrappers.Request.application
    def _serve_pages(self, request):
        listing = {run: self._pages(folder) for run, folder in sorted(self._plugin_dirs().items())}
        return http_util.Respond(request, listing, "application/json")

    @wrappers.Request.application
    def _serve_page(self, request):
        """Serve a page only if the run's index lists it: a request path is never joined as given."""
        run, wanted = request.args.get("run"), request.args.get("path")
        folder = self._plugin_dirs().get(run or "")
        if folder is None:
            return http_util.Respond(request, "unknown run", "text/plain", code=404)
        listed = {p["path"] for p in self._pages(folder)}
        path = (folder / wanted).resolve() if wanted in listed else None
        if path is None or folder.resolve() not in path.parents or not path.is_file():
            return http_util.Respond(request, "not in the index", "text/plain", code=404)
        return http_util.Respond(request, path.read_text(encoding="utf-8"), "text/html")
