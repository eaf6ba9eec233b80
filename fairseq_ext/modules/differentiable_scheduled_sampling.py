"""Differentiable scheduled sampling (Goyal, Dyer, Berg-Kirkpatrick 2017, section 3.3; thesis ch. 3).

Scheduled sampling with the discrete choice of the previous step replaced by a relaxation: where
the mixing coin picks the model, the decoder input at position ``t`` is the soft embedding
``sum_y e(y) w_t(y)`` with ``w_t`` the relaxed argmax (or relaxed sample) of the scores predicted
at output ``t - 1``; elsewhere it is the gold token's embedding.  The soft embeddings stay in the
graph, so a later step's loss reaches the parameters through every earlier prediction: the point of
the method.  The loss is the usual per-step cross-entropy of the gold targets.

Conventions as in :mod:`fairseq_ext.modules.scheduled_sampling`: ``gold`` holds the B x T decoder
inputs ``[BOS, y_1, ...]``, output ``i`` predicts input ``i + 1``, and ``use_model`` (B x T bool,
False at BOS and padding) marks the input positions fed the relaxed prediction.  The model enters
through callbacks:

* ``relax(scores, where) -> (vectors, hard)``: N x V scores of the outputs feeding the N input
  positions ``where`` (B x T bool, row-major) -> N x D soft embeddings and their N argmax ids;
* ``step(tokens, vectors) -> B x C`` (sequential): one decoder step over the prefix;
* ``predict(vectors, outputs) -> N x V`` (parallel): a full pass, scores at the outputs ``outputs``.

Two ways to compute the inputs:

* :func:`sequential_differentiable_ss` (the paper): step by step, each input relaxed from the
  output of the step just taken.  T decoder steps.
* :func:`parallel_differentiable_ss` (for transformers, in the manner of parallel scheduled
  sampling): pass 0 runs on the gold inputs; pass ``k`` relaxes every open position ``t >= k`` from
  the outputs of pass ``k - 1`` and keeps positions ``t < k`` from pass ``k - 1`` (the copy rule),
  all with gradient.  With the same coins and noise, pass ``k`` is exact at positions ``<= k``: the
  passes are a Jacobi iteration of the sequential recurrence, which K >= T - 1 passes solve exactly
  (tested: values and gradients equal the sequential mode).  Exact only with dropout off (or in eval
  mode): a training-mode pass draws its own dropout masks, so each of the K full passes and the
  final loss pass sees different masks than the single step-by-step pass of the sequential mode,
  and the two modes then agree only in distribution, not value by value.  With fewer passes, the soft input at a
  position ``t > K`` is relaxed from an output that saw the earlier inputs of pass ``K - 1`` rather
  than the final ones, and its gradient path is cut at depth K: credit reaches back through at most
  K predictions.  Unlike parallel_ss's fresh coins per pass, the coins and the Gumbel noise here are
  drawn once per batch, so that the iteration has a fixed point (with relaxations the choice made
  at a position is deterministic given them).
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from fairseq_ext.modules.scheduled_sampling import predicted_positions

Relax = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


def mix_in(base: Tensor, where: Tensor, rows: Tensor) -> Tensor:
    """``base`` (B x T x D or B x D) with the entries ``where`` (B x T or B bool) replaced by ``rows``
    (N x D), keeping the graph of both."""
    return base.index_put((where,), rows)


def sequential_differentiable_ss(
    gold: Tensor,
    gold_vectors: Tensor,
    use_model: Tensor,
    step: Callable[[Tensor, Tensor], Tensor],
    relax: Relax,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Step-by-step relaxed scheduled sampling (Figure 2 of the paper).

    Args:
        gold: B x T gold decoder inputs (also passed to ``step`` for positions and padding).
        gold_vectors: B x T x D embeddings of ``gold`` (the decoder's own lookup).
        use_model: B x T bool, input positions fed the relaxed prediction.
        step: ``step(tokens B x t, vectors B x t x D) -> B x C`` decoder output at the last position.
        relax: see the module docstring; gets each step's output rows.
    Returns:
        outputs: B x T x C decoder outputs of every step (with graph).
        vectors: B x T x D inputs fed.
        hard: B x T argmax ids of the fed inputs (gold where the gold embedding was fed).
    """
    bsz, tgt_len = gold.shape
    vectors = gold_vectors[:, :1]
    hard = gold[:, :1]
    outputs = []
    for t in range(tgt_len):
        out = step(gold[:, : t + 1], vectors)  # B x C
        outputs.append(out)
        if t + 1 == tgt_len:
            break
        choose = use_model[:, t + 1]  # B
        next_vector, next_hard = gold_vectors[:, t + 1], gold[:, t + 1]
        if choose.any():
            where = torch.zeros_like(use_model)
            where[:, t + 1] = choose
            soft, argmax = relax(out[choose], where)  # N x D, N
            next_vector = mix_in(next_vector, choose, soft)
            next_hard = next_hard.masked_scatter(choose, argmax)
        vectors = torch.cat([vectors, next_vector.unsqueeze(1)], dim=1)  # B x (t+2) x D
        hard = torch.cat([hard, next_hard.unsqueeze(1)], dim=1)
    return torch.stack(outputs, dim=1), vectors, hard


def parallel_differentiable_ss(
    gold: Tensor,
    gold_vectors: Tensor,
    use_model: Tensor,
    num_passes: int,
    predict: Callable[[Tensor, Tensor], Tensor],
    relax: Relax,
    timestep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """K passes of parallel relaxed prediction (see the module docstring); returns the B x T x D
    inputs of the final pass (with graph through all K passes) and their B x T argmax ids.

    ``predict(vectors, outputs)`` runs the decoder on B x T x D inputs and returns N x V scores at the
    B x T bool ``outputs`` (row-major); only outputs that feed a relaxed input are asked for.
    ``timestep`` (B x T, default: the column index) is each input's timestep within its row, for
    the copy rule when rows are left-padded.
    """
    tgt_len = gold.size(1)
    if timestep is None:
        timestep = torch.arange(tgt_len, device=gold.device).unsqueeze(0)  # 1 x T
    vectors, hard = gold_vectors, gold
    for k in range(1, num_passes + 1):
        open_ = timestep >= k  # B x T (or 1 x T): timesteps re-mixed on pass k; t < k are final
        choose = use_model & open_  # B x T
        if not choose.any():
            break  # nothing left to relax: later passes would change nothing
        scores = predict(vectors, predicted_positions(choose))  # N x V, from pass k - 1
        soft, argmax = relax(scores, choose)
        mixed = torch.where(open_.unsqueeze(-1), gold_vectors, vectors)  # B x T x D
        vectors = mix_in(mixed, choose, soft)
        hard = torch.where(open_, gold, hard).masked_scatter(choose, argmax)
    return vectors, hard
