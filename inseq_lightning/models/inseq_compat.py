"""What step functions written against inseq's internals read from ``args.attribution_model``.

inseq's own step functions (the contrastive ones especially) build their contrast inputs through
inseq's model API: ``encode`` (a padded batch with baseline ids), ``embed`` (ids or texts),
``formatter`` (inseq's batch/argument converters) and ``get_forward_output``. This mixin gives an
:class:`~inseq_lightning.models.AttributionModel` that API, with this library's numbers (the
decoder side fed as the model expects it), so that such functions registered with
``register_step_function`` run unchanged. ``formatter`` is inseq's own class and needs inseq installed.
"""

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInputError
from .batch import pad_right


@dataclass
class _Encoding:
    """inseq's ``BatchEncoding`` fields, when inseq is not installed."""

    input_ids: torch.Tensor
    input_tokens: list[list[str]]
    attention_mask: torch.Tensor
    baseline_ids: torch.Tensor | None


class InseqModelAPI:
    """inseq's ``AttributionModel`` methods read by step functions (mixed into ``AttributionModel``)."""

    def encode(self, texts, as_targets: bool = False, return_baseline: bool = False, include_eos_baseline: bool = False,
               add_bos_token: bool = True, add_special_tokens: bool = True):
        """inseq's ``encode``: a padded batch of ``texts`` (``input_ids``, ``input_tokens``, ``attention_mask``,
        ``baseline_ids`` with ``return_baseline``); encoder-decoder targets start with the decoder start token."""
        if as_targets and not self.is_encoder_decoder:
            raise InvalidInputError("Decoder-only models tokenize every text as a source (as_targets=False)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        key = "text_target" if as_targets else "text"
        rows = [list(self.tokenizer(**{key: text}, add_special_tokens=add_special_tokens, truncation=True)["input_ids"])
                for text in texts]
        bos, eos, unk = self.special_ids.bos, self.special_ids.eos, self.special_ids.unk
        # Chat templates put a BOS in the text and the tokenizer adds another: keep one (inseq's fix).
        if len(rows) == 1 and len(rows[0]) >= 2 and bos is not None and rows[0][0] == rows[0][1] == bos:
            rows = [rows[0][1:]]
        ids, mask = pad_right(rows, self.special_ids.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        baseline = None
        if return_baseline:
            baseline = torch.full_like(ids, unk) if include_eos_baseline else torch.where(ids == eos, eos, unk)
        if as_targets and add_bos_token:
            start = torch.full((ids.shape[0], 1), bos, dtype=ids.dtype, device=ids.device)
            ids, mask = torch.cat([start, ids], 1), torch.cat([torch.ones_like(start), mask], 1)
            baseline = torch.cat([start, baseline], 1) if baseline is not None else None
        tokens = [[str(t) for t in self.tokenizer.convert_ids_to_tokens(row)] for row in ids.tolist()]
        return _encoding_class()(input_ids=ids, input_tokens=tokens, attention_mask=mask, baseline_ids=baseline)

    def embed(self, inputs, as_targets: bool = False, add_special_tokens: bool = True) -> torch.Tensor:
        """``[B, L]`` ids (or texts, encoded first) -> ``[B, L, D]`` attributed embeddings (times
        ``embed_scale``, inseq's convention; ``as_targets``: the target side, from the decoder's own table)."""
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs)):
            inputs = self.encode(inputs, as_targets, add_special_tokens=add_special_tokens).input_ids
        return self.architecture.embed(inputs, as_targets=as_targets)

    def train(self, mode: bool = True):
        """Switch the wrapped model's mode (inseq's ``mc_dropout_prob_avg_fn`` does); ``attribute()``
        puts every submodule's mode back when it returns."""
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def formatter(self) -> Any:
        """inseq's input formatter for this architecture (needs inseq installed)."""
        return self.architecture.inseq_formatter()

    def get_forward_output(self, batch, use_embeddings: bool = True, **kwargs):
        """inseq's ``get_forward_output`` on one of inseq's batches, the decoder side fed as the model expects."""
        return self.architecture.forward_inseq_batch(batch, use_embeddings, **{**self.forward_defaults, **kwargs})


def _encoding_class():
    try:
        from inseq.data import BatchEncoding
    except ImportError:
        return _Encoding
    return BatchEncoding
