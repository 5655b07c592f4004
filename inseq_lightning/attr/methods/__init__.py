"""Attribution methods, registered by name on import."""

from . import gradient, internals, layer, perturbation  # noqa: F401  (registration side effect)
from .base import AttributionMethod, MethodResult, get_method, list_feature_attribution_methods, register_method

__all__ = ["AttributionMethod", "MethodResult", "get_method", "list_feature_attribution_methods", "register_method"]
