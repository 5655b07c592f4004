"""The output of context attribution: inseq 0.7.1's ``AttributeContextOutput`` and ``CCIOutput``, same fields."""

import statistics
from dataclasses import dataclass, field, fields
from typing import Any

from .args import AttributeContextArgs


@dataclass
class CCIOutput:
    """Contextual cues of one context-sensitive token.

    Attributes:
        cti_idx: the token's index in ``AttributeContextOutput.output_current_tokens``.
        cti_token / cti_score: the token and its context sensitivity score.
        contextual_output: the output up to the token, with context (the text attributed).
        contrast_token / contextless_output: the contextless prediction (contrastive ``attributed_fn`` only).
        input_context_scores / output_context_scores: one score per input / output context token.
    """

    cti_idx: int
    cti_token: str
    cti_score: float
    contextual_output: str
    contrast_token: str | None = None
    contextless_output: str | None = None
    input_context_scores: list[float] | None = None
    output_context_scores: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__.items())

    @property
    def all_scores(self) -> list[float]:
        """Input context scores followed by output context scores."""
        return [*(self.input_context_scores or []), *(self.output_context_scores or [])]

    @property
    def minimum(self) -> float:
        return min([0, *self.all_scores])

    @property
    def maximum(self) -> float:
        return max([0, *self.all_scores])


@dataclass
class AttributeContextOutput:
    """What :func:`~inseq_lightning.context.attribute_context` found.

    Attributes:
        input_context / input_context_tokens, output_context / output_context_tokens: the contexts and their
            tokens (special tokens left out).
        output_current / output_current_tokens: the output tested for context sensitivity and its tokens.
        cti_scores: one context sensitivity score per output current token.
        cci_scores: one :class:`CCIOutput` per context-sensitive token, most sensitive first.
        info: the arguments of the call (None with ``add_output_info=False``).
    """

    input_context: str | None = None
    input_context_tokens: list[str] | None = None
    output_context: str | None = None
    output_context_tokens: list[str] | None = None
    output_current: str | None = None
    output_current_tokens: list[str] | None = None
    cti_scores: list[float] | None = None
    cci_scores: list[CCIOutput] = field(default_factory=list)
    info: AttributeContextArgs | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("cci_scores", "info")}
        out["cci_scores"] = [cci.to_dict() for cci in self.cci_scores]
        if self.info:
            out["info"] = self.info.to_dict()
        return out

    @classmethod
    def from_dict(cls, out_dict: dict[str, Any]) -> "AttributeContextOutput":
        """The output saved by :meth:`to_dict` (a JSON file written with ``save_path``, inseq's too)."""
        out = cls()
        for key, value in out_dict.items():
            if key not in ("cci_scores", "info", "has_input_context", "has_output_context"):
                setattr(out, key, value)
        out.cci_scores = [CCIOutput(**cci) for cci in out_dict.get("cci_scores", [])]
        if out_dict.get("info"):
            names = {f.name for f in fields(AttributeContextArgs)}
            out.info = AttributeContextArgs(**{k: v for k, v in out_dict["info"].items() if k in names})
        return out

    def show(self, model=None, return_html: bool = False, display: bool = True) -> str | None:
        """The console view (see :func:`~inseq_lightning.context.visualize_attribute_context`)."""
        from .viz import visualize_attribute_context

        return visualize_attribute_context(self, model, show_viz=display, return_html=return_html)

    @property
    def min_cti(self) -> float:
        return min(self.cti_scores) if self.cti_scores else -1

    @property
    def max_cti(self) -> float:
        return max(self.cti_scores) if self.cti_scores else -1

    @property
    def mean_cti(self) -> float:
        return sum(self.cti_scores) / len(self.cti_scores) if self.cti_scores else 0

    @property
    def std_cti(self) -> float:
        return _std(self.cti_scores) if self.cti_scores else 0

    @property
    def cci_all_scores(self) -> list[float]:
        return [score for cci in self.cci_scores for score in cci.all_scores]

    @property
    def min_cci(self) -> float:
        return min(cci.minimum for cci in self.cci_scores) if self.cci_scores else -1

    @property
    def max_cci(self) -> float:
        return max(cci.maximum for cci in self.cci_scores) if self.cci_scores else -1

    @property
    def mean_cci(self) -> float:
        scores = self.cci_all_scores
        return sum(scores) / len(scores) if scores else 0

    @property
    def std_cci(self) -> float:
        scores = self.cci_all_scores
        return _std(scores) if scores else 0

    @property
    def input_context_scores(self) -> list[list[float]] | None:
        if not self.cci_scores or self.cci_scores[0].input_context_scores is None:
            return None
        return [cci.input_context_scores for cci in self.cci_scores]

    @property
    def output_context_scores(self) -> list[list[float]] | None:
        if not self.cci_scores or self.cci_scores[0].output_context_scores is None:
            return None
        return [cci.output_context_scores for cci in self.cci_scores]


def _std(scores: list[float]) -> float:
    """Sample standard deviation (torch's ``std``, as inseq computes it); NaN for one score."""
    return statistics.stdev(scores) if len(scores) > 1 else float("nan")
