"""Discretized integrated gradients (Sanyal & Ren, 2021) as inseq 0.7.1 computes it.

Instead of a straight line, each token moves from its baseline to its own embedding along a
*monotonic* path through anchor words of the vocabulary (its nearest neighbours in embedding
space, chosen greedily or by the count of monotonic dimensions), and the gradients are summed
with the path's own increments. A token's path depends only on its id and its baseline's, so the
paths are built once per distinct token (inseq rebuilds every prefix's at every step) and every
path point is one forward shared by every step.
"""

import torch

from ...errors import InvalidInputError
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method
from .gradient import _gradients_at

STRATEGIES = ("greedy", "maxcount")


def _monotonic_dims(anchor: torch.Tensor, baseline: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dimensions where ``anchor`` lies between ``x`` and ``baseline`` (inseq's definition)."""
    return (((baseline > x) & (baseline >= anchor) & (anchor >= x))
            | ((baseline < x) & (baseline <= anchor) & (anchor <= x))
            | ((baseline == x) & (baseline == anchor) & (anchor == x)))


def _monotonic_vec(anchor: torch.Tensor, baseline: torch.Tensor, x: torch.Tensor, n_steps: int) -> torch.Tensor:
    """``anchor`` with its non-monotonic dimensions moved a ``1/n_steps`` step from ``x`` towards the baseline."""
    outside = ~_monotonic_dims(anchor, baseline, x)
    if not outside.any():
        return anchor
    out = anchor.clone()
    out[outside] = x[outside] - (1.0 / n_steps) * (x[outside] - baseline[outside])
    return out


class PathBuilder:
    """Monotonic paths through a vocabulary's embeddings (inseq's ``MonotonicPathBuilder``)."""

    def __init__(self, vocabulary: torch.Tensor, n_neighbors: int, special_ids: set[int]):
        try:
            from sklearn.neighbors import kneighbors_graph
        except ImportError as error:
            raise InvalidInputError("discretized_integrated_gradients finds anchor words with scikit-learn: "
                                    "pip install 'inseq-lightning[methods]' (or scikit-learn)") from error
        self.vocabulary = vocabulary
        self.graph = kneighbors_graph(vocabulary.numpy(), n_neighbors=n_neighbors, mode="distance", n_jobs=1)
        self.special_ids = special_ids

    def _distance(self, strategy: str, anchor: int, baseline: int, word: int, n_steps: int) -> float:
        v = self.vocabulary
        if strategy == "greedy":
            moved = _monotonic_vec(v[anchor], v[baseline], v[word], n_steps)
            return float(torch.linalg.vector_norm(v[anchor] - moved))
        return float(10000 - _monotonic_dims(v[anchor], v[baseline], v[word]).sum())

    def _closest(self, word: int, baseline: int, path: list[int], strategy: str, n_steps: int) -> int:
        if word == baseline:
            return baseline
        candidates = [int(a) for a in self.graph[word].tocoo().col if int(a) not in path and int(a) != baseline]
        if not candidates:
            return baseline
        distances = {a: self._distance(strategy, a, baseline, word, n_steps) for a in candidates}
        return min(distances.items(), key=lambda pair: pair[1])[0]

    def path(self, word: int, baseline: int, n_steps: int, strategy: str) -> torch.Tensor:
        """``[n_steps, D]`` embeddings from the baseline (first) to the word (last)."""
        if word in self.special_ids:
            words = [word] * (n_steps - 1)
        else:
            words = [word]
            for _ in range(n_steps - 2):
                word = self._closest(word, baseline, words, strategy, n_steps)
                words.append(word)
        v = self.vocabulary
        embeddings = [v[words[0]]]
        for anchor in words[1:]:
            embeddings.append(_monotonic_vec(v[anchor], v[baseline], embeddings[-1], n_steps))
        embeddings.append(v[baseline])
        return torch.stack(embeddings[::-1])


def _path_builder(ctx: EngineContext, n_neighbors: int) -> PathBuilder:
    """One builder per model, table version and neighbour count (the k-NN graph of a 50k vocabulary
    takes a while; inseq pickles it to disk, here it lives as long as the wrapper)."""
    table = ctx.adapter.input_layer().weight
    key = (table.data_ptr(), table._version, n_neighbors)
    cache = ctx.model.__dict__.setdefault("_dig_path_builders", {})
    if key not in cache:
        cache.clear()
        vocabulary = (table.detach().float().cpu() * ctx.adapter.embed_scale)
        special = set(ctx.model.tokenizer.all_special_ids)
        cache[key] = PathBuilder(vocabulary, n_neighbors, special)
    return cache[key]


@register_method
class DiscretizedIntegratedGradients(AttributionMethod):
    """inseq's ``discretized_integrated_gradients``.

    Args:
        ctx: the engine context of one batch.
        n_steps: points per path (inseq's default 50).
        method: ``"greedy"`` (anchor closest to its monotonic projection) or ``"maxcount"`` (anchor with
            the most monotonic dimensions), inseq's path strategies.
        n_neighbors: neighbours per word in the k-NN graph of the vocabulary (inseq's 50).
        multiply_by_inputs: multiply by ``input - baseline`` (inseq's default: False).
    """

    name = "discretized_integrated_gradients"
    supports_attribute_target = False

    def attribute(self, ctx: EngineContext, n_steps: int = 50, method: str = "greedy", n_neighbors: int = 50,
                  multiply_by_inputs: bool = False, **kwargs) -> MethodResult:
        if method not in STRATEGIES:
            raise InvalidInputError(f"method must be one of {', '.join(STRATEGIES)} for discretized_integrated_gradients,"
                                    f" got {method!r}")
        if n_steps < 2:
            raise InvalidInputError(f"n_steps must be at least 2, got {n_steps}")
        builder = _path_builder(ctx, n_neighbors)
        ids, base_ids = ctx.attributed_ids(), ctx.attributed_ids(baseline=True)
        (x,) = ctx.embeddings()
        paths: dict[tuple[int, int], torch.Tensor] = {}
        points = torch.empty(n_steps, *x.shape, dtype=x.dtype)
        for b in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                pair = (int(ids[b, j]), int(base_ids[b, j]))
                if pair not in paths:
                    paths[pair] = builder.path(*pair, n_steps, method)
                points[:, b, j] = paths[pair]
        points = points.to(x.device)
        # the path's own increments weight each point's gradients (the last point's is 0)
        increments = torch.cat([points[1:] - points[:-1], torch.zeros_like(points[:1])])
        with torch.no_grad():  # step scores at the real inputs
            ctx.record_step_scores(ctx.step_logits(ctx.forward([x]).logits))
        ctx.gradient_passes = 1
        (total,) = _gradients_at(ctx, [points.reshape(-1, *x.shape[1:])], n_steps,
                                 row_weights=[increments.reshape(-1, *x.shape[1:])])
        if multiply_by_inputs:
            total = total * (points[-1] - points[0]).unsqueeze(2)
        return MethodResult(*ctx.split([total]))
