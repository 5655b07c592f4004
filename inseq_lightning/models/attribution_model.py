"""AttributionModel: a Hugging Face model + tokenizer that can attribute its own predictions."""

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..attr.backward import BackwardStrategy, default_memory_budget
from ..attr.contrast import build_contrast_batch
from ..attr.engine import EngineContext, nan_future_positions
from ..attr.methods import get_method
from ..attr.request import AttributionRequest, build_request
from ..data.outputs import (
    FeatureAttributionOutput,
    FeatureAttributionSequenceOutput,
    FeatureAttributionStepOutput,
    TokenWithId,
    merge_attributions,
)
from ..errors import InvalidInputError
from ..utils.model_state import preserve_model_state
from ..utils.sharding import has_sharded_parameters
from .architectures import adapter_for
from .batch import Batch
from .fused_activations import fused_activations
from .inseq_compat import InseqModelAPI
from .tokenization import SpecialIds, build_batch, check_texts, encode_input, token_text

logger = logging.getLogger(__name__)


class AttributionModel(InseqModelAPI):
    """Wraps a loaded ``PreTrainedModel`` and its tokenizer. Build it with :func:`load_model`.

    The model is used where it is (device, dtype) and left exactly as it was found: modes,
    ``requires_grad`` flags, ``.grad`` tensors, attention implementation and RNG streams.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, attribution_method: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.architecture = adapter_for(model)
        self.is_encoder_decoder = self.architecture.is_encoder_decoder  # inseq's attribute, read by step functions
        self.special_ids = SpecialIds.resolve(model, tokenizer)
        self.embed_scale = self.architecture.embed_scale
        self._default_memory_budget: int | None = None
        forward_parameters = inspect.signature(model.forward).parameters
        # One pass over the whole sequence needs no key/value cache (time and memory for nothing).
        self.forward_defaults: dict[str, Any] = {"use_cache": False} if "use_cache" in forward_parameters else {}
        # Passes that read no logits (attention without step scores) can skip the output layer.
        self.can_skip_logits = "logits_to_keep" in forward_parameters
        self.default_attribution_method = attribution_method or "saliency"
        get_method(self.default_attribution_method)  # fail early on unknown names
        self.default_attributed_fn_id = "probability"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def info(self) -> dict[str, Any]:
        return {
            "model_name": getattr(self.model.config, "name_or_path", "") or type(self.model).__name__,
            "model_class": type(self.model).__name__,
            "tokenizer_name": getattr(self.tokenizer, "name_or_path", None) or None,
            "tokenizer_class": type(self.tokenizer).__name__,
        }

    @property
    def default_memory_budget(self) -> int:
        """See :func:`~inseq_lightning.attr.engine.default_memory_budget`; computed once per model."""
        if self._default_memory_budget is None:
            self._default_memory_budget = default_memory_budget(self.model)
        return self._default_memory_budget

    @staticmethod
    def output2logits(forward_output) -> torch.Tensor:
        """``[M, vocab]`` logits of the last position of each row: what step functions written for
        inseq read (``args.attribution_model.output2logits(args.forward_output)``)."""
        return forward_output.logits[:, -1, :]

    # ---- generation ---------------------------------------------------------------------------
    def generate_ids(self, input_texts: list[str], skip_special_tokens: bool = False,
                     **generation_args) -> list[list[int]]:
        """The model's own generation from each input, as ids, exactly as ``model.generate`` returns them.

        Decoder-only: the prompt's ids (as attribution tokenizes it) followed by the new ids;
        encoder-decoder: the decoder start token followed by the new ids. Special tokens the model
        generates (EOS) are kept. One input at a time, so no padding enters the results.
        """
        results = []
        # no_grad, not inference_mode (10% faster on small models): tensors a model caches on itself while
        # generating (a dynamic RoPE's frequencies) would be inference tensors that training cannot use.
        with preserve_model_state(self.model), torch.no_grad():
            self.model.eval()
            for text in input_texts:
                ids = encode_input(self, text, skip_special_tokens)
                input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
                args = {"pad_token_id": self.special_ids.pad, **dict(generation_args)}
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **args)
                results.append(out[0].tolist())
        return results

    def decode_generation(self, input_text: str, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of one :meth:`generate_ids` result: decoder-only, ``input_text`` followed by the
        decoded continuation; encoder-decoder, the decoded target (special tokens left out)."""
        return self.architecture.generation_text(self, input_text, ids, skip_special_tokens)

    def generate(self, input_texts: list[str], skip_special_tokens: bool = False, **generation_args) -> list[str]:
        """Greedy/sampled generation as text; decoder-only results hold the prompt and the continuation.

        To attribute a generation, let :meth:`attribute` generate (``generated_texts=None``): it keeps
        the generated ids, where this text may tokenize differently.
        """
        generated = self.generate_ids(input_texts, skip_special_tokens, **generation_args)
        return [self.decode_generation(text, ids, skip_special_tokens) for text, ids in zip(input_texts, generated)]

    # ---- attribution --------------------------------------------------------------------------
    def attribute(
        self,
        input_texts: str | Sequence[str],
        generated_texts: str | Sequence[str] | None = None,
        method: str | None = None,
        override_default_attribution: bool = False,
        attr_pos_start: int | None = None,
        attr_pos_end: int | None = None,
        show_progress: bool = True,
        pretty_progress: bool = True,
        output_step_attributions: bool = False,
        attribute_target: bool = False,
        step_scores: Sequence[str] = (),
        include_eos_baseline: bool = False,
        attributed_fn: str | Callable | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        generate_from_target_prefix: bool = False,
        skip_special_tokens: bool = False,
        clean_special_chars: bool = False,
        generation_args: dict[str, Any] | None = None,
        memory_budget_bytes: int | None = None,
        backward_strategy: BackwardStrategy | None = None,
        **kwargs,
    ) -> FeatureAttributionOutput:
        """Attribute the generation of ``generated_texts`` (or of the model's own generation) from
        ``input_texts``, with inseq's arguments and numbers.

        Args:
            input_texts: prompt(s) (decoder-only) or source text(s) (encoder-decoder).
            generated_texts: forced target(s); decoder-only targets must start with their prompt.
                When None the model generates them with ``generation_args``.
            method: attribution method name (default: the one given to :func:`load_model`).
            override_default_attribution: make ``method`` the default for later calls.
            pretty_progress: accepted for inseq compatibility; the progress bar is always rich's compact bar.
            attr_pos_start, attr_pos_end: target positions to attribute: one int for every sequence, or
                a list with one int (or None) per input text (an extension of inseq's arguments).
            attribute_target: also attribute the target prefix (encoder-decoder).
            step_scores: step function names computed alongside (``[N]`` per sequence).
            attributed_fn: step function name or callable whose value is attributed (default probability).
            batch_size: sequences per forward (default: all at once).
            generate_from_target_prefix: encoder-decoder only (ignored with a warning otherwise, as in inseq): the
                ``generated_texts`` are prefixes the model continues (with ``generation_args``), and the whole
                generation is attributed.
            skip_special_tokens: tokenize without special tokens (inseq's).
            clean_special_chars: show tokens as text in the output (``"Ġcat"`` -> ``" cat"``: the tokenizer's
                ``convert_tokens_to_string`` of each token, as inseq does); ids and scores are unchanged.
            memory_budget_bytes: extra memory the vectorised backward may use: steps are chunked to
                fit. Default: a quarter of the model's parameter memory, at least 64 MiB; 0 takes one
                step per backward.
            backward_strategy: how per-step gradients are computed (:class:`~inseq_lightning.attr.backward.BackwardStrategy`).
            **kwargs: method arguments (e.g. ``n_steps``, ``internal_batch_size``), attributed-function
                and step-function arguments (e.g. ``logprob``, ``top_p``, and the contrastive
                ``contrast_targets``, ``contrast_sources``, ``contrast_targets_alignments``,
                ``contrast_force_inputs``), routed by name.

        Returns:
            A :class:`FeatureAttributionOutput` with one sequence output per input.
        """
        started = time.perf_counter()
        if device is not None and torch.device(device) != self.device:
            raise InvalidInputError(f"The model is on {self.device}; move it yourself before attributing on {device}")
        input_list = [input_texts] if isinstance(input_texts, str) else list(input_texts)
        if not input_list:
            raise InvalidInputError("input_texts is empty; pass at least one text")
        check_texts("input_texts", input_list)
        method_name = method or self.default_attribution_method
        constrained_decoding = generated_texts is not None
        if generate_from_target_prefix and not self.is_encoder_decoder:
            logger.warning("generate_from_target_prefix parameter is set to True, but will be ignored (not an "
                           "encoder-decoder).")
            generate_from_target_prefix = False
        if generate_from_target_prefix and generated_texts is None:
            raise InvalidInputError("generate_from_target_prefix=True needs generated_texts: the target prefixes "
                                    "the model continues")
        request = build_request(
            len(input_list), method_name, attributed_fn, self.default_attributed_fn_id, step_scores, kwargs,
            attribute_target=attribute_target, output_step_attributions=output_step_attributions,
            include_eos_baseline=include_eos_baseline, skip_special_tokens=skip_special_tokens,
            attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end, memory_budget_bytes=memory_budget_bytes,
            backward_strategy=backward_strategy,
        )
        if override_default_attribution:
            self.default_attribution_method = method_name
        generation_args = dict(generation_args or {})
        # One guard for the whole call (generation, every batch): modes, requires_grad, .grad and RNG
        # are snapshotted once and restored when the call returns or raises. Frozen weights: gradients
        # flow to the inputs only (sharded models keep their flags: FSDP registers hooks from them).
        sharded = has_sharded_parameters(self.model)
        with preserve_model_state(self.model, freeze=not sharded):
            generated_ids = None
            if generate_from_target_prefix:
                generated_ids = self._generate_from_prefixes(input_list, generated_texts, skip_special_tokens,
                                                             generation_args)
                generated_list = [self.decode_generation(text, ids, skip_special_tokens)
                                  for text, ids in zip(input_list, generated_ids)]
            elif generated_texts is None:
                # The generated ids are attributed as they are: decoded text re-tokenizes differently
                # (a Metaspace tokenizer drops the first space, partial UTF-8 bytes become U+FFFD).
                generated_ids = self.generate_ids(input_list, skip_special_tokens=skip_special_tokens, **generation_args)
                generated_list = [self.decode_generation(text, ids, skip_special_tokens)
                                  for text, ids in zip(input_list, generated_ids)]
            else:
                generated_list = [generated_texts] if isinstance(generated_texts, str) else list(generated_texts)
                if len(generated_list) != len(input_list):
                    raise InvalidInputError(
                        f"input_texts has {len(input_list)} texts but generated_texts has {len(generated_list)}; "
                        "pass one target per input"
                    )
                check_texts("generated_texts", generated_list)
                for i, (prompt, full) in enumerate(zip(input_list, generated_list)):
                    problem = self.architecture.check_generated_text(i, prompt, full)
                    if problem:
                        raise InvalidInputError(problem)
            size = batch_size or len(input_list)
            chunks = [range(s, min(s + size, len(input_list))) for s in range(0, len(input_list), size)]
            outputs = []
            # Tensors must be built outside inference mode (trainer.validate/test) to be differentiable.
            with torch.inference_mode(False):
                # Tokenized up front (cheap) so that the bar counts attributed tokens from the start;
                # contrast inputs too, so that a bad one fails before any attribution.
                batches = [build_batch(self, [input_list[i] for i in chunk],
                                       None if generated_ids is not None else [generated_list[i] for i in chunk],
                                       _chunk(request.attr_pos_start, chunk), _chunk(request.attr_pos_end, chunk),
                                       include_eos_baseline, skip_special_tokens,
                                       generated_ids=[generated_ids[i] for i in chunk] if generated_ids is not None else None)
                           for chunk in chunks]
                contrasts = [build_contrast_batch(self, batch, request.contrast, chunk, input_list, skip_special_tokens)
                             if request.contrast is not None else None for batch, chunk in zip(batches, chunks)]
                total_tokens = sum(len(positions) for batch in batches for positions in batch.step_positions)
                # Python-written activations as fused kernels for the attribution only (not generation):
                # same formula, one saved tensor and one backward kernel instead of eight.
                with _progress(show_progress, method_name, total_tokens) as advance, fused_activations(self.model):
                    for batch, contrast in zip(batches, contrasts):
                        outputs.append(self._attribute_batch(batch, request, contrast, advance, sharded))
        out = merge_attributions(outputs) if len(outputs) > 1 else outputs[0]
        if clean_special_chars:
            _clean_special_chars(out, self.tokenizer)
        out.info = {
            "attribution_method": method_name,
            "input_texts": input_list,
            "generated_texts": generated_list,
            "attr_pos_start": request.attr_pos_start,
            "attr_pos_end": request.attr_pos_end,
            "attribute_target": attribute_target,
            "step_scores": list(step_scores),
            "attributed_fn": request.attributed_fn_name,
            "attribution_args": {k: v for k, v in request.method_kwargs.items() if _jsonable(v)},
            "attributed_fn_args": {k: v for k, v in request.attributed_fn_kwargs.items() if _jsonable(v)},
            "step_scores_args": {k: v for k, v in request.step_function_kwargs.items() if _jsonable(v)},
            "generation_args": generation_args,
            "include_eos_baseline": include_eos_baseline,
            "output_step_attributions": output_step_attributions,
            "constrained_decoding": constrained_decoding,
            "generate_from_target_prefix": generate_from_target_prefix,
            "exec_time": time.perf_counter() - started,
            **self.info,
        }
        return out

    def _pad_token(self) -> TokenWithId:
        """The pad token (inseq pads step outputs with it); EOS when the tokenizer has none."""
        pad = self.tokenizer.pad_token if self.tokenizer.pad_token is not None else self.tokenizer.eos_token
        pad_id = self.special_ids.pad
        return TokenWithId(str(pad) if pad is not None else "", int(pad_id) if pad_id is not None else -1)

    def _generate_from_prefixes(self, input_list: list[str], prefixes, skip_special_tokens: bool,
                                generation_args: dict[str, Any]) -> list[list[int]]:
        """inseq's ``generate_from_target_prefix``: each input's generation continues its target prefix (passed
        as ``decoder_input_ids``, tokenized without special tokens; ``generate`` adds the decoder start token)."""
        from .tokenization import encode_as_target

        prefix_list = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        if len(prefix_list) != len(input_list):
            raise InvalidInputError(f"input_texts has {len(input_list)} texts but generated_texts has "
                                    f"{len(prefix_list)} prefixes; pass one per input")
        check_texts("generated_texts", prefix_list)
        results = []
        for text, prefix in zip(input_list, prefix_list):
            ids = torch.tensor([encode_as_target(self, prefix, skip_special_tokens=True)], dtype=torch.long,
                               device=self.device)
            results.extend(self.generate_ids([text], skip_special_tokens=skip_special_tokens,
                                             **{**generation_args, "decoder_input_ids": ids}))
        return results

    def _attribute_batch(self, batch: Batch, request: AttributionRequest, contrast,
                         advance: Callable[[float], None] = lambda n: None,
                         sharded: bool | None = None) -> FeatureAttributionOutput:
        ctx = EngineContext(self, batch, request, progress=advance, contrast=contrast, sharded=sharded)
        # Called inside attribute()'s guard, with frozen weights: the forward saves only what the
        # input gradients need (a Linear no longer keeps its input for the weight's gradient),
        # which leaves memory for batching steps.
        with torch.inference_mode(False), torch.enable_grad():
            # Attributions describe the deterministic model: dropout off for the pass, modes restored
            # by the guard. eval() walks and rewrites every module: skipped when none is training.
            if any(module.training for module in self.model.modules()):
                self.model.eval()
            result = request.method.attribute(ctx, **request.method_kwargs)
            scores = ctx.scorer.ensure_step_scores()
        # Methods without per-step backwards (attention, occlusion, dummy) finish the batch at once.
        advance(ctx.num_tokens - ctx.reported_tokens)
        source = result.source.detach().float().cpu() if result.source is not None else None
        target = result.target.detach().float().cpu() if result.target is not None else None
        if target is not None:
            target = nan_future_positions(target, ctx.positions.cpu(), ctx.valid.cpu())
        return self._sequence_outputs(batch, request.method.granularity, source, target, scores,
                                      request.output_step_attributions, contrast)

    def _sequence_outputs(self, batch: Batch, granularity, source, target, scores, with_steps,
                          contrast=None) -> FeatureAttributionOutput:
        sequences = []
        for i, positions in enumerate(batch.step_positions):
            n = len(positions)
            start, end = positions[0], positions[-1] + 1
            t_len = int(batch.target_mask[i].sum())
            target_tokens = [TokenWithId(t, int(x)) for t, x in zip(batch.target_tokens[i], batch.target_ids[i].tolist())][:t_len]
            if contrast is not None:  # inseq's "contrast → target" label where the aligned tokens differ
                for p, j in zip(positions, contrast.aligned_lists[i]):
                    if contrast.tokens[i][j] != target_tokens[p].token:
                        target_tokens[p] = TokenWithId(f"{contrast.tokens[i][j]} → {target_tokens[p].token}",
                                                       target_tokens[p].id)
            rows = min(t_len, end)
            source_tokens, src = self.architecture.source_side(batch, i, source, target_tokens, start, n, TokenWithId)
            sequences.append(FeatureAttributionSequenceOutput(
                source=source_tokens,
                target=target_tokens,
                source_attributions=_owned(src) if src is not None else None,
                target_attributions=_owned(target[i, :rows, :n]) if target is not None else None,
                step_scores={k: v[i, :n].clone() for k, v in scores.items()},
                attr_pos_start=start,
                attr_pos_end=end,
                granularity=granularity,
            ))
        steps = _step_outputs(sequences, batch, self._pad_token()) if with_steps else None
        return FeatureAttributionOutput(sequences, steps, {})


def _clean_special_chars(out: FeatureAttributionOutput, tokenizer) -> None:
    """inseq's ``clean_special_chars``: every token string (sequence and step outputs) replaced by the
    tokenizer's ``convert_tokens_to_string`` of that token alone (kept when that is empty)."""
    cache: dict[str, str] = {}

    def clean(token: TokenWithId) -> TokenWithId:
        if token.token not in cache:
            cache[token.token] = token_text(tokenizer, token.token) or token.token
        return TokenWithId(cache[token.token], token.id)

    for seq in out.sequence_attributions:
        seq.source = [clean(t) for t in seq.source]
        seq.target = [clean(t) for t in seq.target]
    for step in out.step_attributions or []:
        for name in ("source", "prefix", "target"):
            rows = getattr(step, name)
            if rows is not None:
                setattr(step, name, [type(row)(clean(t) for t in row) for row in rows])


def _chunk(value, indices: range):
    """A per-sequence list cut to one batch's sequences (anything else is shared by all)."""
    return [value[i] for i in indices] if isinstance(value, list) else value


def _owned(view: torch.Tensor) -> torch.Tensor:
    """``view`` itself when it is all of its storage (one sequence), else a copy, so that an output
    never keeps a whole batch's tensor alive through a slice."""
    if view.is_contiguous() and view.numel() * view.element_size() == view.untyped_storage().nbytes():
        return view
    return view.clone()


def _step_outputs(sequences: list[FeatureAttributionSequenceOutput], batch: Batch,
                  pad: TokenWithId | None = None) -> list[FeatureAttributionStepOutput]:
    """inseq's per-step outputs, built from the sequence outputs.

    Decoder-only, and methods inseq runs once on the final step (attention, value zeroing): one output per step
    of each sequence in turn (inseq attributes those one sequence at a time). Encoder-decoder: one output per
    step of the batch, a row per sequence, as inseq batches them; rows of a sequence that has ended are NaN with
    pad tokens, source rows past a sequence's source are NaN (inseq holds the pad tokens' scores there).
    ``target_attributions`` of a step holds the ``position`` prefix rows it sees.
    """
    batched = batch.source_ids is not None and not (sequences and sequences[0].granularity == "multidimensional")
    groups = [sequences] if batched else [[s] for s in sequences]
    pad = pad or TokenWithId("<pad>", -1)
    steps = []
    for group in groups:
        n_steps = [s.attr_pos_end - s.attr_pos_start for s in group]
        for k in range(max(n_steps)):
            alive = [k < n for n in n_steps]
            positions = [s.attr_pos_start + k for s in group]
            prefixes = [(s.target + [pad] * (p + 1))[:p] for s, p in zip(group, positions)]
            source_rows = max(len(s.source) for s in group)
            has_source = group[0].source_attributions is not None
            steps.append(FeatureAttributionStepOutput(
                source_attributions=_stack_col([s.source_attributions for s in group], k, alive)
                if has_source else None,
                step_scores={name: torch.stack([s.step_scores[name][k] if a else
                                                torch.tensor(float("nan"), dtype=s.step_scores[name].dtype)
                                                for s, a in zip(group, alive)])
                             for name in group[0].step_scores},
                target_attributions=_stack_col([s.target_attributions for s in group], k, alive, positions)
                if group[0].target_attributions is not None else None,
                source=[list(s.source) + [pad] * (source_rows - len(s.source)) for s in group]
                if batch.source_ids is not None else None,
                prefix=prefixes,
                target=[[s.target[p] if a else pad] for s, p, a in zip(group, positions, alive)],
            ))
    return steps


def _stack_col(tensors: list[torch.Tensor], k: int, alive: list[bool], rows: list[int] | None = None,
               ) -> torch.Tensor:
    """Column ``k`` of each sequence's scores (its first ``rows`` rows), NaN for sequences past their last step,
    stacked with the token dimension NaN-padded to the longest: ``[B, L, ...]``."""
    cols = []
    for i, (t, a) in enumerate(zip(tensors, alive)):
        length = t.shape[0] if rows is None else min(rows[i], t.shape[0])
        col = t[:length, min(k, t.shape[1] - 1)]
        cols.append(col if a else torch.full_like(col, float("nan")))
    length = max(rows) if rows is not None else max(c.shape[0] for c in cols)
    padded = [torch.nn.functional.pad(c, [0, 0] * (c.ndim - 1) + [0, length - c.shape[0]], value=float("nan"))
              for c in cols]
    return torch.stack(padded)


def _jsonable(value) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | tuple | dict)


class _progress:
    """A rich progress bar over attributed tokens (every step of every sequence), advanced after
    each per-step backward, so that one long sequence moves the bar too (no-op when disabled)."""

    def __init__(self, show: bool, method: str, total: int):
        self.show, self.method, self.total = show, method, total

    def __enter__(self):
        if not self.show:
            return lambda n: None
        self._progress = Progress(TextColumn(f"Attributing with {self.method}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("tokens"), TimeElapsedColumn(), transient=True)
        self._progress.__enter__()
        task = self._progress.add_task("attribute", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        if self.show:
            self._progress.__exit__(*exc)
        return False
