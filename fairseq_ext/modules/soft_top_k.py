"""The continuous relaxation of top-k-argmax (Goyal, Continuous relaxation of beam search, thesis chapter 4,
section 4.3.2, Algorithm 2).

Beam search picks, among the k x |V| successor scores of its k beam elements, the k best (beam
element, word) pairs: hard backpointers and hard successor words.  Algorithm 2 replaces each pick
by a peaked distribution over the whole k x |V| score matrix:

    m = top-k-max(s)                                   (k values, differentiable)
    p_i = peaked-softmax_alpha(-(s - m_i)^2)           (i = 1..k, softmax over all k |V| entries)

so p_i concentrates on the entries whose score is closest to the i-th highest.  As alpha grows,
p_i tends to the one-hot of the i-th best (element, word) pair (tested over random inputs).  Row
sums of p_i give the soft backpointer of new beam element i (a point of the k-simplex), column
sums its soft successor word.  The soft beam search loss (Algorithm 3) builds on this.

Any finite alpha is safe: alpha is capped at ``ALPHA_CEILING`` (1e20, see
:mod:`fairseq_ext.modules.schedules`), where the relaxation is already hard in float32, so that
alpha times a squared score gap, and alpha times a gradient, never overflow into inf or NaN.
"""
from typing import Tuple

import torch
from torch import Tensor

from fairseq_ext.modules.schedules import ALPHA_CEILING


def usable_alpha(alpha: float) -> float:
    """alpha capped at ALPHA_CEILING: the relaxation is already hard there, and larger values would
    overflow alpha * (s - m)^2 and its gradient in float32 (inf, then NaN)."""
    if not alpha > 0.0:
        raise ValueError(f"the peakedness alpha must be > 0, got {alpha}")
    return min(float(alpha), ALPHA_CEILING)


def continuous_top_k_argmax(scores: Tensor, k: int, alpha: float) -> Tensor:
    """Algorithm 2: B x K x V successor scores (K beam elements, any K >= 1) -> B x k x K x V.

    Output ``[b, i]`` is a distribution over the K x V entries of ``scores[b]`` peaked at the
    i-th highest one (i = 0 is the maximum).  k <= K * V.
    """
    bsz, width, vocab = scores.shape
    flat = scores.reshape(bsz, 1, width * vocab)  # B x 1 x KV
    top = flat.topk(k, dim=-1).values.transpose(1, 2)  # B x k x 1: m_i, with gradient (max is continuous)
    closeness = -(flat - top).pow(2)  # B x k x KV, <= 0 and exactly 0 at m_i: the softmax never sees +inf
    weights = torch.softmax(usable_alpha(alpha) * closeness, dim=-1)  # peaked-softmax over all K x V entries
    return weights.view(bsz, k, width, vocab)


def soft_backpointers_and_words(p: Tensor) -> Tuple[Tensor, Tensor]:
    """B x k x K x V relaxed picks -> (B x k x K soft backpointers, B x k x V soft successor words)."""
    return p.sum(dim=-1), p.sum(dim=-2)


def hard_top_k(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The discrete top-k-argmax of beam search: B x K x V -> (B x k backpointers, B x k words)."""
    bsz, width, vocab = scores.shape
    index = scores.reshape(bsz, width * vocab).topk(k, dim=-1).indices  # B x k
    return torch.div(index, vocab, rounding_mode="floor"), index % vocab
