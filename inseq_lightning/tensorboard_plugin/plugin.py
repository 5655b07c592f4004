"""The TensorBoard backend of the Attributions tab: it lists runs' pages and serves indexed files only:
the pages, and as JSON the maps of two steps compared and a probe's curves (the compare view)."""

import json
import os
import re
import time
from pathlib import Path

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .layout import INDEX_FILE, PLUGIN_NAME
from .maps import compare_maps

STATIC = Path(__file__).parent / "static"
RESCAN_SECONDS = 5.0  # walking a large log dir on every request would be slow
_STEP = re.compile(r"-?[0-9]{1,18}")


class AttributionsPlugin(base_plugin.TBPlugin):
    """Lists ``<run>/plugins/inseq_lightning/index.json`` of every run and serves the pages it names.

    Every response goes through ``http_util.Respond``, as TensorBoard's own plugins do, so it
    carries ``X-Content-Type-Options: nosniff`` and, for HTML, TensorBoard's
    Content-Security-Policy (``default-src 'self'``, no scripts).

    Routes (under ``/data/plugin/inseq_lightning``): ``/pages`` (every run's index), ``/page?run=&path=``
    (one page), ``/compare?run=&prefix=&probe=&a=&b=`` (the maps of steps ``a`` and ``b`` and their
    difference, :func:`.maps.compare_maps`) and ``/curves?run=&prefix=&probe=`` (the probe's drift and
    faithfulness values per step). Each parameter is looked up in the run's index; a file is read
    only through an index entry.
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._logdir = Path(context.logdir) if context.logdir else None
        self._scanned_at = -RESCAN_SECONDS
        self._runs: dict[str, Path] = {}
        self._curve_values: dict[Path, tuple[int, dict]] = {}  # map file -> (mtime, its values and curve names)

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
        return {"/index.js": self._serve_js, "/pages": self._serve_pages, "/page": self._serve_page,
                "/compare": self._serve_compare, "/curves": self._serve_curves}

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

    # ---- the compare view ---------------------------------------------------------------------
    def _maps(self, request) -> dict[int, Path] | None:
        """``{step: map file}`` of the probe named by the request's ``run``, ``prefix`` and ``probe``,
        from the run's index only; None when the run or the probe is not there."""
        folder = self._plugin_dirs().get(request.args.get("run") or "")
        if folder is None:
            return None
        prefix, probe = request.args.get("prefix", ""), request.args.get("probe")
        root = folder.resolve()
        maps = {}
        for entry in self._pages(folder):
            if entry["prefix"] == prefix and entry["probe"] == probe and isinstance(entry.get("map"), str):
                path = (folder / entry["map"]).resolve()
                if root in path.parents and isinstance(entry["step"], int):
                    maps[entry["step"]] = path
        return maps or None

    @staticmethod
    def _record(path: Path) -> dict | None:
        """A map file's record; None when it cannot be read."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _values(self, path: Path) -> dict | None:
        """``{"values", "curves"}`` of a map file, kept until the file changes (curves read every map)."""
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._curve_values.get(path)
        if cached is None or cached[0] != mtime:
            record = self._record(path)
            if record is None:
                return None
            cached = (mtime, {"values": record.get("values", {}), "curves": record.get("curves", [])})
            self._curve_values[path] = cached
        return cached[1]

    @wrappers.Request.application
    def _serve_compare(self, request):
        """Steps ``a`` and ``b`` of one probe: both maps and B minus A (or why the tokens differ)."""
        maps = self._maps(request)
        if maps is None:
            return http_util.Respond(request, "no maps for this run and probe", "text/plain", code=404)
        steps = [_step(request.args.get(side)) for side in ("a", "b")]
        if any(step not in maps for step in steps):
            return http_util.Respond(request, "step not in the index", "text/plain", code=404)
        a, b = (self._record(maps[step]) for step in steps)
        try:
            comparison = compare_maps(a, b)
        except (AttributeError, KeyError, TypeError, ValueError):  # a missing or malformed map file
            return http_util.Respond(request, "map file unreadable", "text/plain", code=404)
        return http_util.Respond(request, {"a": a, "b": b, **comparison}, "application/json")

    @wrappers.Request.application
    def _serve_curves(self, request):
        """``{"steps": [...], "curves": [{"name", "group", "better", "values": [value or None per step]}]}``:
        the values each map names as curves (drift, faithfulness), for every step of the probe."""
        maps = self._maps(request)
        if maps is None:
            return http_util.Respond(request, "no maps for this run and probe", "text/plain", code=404)
        records = {step: record for step in sorted(maps) if (record := self._values(maps[step])) is not None}
        names: dict[str, dict] = {}
        for record in records.values():
            for curve in record.get("curves", []):
                names.setdefault(curve["name"], {k: curve.get(k) for k in ("name", "group", "better")})
        curves = [{**spec, "values": [record["values"].get(name) for record in records.values()]}
                  for name, spec in names.items()]
        return http_util.Respond(request, {"steps": list(records), "curves": curves}, "application/json")


def _step(text: str | None) -> int | None:
    """A step given in a query: ASCII digits (an optional minus), else None."""
    return int(text) if text is not None and _STEP.fullmatch(text) else None
