"""Continuous relaxations of argmax and of sampling (Goyal et al. 2017, sections 3.1 and 3.2).

Both return the weights ``w`` of a soft one-hot vector over the vocabulary; the soft embedding fed
to the decoder is ``sum_y e(y) w(y)`` (:func:`fairseq_ext.modules.embedding_inputs.soft_embeddings`).

* soft argmax (section 3.1):                   w = softmax(alpha * s)
* soft reparametrised sample (section 3.2):    w = softmax(alpha * (s + G)),  G_y = -log(-log U_y)

As alpha grows, the first tends to the one-hot of argmax_y s(y) and the second to the one-hot of a
Gumbel-max sample, i.e. a draw from softmax(s).  Both are invariant to adding a constant to every
score of a row, so raw logits and log-probabilities give the same weights.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from fairseq.dataclass import ChoiceEnum

from fairseq_ext.modules.embedding_inputs import soft_embeddings
from fairseq_ext.modules.schedules import ALPHA_CEILING

RELAXATION_CHOICES = ChoiceEnum(["greedy", "sample"])

# U is kept in [1e-10, 1 - 1e-10]: -log(-log U) stays finite (U = 0 would give -inf)
_UNIFORM_EDGE = 1e-10

# The largest peakedness used as such; a larger alpha gives the same weights.  exp(-x) underflows to
# 0 in float32 for x > 104, so at alpha = 1e20 the weights are already the exact one-hot of the argmax
# whenever the top score leads the next by more than 1.04e-18 (any two distinct float32 scores of
# magnitude >= 1e-10 do).  Only (near-)ties are affected, and there the cap is what keeps the
# gradient finite: d softmax(alpha z) / dz = alpha (diag(w) - w w^T) is of order alpha at a tie, which
# at alpha ~ 1e37 overflows float32 (and an infinite alpha would give inf * 0 = NaN at the maximum).
MAX_EFFECTIVE_ALPHA = ALPHA_CEILING


def gumbel_noise(shape, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)``, U ~ Uniform(0, 1), of ``like``'s dtype and device."""
    uniform = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    uniform = uniform.clamp(_UNIFORM_EDGE, 1.0 - _UNIFORM_EDGE)
    return -torch.log(-torch.log(uniform))


def peaked_softmax(
    scores: Tensor, alpha: float, noise: Optional[Tensor] = None, banned: Sequence[int] = ()
) -> Tensor:
    """``softmax(alpha * (scores + noise))`` over the last dimension (N x V -> N x V weights).

    ``banned`` ids (padding) get weight exactly 0, as the hard argmax / sampler never choose them.
    Safe for any alpha > 0 (values and gradients finite): the row maximum is subtracted first
    (detached: softmax ignores row constants, so the gradient is unchanged), so ``alpha * z`` is <= 0
    and cannot overflow to +inf, and alpha is capped at :data:`MAX_EFFECTIVE_ALPHA`, beyond which
    the weights do not change but the gradient at a tie would overflow.
    """
    z = scores if noise is None else scores + noise
    if banned:
        banned_ids = torch.tensor(list(banned), device=z.device, dtype=torch.long)
        z = z.index_fill(-1, banned_ids, float("-inf"))
    z = z - z.max(dim=-1, keepdim=True).values.detach()
    alpha = min(float(alpha), MAX_EFFECTIVE_ALPHA)
    return torch.softmax(alpha * z, dim=-1)  # N x V


def relaxed_embeddings(
    scores: Tensor,
    alpha: float,
    embedding: Tensor,
    noise: Optional[Tensor] = None,
    banned: Sequence[int] = (),
    candidates: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The soft embedding ``sum_y e(y) w(y)`` of the relaxation, and its argmax id.

    Args:
        scores: N x V scores; with ``candidates``, N x k scores of those candidates only.
        alpha: peakedness.
        embedding: V x D embedding table e.
        noise: Gumbel noise N x V for the relaxed sample (None: soft argmax); always over the vocabulary.
        banned: ids never chosen (weight 0), e.g. padding.
        candidates: N x k ids the relaxation is restricted to (an approximation: the other words
            get weight 0 instead of ``exp(alpha (s_y - s_max))``).
    Returns:
        N x D soft embeddings (in the table's dtype) and N argmax ids.
    """
    dtype = torch.promote_types(embedding.dtype, torch.float32)  # the softmax in at least float32
    scores = scores.to(dtype)
    if candidates is None:
        weights = peaked_softmax(scores, alpha, noise, banned=banned)  # N x V
        return soft_embeddings(weights, embedding), weights.argmax(-1)
    if banned:
        scores = scores.masked_fill(torch.isin(candidates, torch.tensor(list(banned), device=candidates.device)), float("-inf"))
    weights = peaked_softmax(scores, alpha, None if noise is None else noise.gather(-1, candidates))  # N x k
    soft = torch.einsum("nk,nkd->nd", weights.to(embedding.dtype), embedding[candidates])  # N x D
    return soft, candidates.gather(-1, weights.argmax(-1, keepdim=True)).squeeze(-1)


def relaxation_ranking(scores: Tensor, noise: Optional[Tensor] = None, banned: Sequence[int] = ()) -> Tensor:
    """N x V values whose top k are a relaxation's k candidates: the (perturbed) scores, banned ids at -inf."""
    ranked = scores.float() if noise is None else scores.float() + noise
    if banned:
        ranked = ranked.index_fill(-1, torch.tensor(list(banned), device=ranked.device), float("-inf"))
    return ranked
