"""Where the Attributions tab's files live in a run: the plugin's name, its index and its page paths.

The TensorBoard sink (which writes the pages) and the plugin (which serves them) both import this
module. It imports only the standard library, so the TensorBoard server never loads torch.
"""

import hashlib
import re

PLUGIN_NAME = "inseq_lightning"
INDEX_FILE = "index.json"  # {"pages": [{"step", "probe", "prefix", "method", "path", "map"}, ...]}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def file_safe(name: str) -> str:
    """``name`` as one file name: letters, digits and ``_ . -`` (``attribution/saliency`` -> ``attribution_saliency``)."""
    return _UNSAFE.sub("_", name).strip("._") or "_"


def page_path(prefix: str, step: int, probe: str, pages: list[dict]) -> str:
    """A page's path under ``<run>/plugins/inseq_lightning``: ``<prefix folder>/step_<N>/<probe>.html``.

    The prefix folder is the prefix made file-safe. Two prefixes can become the same folder
    (``attribution/saliency`` and ``attribution_saliency``): when an entry of another prefix in
    ``pages`` (the index so far) already uses the folder, a hash of the prefix is appended, so
    pages of different prefixes never share a file.
    """
    folder = file_safe(prefix)
    taken = {str(p.get("path", "")).split("/", 1)[0] for p in pages if p.get("prefix") != prefix}
    if folder in taken:
        folder = f"{folder}-{hashlib.sha1(prefix.encode()).hexdigest()[:8]}"
    return f"{folder}/step_{step}/{file_safe(probe)}.html"


def map_path(page: str) -> str:
    """The map file beside a page (the compare view's data): ``.../step_<N>/<probe>.html`` ->
    ``.../step_<N>/<probe>.map.json``."""
    return page.removesuffix(".html") + ".map.json"
