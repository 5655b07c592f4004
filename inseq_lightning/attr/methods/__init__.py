"""Attribution methods, registered by name on import."""

from . import discretized, gradient, internals, layer, lime, perturbation, reagent, value_zeroing  # noqa: F401  (registration side effect)
from .base import AttributionMethod, MethodResult, get_method, list_feature_attribution_methods, register_method

__all__ = ["AttributionMethod", "MethodResult", "get_method", "list_feature_attribution_methods", "register_method"]
