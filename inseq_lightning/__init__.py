"""inseq-lightning: attribute sequence-generation models (inseq's API, faster) and watch the
attributions evolve while the model trains."""

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module defining it. Imported on first use (PEP 562): importing a light
# subpackage (the TensorBoard plugin) must not load torch, transformers and captum with it.
_EXPORTS = {
    "AttributeContextArgs": ".context",
    "AttributionModel": ".models",
    "FeatureAttributionOutput": ".data",
    "FeatureAttributionSequenceOutput": ".data",
    "FeatureAttributionStepOutput": ".data",
    "StepFunctionArgs": ".attr.step_functions",
    "TokenWithId": ".data",
    "attribute_context": ".context",
    "list_aggregation_functions": ".data.aggregation",
    "list_aggregators": ".data.aggregation",
    "list_feature_attribution_methods": ".attr.methods",
    "list_step_functions": ".attr.step_functions",
    "load_model": ".models",
    "merge_attributions": ".data",
    "register_step_function": ".attr.step_functions",
    "show_attributions": ".viz",
    "show_granular_attributions": ".viz",
    "show_token_attributions": ".viz",
}

__all__ = [
    "AttributeContextArgs",
    "AttributionModel",
    "FeatureAttributionOutput",
    "FeatureAttributionSequenceOutput",
    "FeatureAttributionStepOutput",
    "StepFunctionArgs",
    "TokenWithId",
    "attribute_context",
    "list_aggregation_functions",
    "list_aggregators",
    "list_feature_attribution_methods",
    "list_step_functions",
    "load_model",
    "merge_attributions",
    "register_step_function",
    "show_attributions",
    "show_granular_attributions",
    "show_token_attributions",
]

if TYPE_CHECKING:
    from .attr.methods import list_feature_attribution_methods
    from .attr.step_functions import StepFunctionArgs, list_step_functions, register_step_function
    from .context import AttributeContextArgs, attribute_context
    from .data import (
        FeatureAttributionOutput,
        FeatureAttributionSequenceOutput,
        FeatureAttributionStepOutput,
        TokenWithId,
        merge_attributions,
    )
    from .data.aggregation import list_aggregation_functions, list_aggregators
    from .models import AttributionModel, load_model
    from .viz import show_attributions, show_granular_attributions, show_token_attributions


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # `il.monitor` works as when imports were eager
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
