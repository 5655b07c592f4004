"""inseq-lightning: attribute sequence-generation models (inseq's API, faster) and watch the
attributions evolve while the model trains."""

from .attr.methods import list_feature_attribution_methods
from .attr.step_functions import StepFunctionArgs, list_step_functions, register_step_function
from .data import (
    FeatureAttributionOutput,
    FeatureAttributionSequenceOutput,
    FeatureAttributionStepOutput,
    merge_attributions,
)
from .models import AttributionModel, load_model
from .viz import show_attributions

__version__ = "0.1.0"

__all__ = [
    "AttributionModel",
    "FeatureAttributionOutput",
    "FeatureAttributionSequenceOutput",
    "FeatureAttributionStepOutput",
    "StepFunctionArgs",
    "list_feature_attribution_methods",
    "list_step_functions",
    "load_model",
    "merge_attributions",
    "register_step_function",
    "show_attributions",
]
