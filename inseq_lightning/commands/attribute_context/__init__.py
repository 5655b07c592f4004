"""inseq 0.7.1's ``inseq.commands.attribute_context`` names (implemented in :mod:`inseq_lightning.context`)."""

from ...context import AttributeContextArgs, AttributeContextOutput, CCIOutput, visualize_attribute_context

__all__ = ["AttributeContextArgs", "AttributeContextOutput", "CCIOutput", "visualize_attribute_context"]
