"""Contrastive inputs: what the contrastive step functions compare each step with.

inseq's arguments, validated once per ``attribute()`` call (:class:`ContrastSpec`):

- ``contrast_targets``: one alternative target per input. Decoder-only: the full text (prompt +
  alternative continuation), as ``generated_texts``, or another prompt and continuation when
  ``contrast_targets_alignments`` are given; encoder-decoder: the alternative target.
- ``contrast_sources``: one alternative source per input (encoder-decoder). On a decoder-only model
  (an extension of inseq, which refuses it) it is an alternative *prompt*: the contrast sequence is
  that prompt followed by the original continuation, aligned token for token.
- ``contrast_targets_alignments``: ``[(target_position, contrast_position), ...]`` per input (one list
  for a single input), positions in the token lists of the full target and contrast sequences
  (decoder-only: prompt included; encoder-decoder: decoder start token included). Attributed positions
  with no pair are aligned right to left, the last attributed token with the last contrast token
  (inseq's fill). ``"auto"`` needs inseq's LaBSE word aligner, which is downloaded at run time: refused.
- ``contrast_force_inputs``: as attributed function, score the contrast inputs' forward instead of
  the original one (gradients then only flow through the original side).

Every step's contrastive logits come from **one** forward over the contrast inputs (a causal
decoder's logits at position ``j - 1`` depend only on the contrast prefix up to ``j``), not one
forward per step as in inseq.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..models.batch import Batch

CONTRAST_ARGUMENTS = ("contrast_sources", "contrast_targets", "contrast_targets_alignments", "contrast_force_inputs")


@dataclass(frozen=True)
class ContrastSpec:
    """Validated contrastive arguments of one ``attribute()`` call (one entry per input text)."""

    sources: list[str] | None
    targets: list[str] | None
    alignments: list[list[tuple[int, int]] | None] | None
    force_inputs: bool

    @classmethod
    def from_kwargs(cls, argument_sets: Sequence[dict[str, Any]], n_inputs: int) -> "ContrastSpec | None":
        """The contrast arguments given to the attributed function or the step functions (the
        attributed function's first, as inseq reads them); None when none is given."""

        def pick(name):
            for args in argument_sets:
                if args.get(name) is not None:
                    return args[name]
            return None

        sources, targets = pick("contrast_sources"), pick("contrast_targets")
        alignments, force = pick("contrast_targets_alignments"), bool(pick("contrast_force_inputs"))
        if sources is None and targets is None:
            if alignments is not None:
                raise InvalidInputError("contrast_targets_alignments requires contrast_targets; pass the contrast "
                                        "targets the alignments point into")
            return None
        return cls(_texts("contrast_sources", sources, n_inputs), _texts("contrast_targets", targets, n_inputs),
                   _alignments(alignments, n_inputs) if alignments is not None else None, force)


def _texts(name: str, value, n_inputs: int) -> list[str] | None:
    if value is None:
        return None
    texts = [value] if isinstance(value, str) else list(value)
    if len(texts) != n_inputs:
        raise InvalidInputError(f"{name} has {len(texts)} texts for {n_inputs} input texts; pass one per input text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{name}[{i}] must be a non-empty string, got {text!r}")
    return texts


def _alignments(value, n_inputs: int) -> list[list[tuple[int, int]] | None]:
    if isinstance(value, str):
        raise InvalidInputError(
            f"contrast_targets_alignments={value!r} needs inseq's LaBSE word aligner, downloaded at run time; pass "
            "explicit [(target_position, contrast_position), ...] pairs, or none for right-aligned 1:1 positions"
        )
    pairs = list(value)
    if pairs and isinstance(pairs[0], tuple | list) and len(pairs[0]) == 2 and all(isinstance(x, int) for x in pairs[0]):
        pairs = [pairs]  # one list of pairs: the single input's
    if len(pairs) != n_inputs:
        raise InvalidInputError(f"contrast_targets_alignments has {len(pairs)} lists of pairs for {n_inputs} input "
                                "texts; pass one list per input text")
    out = []
    for i, seq in enumerate(pairs):
        if seq is None:
            out.append(None)
            continue
        checked = []
        for pair in seq:
            if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(x, int) for x in pair)):
                raise InvalidInputError(f"contrast_targets_alignments[{i}] holds {pair!r}; each alignment is a "
                                        "(target_position, contrast_position) pair of ints")
            checked.append((int(pair[0]), int(pair[1])))
        out.append(checked)
    return out


def align_positions(positions: list[int], target_length: int, contrast_length: int,
                    pairs: list[tuple[int, int]] | None, name: str) -> list[int]:
    """The contrast position aligned with each attributed target position (inseq's rules: the first
    pair of a position whose contrast side is not yet taken, else its first pair; positions without
    a pair aligned right to left from the last contrast token)."""
    chosen: dict[int, int] = {}
    by_position: dict[int, list[int]] = {}
    for p0, p1 in sorted(set(pairs or [])):
        if not (0 <= p0 < target_length and 0 <= p1 < contrast_length):
            raise InvalidInputError(
                f"{name}: alignment ({p0}, {p1}) is out of range: the target has {target_length} tokens and the "
                f"contrast target {contrast_length} (positions count the prompt / decoder start token)"
            )
        by_position.setdefault(p0, []).append(p1)
    taken: set[int] = set()
    for p in positions:
        matches = by_position.get(p)
        if matches:
            free = [p1 for p1 in matches if p1 not in taken]
            chosen[p] = free[0] if free else matches[0]
            taken.add(chosen[p])
    for step, p in enumerate(reversed(positions), start=1):
        if p not in chosen:
            chosen[p] = contrast_length - step if contrast_length - step > 0 else contrast_length - 1
    aligned = [chosen[p] for p in positions]
    for p, j in zip(positions, aligned):
        if j < 1:
            raise InvalidInputError(f"{name}: target position {p} is aligned with contrast position {j}, which no "
                                    "token precedes; align it with a later contrast token or lengthen the contrast")
    return aligned


@dataclass
class ContrastBatch:
    """The contrast inputs of one batch, ready for one forward.

    Attributes:
        target_ids / target_mask: ``[B, Tc]`` contrast target side (decoder-only: the whole sequence).
        source_ids / source_mask: ``[B, S']`` encoder inputs (encoder-decoder), the contrast sources or
            the original ones.
        aligned: ``[B, N]`` the contrast position aligned with each step (padding steps: 1).
        tokens: the contrast target tokens of each sequence.
    """

    target_ids: torch.Tensor
    target_mask: torch.Tensor
    source_ids: torch.Tensor | None
    source_mask: torch.Tensor | None
    aligned: torch.Tensor
    aligned_lists: list[list[int]]
    tokens: list[list[str]]

    def step_target_ids(self) -> torch.Tensor:
        """``[B, N]`` the contrast token aligned with each step."""
        return self.target_ids.gather(1, self.aligned)


def build_contrast_batch(wrapper, batch: "Batch", spec: ContrastSpec, indices: Sequence[int], input_texts: list[str],
                         skip_special_tokens: bool) -> ContrastBatch:
    """Tokenize the contrast inputs of the sequences ``indices`` of the call into a :class:`ContrastBatch`."""
    from ..models.batch import pad_right

    special = wrapper.special_ids
    targets, sources, aligned = [], [], []
    for row, i in enumerate(indices):
        own = batch.target_ids[row, : int(batch.target_mask[row].sum())].tolist()
        positions = batch.step_positions[row]
        pairs = spec.alignments[i] if spec.alignments is not None else None
        source, contrast, pairs = wrapper.architecture.contrast_sequence(
            wrapper, spec, i, input_texts[i], own, batch.prompt_lengths[row], positions, pairs, skip_special_tokens)
        if source is not None:
            sources.append(source)
        targets.append(contrast)
        aligned.append(align_positions(positions, len(own), len(contrast), pairs, f"contrast for input {i}"))
    tgt_ids, tgt_mask = pad_right(targets, special.pad)
    src_ids = src_mask = None
    if sources:
        src_ids, src_mask = pad_right(sources, special.pad)
    n = max(len(a) for a in aligned)
    aligned_t = torch.ones(len(aligned), n, dtype=torch.long)
    for row, a in enumerate(aligned):
        aligned_t[row, : len(a)] = torch.tensor(a, dtype=torch.long)
    device = batch.target_ids.device
    tokens = [[str(t) for t in wrapper.tokenizer.convert_ids_to_tokens(ids)] for ids in targets]
    return ContrastBatch(tgt_ids.to(device), tgt_mask.to(device), None if src_ids is None else src_ids.to(device),
                         None if src_mask is None else src_mask.to(device), aligned_t.to(device), aligned, tokens)
