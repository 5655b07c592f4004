"""Architecture adapters: everything that differs between decoder-only and encoder-decoder models.

The engine, the methods, the step scorer and the output builder ask the adapter and never branch on
the architecture themselves. An adapter owns:

- **embedding**, with the right table for each side (an encoder-decoder's decoder may have its own)
  and inseq's scale convention, and the factor that turns attributed target embeddings into what
  the decoder expects as ``decoder_inputs_embeds``;
- **the attributed inputs** of a batch (embeddings or, for layer methods, ids) and their baselines;
- **the forward** from attributed embeddings, from ids with an embedding-layer override, or from
  plain ids (contrastive inputs), its length, and whether a prefix of the attributed sequence can be
  computed apart in a key/value cache (sequential integrated gradients, faithfulness);
- **the mapping of results** to (source, target) sides, attention rows included;
- **tokenization** of a batch (through :mod:`.tokenization`) and what a generation's ids mean.
"""

import functools
import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import ModelOutput

from ..errors import InvalidInputError
from ..utils.kv_cache import cache_argument
from .batch import Batch


class ArchitectureAdapter:
    """The decoder-only/encoder-decoder seam. Build one with :func:`adapter_for`.

    Args:
        model: the wrapped ``PreTrainedModel``.
    """

    is_encoder_decoder: bool = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.embed_scale = _scale_to_apply(self._scaled_module())

    def _scaled_module(self) -> torch.nn.Module:
        return self.model

    # ---- embedding ------------------------------------------------------------------------
    def input_layer(self) -> torch.nn.Module:
        """The embedding module the attributed side's ids go through (what layer methods hook)."""
        return self.model.get_input_embeddings()

    def embed(self, ids: torch.Tensor, as_targets: bool = False) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, D]`` attributed embeddings (times ``embed_scale``, inseq's convention).

        Args:
            ids: token ids.
            as_targets: embed as the target side (an encoder-decoder's decoder table and scale).
        """
        return self.input_layer()(ids) * self.embed_scale

    def decoder_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Target-side embeddings from :meth:`embed` as the model expects them as ``inputs_embeds``."""
        return embeddings

    # ---- attributed inputs ----------------------------------------------------------------
    def attributed_embeddings(self, batch: Batch, attribute_target: bool, baseline: bool = False) -> list[torch.Tensor]:
        """The tensors embedding-level methods attribute (one per attributed side).

        Args:
            batch: the batch.
            attribute_target: also attribute the target prefix (encoder-decoder only; decoder-only
                models always attribute their one sequence).
            baseline: the baseline ids' embeddings instead.
        """
        ids = batch.target_baseline_ids if baseline else batch.target_ids
        return [self.embed(ids)]

    def attributed_ids(self, batch: Batch, baseline: bool = False) -> torch.Tensor:
        """The ids whose embedding-layer output layer methods attribute."""
        return batch.target_baseline_ids if baseline else batch.target_ids

    def attributed_token_ids(self, batch: Batch, attribute_target: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(ids, baseline ids)`` of each attributed side, in :meth:`attributed_embeddings` order (what
        token-replacing methods perturb)."""
        return [(batch.target_ids, batch.target_baseline_ids)]

    def target_with_prompt(self, prompt: str, target: str | None) -> str | None:
        """A forced target as :meth:`~inseq_lightning.models.AttributionModel.attribute` takes it: a
        decoder-only target holds its prompt (prepended when the caller gave the continuation alone)."""
        return target if target is None or target.startswith(prompt) else prompt + target

    #: chat templates render this architecture's prompts (a decoder-only conversation)
    renders_chat = True

    def decoder(self) -> torch.nn.Module:
        """The module that runs the attributed steps' blocks: the whole decoder-only model."""
        return self.model

    def contrast_sequence(self, wrapper, spec, i: int, input_text: str, own: list[int], prompt_length: int,
                          positions: list[int], pairs: list[tuple[int, int]] | None, skip_special_tokens: bool
                          ) -> tuple[list[int] | None, list[int], list[tuple[int, int]] | None]:
        """``(contrast source ids or None, contrast target ids, alignments)`` of sequence ``i`` of a call with
        contrast inputs ``spec`` (:class:`~inseq_lightning.attr.contrast.ContrastSpec`).

        Decoder-only: ``contrast_sources`` is another prompt followed by the original continuation (``own``
        after ``prompt_length``), aligned token for token; ``contrast_targets`` are full texts that start with
        their prompt unless alignments say which contrast token each step compares with (context attribution
        compares with the same output after a longer prompt)."""
        from .tokenization import encode_input, encode_target

        if spec.sources is not None:
            if spec.targets is not None:
                raise InvalidInputError("On a decoder-only model contrast_sources is an alternative prompt for the "
                                        "original continuation; to change both, pass only contrast_targets (full "
                                        "texts, prompt included)")
            prompt = encode_input(wrapper, spec.sources[i], skip_special_tokens)
            pairs = [(p, len(prompt) + p - prompt_length) for p in positions] if pairs is None else pairs
            return None, prompt + own[prompt_length:], pairs
        text = spec.targets[i]
        if pairs is None and not text.startswith(input_text):
            raise InvalidInputError(
                f"contrast_targets[{i}] does not start with its prompt {input_text!r}: on a decoder-only "
                "model a contrast target is the full text (prompt + alternative continuation); a contrast "
                "with another prompt needs contrast_targets_alignments"
            )
        return None, encode_target(wrapper, text, skip_special_tokens), pairs

    def encoder(self) -> torch.nn.Module | None:
        """The encoder the decoder cross-attends to, or None."""
        return None

    def split(self, results: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-attributed-input results (in :meth:`attributed_embeddings` order) -> (source, target)."""
        return None, results[0]

    def visible_lengths(self, batch: Batch, which: int, positions: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` tokens of attributed input ``which`` that each step sees (the target's prefix)."""
        return positions

    # ---- forward --------------------------------------------------------------------------
    def forward_length(self, batch: Batch) -> int:
        """Positions one forward of ``batch`` runs (for memory estimates): the sequence."""
        return batch.target_ids.shape[1]

    def prefix_cache_argument(self) -> str | None:
        """The forward argument that takes a key/value cache of the attributed sequence's first
        positions, computed apart (:mod:`~inseq_lightning.utils.kv_cache`), or None where there is no
        such prefix: an encoder-decoder (a bidirectional encoder), an adapter with its own forward.
        Whether the model's cache is a plain one shows only when it is built."""
        if type(self).forward_embeddings is not ArchitectureAdapter.forward_embeddings:
            return None
        return cache_argument(self.model)

    def forward_embeddings(self, batch: Batch, inputs: Sequence[torch.Tensor], target_embeddings, repeat: int = 1,
                           **kwargs) -> ModelOutput:
        """Run the model on attributed embeddings.

        Args:
            batch: the batch the inputs belong to.
            inputs: tensors as returned by :meth:`attributed_embeddings` (possibly interpolated), each
                ``[repeat * B, L, D]``.
            target_embeddings: a callable returning the (not attributed) target-side embeddings, used
                by encoder-decoders when the target is not attributed.
            repeat: how many stacked copies of the batch the inputs hold.
            **kwargs: passed to the model's forward.
        """
        return self.model(inputs_embeds=inputs[0], attention_mask=batch.target_mask.repeat(repeat, 1), **kwargs)

    def forward_ids_with_layer(self, batch: Batch, layer_output: torch.Tensor, target_embeddings, repeat: int = 1,
                               **kwargs) -> ModelOutput:
        """Run the model from ids, the input embedding layer's output replaced by ``layer_output``."""
        layer = self.input_layer()
        handle = layer.register_forward_hook(lambda module, args, output: layer_output)
        try:
            return self.model(input_ids=batch.target_ids.repeat(repeat, 1),
                              attention_mask=batch.target_mask.repeat(repeat, 1), **kwargs)
        finally:
            handle.remove()

    def forward_ids(self, target_ids: torch.Tensor, target_mask: torch.Tensor, source_ids: torch.Tensor | None = None,
                    source_mask: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        """A plain forward from ids (contrastive inputs), the target side fed as the model expects it."""
        return self.model(input_ids=target_ids, attention_mask=target_mask, **kwargs)

    def attention_rows(self, output: ModelOutput, attribute_target: bool) -> tuple[Any, Any]:
        """The per-layer attention tuples read as (source, target) attributions."""
        return None, output.attentions

    # ---- inseq's model API (for step functions written against inseq's internals) ----------
    def inseq_formatter(self) -> Any:
        """inseq's input formatter class for this architecture (needs inseq installed)."""
        try:
            from inseq.models.decoder_only import DecoderOnlyInputFormatter
        except ImportError as error:
            raise _needs_inseq() from error
        return DecoderOnlyInputFormatter

    def forward_inseq_batch(self, batch, use_embeddings: bool, **kwargs) -> ModelOutput:
        """inseq's ``get_forward_output`` on one of inseq's batches."""
        return self.model(input_ids=None if use_embeddings else batch.input_ids,
                          inputs_embeds=batch.input_embeds if use_embeddings else None,
                          attention_mask=batch.attention_mask, **kwargs)

    # ---- tokens ---------------------------------------------------------------------------
    def input_bos(self, special_ids) -> int | None:
        """The BOS id that chat-templated inputs may carry twice (decoder-only prompts only)."""
        return special_ids.bos

    def encode_target(self, wrapper, text: str, skip_special_tokens: bool) -> list[int]:
        """The target-side ids of ``text`` as a batch holds them (decoder-only: the full text)."""
        from .tokenization import encode_input

        return encode_input(wrapper, text, skip_special_tokens)

    def build_batch(self, wrapper, *args, **kwargs) -> Batch:
        from .tokenization import build_decoder_only_batch

        return build_decoder_only_batch(wrapper, *args, **kwargs)

    def generation_text(self, wrapper, input_text: str, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of a generation's ids: the prompt followed by the decoded continuation."""
        from .tokenization import encode_input

        prompt = encode_input(wrapper, input_text, skip_special_tokens)
        return input_text + wrapper.tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)

    def source_side(self, batch: Batch, index: int, source: torch.Tensor | None, target_tokens: list, start: int,
                    steps: int, token_cls) -> tuple[list, torch.Tensor | None]:
        """Source tokens and source attributions of sequence ``index`` (decoder-only: the target
        tokens before the first attributed step, no separate scores)."""
        return target_tokens[:start], None

    def check_generated_text(self, index: int, prompt: str, full: str) -> str | None:
        """Why ``full`` cannot be the target of ``prompt`` (None when it can)."""
        if not full.startswith(prompt):
            return (f"generated_texts[{index}] does not start with its prompt; pass the full text (prompt + "
                    "continuation) or use an encoder-decoder model")
        return None


class EncoderDecoderAdapter(ArchitectureAdapter):
    """Source side: the encoder's input embeddings; target side: the decoder's (own table)."""

    is_encoder_decoder = True

    def forward_length(self, batch: Batch) -> int:
        return batch.source_ids.shape[1] + batch.target_ids.shape[1]

    def prefix_cache_argument(self) -> str | None:
        return None

    def _scaled_module(self) -> torch.nn.Module:
        return self.model.get_encoder()

    def input_layer(self) -> torch.nn.Module:
        # The encoder's own module: transformers 5 ties T5/BART/mBART/M2M100/Pegasus embeddings by
        # weight only, and the ``shared`` module get_input_embeddings() returns is never called.
        return self.model.get_encoder().get_input_embeddings()

    @functools.cached_property
    def _decoder_side(self) -> tuple[torch.nn.Module, float, float]:
        """The decoder's own embedding table, the scale of the embeddings attributed on the target side
        (inseq's: the decoder's ``embed_scale``, as on the source side), and the factor that turns them
        into what the decoder expects as ``decoder_inputs_embeds``.

        Marian's and Pegasus's decoders multiply the ``decoder_inputs_embeds`` they are given by
        ``embed_scale`` themselves (their encoders only scale ids they embed): fed the scaled
        embeddings as they are, the decoder saw them scaled twice, 9-15% off the model's own step
        scores (inseq 0.7.1 does that). The factor undoes the decoder's own scaling."""
        decoder = self.model.get_decoder()
        table = getattr(decoder, "embed_tokens", None)
        table = table if isinstance(table, torch.nn.Module) else self.model.get_input_embeddings()
        own = getattr(decoder, "embed_scale", None)
        scale = float(own) if own is not None else self.embed_scale
        given = 1.0 / scale if own is not None and _scales_given_embeddings(type(decoder)) else 1.0
        return table, scale, given

    def embed(self, ids: torch.Tensor, as_targets: bool = False) -> torch.Tensor:
        if as_targets:
            table, scale, _ = self._decoder_side
            return table(ids) * scale
        return super().embed(ids)

    def decoder_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        factor = self._decoder_side[2]
        return embeddings if factor == 1.0 else embeddings * factor

    def attributed_embeddings(self, batch: Batch, attribute_target: bool, baseline: bool = False) -> list[torch.Tensor]:
        source = batch.source_baseline_ids if baseline else batch.source_ids
        out = [self.embed(source)]
        if attribute_target:
            out.append(self.embed(batch.target_baseline_ids if baseline else batch.target_ids, as_targets=True))
        return out

    def attributed_ids(self, batch: Batch, baseline: bool = False) -> torch.Tensor:
        return batch.source_baseline_ids if baseline else batch.source_ids

    def attributed_token_ids(self, batch: Batch, attribute_target: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sides = [(batch.source_ids, batch.source_baseline_ids)]
        return sides + [(batch.target_ids, batch.target_baseline_ids)] if attribute_target else sides

    def target_with_prompt(self, prompt: str, target: str | None) -> str | None:
        return target  # the target sequence alone

    renders_chat = False

    def decoder(self) -> torch.nn.Module:
        return self.model.get_decoder()

    def contrast_sequence(self, wrapper, spec, i: int, input_text: str, own: list[int], prompt_length: int,
                          positions: list[int], pairs: list[tuple[int, int]] | None, skip_special_tokens: bool
                          ) -> tuple[list[int] | None, list[int], list[tuple[int, int]] | None]:
        """The contrast source (``contrast_sources``, else the input) and target (``contrast_targets``, else
        the original target)."""
        from .tokenization import encode_input, encode_target

        source = encode_input(wrapper, spec.sources[i] if spec.sources is not None else input_text, skip_special_tokens)
        target = encode_target(wrapper, spec.targets[i], skip_special_tokens) if spec.targets else own
        return source, target, pairs

    def encoder(self) -> torch.nn.Module | None:
        return self.model.get_encoder()

    def split(self, results: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return results[0], results[1] if len(results) > 1 else None

    def visible_lengths(self, batch: Batch, which: int, positions: torch.Tensor) -> torch.Tensor:
        if which == 1:  # the attributed target prefix
            return positions
        return batch.source_mask.sum(1, keepdim=True).expand_as(positions)

    def forward_embeddings(self, batch: Batch, inputs: Sequence[torch.Tensor], target_embeddings, repeat: int = 1,
                           **kwargs) -> ModelOutput:
        source = inputs[0]
        target = inputs[1] if len(inputs) > 1 else target_embeddings()
        if target.shape[0] != source.shape[0]:
            target = target.repeat(repeat, 1, 1)
        return self.model(
            inputs_embeds=source,
            attention_mask=batch.source_mask.repeat(repeat, 1),
            decoder_inputs_embeds=self.decoder_input(target),
            decoder_attention_mask=batch.target_mask.repeat(repeat, 1),
            **kwargs,
        )

    def forward_ids_with_layer(self, batch: Batch, layer_output: torch.Tensor, target_embeddings, repeat: int = 1,
                               **kwargs) -> ModelOutput:
        # Decoder embeddings are computed before the hook exists: the layer may be shared.
        decoder_embeds = target_embeddings()
        layer = self.input_layer()
        handle = layer.register_forward_hook(lambda module, args, output: layer_output)
        try:
            return self.model(
                input_ids=batch.source_ids.repeat(repeat, 1),
                attention_mask=batch.source_mask.repeat(repeat, 1),
                decoder_inputs_embeds=self.decoder_input(decoder_embeds.repeat(repeat, 1, 1)),
                decoder_attention_mask=batch.target_mask.repeat(repeat, 1),
                **kwargs,
            )
        finally:
            handle.remove()

    def forward_ids(self, target_ids: torch.Tensor, target_mask: torch.Tensor, source_ids: torch.Tensor | None = None,
                    source_mask: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        # The decoder side goes in as embeddings, exactly as attribution feeds it (same numbers).
        return self.model(input_ids=source_ids, attention_mask=source_mask,
                          decoder_inputs_embeds=self.decoder_input(self.embed(target_ids, as_targets=True)),
                          decoder_attention_mask=target_mask, **kwargs)

    def attention_rows(self, output: ModelOutput, attribute_target: bool) -> tuple[Any, Any]:
        return output.cross_attentions, output.decoder_attentions if attribute_target else None

    def inseq_formatter(self) -> Any:
        try:
            from inseq.models.encoder_decoder import EncoderDecoderInputFormatter
        except ImportError as error:
            raise _needs_inseq() from error
        return EncoderDecoderInputFormatter

    def forward_inseq_batch(self, batch, use_embeddings: bool, **kwargs) -> ModelOutput:
        return self.model(input_ids=None if use_embeddings else batch.source_ids,
                          inputs_embeds=batch.source_embeds if use_embeddings else None,
                          attention_mask=batch.source_mask,
                          decoder_inputs_embeds=self.decoder_input(batch.target_embeds),
                          decoder_attention_mask=batch.target_mask, **kwargs)

    def input_bos(self, special_ids) -> int | None:
        return None

    def encode_target(self, wrapper, text: str, skip_special_tokens: bool) -> list[int]:
        from .tokenization import encode_as_target

        return [wrapper.special_ids.bos] + encode_as_target(wrapper, text, skip_special_tokens)

    def build_batch(self, wrapper, *args, **kwargs) -> Batch:
        from .tokenization import build_encoder_decoder_batch

        return build_encoder_decoder_batch(wrapper, *args, **kwargs)

    def generation_text(self, wrapper, input_text: str, ids: list[int], skip_special_tokens: bool) -> str:
        return wrapper.tokenizer.decode(ids, skip_special_tokens=True)

    def source_side(self, batch: Batch, index: int, source: torch.Tensor | None, target_tokens: list, start: int,
                    steps: int, token_cls) -> tuple[list, torch.Tensor | None]:
        length = int(batch.source_mask[index].sum())
        tokens = [token_cls(t, int(x)) for t, x in zip(batch.source_tokens[index], batch.source_ids[index].tolist())]
        return tokens[:length], (source[index, :length, :steps] if source is not None else None)

    def check_generated_text(self, index: int, prompt: str, full: str) -> str | None:
        return None


def _needs_inseq() -> Exception:
    from ..errors import InvalidInputError

    return InvalidInputError("This step function uses inseq's input formatter (args.attribution_model.formatter): "
                             "install inseq (pip install --no-deps inseq==0.7.1)")


def adapter_for(model: torch.nn.Module) -> ArchitectureAdapter:
    """The adapter of ``model``'s architecture (from its config)."""
    return EncoderDecoderAdapter(model) if model.config.is_encoder_decoder else ArchitectureAdapter(model)


_SCALES_GIVEN_EMBEDDINGS = re.compile(r"^\s*inputs_embeds\s*(=\s*inputs_embeds\s*\*|\*=)\s*self\.embed_scale", re.MULTILINE)


@functools.cache
def _scales_given_embeddings(module_type: type) -> bool:
    """Whether ``module_type.forward`` multiplies the ``inputs_embeds`` it is given by ``embed_scale``."""
    try:
        return bool(_SCALES_GIVEN_EMBEDDINGS.search(inspect.getsource(module_type.forward)))
    except (OSError, TypeError):
        return False


def _scale_to_apply(module: torch.nn.Module) -> float:
    """inseq's embedding scale of ``module``'s side: its ``embed_scale`` attribute when there is one."""
    scale = getattr(module, "embed_scale", None)
    return float(scale) if scale is not None else 1.0
