"""Continuous relaxations of argmax and of sampling (Goyal et al. 2017, sections 3.1 and 3.2).

Both return the weights ``w`` of a soft one-hot vector over the vocabulary; the soft embedding fed
to the decoder is ``sum_y e(y) w(y)`` (:func:`fairseq_ext.modules.embedding_inputs.soft_embeddings`).

* soft argmax (eq. of section 3.1):            w = softmax(alpha * s)
* soft reparametrised sample (section 3.2):    w = softmax(alpha * (s + G)),  G_y = -log(-log U_y)

As alpha grows, the first tends to the one-hot of argmax_y s(y) and the second to the one-hot of a
Gumbel-max sample, i.e. a draw from softmax(s).  Both are invariant to adding a constant to every
score of a row, so raw logits and log-probabilities give the same weights.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from fairseq.dataclass import ChoiceEnum

RELAXATION_CHOICES = ChoiceEnum(["greedy", "sample"])

# U is kept in [1e-10, 1 - 1e-10]: -log(-log U) stays finite (U = 0 would give -inf)
_UNIFORM_EDGE = 1e-10


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
    The row maximum is subtracted first (detached: softmax ignores row constants, so the gradient is
    unchanged), which keeps ``alpha * scores`` finite for any finite alpha.
    """
    z = scores if noise is None else scores + noise
    if banned:
        banned_ids = torch.tensor(list(banned), device=z.device, dtype=torch.long)
        z = z.index_fill(-1, banned_ids, float("-inf"))
    z = z - z.max(dim=-1, keepdim=True).values.detach()
    alpha = min(alpha, torch.finfo(z.dtype).max)  # an infinite alpha would give inf * 0 at the maximum
    return torch.softmax(alpha * z, dim=-1)
