"""LIME (Ribeiro et al., 2016) as inseq 0.7.1 runs it: for each step, ``n_samples`` perturbations of
the attributed embeddings, a weighted ridge regression of the attributed score on them, and the
regression's coefficients as the step's (granular) attributions.

inseq's perturbation, kept for its numbers: each token is kept with probability ``1 - mask_prob``,
and a masked token's embedding vector is filled with the *id* of the UNK (or PAD) token as a
number; the sample weight is the count of embedding entries left unchanged. The draws come from
this method's own generator (``seed``) in inseq's order (step by step, sample by sample, one draw
per token the step sees), so with inseq's global seed equal to ``seed`` both libraries draw the same
masks. What changes is the cost: inseq runs one forward per sample and step; here the samples of a
step run as one batched forward.
"""

import torch

from ...errors import InvalidInputError
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method


def _ridge():
    try:
        import sklearn  # noqa: F401  (SkLearnLinearModel imports it lazily: fail here with a clear message)
        from captum._utils.models.linear_model import SkLearnLinearModel
    except ImportError as error:
        raise InvalidInputError("lime fits scikit-learn's Ridge regression: pip install 'inseq-lightning[methods]' "
                                "(or scikit-learn)") from error
    return SkLearnLinearModel("linear_model.Ridge")


@register_method
class Lime(AttributionMethod):
    """inseq's ``lime``.

    Args:
        ctx: the engine context of one batch.
        n_samples: perturbations per step (inseq's default 50).
        mask_prob: probability that a token is masked.
        mask_token: ``"unk"`` or ``"pad"``: whose id fills a masked token's embedding.
        seed: seed of the method's generator (None: drawn from torch's global RNG).
    """

    name = "lime"
    supports_attribute_target = False  # one attributed input, as in inseq

    def attribute(self, ctx: EngineContext, n_samples: int = 50, mask_prob: float = 0.3, mask_token: str = "unk",
                  seed: int | None = None, **kwargs) -> MethodResult:
        from torch.utils.data import DataLoader, TensorDataset

        if mask_token not in ("unk", "pad"):
            raise InvalidInputError(f"mask_token must be 'unk' or 'pad', got {mask_token!r}")
        if not 0 <= mask_prob <= 1 or n_samples < 1:
            raise InvalidInputError(f"lime needs 0 <= mask_prob <= 1 and n_samples >= 1 (got {mask_prob}, {n_samples})")
        special = ctx.model.special_ids
        fill = float(special.unk if mask_token == "unk" else special.pad)
        (x,) = ctx.embeddings()
        with torch.no_grad():
            ctx.scorer.record_step_scores(ctx.step_logits(ctx.forward([x]).logits))
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
        probs = torch.tensor([mask_prob, 1 - mask_prob])
        visible = ctx.visible_lengths(0)
        batch, length = x.shape[0], x.shape[1]
        result = torch.zeros(batch, length, ctx.num_steps, x.shape[-1], dtype=torch.float64)
        ctx.gradient_passes = 1
        for n in range(ctx.num_steps):
            # masks[k, b, j]: keep token j of sequence b in sample k (inseq draws over what the step sees)
            masks = torch.ones(n_samples, batch, length, dtype=x.dtype)
            for b in range(batch):
                if not ctx.valid[b, n]:
                    continue
                seen = int(visible[b, n])
                for k in range(n_samples):
                    masks[k, b, :seen] = torch.multinomial(probs, seen, replacement=True, generator=generator).to(x.dtype)
            keep = masks.to(x.device).unsqueeze(-1)
            samples = x.unsqueeze(0) * keep + (1 - keep) * fill  # [K, B, L, D]
            with torch.no_grad():
                scores = ctx.attributed_scores(ctx.forward([samples.reshape(-1, length, x.shape[-1])],
                                                           repeat=n_samples))
            scores = scores.view(n_samples, batch, -1)[:, :, n]
            for b in range(batch):
                if not ctx.valid[b, n]:
                    continue
                seen = int(visible[b, n])
                inputs = samples[:, b, :seen].reshape(n_samples, -1).double().cpu()
                unchanged = (samples[:, b, :seen] == x[b, :seen].unsqueeze(0)).sum(dim=(1, 2)).double().cpu()
                model = _ridge()
                # The loader draws its base seed from the generator, as inseq's does from the global one:
                # the next step's masks then come out of the same stream as inseq's.
                model.fit(DataLoader(TensorDataset(inputs, scores[:, b].double().cpu(), unchanged),
                                     batch_size=n_samples, generator=generator))
                result[b, :seen, n] = model.representation().reshape(seen, -1).double()
                # inseq's surrogate (captum's) initialises an nn.Linear(inputs, 1) from the global RNG before
                # fitting: the same draws from this generator keep the next step's masks in inseq's stream.
                torch.empty(1, inputs.shape[1]).uniform_(generator=generator)
                torch.empty(1).uniform_(generator=generator)
            ctx.report_steps_done(range(n, n + 1))
        return MethodResult(*ctx.split([result.to(x.dtype)]))
