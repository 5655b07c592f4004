"""Tokenized, padded inputs for one attribution pass, and the positions each sequence attributes."""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Right-padded token ids for a batch of B sequences.

    Right padding keeps every real token at the position it has when the sequence is alone, so
    batched runs equal single runs on absolute-position models without position ids tricks.

    Attributes:
        target_ids: ``[B, T]`` decoder-side ids (decoder-only: the whole prompt + continuation;
            encoder-decoder: decoder start token + target).
        target_mask: ``[B, T]`` 1 for real tokens.
        target_baseline_ids: ``[B, T]`` ids whose embeddings are the attribution baseline.
        step_positions: per sequence, the target positions attributed (each predicted from the
            position before it).
        source_ids, source_mask, source_baseline_ids: ``[B, S]`` encoder inputs (encoder-decoder only).
        prompt_lengths: per sequence, the first position of the continuation.
    """

    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_baseline_ids: torch.Tensor
    target_tokens: list[list[str]]
    step_positions: list[list[int]]
    source_ids: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None
    source_baseline_ids: torch.Tensor | None = None
    source_tokens: list[list[str]] | None = None
    # Where each target's continuation starts (decoder-only: the prompt's length in tokens; encoder-
    # decoder: 1, after the decoder start token).
    prompt_lengths: list[int] | None = None

    @property
    def size(self) -> int:
        return self.target_ids.shape[0]

    @property
    def max_steps(self) -> int:
        return max(len(p) for p in self.step_positions)

    def step_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``[B, N]`` tensors of attributed positions and a validity mask (padding steps
        point at position 1 so that gathers stay in range)."""
        n = self.max_steps
        positions = torch.ones(self.size, n, dtype=torch.long)
        valid = torch.zeros(self.size, n, dtype=torch.bool)
        for i, pos in enumerate(self.step_positions):
            positions[i, : len(pos)] = torch.tensor(pos, dtype=torch.long)
            valid[i, : len(pos)] = True
        return positions.to(self.target_ids.device), valid.to(self.target_ids.device)

    def to(self, device: torch.device | str) -> "Batch":
        for name in ("target_ids", "target_mask", "target_baseline_ids", "source_ids", "source_mask",
                     "source_baseline_ids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, max_len]`` ids padded on the right with ``pad_id`` and the matching 0/1 mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask
