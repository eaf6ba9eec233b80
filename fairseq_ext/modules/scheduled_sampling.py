"""Scheduled sampling: choosing the decoder's conditioning tokens as a mix of gold and model tokens.

Duckworth et al., "Parallel Scheduled Sampling": Algorithm 1 (sequential, Bengio et al. 2015) and
Algorithm 2 (parallel, K passes).  The functions here are model-agnostic: the model enters through
callbacks, so the tests can drive them with exact toy distributions.

Conventions (fairseq's teacher-forcing layout):
    gold:        B x T decoder inputs ``[BOS, y_1, ..., y_{T-1}]``, right-padded (fairseq's default)
                 or left-padded (``--left-pad-target True``); the paper's timestep t is the t-th
                 token of the row (:func:`timesteps`), the input column t when right-padded.
    replaceable: B x T bool, True at the tokens of timestep > N, where N is the forced prefix
                 (``--ignore-prefix-size``, e.g. a target-language tag; 0 by default): BOS and the
                 prefix are always fed gold, as at inference, and padding is never replaced.
    output i of the decoder predicts input i + 1, so a token drawn from output i is fed at
    position i + 1 (predictions shifted right, BOS first, as tensor2tensor and OR-NMT do).
    Padding sits only before BOS or after the last token, so the output i feeding a replaceable
    input i + 1 always reads a token.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fairseq.dataclass import ChoiceEnum

CONDITIONING_CHOICES = ChoiceEnum(["sample", "argmax"])


def timesteps(gold: Tensor, pad: int) -> Tensor:
    """B x T timestep of each input within its row: 0 at BOS, t at the t-th token after it, wherever the
    padding is (left or right); the column index when right-padded.  Undefined (any value) at padding."""
    return gold.ne(pad).long().cumsum(1) - 1  # B x T


def left_padded(gold: Tensor, pad: int) -> bool:
    """True when some row of the B x T decoder inputs starts with padding (``--left-pad-target True``):
    every row holds BOS, so a row that starts with padding is padded on the left."""
    return bool(gold[:, 0].eq(pad).any())


def replaceable_positions(gold: Tensor, pad: int, prefix_size: int = 0) -> Tensor:
    """B x T bool: inputs that may be replaced: tokens at timestep > ``prefix_size`` (not BOS, not the
    ``prefix_size`` forced tokens after it, not padding)."""
    return gold.ne(pad) & timesteps(gold, pad).gt(prefix_size)  # B x T


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
    timestep: Optional[Tensor] = None,
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
        timestep: B x T timestep t of each input for the copy rule (:func:`timesteps`; needed when
            left-padded); default: the column index.
    Returns:
        tokens: B x T conditioning tokens of pass K.
        from_model: B x T bool, True where the token of pass K came from the model.
    """
    bsz, tgt_len = gold.shape
    if timestep is None:
        timestep = torch.arange(tgt_len, device=gold.device).unsqueeze(0)  # 1 x T
    tokens = gold
    from_model = torch.zeros_like(replaceable)
    for k in range(1, num_passes + 1):
        open_ = replaceable & (timestep >= k)  # B x T: timesteps t >= k are re-mixed on pass k
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

    The model's token at step t is drawn from p(. | y~_<t, x), the MIXED history of conditioning tokens
    fed so far, as in Bengio et al. 2015 and tensor2tensor; read literally, the algorithm box of
    Duckworth et al. conditions the sample on the model's own earlier samples y^_<t (a free-running
    decoder beside the mixed one).  Both agree at p = 0 and p = 1; in between, the mixed history is the
    one the loss conditions on, and it costs one decoder instead of two.

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
