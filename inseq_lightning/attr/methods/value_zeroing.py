"""Value zeroing (Mohebbi et al., 2023, "Quantifying Context Mixing in Transformers").

For a layer ``l`` and a token ``j``, token ``j``'s value vectors are set to zero in that layer's
attention (every head, or the heads chosen), the layer is run again on its original input, and each
position ``i`` is scored by the cosine distance between the layer's original output at ``i`` and its
output with ``j``'s values zeroed. A step reads the row of the position that predicts it.

Every layer is zeroed independently and all of them in the same forward: each block's output is
replaced by its original one before the next block sees it (inseq's scheme), so a layer always runs
on its original input. The variants (one per zeroed token) run as one batched forward, as many per
forward as the memory budget allows (``variants_per_forward``), every step at once. The value
vectors are zeroed at the output of the value projection (``v_proj``, T5's ``v``, the value third of
GPT-2's fused ``c_attn``...), which holds for eager, SDPA and flash attention alike.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from ...errors import InvalidInputError
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method

__all__ = ["ValueZeroing", "value_zeroing_sites"]

# Projections whose whole output is the value vectors, and fused q/k/v projections (by model type,
# their layouts differ between architectures that share a module name).
PLAIN_VALUE_NAMES = ("v_proj", "v", "value")
FUSED_VALUE_NAMES = {"c_attn": ("gpt2",), "qkv_proj": ("phi3",), "query_key_value": ("gpt_neox", "bloom")}
CROSS_MARKERS = ("encoder_attn", "encdecattention", "crossattention", "cross_attn", "cross_attention")
SIMILARITY_METRICS = ("cosine", "euclidean")
MIN_SCORE_THRESHOLD = 1e-5  # inseq's: smaller distances count as 0


@dataclass
class _Site:
    """Where one block's values can be zeroed: the projection module and the value columns of its
    output, one index tensor per value head."""

    module: torch.nn.Module
    heads: list[torch.Tensor]


@dataclass
class _Stack:
    """A stack of blocks: the module that runs them (its output's first element is the stack's final
    hidden state), the blocks, and each block's self- and cross-attention value sites."""

    module: torch.nn.Module
    blocks: torch.nn.ModuleList
    self_sites: list[_Site]
    cross_sites: list[_Site | None]


def _unsupported(model: torch.nn.Module, where: str) -> InvalidInputError:
    fused = ", ".join(f"{name} ({'/'.join(types)})" for name, types in FUSED_VALUE_NAMES.items())
    return InvalidInputError(
        f"value_zeroing cannot patch {type(model).__name__} (model_type "
        f"{getattr(model.config, 'model_type', '?')!r}): {where}. It looks for a ModuleList of blocks whose "
        f"attention modules (a path containing 'att') each hold one value projection named "
        f"{', '.join(PLAIN_VALUE_NAMES)} or a fused q/k/v projection {fused}. Use another method "
        "(attention, occlusion, reagent) for this model, or open an issue naming its architecture."
    )


def _out_width(module: torch.nn.Module) -> int | None:
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def _head_dim(attn: torch.nn.Module | None, config) -> int | None:
    for owner, attr in ((attn, "head_dim"), (attn, "key_value_proj_dim"), (attn, "head_size"), (config, "head_dim")):
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _value_heads(name: str, module: torch.nn.Module, attn: torch.nn.Module | None, config) -> list[torch.Tensor] | None:
    """Column indices of each value head in ``module``'s output (None: layout unknown)."""
    width = _out_width(module)
    if width is None:
        return None
    if name in PLAIN_VALUE_NAMES:
        start, size = 0, width
        hd = _head_dim(attn, config)
    elif name == "c_attn":  # GPT-2: [q | k | v], or [k | v] in a cross-attention
        size = width // 2 if getattr(attn, "is_cross_attention", False) else width // 3
        start, hd = width - size, _head_dim(attn, config)
    elif name == "qkv_proj":  # Phi-3: [q (heads) | k (kv heads) | v (kv heads)]
        hd = _head_dim(attn, config)
        kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        if hd is None or kv is None:
            return None
        size = kv * hd
        start = width - size
    else:  # query_key_value, GPT-NeoX and BLOOM: per head [q | k | v]
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        if not heads or width % (3 * heads):
            return None
        hd = width // (3 * heads)
        return [torch.arange(h * 3 * hd + 2 * hd, (h + 1) * 3 * hd) for h in range(heads)]
    if hd is None or size % hd:
        hd = size  # one unit: the whole value vector
    return [torch.arange(start + h * hd, start + (h + 1) * hd) for h in range(size // hd)]


def _block_sites(block: torch.nn.Module, model_type: str, config) -> tuple[list[_Site], list[_Site]]:
    self_sites, cross_sites = [], []
    for path, module in block.named_modules():
        parts = path.split(".")
        name = parts[-1]
        if "att" not in path.lower():
            continue
        if name not in PLAIN_VALUE_NAMES and model_type not in FUSED_VALUE_NAMES.get(name, ()):
            continue
        attn = block.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else block
        heads = _value_heads(name, module, attn, config)
        if heads is None:
            continue
        cross = any(marker in path.lower() for marker in CROSS_MARKERS)
        (cross_sites if cross else self_sites).append(_Site(module, heads))
    return self_sites, cross_sites


def _find_stack(model: torch.nn.Module, root: torch.nn.Module, config) -> _Stack:
    """The first ModuleList under ``root`` whose every block has exactly one self-attention value site."""
    model_type = getattr(config, "model_type", "")
    for name, module in root.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        sites = [_block_sites(block, model_type, config) for block in module]
        if all(len(s) == 1 and len(c) <= 1 for s, c in sites):
            parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
            return _Stack(parent, module, [s[0] for s, _ in sites], [c[0] if c else None for _, c in sites])
    raise _unsupported(model, f"no block stack with one value projection per block under {type(root).__name__}")


def value_zeroing_sites(model: torch.nn.Module) -> dict[str, _Stack]:
    """The block stacks value zeroing patches: ``{"decoder": ...}`` (the decoder-only model's stack or an
    encoder-decoder's decoder, with its cross-attention sites). Raises :class:`InvalidInputError` for an
    architecture it cannot patch."""
    from ...models.architectures import adapter_for

    adapter = adapter_for(model)
    stack = _find_stack(model, adapter.decoder(), model.config)
    if adapter.encoder() is not None and any(site is None for site in stack.cross_sites):
        raise _unsupported(model, "a decoder block without a cross-attention value projection")
    return {"decoder": stack}


def _units(value, n_layers: int, n_units: Callable[[int], int], what: str) -> dict[int, torch.Tensor | None]:
    """inseq's ``*_zeroed_units_indices``: None (every head of every layer), an int, a ``(start, end)``
    span, a list of heads (the same for every layer), or ``{layer: one of those}`` (other layers are not
    zeroed). Returns ``{layer: head indices or None (all)}``."""
    if isinstance(value, dict):
        layers = {}
        for layer, heads in value.items():
            if not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise InvalidInputError(f"{what}: layer {layer!r} is not one of the model's layers 0..{n_layers - 1}")
            layers[layer] = _heads(heads, n_units(layer), f"{what}[{layer}]")
        return layers
    return {layer: _heads(value, n_units(layer), what) for layer in range(n_layers)}


def _heads(value, n: int, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | tuple | list):
        raise InvalidInputError(f"{what} must be None, a head index, a (start, end) span or a list of heads, "
                                f"got {value!r}")
    if isinstance(value, int):
        heads = [value]
    elif isinstance(value, tuple):
        if len(value) != 2 or not all(isinstance(v, int) for v in value):
            raise InvalidInputError(f"{what}: a tuple is a (start, end) span of heads, got {value!r}")
        start, end = (v if v >= 0 else n + v for v in value)
        if start >= end:
            raise InvalidInputError(f"{what}: the span {value!r} holds no head")
        heads = list(range(start, end))
    else:
        heads = list(value)
    heads = [h + n if isinstance(h, int) and h < 0 else h for h in heads]
    if not heads or any(not isinstance(h, int) or not 0 <= h < n for h in heads) or len(set(heads)) != len(heads):
        raise InvalidInputError(f"{what}: {value!r} does not select distinct heads among the {n} value heads "
                                f"(0..{n - 1}) of the layer")
    return torch.tensor(heads)


class _StopForward(Exception):
    """Raised by the stack's hook once its final hidden state is read: nothing after it is needed."""


def _first(output):
    return output[0] if isinstance(output, tuple | list) or hasattr(output, "to_tuple") else output


def _with_first(output, value):
    if isinstance(output, tuple | list):
        return (value, *output[1:])
    return value


@register_method
class ValueZeroing(AttributionMethod):
    """Value zeroing: ``[B, tokens, N, layers]`` cosine distances (aggregated by default as the mean over
    layers, then normalized per step).

    For step ``n`` (predicted from position ``q = position - 1``), layer ``l`` and token ``j``:
    ``d(h_l[q], h_l^(j)[q])`` where ``h_l`` is the layer's output (the stack's final hidden state, after
    its final norm, for the last layer, as inseq reads it) and ``h_l^(j)`` the same layer run on its
    original input with token ``j``'s value vectors zeroed. Distances under 1e-5 count as 0 and each
    (step, layer) is divided by its sum over the tokens the step sees (inseq's normalization).

    Decoder-only models zero the self-attention values of the sequence's tokens. Encoder-decoders, as
    inseq: source scores zero the encoder token's values in the decoder's cross-attention; target
    scores (``attribute_target=True``) zero the target token's values in the decoder's self-attention;
    both measure the decoder's layers.

    Args:
        ctx: the engine context of one batch.
        similarity_metric: ``"cosine"`` (1 - cosine similarity) or ``"euclidean"`` (the L2 distance).
        decoder_zeroed_units_indices: value heads zeroed in the (decoder) self-attention: None (all), a
            head, a ``(start, end)`` span, a list of heads, or ``{layer: heads}`` (other layers are not
            zeroed and score 0). Grouped-query models count key/value heads.
        cross_zeroed_units_indices: the same for the decoder's cross-attention (encoder-decoders).
        encoder_zeroed_units_indices, output_encoder_self_scores, output_decoder_self_scores: inseq's
            options for the encoder/decoder self-scores it returns as ``sequence_scores``, which these
            outputs do not have: accepted as None/False only.
        min_score_threshold: distances under it count as 0 (inseq's 1e-5; tiny random models may
            stay under it everywhere).
        variants_per_forward: zeroed tokens batched into one forward (None: as many as the memory budget
            allows; each holds ``B`` rows).
    """

    name = "value_zeroing"
    granularity = "multidimensional"

    def attribute(self, ctx: EngineContext, similarity_metric: str = "cosine",
                  decoder_zeroed_units_indices=None, cross_zeroed_units_indices=None,
                  encoder_zeroed_units_indices=None, output_encoder_self_scores: bool = False,
                  output_decoder_self_scores: bool = False, min_score_threshold: float = MIN_SCORE_THRESHOLD,
                  variants_per_forward: int | None = None, **kwargs) -> MethodResult:
        if similarity_metric not in SIMILARITY_METRICS:
            raise InvalidInputError(f"similarity_metric must be one of {', '.join(SIMILARITY_METRICS)}, "
                                    f"got {similarity_metric!r}")
        if output_encoder_self_scores or output_decoder_self_scores or encoder_zeroed_units_indices is not None:
            raise InvalidInputError(
                "value_zeroing: encoder/decoder self-scores (inseq's sequence_scores) are not part of these outputs; "
                "leave output_encoder_self_scores/output_decoder_self_scores False and encoder_zeroed_units_indices "
                "None (decoder self-scores are the target attributions with attribute_target=True)")
        if not isinstance(min_score_threshold, int | float) or min_score_threshold < 0:
            raise InvalidInputError(f"min_score_threshold must be a number >= 0, got {min_score_threshold!r}")
        if variants_per_forward is not None and (not isinstance(variants_per_forward, int) or variants_per_forward < 1):
            raise InvalidInputError(f"variants_per_forward must be a positive int or None, got {variants_per_forward!r}")
        model = ctx.model.model
        stack = value_zeroing_sites(model)["decoder"]  # raises before any hook exists
        n_layers = len(stack.blocks)
        self_units = _units(decoder_zeroed_units_indices, n_layers, lambda i: len(stack.self_sites[i].heads),
                            "decoder_zeroed_units_indices")
        cross_units = None
        encoder = ctx.adapter.encoder()
        if encoder is not None:
            cross_units = _units(cross_zeroed_units_indices, n_layers, lambda i: len(stack.cross_sites[i].heads),
                                 "cross_zeroed_units_indices")
        elif cross_zeroed_units_indices is not None:
            raise InvalidInputError("cross_zeroed_units_indices applies to encoder-decoders; this model is "
                                    "decoder-only: use decoder_zeroed_units_indices")

        query = (ctx.positions - 1).clamp(min=0)  # [B, N]
        clean, encoder_states = self._clean_pass(ctx, stack, query)
        inputs = ctx.embeddings()
        batch = inputs[0].shape[0]
        results = []
        if encoder is not None:  # the source is read through cross-attention
            sides = [(stack.cross_sites, cross_units, inputs[0].shape[1], 0)]
            if ctx.attribute_target:
                sides.append((stack.self_sites, self_units, inputs[1].shape[1], 1))
        else:
            sides = [(stack.self_sites, self_units, inputs[0].shape[1], 0)]
        for sites, units, length, which in sides:
            visible = ctx.visible_lengths(which)  # [B, N]
            # tokens no step sees change nothing that is read: not zeroed (their scores are 0)
            count = min(length, int(visible[ctx.valid].max()) if bool(ctx.valid.any()) else 0)
            distances = torch.zeros(batch, length, ctx.num_steps, n_layers, dtype=torch.float32,
                                    device=inputs[0].device)
            chunk = variants_per_forward or self._variants_per_forward(ctx, inputs, n_layers)
            for start in range(0, count, chunk):
                tokens = torch.arange(start, min(start + chunk, count), device=inputs[0].device)
                corrupted = self._zeroed_pass(ctx, stack, sites, units, tokens, clean, encoder_states, query, inputs)
                for layer in range(n_layers):
                    distances[:, start : start + len(tokens), :, layer] = _distance(
                        clean["query"][layer], corrupted[layer], similarity_metric).permute(1, 0, 2)
            results.append(_normalize(distances, visible, ctx.valid, min_score_threshold))
        return MethodResult(*ctx.split(results))

    @staticmethod
    def _variants_per_forward(ctx: EngineContext, inputs: Sequence[torch.Tensor], n_layers: int) -> int:
        """Variants per forward under the memory budget: a rough activation size per variant (B rows)."""
        config = ctx.model.model.config
        hidden = inputs[0].shape[-1]
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 8
        length = sum(x.shape[1] for x in inputs)
        per_variant = inputs[0].shape[0] * length * (16 * hidden + 2 * heads * length) * inputs[0].element_size()
        per_variant += inputs[0].shape[0] * ctx.num_steps * hidden * n_layers * 4  # the states kept per layer
        return max(1, int(ctx.memory_budget_bytes // max(per_variant, 1)))

    @staticmethod
    def _clean_pass(ctx: EngineContext, stack: _Stack, query: torch.Tensor):
        """One forward on the real inputs: each block's output (to patch the zeroed passes with) and, at the
        predicting positions, each layer's output (the stack's final hidden state for the last layer)."""
        n_layers = len(stack.blocks)
        clean = {"full": [None] * n_layers, "query": [None] * n_layers}
        encoder_states = []
        handles = []

        def block_hook(layer):
            def hook(module, args, output):
                clean["full"][layer] = _first(output).detach()
            return hook

        def stack_hook(module, args, output):
            clean["query"][n_layers - 1] = _gather(_first(output), query)
            if not ctx.needs_logits:
                raise _StopForward

        try:
            for layer, block in enumerate(stack.blocks):
                handles.append(block.register_forward_hook(block_hook(layer)))
            handles.append(stack.module.register_forward_hook(stack_hook))
            encoder = ctx.adapter.encoder()
            if encoder is not None:
                handles.append(encoder.register_forward_hook(
                    lambda module, args, output: encoder_states.append(_first(output).detach())))
            with torch.no_grad():
                try:
                    output = ctx.forward(ctx.embeddings())
                    ctx.record_step_scores(ctx.step_logits(output.logits))
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        for layer in range(n_layers - 1):
            clean["query"][layer] = _gather(clean["full"][layer], query)
        return clean, (encoder_states[0] if encoder_states else None)

    @staticmethod
    def _zeroed_pass(ctx: EngineContext, stack: _Stack, sites: list[_Site], units: dict, tokens: torch.Tensor,
                     clean: dict, encoder_states, query: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list:
        """One forward of ``V = len(tokens)`` stacked copies of the batch; in copy ``v`` token ``tokens[v]``'s
        values are zeroed in every layer with units to zero, and every block's output is replaced by its
        clean one. Returns each layer's ``[V, B, N, D]`` outputs at the predicting positions."""
        n_layers, variants = len(stack.blocks), len(tokens)
        batch = inputs[0].shape[0]
        rows_query = query.repeat(variants, 1)
        corrupted = [None] * n_layers
        handles = []
        copies = torch.arange(variants, device=tokens.device)

        def zero_hook(columns):
            def hook(module, args, output):
                out = output.clone()
                view = out.view(variants, batch, out.shape[-2], out.shape[-1])
                cols = columns.to(out.device)
                view[copies.view(-1, 1), :, tokens.view(-1, 1), cols.view(1, -1)] = 0
                return out
            return hook

        def patch_hook(layer):
            def hook(module, args, output):
                corrupted[layer] = _gather(_first(output), rows_query)
                return _with_first(output, clean["full"][layer].repeat(variants, 1, 1))
            return hook

        def stack_hook(module, args, output):
            corrupted[n_layers - 1] = _gather(_first(output), rows_query)
            raise _StopForward

        try:
            for layer, site in enumerate(sites):
                if layer not in units:
                    continue
                heads = site.heads if units[layer] is None else [site.heads[h] for h in units[layer].tolist()]
                handles.append(site.module.register_forward_hook(zero_hook(torch.cat(heads))))
            for layer, block in enumerate(stack.blocks[:-1]):
                handles.append(block.register_forward_hook(patch_hook(layer)))
            handles.append(stack.module.register_forward_hook(stack_hook))
            kwargs = {}
            if encoder_states is not None:  # the encoder's output does not change: not run again
                kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_states.repeat(variants, 1, 1))
            with torch.no_grad():
                try:
                    ctx.forward([x.repeat(variants, 1, 1) for x in inputs], repeat=variants, **kwargs)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return [c.view(variants, batch, *c.shape[1:]) for c in corrupted]


def _gather(states: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[R, L, D]`` -> ``[R, N, D]`` rows at the predicting positions."""
    return states.gather(1, query.unsqueeze(-1).expand(-1, -1, states.shape[-1])).float()


def _distance(clean: torch.Tensor, corrupted: torch.Tensor, metric: str) -> torch.Tensor:
    """``[B, N, D]`` and ``[V, B, N, D]`` -> ``[V, B, N]``."""
    if metric == "cosine":  # rounding may leave 1 - cos a few 1e-8 below 0
        return (1 - F.cosine_similarity(clean.unsqueeze(0), corrupted, dim=-1)).clamp(min=0)
    return (corrupted - clean.unsqueeze(0)).norm(dim=-1)


def _normalize(distances: torch.Tensor, visible: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """inseq's post-processing: distances under ``threshold`` -> 0, then each (step, layer) divided by its sum
    over the tokens the step sees (a zero sum left as is). ``distances``: ``[B, L, N, layers]``."""
    tokens = torch.arange(distances.shape[1], device=distances.device).view(1, -1, 1)
    seen = (tokens < visible.unsqueeze(1)) & valid.unsqueeze(1)  # [B, L, N]
    out = torch.where((distances < threshold) | ~seen.unsqueeze(-1), torch.zeros_like(distances), distances)
    total = out.sum(1, keepdim=True)
    return out / torch.where(total == 0, torch.ones_like(total), total)
