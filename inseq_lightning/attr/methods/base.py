"""The method interface and registry shared by every attribution method."""

from dataclasses import dataclass

import torch

from ...errors import UnknownMethodError
from ...utils.registry import Registry
from ..engine import EngineContext


@dataclass
class MethodResult:
    """Raw scores of one batch.

    Attributes:
        source: ``[B, S, N, ...]`` encoder-side scores (encoder-decoder only) or None.
        target: ``[B, T, N, ...]`` decoder-side scores or None.
    """

    source: torch.Tensor | None
    target: torch.Tensor | None


class AttributionMethod:
    """One attribution method. Subclasses set ``name`` and ``granularity`` and implement ``attribute``.

    ``granularity`` decides the default aggregation: ``"granular"`` (one score per embedding
    dimension: L2 norm, then normalize), ``"coarse"`` (one score per token: none),
    ``"multidimensional"`` (layers x heads: mean over heads, then layers, normalizing after each),
    ``"none"`` (no attributions).
    """

    name: str = ""
    granularity: str = "granular"
    supports_attribute_target: bool = True

    def attribute(self, ctx: EngineContext, **kwargs) -> MethodResult:
        raise NotImplementedError


METHODS: Registry[type[AttributionMethod]] = Registry("attribution method", error=UnknownMethodError)


def register_method(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    METHODS.register(cls.name, cls)
    return cls


def list_feature_attribution_methods() -> list[str]:
    """Identifiers of every available attribution method."""
    return METHODS.names()


def get_method(name: str) -> AttributionMethod:
    return METHODS.get(name)()


@register_method
class DummyAttribution(AttributionMethod):
    """No attributions: a single forward for step scores only."""

    name = "dummy"
    granularity = "none"

    def attribute(self, ctx: EngineContext, **kwargs) -> MethodResult:
        return MethodResult(None, None)
