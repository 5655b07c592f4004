"""Model wrappers: load_model, AttributionModel and the tokenized Batch."""

from .attribution_model import AttributionModel
from .batch import Batch
from .loading import load_model

__all__ = ["AttributionModel", "Batch", "load_model"]
