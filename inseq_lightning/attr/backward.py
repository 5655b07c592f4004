"""The per-step backward: the gradients of every step's score w.r.t. the attributed inputs.

For a causal decoder every step's score comes from one shared forward, and the gradients of all
steps come from vectorised backwards (``torch.autograd.grad(..., is_grads_batched=True)``), one per
chunk of steps sized to a memory budget.

The backward is split at the input of the output projection (``lm_head``): each step's score depends
only on the hidden row that predicts it, so one ordinary backward of the summed scores gives every
step's gradient at that layer, and only the part below it (``[steps, L, hidden]`` instead of
``[steps, L, vocab]``) is vectorised. With a 50k vocabulary this removes most of the backward's work
and memory.

:class:`BackwardStrategy` holds the choices (split point, chunking, weighted sums over integration
points) and records what each call did, so that tests select and observe them.

**Segments.** A step's backward runs over the whole graph of the forward it comes from, although
the step only depends on the positions before it. When the forward ran in segments (each one's
keys and values carrying the gradient into the next, see ``EngineContext.forward``), the steps
predicted in segment ``s`` backpropagate from that segment's output-layer input, through segments
``<= s`` only: with 50 + 50 tokens and two segments, the first half of the steps skips the last fifth
of the positions.
"""

import contextlib
import itertools
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

MIB = 1024**2
# Below this a budget saves nothing anyone needs: a tiny model would take one step per backward to
# stay at inseq's few MiB and lose most of the batching's speed.
MEMORY_BUDGET_FLOOR_BYTES = 64 * MIB
# Sharded ranks must chunk identically (every backward is a collective), and a rank's view of the
# parameters holds only its shard: a fixed budget keeps them in lockstep.
SHARDED_MEMORY_BUDGET_BYTES = 80 * MIB


def default_memory_budget(model: torch.nn.Module) -> int:
    """What the vectorised backward may add on top of the forward pass: a quarter of the model's
    parameter memory, and never less than :data:`MEMORY_BUDGET_FLOOR_BYTES` (64 MiB). Batching steps
    then costs at most a fraction of what holding the model already costs on large models (a 7B model
    on a GPU batches many steps), and at most 64 MiB on small ones."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(weights // 4, MEMORY_BUDGET_FLOOR_BYTES)


@dataclass
class StepLayout:
    """Where the steps of a batch are: ``positions``/``valid`` ``[B, N]`` (see ``Batch.step_index``),
    the padded target length ``T``, and the model's sizes for the memory estimate."""

    positions: torch.Tensor
    valid: torch.Tensor
    target_length: int
    hidden_size: int
    num_layers: int
    inner_size: int | None = None  # the feed-forward width (None: 4 x hidden)
    num_heads: int = 8
    kv_dim: int | None = None  # keys (or values) per position and layer (None: hidden)
    vocab_size: int | None = None  # (None: VOCAB_SIZE_WHEN_UNKNOWN)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def num_steps(self) -> int:
        return self.positions.shape[1]


@dataclass
class BackwardRecord:
    """What one vectorised backward did: how many steps it covered, whether it started at the
    output projection's input (``split``) or at the scores, and from which forward segment (None:
    the forward ran whole)."""

    steps: int
    split: bool
    segment: int | None = None


@dataclass
class BackwardStrategy:
    """How the per-step gradients are computed. Pass one to ``attribute(backward_strategy=...)``.

    Args:
        split_at_head: start the vectorised backward at the output projection's input when the model
            allows it (a ``Linear`` head, not sharded); False always seeds the scores themselves.
        steps_per_backward: steps per vectorised backward; None sizes chunks to ``memory_budget_bytes``.
        memory_budget_bytes: what the vectorised backward may add; None: :func:`default_memory_budget`.
        sum_points: sum gradients over integration points/samples as each chunk comes (only the sum is
            held); False keeps every point's gradients and sums them at the end (n_steps times the memory;
            the same numbers).
        segments: run the forward in this many segments, so that each step's backward covers its
            prefix only (decoder-only models with a plain key/value cache, split at the head, every row
            of the batch attributing the same positions); 1 never does; None: :data:`AUTO_SEGMENTS`
            when the steps take at least that many backwards, else 1.

    Attributes:
        records: one :class:`BackwardRecord` per vectorised backward run with this strategy.
    """

    split_at_head: bool = True
    steps_per_backward: int | None = None
    memory_budget_bytes: int | None = None
    sum_points: bool = True
    segments: int | None = None
    records: list[BackwardRecord] = field(default_factory=list, repr=False)

    def __post_init__(self):
        for name in ("steps_per_backward", "segments"):
            value = getattr(self, name)
            if value is None:
                continue
            try:  # ints and numpy integers; not bools, floats or strings
                number = operator.index(value) if not isinstance(value, bool) else None
            except TypeError:
                number = None
            if number is None or number < 1:
                raise ValueError(f"BackwardStrategy.{name} must be a positive integer or None, got {value!r}")
            setattr(self, name, number)

    def steps_per_chunk(self, layout: StepLayout, rows: int, length: int, budget: int, split: bool = True,
                        segmented: bool = False) -> int:
        """How many steps one vectorised backward covers: as many as the memory budget holds
        (:func:`backward_bytes_per_step`), on a CPU at most :data:`CPU_POSITIONS_PER_BACKWARD` positions."""
        if self.steps_per_backward is not None:
            return max(1, min(layout.num_steps, self.steps_per_backward))
        steps = int(budget // max(backward_bytes_per_step(layout, rows, length, split, segmented), 1))
        if layout.positions.device.type == "cpu":
            steps = min(steps, CPU_POSITIONS_PER_BACKWARD // max(rows * length, 1))
        return max(1, min(layout.num_steps, steps))


# What the memory estimates assume of a config that does not say its vocabulary size.
VOCAB_SIZE_WHEN_UNKNOWN = 50_000

# The vectorised backward's matrix products have steps x positions rows. On a CPU, past about this many
# rows a backward gains nothing more (each weight is already read once for all of them) and its
# activations fall out of the caches: the fastest chunks measured were 20 steps of 40 positions on a
# 2x64 GPT-2, 4-8 steps of 100 on a 6x256 one and 8 of 100 on a 12x768 one (16 were slower on both).
# Accelerators are not capped (not measured; they favour large batches).
CPU_POSITIONS_PER_BACKWARD = 800


def backward_bytes_per_step(layout: StepLayout, rows: int, length: int, split: bool = True,
                            segmented: bool = False) -> int:
    """What one more step adds to a vectorised backward, in bytes (float32): the gradients it holds at
    once inside one layer (the feed-forward's inner activations twice, a few hidden-size tensors, the
    attention scores twice); a layer's are freed before the next layer's are made. Measured on a 6x256
    GPT-2 with 100 positions: 1.5 MB a step, estimated 1.9 MB.

    ``split``: False when the backward starts at the scores, not at the output layer's input: each step
    then also holds the gradient of the logits (twice the vocabulary per position). ``segmented``: the
    forward ran in segments: autograd finishes a later segment before it enters an earlier one, so the
    gradients of the earlier segments' keys and values (every layer's) wait meanwhile."""
    inner = layout.inner_size or 4 * layout.hidden_size
    per_position = 2 * inner + 4 * layout.hidden_size + 2 * layout.num_heads * length
    if not split:
        per_position += 2 * (layout.vocab_size or VOCAB_SIZE_WHEN_UNKNOWN)
    if segmented:
        per_position += 2 * (layout.kv_dim or layout.hidden_size) * max(layout.num_layers, 1)
    return rows * length * 4 * per_position


# Two segments: a third saved less than it cost on a 12x768 GPT-2 (each segment a backward passes through
# reads every weight once more) and about as much as it cost on a 6x256 one; two were the fastest on both.
AUTO_SEGMENTS = 2


def plan_segments(strategy: BackwardStrategy, layout: StepLayout, chunk: int) -> list[range] | None:
    """The steps of each forward segment (consecutive, whole chunks of ``chunk`` steps), or None for
    one whole forward. Only when every row attributes the same positions (one sequence, or stacked
    copies of it): a segment's steps are then the same for every row."""
    wanted = strategy.segments
    chunks = -(-layout.num_steps // max(chunk, 1))
    if wanted is None:
        wanted = AUTO_SEGMENTS if chunks >= AUTO_SEGMENTS else 1
    wanted = min(wanted, chunks)
    if wanted <= 1 or not bool(layout.valid.all()) or not bool((layout.positions == layout.positions[:1]).all()):
        return None
    # whole chunks per segment, spread evenly
    bounds = [round(chunks * i / wanted) * chunk for i in range(wanted)] + [layout.num_steps]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


class HeadRecorder:
    """Keeps the input of the output projection during a forward: the split point of the backward.

    Not on sharded models: a backward that stops at the head runs FSDP's end-of-backward callback,
    which reshards the root's parameters that the rest of the backward still needs."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled
        self.inputs: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        if not torch.is_grad_enabled():  # e.g. a step function's extra forwards: keep what was recorded
            yield
            return
        self.inputs = []
        head = self.model.get_output_embeddings()
        # A Linear maps each row on its own, which is what makes the split exact.
        if not isinstance(head, torch.nn.Linear) or not self.enabled:
            yield
            return
        handle = head.register_forward_hook(lambda module, args, output: self.inputs.append(args[0]))
        try:
            yield
        finally:
            handle.remove()

    def split_point(self, rows: int, target_length: int) -> torch.Tensor | None:
        """The output projection's input of the last forward, when the backward can split there:
        exactly one call, on ``[rows, T', hidden]`` (the last ``T' <= T`` positions), inside the graph."""
        if len(self.inputs) != 1:
            return None
        head = self.inputs[0]
        if head.ndim != 3 or not head.requires_grad or head.shape[0] != rows or head.shape[1] > target_length:
            return None
        return head


def step_gradients(
    strategy: BackwardStrategy,
    layout: StepLayout,
    budget: int,
    scores: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    head: torch.Tensor | None,
    retain_graph: bool = False,
    row_weights: Sequence[torch.Tensor | float] | None = None,
    report: Callable[[range], None] = lambda steps: None,
    segments: Sequence[tuple[torch.Tensor, range]] | None = None,
) -> list[torch.Tensor]:
    """Gradients of each step's score w.r.t. each input: ``[rows, L, N, ...]`` per input.

    Args:
        strategy: the choices (and the record of what was done).
        layout: where the steps are.
        budget: the memory budget in bytes (when the strategy does not fix the chunk size).
        scores: ``[rows, N]`` attributed scores (0 on padding steps).
        inputs: the tensors to differentiate, each ``[rows, L, ...]``.
        head: the output projection's input of the forward (:meth:`HeadRecorder.split_point`), or None.
        retain_graph: keep the graph after the last chunk.
        row_weights: one per input, broadcastable to it (e.g. ``[R*B, 1, 1]``) or a number: the rows
            are ``R`` stacked copies of the batch (integration points, samples) and the gradients are
            weighted and summed over the copies, giving ``[B, L, N, ...]``.
        report: called with the range of steps after each chunk (progress).
        segments: when the forward ran in segments, each segment's output-projection input (the last
            ``T_s`` positions before the segment's end) and the steps it predicts; ``head`` is then unused.
    """
    if row_weights is not None and not strategy.sum_points:
        grads = _step_gradients(strategy, layout, budget, scores, inputs, head, retain_graph, None, report, segments)
        out = []
        for g, w in zip(grads, row_weights):
            weighted = g * (w.unsqueeze(2) if isinstance(w, torch.Tensor) else w)
            out.append(weighted.view(-1, layout.batch_size, *g.shape[1:]).sum(0))
        return out
    return _step_gradients(strategy, layout, budget, scores, inputs, head, retain_graph, row_weights, report,
                           segments)


def _step_gradients(strategy, layout, budget, scores, inputs, head, retain_graph, row_weights, report, segments=None):
    rows, n = scores.shape
    split = strategy.split_at_head and (segments is not None or head is not None)
    chunk = strategy.steps_per_chunk(layout, rows, max(t.shape[1] for t in inputs), budget, split,
                                     split and segments is not None)
    if segments is not None and strategy.split_at_head:
        # One ordinary backward down to every segment's output-projection input; then each segment's
        # steps from its own (a segment's end is where the next one's positions start).
        heads = [h for h, _ in segments]
        head_grads = torch.autograd.grad(scores.sum(), heads, retain_graph=retain_graph)
        ends = _segment_ends(layout, segments)
        plan = [(i, h, _head_seeds(layout, g, end), steps)
                for i, ((h, steps), g, end) in enumerate(zip(segments, head_grads, ends))]
        split = True
    else:
        split = strategy.split_at_head and head is not None
        if split:
            # Every step's gradient at the output projection's input, in one ordinary backward. Without
            # retain_graph this frees what only the part above the head saved (the softmax over the
            # vocabulary); the part below is not run, so it keeps its buffers.
            (head_grad,) = torch.autograd.grad(scores.sum(), head, retain_graph=retain_graph)
            plan = [(None, head, _head_seeds(layout, head_grad), range(n))]
        else:
            plan = [(None, scores, _score_seeds(rows, n, scores), range(n))]
    # Each chunk's gradients go straight into the result, allocated once up front: the heap then
    # reuses one hole for every chunk's temporary instead of stacking them up beside the graph's
    # buffers, and there is no join (a second copy) at the end.
    out_rows = layout.batch_size if row_weights is not None else rows
    # Sums over integration points accumulate in float32 even for half-precision models.
    dtypes = [torch.promote_types(x.dtype, torch.float32) if row_weights is not None else x.dtype for x in inputs]
    results = [x.new_empty((out_rows, x.shape[1], n, *x.shape[2:]), dtype=d) for x, d in zip(inputs, dtypes)]
    chunks = [(segment, outputs, seeds_of, range(start, min(start + chunk, part.stop)))
              for segment, outputs, seeds_of, part in plan for start in range(part.start, part.stop, chunk)]
    for number, (segment, outputs, seeds_of, steps) in enumerate(chunks):
        # the later segments' graphs hold the earlier ones: keep all until the last backward
        keep = retain_graph or number + 1 < len(chunks)
        grads = batched_grad(outputs, inputs, seeds_of(steps), keep)
        strategy.records.append(BackwardRecord(len(steps), split, segment))
        for i, (result, g) in enumerate(zip(results, grads)):
            if g is None:  # an input the scores do not depend on: zero gradient
                result[:, :, steps.start : steps.stop].zero_()
                continue
            if row_weights is not None:  # [steps, R*B, L, D] -> [steps, B, L, D], weighted sum over R
                g = (g.to(result.dtype) * row_weights[i]).view(len(steps), -1, out_rows, *g.shape[2:]).sum(1)
            result[:, :, steps.start : steps.stop] = g.movedim(0, 2)  # [steps, rows, L, D] -> [rows, L, steps, D]
        del grads
        report(steps)
    return results


def _segment_ends(layout: StepLayout, segments: Sequence[tuple[torch.Tensor, range]]) -> list[int]:
    """Where each segment's positions end: where the next segment's first step is predicted, the
    sequence's end for the last."""
    starts = [int(layout.positions[0, steps.start]) - 1 for _, steps in segments[1:]]
    return starts + [layout.target_length]


def _head_seeds(layout: StepLayout, head_grad: torch.Tensor, end: int | None = None) -> Callable[[range], torch.Tensor]:
    """Per-step seeds ``[steps, rows, T, hidden]``: step k keeps only the row that predicts it.
    ``end``: the absolute position where the head's input ends (default: the sequence's end)."""
    rows, length, _ = head_grad.shape
    repeat = rows // layout.batch_size
    predicting = (layout.positions - 1).repeat(repeat, 1).T  # [N, rows]
    valid = layout.valid.repeat(repeat, 1).T
    # absolute position of each row of the head's input (the last ``length`` before ``end``)
    time = torch.arange(length, device=head_grad.device) + ((layout.target_length if end is None else end) - length)
    # [N, rows, T, 1]: which row of the head's input predicts each (valid) step
    pick = ((predicting.unsqueeze(-1) == time) & valid.unsqueeze(-1)).unsqueeze(-1).to(head_grad.dtype)
    return lambda steps: pick[steps.start : steps.stop] * head_grad


def _score_seeds(rows: int, n: int, scores: torch.Tensor) -> Callable[[range], torch.Tensor]:
    """One-hot seeds ``[steps, rows, N]`` on the scores themselves (no split point)."""

    def seeds(steps: range) -> torch.Tensor:
        eye = torch.zeros(len(steps), rows, n, dtype=scores.dtype, device=scores.device)
        for j, k in enumerate(steps):
            eye[j, :, k] = 1.0
        return eye

    return seeds


def batched_grad(
    outputs: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: torch.Tensor, retain_graph: bool
) -> tuple[torch.Tensor, ...]:
    """Vectorised backward (one pass for many steps); a plain loop where vmap cannot batch an op."""
    if grad_outputs.shape[0] == 1:  # one step: a plain backward is faster than vmap's batching rules
        grads = torch.autograd.grad(outputs, list(inputs), grad_outputs=grad_outputs[0], retain_graph=retain_graph,
                                    allow_unused=True)
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    try:
        return torch.autograd.grad(
            outputs, list(inputs), grad_outputs=grad_outputs, is_grads_batched=True, retain_graph=retain_graph,
            allow_unused=True,
        )
    except RuntimeError:
        outs = [
            torch.autograd.grad(outputs, list(inputs), grad_outputs=g, retain_graph=True, allow_unused=True)
            for g in grad_outputs
        ]
        return tuple(torch.stack(parts) for parts in zip(*outs))
