"""inseq 0.7.1's ``inseq.commands.attribute_context.attribute_context`` functions (see :mod:`inseq_lightning.context`)."""

from ...context import AttributeContextArgs, AttributeContextOutput, attribute_context, attribute_context_with_model

__all__ = ["AttributeContextArgs", "AttributeContextOutput", "attribute_context", "attribute_context_with_model"]
