"""Scheduled sampling: choosing the decoder's conditioning tokens as a mix of gold and model tokens.

Duckworth et al., "Parallel Scheduled Sampling" (../shared/papers/000_*): Algorithm 1 (sequential,
Bengio et al. 2015) and Algorithm 2 (parallel, K passes).  The functions here are model-agnostic:
the model enters through callbacks, so the tests can drive them with exact toy distributions.

Conventions (fairseq's teacher-forcing layout):
    gold:        B x T decoder inputs ``[BOS, y_1, ..., y_{T-1}]`` (right-padded); the paper's
                 timestep t is input position t, and position 0 (BOS) is never replaced.
    replaceable: B x T bool, True at positions 1..T-1 that hold a token (not padding).
    output i of the decoder predicts input i + 1, so a token drawn from output i is fed at
    position i + 1 ("predictions shifted right", anchors-methods.md 8.1 item 2).
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fairseq.dataclass import ChoiceEnum

CONDITIONING_CHOICES = ChoiceEnum(["sample", "argmax"])


def replaceable_positions(gold: Tensor, pad: int) -> Tensor:
    """B x T bool: positions whose input may be replaced (not BOS at 0, not padding)."""
    mask = gold.ne(pad)
    mask[:, 0] = False
    return mask


def draw_tokens(lprobs: Tensor, method: str, temperature: float = 1.0, banned: Sequence[int] = ()) -> Tensor:
    """One token per row of ``lprobs`` (N x V log-probabilities, or logits: only their softmax
    matters): a sample or the argmax.

    ``sample`` draws from softmax(lprobs / temperature), by multinomial sampling as the paper and
    tensor2tensor do.  ``banned`` tokens (padding) are never drawn, as in fairseq's sampling
    generator: a padding input would change fairseq's positions.  Returns N token ids.
    """
    scores = lprobs.float()
    banned_ids = torch.tensor(list(banned), device=scores.device, dtype=torch.long) if banned else None
    if method == "argmax":
        if banned_ids is not None:
            scores = scores.index_fill(-1, banned_ids, float("-inf"))
        return scores.argmax(-1)
    if temperature != 1.0:
        scores = scores / temperature
    probs = torch.softmax(scores, dim=-1)  # N x V; also renormalises after dividing by the temperature
    if banned_ids is not None:
        probs.index_fill_(-1, banned_ids, 0.0)
    return sample_categorical(probs)


def sample_categorical(probs: Tensor) -> Tensor:
    """One draw per row of the unnormalised N x V ``probs`` by inverse-CDF sampling: N token ids.

    Same distribution as ``torch.multinomial(probs, 1)``, which on CPU fills an N x V tensor with
    random numbers (bench/README.md: 291 ms vs 62 ms for 1464 x 8008); this needs N.  ``u`` lies in
    (0, row total], and a zero-probability token never raises the CDF, so it is never the first
    index whose CDF reaches ``u``.
    """
    cdf = probs.cumsum(-1)  # N x V
    u = (1.0 - torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device)) * cdf[:, -1:]  # N x 1
    return torch.searchsorted(cdf, u).clamp_(max=cdf.size(-1) - 1).squeeze(-1)


def predicted_positions(select_inputs: Tensor) -> Tensor:
    """Decoder outputs to read for the inputs ``select_inputs`` (B x T bool): output i feeds input i + 1."""
    outputs = torch.zeros_like(select_inputs)
    outputs[:, :-1] = select_inputs[:, 1:]
    return outputs


def parallel_scheduled_sampling(
    gold: Tensor,
    replaceable: Tensor,
    prob: float,
    num_passes: int,
    predict: Callable[[Tensor, Tensor], Tensor],
    draw: Callable[[Tensor], Tensor],
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Algorithm 2: the conditioning tokens of the final pass K.

    For k = 1..K: predict every position in parallel from the previous pass's tokens, then
    for each position t >= k take the model's token with probability ``prob`` and the gold token
    otherwise; positions t < k keep the previous pass's token (the t < k copy rule, which makes
    position t final after pass t and gives Theorem 2.1).  Each pass draws fresh coins.

    Only the positions whose coin chose the model are predicted: ``predict(tokens, outputs)`` gets
    the B x T inputs and a B x T bool of decoder outputs to return and answers N x V
    log-probabilities (or logits) for those outputs in row-major order.  ``draw`` maps them to N tokens.

    Args:
        gold: B x T gold decoder inputs.
        replaceable: B x T bool (see :func:`replaceable_positions`).
        prob: probability of feeding the model's own prediction (1 - prob: the gold token).
        num_passes: K >= 1.
    Returns:
        tokens: B x T conditioning tokens of pass K.
        from_model: B x T bool, True where the token of pass K came from the model.
    """
    bsz, tgt_len = gold.shape
    position = torch.arange(tgt_len, device=gold.device).unsqueeze(0)  # 1 x T
    tokens = gold
    from_model = torch.zeros_like(replaceable)
    for k in range(1, num_passes + 1):
        open_ = replaceable & (position >= k)  # B x T: positions t >= k are re-mixed on pass k
        coins = torch.rand(bsz, tgt_len, device=gold.device, generator=generator) < prob
        choose = open_ & coins  # B x T: take the model's token here
        mixed = torch.where(open_, gold, tokens)
        if choose.any():
            lprobs = predict(tokens, predicted_positions(choose))  # N x V
            mixed = mixed.masked_scatter(choose, draw(lprobs))
        from_model = torch.where(open_, choose, from_model)
        tokens = mixed
    return tokens, from_model


def sequential_scheduled_sampling(
    gold: Tensor,
    replaceable: Tensor,
    prob: float,
    step: Callable[[Tensor], Tensor],
    log_probs: Callable[[Tensor], Tensor],
    draw: Callable[[Tensor], Tensor],
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1: decode step by step, choosing each next input as soon as it is predicted.

    ``step(prefix)`` runs the decoder on the B x t prefix (incrementally) and returns its B x C
    output for the last position, keeping the graph (the loss sums log p(y_t | tokens_<t));
    ``log_probs`` maps such an output to B x V log-probabilities for drawing (without gradient).
    Returns the B x T x C outputs of every step, the B x T conditioning tokens and the B x T bool
    of positions that took the model's token.
    """
    bsz, tgt_len = gold.shape
    tokens = gold[:, :1]
    outputs, from_model = [], [torch.zeros_like(replaceable[:, 0])]
    for t in range(tgt_len):
        out = step(tokens)  # B x C
        outputs.append(out)
        if t + 1 == tgt_len:
            break
        coins = torch.rand(bsz, device=gold.device, generator=generator) < prob
        choose = coins & replaceable[:, t + 1]  # B
        nxt = gold[:, t + 1]
        if choose.any():
            with torch.no_grad():
                nxt = nxt.masked_scatter(choose, draw(log_probs(out[choose])))
        from_model.append(choose)
        tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)  # B x (t+2)
    return torch.stack(outputs, dim=1), tokens, torch.stack(from_model, dim=1)
