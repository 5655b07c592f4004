"""Turning texts into a :class:`Batch`: tokenization, baselines and the positions to attribute."""

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..errors import InvalidInputError, TokenBoundaryWarning, TokenizerError
from ..utils.sequences import common_prefix_length
from .batch import Batch, pad_right


@dataclass
class SpecialIds:
    """Ids attribution needs, resolved once with inseq's fallbacks: UNK -> PAD -> EOS (-> BOS)."""

    bos: int | None  # decoder start for encoder-decoder models
    eos: int | None
    pad: int
    unk: int

    @classmethod
    def resolve(cls, model, tokenizer: PreTrainedTokenizerBase) -> "SpecialIds":
        config = model.config
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            eos = tokenizer.eos_token_id
        pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else tokenizer.pad_token_id
        if pad is None:
            pad = eos
        seq2seq = bool(config.is_encoder_decoder)
        bos = getattr(config, "decoder_start_token_id", None) if seq2seq else None
        if bos is None:
            bos = getattr(config, "bos_token_id", None)
            bos = tokenizer.bos_token_id if bos is None else bos
        if pad is None and not seq2seq:
            pad = bos
        unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad
        if pad is None or unk is None:
            raise TokenizerError(
                f"{type(tokenizer).__name__} has no pad, unk or eos token, so there is no baseline token and no "
                "padding: set one, e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the "
                "model's embeddings, or set model.config.pad_token_id."
            )
        if seq2seq and bos is None:
            raise TokenizerError("The model config has no decoder_start_token_id or bos_token_id; set one.")
        return cls(bos=bos, eos=eos, pad=pad, unk=unk)


# Tokenizations already made inside a ``reused_tokenizations()`` block: {(tokenizer, text, flags): ids}.
_REUSED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("inseq_lightning_tokenizations", default=None)


@contextlib.contextmanager
def reused_tokenizations() -> Iterator[None]:
    """Within the block, each text is tokenized once per tokenizer and flags.

    Workflows that go back and forth between texts and tokens (context attribution tokenizes the
    same few texts over a dozen times) open one around a call; the tokenizer must not change inside
    it. Nested blocks share the outermost one's tokenizations.
    """
    if _REUSED.get() is not None:
        yield
        return
    token = _REUSED.set({})
    try:
        yield
    finally:
        _REUSED.reset(token)


def token_text(tokenizer, token: str | None) -> str | None:
    """One token as text: the tokenizer's ``convert_tokens_to_string`` of that token alone (``"Ġcat"`` ->
    ``" cat"``), as inseq's ``clean_special_chars`` reads it; None when the tokenizer cannot read it (a
    merged or contrast label, a missing token)."""
    if token is None:
        return None
    try:
        return tokenizer.convert_tokens_to_string([token])
    except Exception:  # noqa: BLE001 - any tokenizer's failure on a string it did not make
        return None


def tokenize_ids(tokenizer, text: str, add_special_tokens: bool, as_target: bool = False) -> list[int]:
    """``tokenizer(text)["input_ids"]`` (``text_target`` when ``as_target``), reused inside a
    :func:`reused_tokenizations` block."""
    reused = _REUSED.get()
    key = (id(tokenizer), text, add_special_tokens, as_target)
    if reused is not None and key in reused:
        return list(reused[key])
    kwargs = {"text_target": text} if as_target else {"text": text}
    ids = list(tokenizer(**kwargs, add_special_tokens=add_special_tokens)["input_ids"])
    if reused is not None:
        reused[key] = tuple(ids)
    return ids


def _encode(tokenizer, text: str, add_special_tokens: bool, as_target: bool, bos: int | None) -> list[int]:
    ids = tokenize_ids(tokenizer, text, add_special_tokens, as_target)
    # Chat templates put a BOS in the text and the tokenizer adds another: keep one (inseq's fix).
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def prompt_boundary(tokenizer, prompt: str, full_text: str, prompt_ids: list[int], full_ids: list[int],
                    add_special_tokens: bool, name: str) -> int:
    """The index of the first token of ``full_ids`` (the tokenized ``full_text``) that holds a
    character after ``prompt``: the first attributed step.

    Tokenizing the prompt alone and skipping that many tokens is right only when the prompt's tokens
    are a prefix of the full text's. Otherwise (``"Answer: "`` + ``"the"``, where the space joins
    ``Ġthe``; ``"capi"`` + ``"tal"``) the boundary is located with the tokenizer's character offsets,
    so that every target character is attributed; a token that holds both prompt and target
    characters is attributed, with a :class:`TokenBoundaryWarning` naming it.
    """
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return len(prompt_ids)
    cut = len(prompt)
    start = None
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(full_text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        offsets = list(encoding["offset_mapping"])
        offsets = offsets[len(offsets) - len(full_ids):]  # a duplicate BOS dropped by _encode
        if list(encoding["input_ids"])[len(encoding["input_ids"]) - len(full_ids):] == full_ids:
            start = next((i for i, (_, end) in enumerate(offsets) if end > cut), len(full_ids))
            straddles = offsets[start][0] < cut if start < len(full_ids) else False
    if start is None:  # no offsets: the tokens both encodings share are the prompt's
        start = common_prefix_length(prompt_ids, full_ids)
        straddles = True
    if start == 0:
        raise InvalidInputError(
            f"{name}: the prompt ends inside the first token, which nothing precedes to predict it; end the prompt "
            "on a token boundary or make it longer"
        )
    if straddles and start < len(full_ids):
        token = tokenizer.convert_ids_to_tokens(full_ids[start])
        warnings.warn(
            f"{name}: the prompt ends inside token {token!r} of the full text (the two tokenize differently at "
            f"their boundary); that token is attributed as the first target token.", TokenBoundaryWarning, stacklevel=3
        )
    return start


def tokens_before_char(wrapper, text: str, char: int, skip_special_tokens: bool = False) -> int:
    """How many tokens of ``text``, encoded as a decoder-only model's full text is attributed, hold a
    character before ``char``: the ``attr_pos_end`` of a target that ends at ``char`` (a token that
    straddles ``char`` is counted in)."""
    tok = wrapper.tokenizer
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{type(tok).__name__} gives no character offsets; load its fast version "
                             "(use_fast=True) to attribute conversations")
    ids = encode_input(wrapper, text, skip_special_tokens)
    encoding = tok(text, return_offsets_mapping=True, add_special_tokens=not skip_special_tokens)
    offsets = list(encoding["offset_mapping"])[len(encoding["input_ids"]) - len(ids):]
    inside = [i for i, (start, end) in enumerate(offsets) if end > start and start < char]
    return inside[-1] + 1 if inside else 0


def encode_input(wrapper, text: str, skip_special_tokens: bool) -> list[int]:
    """The ids of an input text as attribution sees them (decoder-only: the prompt; encoder-decoder: the source)."""
    bos = wrapper.architecture.input_bos(wrapper.special_ids)
    return _encode(wrapper.tokenizer, text, not skip_special_tokens, False, bos)


def encode_as_target(wrapper, text: str, skip_special_tokens: bool) -> list[int]:
    """The ids of an encoder-decoder target text (the target tokenizer), without the decoder start token."""
    return _encode(wrapper.tokenizer, text, not skip_special_tokens, True, None)


def encode_target(wrapper, text: str, skip_special_tokens: bool) -> list[int]:
    """The target-side ids of ``text`` exactly as a batch holds them (decoder-only: prompt included;
    encoder-decoder: after the decoder start token)."""
    return wrapper.architecture.encode_target(wrapper, text, skip_special_tokens)


def baseline_ids(ids: list[int], special: SpecialIds, include_eos_baseline: bool) -> list[int]:
    """UNK at every position; EOS positions stay EOS unless ``include_eos_baseline``."""
    if include_eos_baseline:
        return [special.unk] * len(ids)
    return [special.eos if i == special.eos else special.unk for i in ids]


def check_texts(name: str, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"{name}[{i}] is a {type(text).__name__}; pass strings")
        if not text.strip():
            raise InvalidInputError(f"{name}[{i}] is empty; every text needs at least one token")


def _max_positions(model) -> int | None:
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_length(model, name: str, index: int, ids: list[int]) -> None:
    limit = _max_positions(model)
    if limit is not None and len(ids) > limit:
        raise InvalidInputError(
            f"{name}[{index}] is {len(ids)} tokens long but the model has {limit} positions; shorten the text "
            "or split it into several probes."
        )


def _position(value: int | list[int | None] | None, index: int) -> int | None:
    """``attr_pos_start``/``attr_pos_end`` for sequence ``index``: one value for all, or one per sequence."""
    return value[index] if isinstance(value, list) else value


def build_batch(
    wrapper,
    input_texts: list[str],
    generated_texts: list[str] | None,
    attr_pos_start: int | list[int | None] | None,
    attr_pos_end: int | list[int | None] | None,
    include_eos_baseline: bool,
    skip_special_tokens: bool,
    generated_ids: list[list[int]] | None = None,
) -> Batch:
    """Tokenize texts into a right-padded :class:`Batch` with the positions each sequence attributes.

    ``generated_ids`` (instead of ``generated_texts``) are target ids taken as they are: decoder-only,
    the prompt's ids followed by the continuation's; encoder-decoder, the decoder start token followed
    by the target's. A model's own generation is attributed this way, so that the attributed tokens
    are exactly the generated ones (decoding and re-tokenizing can merge, split or drop tokens).
    """
    if (generated_texts is None) == (generated_ids is None):
        raise ValueError("build_batch takes either generated_texts or generated_ids")
    batch = wrapper.architecture.build_batch(wrapper, input_texts, generated_texts, attr_pos_start, attr_pos_end,
                                             include_eos_baseline, skip_special_tokens, generated_ids)
    for i, pos in enumerate(batch.step_positions):
        if not pos:
            raise InvalidInputError(f"Nothing to attribute in sequence {i}: check attr_pos_start/attr_pos_end.")
    return batch.to(wrapper.device)


def _tokens(tok, ids: list[int]) -> list[str]:
    return [str(t) for t in tok.convert_ids_to_tokens(ids)]


def build_encoder_decoder_batch(wrapper, input_texts, generated_texts, attr_pos_start, attr_pos_end,
                                include_eos_baseline, skip_special_tokens, generated_ids) -> Batch:
    """:func:`build_batch` for encoder-decoder models: sources on the encoder, ``[decoder start] + target``
    on the decoder."""
    tok, special = wrapper.tokenizer, wrapper.special_ids
    add_special = not skip_special_tokens
    sources = [_encode(tok, t, add_special, False, None) for t in input_texts]
    if generated_ids is not None:
        targets = [ids if ids[:1] == [special.bos] else [special.bos] + ids for ids in map(list, generated_ids)]
    else:
        targets = [encode_target(wrapper, t, skip_special_tokens) for t in generated_texts]
    for i, (s, t) in enumerate(zip(sources, targets)):
        _check_length(wrapper.model, "input_texts", i, s)
        _check_length(wrapper.model, "generated_texts", i, t)
    positions = []
    for i, t in enumerate(targets):
        first, last = _position(attr_pos_start, i), _position(attr_pos_end, i)
        start = 1 if first is None else max(1, first)
        end = len(t) if last is None else min(len(t), last + 1)
        positions.append(list(range(start, end)))
    src_ids, src_mask = pad_right(sources, special.pad)
    src_base, _ = pad_right([baseline_ids(s, special, include_eos_baseline) for s in sources], special.pad)
    tgt_ids, tgt_mask = pad_right(targets, special.pad)
    # The decoder start token stays itself in the target baseline (inseq keeps BOS there).
    tgt_base, _ = pad_right(
        [[special.bos] + baseline_ids(t[1:], special, include_eos_baseline) for t in targets], special.pad
    )
    return Batch(tgt_ids, tgt_mask, tgt_base, [_tokens(tok, t) for t in targets], positions,
                 src_ids, src_mask, src_base, [_tokens(tok, s) for s in sources], prompt_lengths=[1] * len(targets))


def build_decoder_only_batch(wrapper, input_texts, generated_texts, attr_pos_start, attr_pos_end,
                             include_eos_baseline, skip_special_tokens, generated_ids) -> Batch:
    """:func:`build_batch` for decoder-only models: one sequence, the prompt followed by its continuation."""
    tok, special = wrapper.tokenizer, wrapper.special_ids
    add_special = not skip_special_tokens
    prompts = [_encode(tok, t, add_special, False, special.bos) for t in input_texts]
    if generated_ids is not None:
        fulls = [list(ids) for ids in generated_ids]
        for i, (p, f) in enumerate(zip(prompts, fulls)):
            if f[: len(p)] != p:
                raise InvalidInputError(f"generated_ids[{i}] does not start with the ids of its prompt")
        boundaries = [len(p) for p in prompts]
    else:
        fulls = [_encode(tok, t, add_special, False, special.bos) for t in generated_texts]
        boundaries = [prompt_boundary(tok, prompt, full, p, f, add_special, f"generated_texts[{i}]")
                      for i, (prompt, full, p, f) in enumerate(zip(input_texts, generated_texts, prompts, fulls))]
    positions = []
    for i, (boundary, f) in enumerate(zip(boundaries, fulls)):
        _check_length(wrapper.model, "generated_texts", i, f)
        first, last = _position(attr_pos_start, i), _position(attr_pos_end, i)
        start = boundary if first is None else max(boundary, first)
        end = len(f) if last is None else min(len(f), last)
        if start >= end:
            raise InvalidInputError(
                f"generated_texts[{i}] adds no token to its prompt within attr_pos_start..attr_pos_end; "
                "pass a longer continuation or widen the positions."
            )
        positions.append(list(range(start, end)))
    ids, mask = pad_right(fulls, special.pad)
    base, _ = pad_right([baseline_ids(f, special, include_eos_baseline) for f in fulls], special.pad)
    return Batch(ids, mask, base, [_tokens(tok, f) for f in fulls], positions, prompt_lengths=boundaries)
