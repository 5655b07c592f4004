"""The TensorBoard server loads the Attributions tab without torch, transformers, captum or
matplotlib, and ``import inseq_lightning`` defers them until a public name is used."""

import json
import subprocess
import sys

from inseq_lightning.monitor.report import MonitorReport
from inseq_lightning.sinks import write_plugin_html

HEAVY = ("torch", "transformers", "captum", "matplotlib")


def _loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON value built with ``loaded()``."""
    prelude = f"import json, sys\nloaded = lambda: sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tensorboard_loads_and_serves_the_tab_without_heavy_imports(tmp_path):
    report = MonitorReport(step=3, epoch=None, stage="fit", method="saliency", prefix="attribution/saliency",
                           results=[])
    write_plugin_html(tmp_path / "run", report, {"cat": "<p>cat</p>"})
    seen = _loaded_after(f"""
from importlib.metadata import entry_points
from tensorboard.plugins import base_plugin
from werkzeug.test import Client
plugin_class = entry_points(group="tensorboard_plugins")["inseq_lightning"].load()  # as TensorBoard does
plugin = plugin_class(base_plugin.TBContext(logdir={str(tmp_path)!r}))
apps = plugin.get_plugin_apps()
pages = Client(apps["/pages"]).get("/pages").get_json()
page = Client(apps["/page"]).get("/page", query_string={{"run": "run", "path": pages["run"][0]["path"]}})
print(json.dumps({{"plugin": plugin.plugin_name, "active": plugin.is_active(), "page": page.get_data(as_text=True),
                  "loaded": loaded()}}))
""")
    assert seen == {"plugin": "inseq_lightning", "active": True, "page": "<p>cat</p>", "loaded": []}


def test_importtime_of_the_plugin_package_lists_no_heavy_module():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import inseq_lightning.tensorboard_plugin"],
                            capture_output=True, text=True, timeout=120, check=True)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "inseq_lightning.tensorboard_plugin" in imported
    assert sorted(imported & set(HEAVY)) == []


def test_import_inseq_lightning_defers_torch_until_a_public_name_is_used():
    seen = _loaded_after("""
import inseq_lightning as il
before = loaded()
methods = il.list_feature_attribution_methods()
from inseq_lightning.attr.methods import list_feature_attribution_methods
from inseq_lightning.data import FeatureAttributionOutput
print(json.dumps({"before": before, "torch_after": "torch" in loaded(), "has_saliency": "saliency" in methods,
                  "same_objects": il.list_feature_attribution_methods is list_feature_attribution_methods
                  and il.FeatureAttributionOutput is FeatureAttributionOutput}))
""")
    assert seen == {"before": [], "torch_after": True, "has_saliency": True, "same_objects": True}


def test_every_public_name_of_inseq_lightning_still_resolves():
    seen = _loaded_after("""
import inseq_lightning as il
from inseq_lightning import *  # noqa: F403
names = {name: type(getattr(il, name)).__name__ for name in il.__all__}
print(json.dumps({"names": names, "star": all(name in globals() for name in il.__all__),
                  "in_dir": set(il.__all__) <= set(dir(il)), "submodule": il.models.load_model.__name__}))
""")
    assert seen["names"] == {
        "AttributeContextArgs": "type", "attribute_context": "function", "AttributionModel": "type", "FeatureAttributionOutput": "type", "FeatureAttributionSequenceOutput": "type",
        "FeatureAttributionStepOutput": "type", "StepFunctionArgs": "type", "TokenWithId": "type",
        "list_aggregation_functions": "function", "list_aggregators": "function",
        "list_feature_attribution_methods": "function", "list_step_functions": "function", "load_model": "function",
        "merge_attributions": "function", "register_step_function": "function", "show_attributions": "function",
        "show_granular_attributions": "function", "show_token_attributions": "function"}
    assert seen["star"] and seen["in_dir"] and seen["submodule"] == "load_model"  # subpackages stay attributes
