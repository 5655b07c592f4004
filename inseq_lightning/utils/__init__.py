"""Small shared helpers: the name registry and the model-state guard."""

from .model_state import preserve_model_state
from .registry import Registry

__all__ = ["Registry", "preserve_model_state"]
