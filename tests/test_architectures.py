"""Ground truth over many architectures: tiny random models (built from configs, nothing downloaded).

For each architecture the ``probability`` step scores must equal the model's own forward pass fed as
the model expects it (decoder-only: ``input_ids``; encoder-decoder: ``labels``, shifted right by the
model itself with its own decoder start), for one sequence and for two right-padded sequences of
different lengths in one call: a wrong embedding scale, decoder start, position offset or padding
treatment shows up as silently wrong numbers. Every attribution method then runs on every
architecture (the full method x architecture grid) and must give finite maps where they are defined
(NaN only at the future target positions), with the same step scores. DeepLIFT variants may refuse
models with activation modules captum's rescale rule rewrites (``NotImplementedError``, documented).
Saliency must equal ``|d p / d x|`` from plain backwards of the model's own forward, and
``layer_gradient_x_activation`` must equal ``input_x_gradient`` (the layer hooked is the one the model
calls). Models keep transformers' default initialisation: float32 noise between a padded batch and a
sequence alone stays below 7e-7 relative, under the 1e-6 tolerance (it exceeds it with 5x larger weights).

Tokenizers are the locally trained ones of :mod:`inseq_lightning.tiny_models`, re-templated per
architecture (BOS added or not, OPT's ``</s>`` prefix, BART's ``<s> ... </s>``, mBART's trailing
language code, M2M100's leading one), with config special ids consistent with them.
"""

import functools

import pytest
import torch
import transformers
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

import inseq_lightning as il
from inseq_lightning.attr.methods import get_method
from inseq_lightning.tiny_models import (
    chat_tokenizer,
    gpt2_tokenizer,
    llama_tokenizer,
    marian_tokenizer,
    metaspace_tokenizer,
)

DECODER_TEXTS = [("The cat sat", "The cat sat on the mat"),
                 ("A dog ran far away", "A dog ran far away from the red box and looked at the dog.")]
ENCDEC_TEXTS = [("Hello world", "Le chat est noir"),
                ("The cat sat on the mat and looked at the dog.", "Il gatto dorme. Das ist ein kleines Haus.")]
METHOD_ARGS = {"integrated_gradients": {"n_steps": 4}, "layer_integrated_gradients": {"n_steps": 4},
               "gradient_shap": {"n_samples": 2, "seed": 0},
               "sequential_integrated_gradients": {"n_steps": 1},
               "discretized_integrated_gradients": {"n_steps": 4, "n_neighbors": 10},
               "lime": {"n_samples": 8, "seed": 0},
               # tiny random OPT's value-zeroing distances (~5e-6) all sit under inseq's 1e-5 threshold
               "value_zeroing": {"min_score_threshold": 0.0},
               "reagent": {"max_probe_steps": 3, "num_probes": 4, "seed": 0}}
DEEPLIFT = ("deeplift", "layer_deeplift")
RTOL = 1e-6

# ---- tokenizers -----------------------------------------------------------------------------------


def _retemplate(base: PreTrainedTokenizerFast, template: str | None, new_special: tuple[str, ...] = (),
                **special_tokens) -> PreTrainedTokenizerFast:
    """A copy of ``base`` with ``new_special`` tokens appended to its vocabulary and ``template``
    (``TemplateProcessing``'s single-sequence spec) as post-processor."""
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.add_special_tokens(list(new_special))
    if template is not None:
        names = {t for t in template.split() if t != "$A"}
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, backend.token_to_id(t)) for t in sorted(names)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


@functools.cache
def tokenizer(kind: str) -> PreTrainedTokenizerFast:
    if kind == "byte_level":  # GPT-2, GPT-NeoX, BLOOM: no BOS added, EOS doubles as BOS/UNK, no PAD
        return gpt2_tokenizer()
    if kind == "byte_level_bos":  # Llama-3 style: byte-level, BOS added
        return llama_tokenizer()
    if kind == "chatml":  # Qwen, OLMo-2: byte-level, no BOS added, a PAD token
        return chat_tokenizer()
    if kind == "metaspace":  # Llama-2, Mistral, Phi-3: SentencePiece-style, BOS added, no PAD
        return metaspace_tokenizer()
    if kind == "metaspace_pad":  # Gemma: SentencePiece-style, BOS added, a PAD token
        return _retemplate(metaspace_tokenizer(), None, ("<pad>",), bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", pad_token="<pad>")
    if kind == "opt":  # OPT: byte-level with "</s>" prepended as BOS
        return _retemplate(gpt2_tokenizer(), "<|endoftext|> $A", ("<pad>",), bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<pad>")
    if kind == "seq2seq":  # T5, Marian, Pegasus: "$A </s>"
        return marian_tokenizer()
    if kind == "bart":  # "<s> $A </s>"
        return _retemplate(marian_tokenizer(), "<s> $A </s>", ("<s>",), bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", pad_token="<pad>")
    if kind == "mbart":  # "$A </s> en_XX": the language code last, and the decoder start
        return _retemplate(marian_tokenizer(), "$A </s> en_XX", ("en_XX",), eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>")
    if kind == "m2m100":  # "__en__ $A </s>": the language code first, decoder start = EOS
        return _retemplate(marian_tokenizer(), "__en__ $A </s>", ("__en__",), eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>")
    raise KeyError(kind)


# ---- models ---------------------------------------------------------------------------------------

DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128}
SEQ2SEQ = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
           "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "max_position_embeddings": 128}


def _ids(tok, **extra) -> dict:
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, **extra}


def _seq2seq_ids(tok, decoder_start: int, **extra) -> dict:
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "decoder_start_token_id": decoder_start, **extra}


# name -> (tokenizer kind, config class, model class, config kwargs from the tokenizer)
ARCHITECTURES = {
    "gpt2": ("byte_level", "GPT2Config", "GPT2LMHeadModel",
             lambda t: {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, **_ids(t)}),
    "llama": ("byte_level_bos", "LlamaConfig", "LlamaForCausalLM", lambda t: {**DECODER, **_ids(t)}),
    "qwen2": ("chatml", "Qwen2Config", "Qwen2ForCausalLM", lambda t: {**DECODER, **_ids(t)}),
    "qwen3": ("chatml", "Qwen3Config", "Qwen3ForCausalLM", lambda t: {**DECODER, "head_dim": 16, **_ids(t)}),
    "gemma": ("metaspace_pad", "GemmaConfig", "GemmaForCausalLM", lambda t: {**DECODER, "head_dim": 16, **_ids(t)}),
    "gemma2": ("metaspace_pad", "Gemma2Config", "Gemma2ForCausalLM",
               lambda t: {**DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4, **_ids(t)}),
    "gemma3": ("metaspace_pad", "Gemma3TextConfig", "Gemma3ForCausalLM",
               lambda t: {**DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                          "layer_types": ["sliding_attention", "full_attention"], **_ids(t)}),
    "mistral": ("metaspace", "MistralConfig", "MistralForCausalLM",
                lambda t: {**DECODER, "sliding_window": 4, **_ids(t)}),
    "phi3": ("metaspace", "Phi3Config", "Phi3ForCausalLM",
             lambda t: {**DECODER, "original_max_position_embeddings": 128, **_ids(t)}),
    "gpt_neox": ("byte_level", "GPTNeoXConfig", "GPTNeoXForCausalLM",
                 lambda t: {**{k: v for k, v in DECODER.items() if k != "num_key_value_heads"}, **_ids(t)}),
    # opt-350m's layout: embeddings projected in and out (word_embed_proj_dim < hidden), post-LayerNorm
    "opt": ("opt", "OPTConfig", "OPTForCausalLM",
            lambda t: {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "max_position_embeddings": 128, "word_embed_proj_dim": 32, "do_layer_norm_before": False,
                       **_ids(t)}),
    "bloom": ("byte_level", "BloomConfig", "BloomForCausalLM",
              lambda t: {"hidden_size": 64, "n_layer": 2, "n_head": 4, **_ids(t)}),
    "olmo2": ("chatml", "Olmo2Config", "Olmo2ForCausalLM", lambda t: {**DECODER, **_ids(t)}),
    "t5": ("seq2seq", "T5Config", "T5ForConditionalGeneration",
           lambda t: {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16,
                      **_seq2seq_ids(t, t.pad_token_id)}),
    "bart": ("bart", "BartConfig", "BartForConditionalGeneration",
             lambda t: {**SEQ2SEQ, **_seq2seq_ids(t, t.eos_token_id, bos_token_id=t.bos_token_id,
                                                  forced_bos_token_id=t.bos_token_id)}),
    "mbart": ("mbart", "MBartConfig", "MBartForConditionalGeneration",
              lambda t: {**SEQ2SEQ, "scale_embedding": True,
                         **_seq2seq_ids(t, t.convert_tokens_to_ids("en_XX"))}),
    "m2m100": ("m2m100", "M2M100Config", "M2M100ForConditionalGeneration",
               lambda t: {**SEQ2SEQ, "scale_embedding": True, **_seq2seq_ids(t, t.eos_token_id)}),
    "marian": ("seq2seq", "MarianConfig", "MarianMTModel",
               lambda t: {**SEQ2SEQ, "scale_embedding": True, **_seq2seq_ids(t, t.pad_token_id)}),
    "pegasus": ("seq2seq", "PegasusConfig", "PegasusForConditionalGeneration",
                lambda t: {**SEQ2SEQ, "scale_embedding": True, **_seq2seq_ids(t, t.pad_token_id)}),
}
METHODS = il.list_feature_attribution_methods()


@functools.cache
def built(arch: str) -> tuple[transformers.PreTrainedModel, PreTrainedTokenizerFast, il.AttributionModel]:
    """The architecture's tiny float32 model (random weights, seed 0), its tokenizer and its wrapper, once per module."""
    kind, config_cls, model_cls, config_kwargs = ARCHITECTURES[arch]
    tok = tokenizer(kind)
    config = getattr(transformers, config_cls)(**config_kwargs(tok))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval().float()
    return model, tok, il.load_model(model, "saliency", tokenizer=tok)


def texts(arch: str) -> list[tuple[str, str]]:
    return ENCDEC_TEXTS if built(arch)[0].config.is_encoder_decoder else DECODER_TEXTS


@functools.cache
def reference(arch: str, indices: tuple[int, ...], eager: bool = False) -> list[tuple]:
    """Per text pair of ``indices``: ``(source ids, target ids, first attributed position, probabilities)``
    from the model's own forward on those pairs together (right-padded, with attention masks):
    decoder-only, ``softmax(logits[t - 1])[id_t]`` from ``input_ids``; encoder-decoder,
    ``softmax(logits[t])[label_t]`` from ``labels`` (the model shifts them right itself; target ids
    as attributed: the decoder start, then the labels).

    ``eager``: with eager attention, which the ``attention`` method switches to for its pass (SDPA's
    kernels round differently: up to 1.0e-6 apart on T5)."""
    model = built(arch)[0]
    original = model.config._attn_implementation
    if not eager or original == "eager":
        return _own_forward(arch, indices)
    model.set_attn_implementation("eager")
    try:
        return _own_forward(arch, indices)
    finally:
        model.set_attn_implementation(original)


def _own_forward(arch: str, indices: tuple[int, ...]) -> list[tuple]:
    model, tok, _ = built(arch)
    pairs = [texts(arch)[i] for i in indices]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results = []
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            sources = [tok(p)["input_ids"] for p, _ in pairs]
            labels = [tok(text_target=t)["input_ids"] for _, t in pairs]
            source_ids, source_mask = _pad(sources, pad)
            label_ids, _ = _pad(labels, -100)
            logits = model(input_ids=source_ids, attention_mask=source_mask, labels=label_ids).logits
            for row, (source, label) in enumerate(zip(sources, labels)):
                probs = logits[row, : len(label)].softmax(-1).gather(-1, torch.tensor(label).unsqueeze(-1))
                results.append((source, [model.config.decoder_start_token_id, *label], 1, probs.squeeze(-1).double()))
            return results
        fulls, starts = [], []
        for prompt, full in pairs:
            prompt_ids, full_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids, "test texts must tokenize with the prompt as a prefix"
            fulls.append(full_ids)
            starts.append(len(prompt_ids))
        ids, mask = _pad(fulls, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (full, start) in enumerate(zip(fulls, starts)):
            probs = logits[row, start - 1 : len(full) - 1].softmax(-1).gather(-1, torch.tensor(full[start:]).unsqueeze(-1))
            results.append((None, full, start, probs.squeeze(-1).double()))
        return results


def _pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.tensor([s + [value] * (length - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    return ids, mask


def _attribute(arch: str, indices: list[int], method: str = "dummy", **kwargs) -> il.FeatureAttributionOutput:
    pairs = [texts(arch)[i] for i in indices]
    kwargs = {"step_scores": ["probability"], **kwargs}
    return built(arch)[2].attribute(input_texts=[p for p, _ in pairs], generated_texts=[t for _, t in pairs],
                                    method=method, show_progress=False, **kwargs)


def _check_step_scores(arch: str, out: il.FeatureAttributionOutput, indices: list[int], eager: bool = False) -> None:
    """Ids as fed, and probabilities equal to the model's own forward on the same batch and on each
    pair alone (padding changes nothing), within ``RTOL``."""
    assert len(out.sequence_attributions) == len(indices)
    together = reference(arch, tuple(indices), eager)
    for row, (seq, index) in enumerate(zip(out.sequence_attributions, indices)):
        source, target, start, _ = together[row]
        assert [t.id for t in seq.target] == target
        if source is not None:
            assert [t.id for t in seq.source] == source
        assert (seq.attr_pos_start, seq.attr_pos_end) == (start, len(target))
        got = seq.step_scores["probability"].double()
        for name, expected in (("batch", together[row][3]), ("alone", reference(arch, (index,), eager)[0][3])):
            rel = ((got - expected).abs() / expected.abs()).max().item()
            assert rel <= RTOL, (f"{arch} sequence {index}: max relative difference {rel:.3e} from the model's own "
                                 f"forward ({name})")


def _check_target_map(attr: torch.Tensor, seq) -> None:
    """Rows before each step's position: finite; rows at or after it (not generated yet): NaN."""
    n = seq.attr_pos_end - seq.attr_pos_start
    assert attr.shape[:2] == (len(seq.target), n), attr.shape
    for k, position in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
        visible, future = attr[:position, k], attr[position:, k]
        assert visible.numel() > 0 and torch.isfinite(visible).all(), f"step {k}: non-finite visible attributions"
        assert torch.isnan(future).all(), f"step {k}: future positions are not NaN"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_probability_equals_the_models_own_forward(arch):
    _check_step_scores(arch, _attribute(arch, [0]), [0])
    _check_step_scores(arch, _attribute(arch, [0, 1]), [0, 1])  # right padding changes nothing


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_contrast_rows_batched_with_the_real_ones_equal_the_models_own_forward(arch):
    """Step scores only (``dummy``) with a contrastive one run the real and the contrast rows in one right-padded
    forward: with each target as its own contrast, ``contrast_prob`` is the model's own probability too (the
    four rows of two pairs padded to the longest)."""
    targets = [t for _, t in texts(arch)]
    out = _attribute(arch, [0, 1], step_scores=["probability", "contrast_prob"], contrast_targets=targets)
    _check_step_scores(arch, out, [0, 1])
    for row, seq in enumerate(out.sequence_attributions):
        expected = reference(arch, (0, 1))[row][3]
        rel = ((seq.step_scores["contrast_prob"].double() - expected).abs() / expected.abs()).max().item()
        assert rel <= RTOL, f"{arch} sequence {row}: contrast_prob {rel:.3e} from the model's own forward"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_method_gives_finite_maps(arch, method):
    encoder_decoder = built(arch)[0].config.is_encoder_decoder
    # every method that can attribute the target prefix does it on encoder-decoders
    attribute_target = encoder_decoder and get_method(method).supports_attribute_target and method != "dummy"
    try:
        out = _attribute(arch, [0, 1], method, attribute_target=attribute_target, **METHOD_ARGS.get(method, {}))
    except NotImplementedError as error:
        # the documented refusal: DeepLIFT's rescale rule on models with modules captum rewrites
        assert method in DEEPLIFT, f"{method} raised {error!r}"
        assert method in str(error) and "DeepLIFT" in str(error), str(error)
        return
    _check_step_scores(arch, out, [0, 1], eager=method == "attention")
    for seq in out.sequence_attributions:
        if method == "dummy":
            assert seq.source_attributions is None and seq.target_attributions is None
            continue
        maps = []
        if encoder_decoder:
            src = seq.source_attributions
            assert src.shape[:2] == (len(seq.source), seq.attr_pos_end - seq.attr_pos_start), src.shape
            assert torch.isfinite(src).all(), "non-finite source attributions"
            maps.append(src)
        if attribute_target or not encoder_decoder:
            _check_target_map(seq.target_attributions, seq)
            maps.append(seq.target_attributions)
        else:
            assert seq.target_attributions is None
        assert any(m.nan_to_num().abs().sum() > 0 for m in maps), "all-zero attributions"


def _model_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """What the model (its encoder) computes from ``ids`` before its first layer, to be fed back as
    ``inputs_embeds``: the embedding module's output (Gemma and BART-style modules scale inside),
    times the stack's own ``embed_scale`` where the stack scales ids outside the module (Marian, Pegasus)."""
    stack = model.get_encoder() if model.config.is_encoder_decoder else model
    return stack.get_input_embeddings()(ids) * getattr(stack, "embed_scale", 1.0)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_saliency_equals_autograd_of_the_models_own_forward(arch):
    """``|d p_k / d x|`` per step from one plain backward each on the pair alone; the library
    computes them batched with another pair (padding), split at the output layer and vectorised."""
    model = built(arch)[0]
    source, target, start, _ = reference(arch, (1,))[0]
    encoder_decoder = model.config.is_encoder_decoder
    ids = torch.tensor([source if encoder_decoder else target])
    with torch.enable_grad():
        x = _model_embeddings(model, ids).detach().requires_grad_(True)
        if encoder_decoder:
            labels = torch.tensor([target[1:]])
            logits = model(inputs_embeds=x, labels=labels).logits[0]
            with torch.no_grad():  # x is what the model computes from the ids itself
                plain = model(input_ids=ids, labels=labels).logits[0]
            predicted = labels[0]
        else:
            logits = model(inputs_embeds=x, attention_mask=torch.ones_like(ids)).logits[0, start - 1 : -1]
            with torch.no_grad():
                plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, start - 1 : -1]
            predicted = ids[0, start:]
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-6)
        probs = logits.softmax(-1).gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
        grads = [torch.autograd.grad(p, x, retain_graph=True)[0][0].abs() for p in probs]
    seq = _attribute(arch, [0, 1], "saliency")[1]
    attr = seq.source_attributions if encoder_decoder else seq.target_attributions
    assert attr.shape == (ids.shape[1], len(grads), x.shape[-1])
    for k, grad in enumerate(grads):
        rows = ids.shape[1] if encoder_decoder else start + k  # decoder-only: the positions before the step
        torch.testing.assert_close(attr[:rows, k], grad[:rows], rtol=1e-5, atol=1e-5 * grad.max().item(),
                                   msg=lambda m, k=k: f"{arch} step {k}: {m}")
        if not encoder_decoder:
            assert not grad[rows:].any(), "the model looks ahead"  # causality of the reference itself


# Decoder-only models whose forward continues a plain full-attention key/value cache: their forwards run
# in segments (the others' sliding-window layers keep a cache of their own kind and run whole).
SEGMENTED = {"gpt2", "llama", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "opt", "bloom", "olmo2"}


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if not a.startswith(("t5", "bart", "mbart", "m2m100",
                                                                                   "marian", "pegasus"))])
def test_a_forward_in_segments_gives_the_whole_forwards_numbers(arch, method):
    """Three segments, each continuing the previous one's key/value cache with the gradient, one step
    per backward: the maps and probabilities of one forward over the whole sequence, and each step's
    backward starts from its own segment (the model's own prefix-by-prefix gradients for saliency are
    checked on whole forwards above; here the two ways are compared value for value)."""
    from inseq_lightning.attr.backward import BackwardStrategy

    kwargs = {"n_steps": 4} if method == "integrated_gradients" else {}
    segmented, whole = BackwardStrategy(steps_per_backward=1, segments=3), BackwardStrategy(segments=1)
    out = _attribute(arch, [1], method, backward_strategy=segmented, **kwargs)[0]
    ref = _attribute(arch, [1], method, backward_strategy=whole, **kwargs)[0]
    assert all(r.segment is None for r in whole.records)
    used = sorted({r.segment for r in segmented.records}, key=str)
    assert used == ([0, 1, 2] if arch in SEGMENTED else [None]), used
    if arch in SEGMENTED:
        assert [r.steps for r in segmented.records] == [1] * len(ref.step_scores["probability"])
    a, b = out.target_attributions, ref.target_attributions
    assert torch.equal(a.isnan(), b.isnan())
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-6 * b.nan_to_num().abs().max().item())
    torch.testing.assert_close(out.step_scores["probability"], ref.step_scores["probability"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layer_gradient_x_activation_equals_input_x_gradient(arch):
    """``a * d f / d a`` does not depend on a constant scale between the embedding layer's output and
    the attributed embeddings: both methods give the same map when the layer hooked is the one the
    model calls (transformers 5 ties T5/BART/mBART/M2M100/Pegasus embeddings by weight only: the
    ``shared`` module of ``get_input_embeddings()`` is never called by the encoder)."""
    side = "source_attributions" if built(arch)[0].config.is_encoder_decoder else "target_attributions"
    layer = _attribute(arch, [0, 1], "layer_gradient_x_activation")
    inputs = _attribute(arch, [0, 1], "input_x_gradient")
    for a, b in zip(layer.sequence_attributions, inputs.sequence_attributions):
        a, b = getattr(a, side), getattr(b, side)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.nan_to_num().abs().max().item(), equal_nan=True)
