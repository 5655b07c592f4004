"""Attribution outputs, their aggregation and their serialization."""

from .outputs import (
    FeatureAttributionOutput,
    FeatureAttributionSequenceOutput,
    FeatureAttributionStepOutput,
    TokenWithId,
    merge_attributions,
)

__all__ = [
    "FeatureAttributionOutput",
    "FeatureAttributionSequenceOutput",
    "FeatureAttributionStepOutput",
    "TokenWithId",
    "merge_attributions",
]
