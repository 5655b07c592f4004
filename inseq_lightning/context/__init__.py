"""Context attribution (PECoRe): which generated tokens depend on the context, and on which context tokens.

inseq 0.7.1's ``attribute_context`` with its arguments, output object and views; see
:mod:`~inseq_lightning.context.attribution` for what runs. Names are imported on first use, so that the command
line reads :class:`AttributeContextArgs` (its flags) without loading torch.
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AttributeContextArgs": ".args",
    "HandleOutputContextSetting": ".args",
    "AttributeContextOutput": ".output",
    "CCIOutput": ".output",
    "attribute_context": ".attribution",
    "attribute_context_with_model": ".attribution",
    "contrastive_step_functions": ".attribution",
    "visualize_attribute_context": ".viz",
}
__all__ = [
    "AttributeContextArgs",
    "AttributeContextOutput",
    "CCIOutput",
    "HandleOutputContextSetting",
    "attribute_context",
    "attribute_context_with_model",
    "contrastive_step_functions",
    "visualize_attribute_context",
]

if TYPE_CHECKING:
    from .args import AttributeContextArgs, HandleOutputContextSetting
    from .attribution import attribute_context, attribute_context_with_model, contrastive_step_functions
    from .output import AttributeContextOutput, CCIOutput
    from .viz import visualize_attribute_context


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
