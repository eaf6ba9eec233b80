"""Scoring decoded candidates and the sequence-level objectives of minimum risk training and policy gradient.

Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence Modeling"
(AAAI 2021), section 3 ("Comparison with policy gradient", "Comparison with minimum risk training"):

* policy gradient (eq. 5): grad = E_{Y ~ p_theta}[c(Y) grad log p_theta(Y | X)], estimated with K
  samples per sentence and a baseline (Williams 1992);
* minimum risk training (eq. 6; Shen et al., "Minimum Risk Training for Neural Machine Translation",
  ACL 2016, section 3): the expected cost under q(Y) = p_theta(Y | X)^alpha / Z over a candidate set S,
  whose gradient is eq. 7: alpha [E_q[c grad log p] - E_q[c] E_q[grad log p]].

Here log p_theta(Y | X) is the model's *sequence* log-probability: the sum of its token
log-probabilities, the EOS included when the decoder emitted it (a candidate cut at the maximum length
is scored as decoded, without an EOS it never produced).

Candidates are held in B x K tensors (B sentences, K candidates each, ``mask`` marking the real ones:
sentences may have fewer candidates than others once duplicates are removed).  Scoring runs the encoder
once per sentence and the decoder over all candidates (the encoder output is reordered, not recomputed);
a decoder-only language model (text completion) reads ``[EOS] + prefix + candidate`` and only the
candidate's positions are scored.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from fairseq.dataclass import ChoiceEnum

DISTRIBUTION_CHOICES = ChoiceEnum(["renormalized", "classic"])
COST_NORMALIZATION_CHOICES = ChoiceEnum(["none", "max"])


@dataclass
class Candidates:
    """B x K candidates: token lists (no EOS), whether the decoder emitted the EOS, and the real slots."""

    tokens: List[List[List[int]]]  # B lists of K_b token lists
    terminated: List[List[bool]]  # B lists of K_b flags

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    @property
    def width(self) -> int:
        """K, the largest number of candidates of a sentence."""
        return max((len(row) for row in self.tokens), default=0)

    def mask(self, device=None) -> torch.Tensor:
        """B x K booleans: True where a sentence has a k-th candidate."""
        K = self.width
        return torch.tensor([[k < len(row) for k in range(K)] for row in self.tokens], dtype=torch.bool, device=device)

    def flat(self) -> Tuple[List[int], List[List[int]], List[bool]]:
        """(sentence index, tokens, terminated) of every candidate, sentence by sentence."""
        rows, toks, done = [], [], []
        for b, (row, flags) in enumerate(zip(self.tokens, self.terminated)):
            for t, d in zip(row, flags):
                rows.append(b)
                toks.append(list(t))
                done.append(bool(d))
        return rows, toks, done

    def scatter(self, values: Sequence[float], fill: float = 0.0, dtype=torch.float64) -> torch.Tensor:
        """B x K tensor of per-candidate ``values`` given in :meth:`flat` order (``fill`` elsewhere)."""
        out = torch.full((self.batch_size, self.width), fill, dtype=dtype)
        i = 0
        for b, row in enumerate(self.tokens):
            for k in range(len(row)):
                out[b, k] = values[i]
                i += 1
        return out


def hypotheses_to_candidates(rows, unique: bool, reference: Optional[Sequence[Sequence[int]]] = None) -> Candidates:
    """Candidates from :class:`~fairseq_ext.modules.sequence_decoding.Hypothesis` lists.

    Args:
        rows: B lists of hypotheses (n-best or samples).
        unique: keep the first of identical (tokens, terminated) candidates: S is a set (eq. 6).
        reference: B reference token lists to add as terminated candidates (MRT with the ground truth in S,
            section 3), when not already present.
    """
    tokens, terminated = [], []
    for b, row in enumerate(rows):
        seen, toks, done = set(), [], []
        items = [(list(h.tokens), bool(h.terminated)) for h in row]
        if reference is not None:
            items.append((list(reference[b]), True))
        for t, d in items:
            key = (tuple(t), d)
            if unique and key in seen:
                continue
            seen.add(key)
            toks.append(t)
            done.append(d)
        tokens.append(toks)
        terminated.append(done)
    return Candidates(tokens, terminated)


# -- scoring ---------------------------------------------------------------------------------------------
def _pad_rows(rows: Sequence[Sequence[int]], pad: int, device) -> torch.Tensor:
    T = max(1, max((len(r) for r in rows), default=1))
    out = torch.full((len(rows), T), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    return out


def candidate_log_probs(model, sample, candidates: Candidates, dictionary) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities log p_theta(Y | X) of every candidate, with gradient.

    Args:
        model: the unwrapped fairseq model: an encoder-decoder model, or a decoder-only language model
            when ``sample`` has ``prefix_tokens`` (text completion).
        sample: the training sample the candidates were decoded from.
        candidates: B x K candidates (:class:`Candidates`).
        dictionary: the target dictionary (EOS, padding).
    Returns:
        (log_p, lengths): B x K sequence log-probabilities in the model's dtype (0 at empty slots) and B x K
        numbers of scored tokens (float64, EOS included when emitted; 0 at empty slots).
    """
    from fairseq.models import FairseqEncoderDecoderModel

    eos, pad = dictionary.eos(), dictionary.pad()
    device = sample["target"].device
    rows, toks, done = candidates.flat()
    targets = [t + ([eos] if d else []) for t, d in zip(toks, done)]  # N scored tokens each
    index = torch.tensor(rows, dtype=torch.long, device=device)  # N: the sentence of each candidate
    if isinstance(model, FairseqEncoderDecoderModel):
        net_input = sample["net_input"]
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])  # one pass
        encoder_out = model.encoder.reorder_encoder_out(encoder_out, index)  # B -> N rows
        prev = _pad_rows([[eos] + t[: max(len(g), 1) - 1] for t, g in zip(toks, targets)], pad, device)  # N x T
        gold = _pad_rows(targets, pad, device)  # N x T
        net_output = model.decoder(prev, encoder_out=encoder_out, src_lengths=net_input["src_lengths"].index_select(0, index))
        offsets = [0] * len(rows)
    else:  # decoder-only LM continuing a prefix
        prefix = sample.get("prefix_tokens")
        if prefix is None:
            raise ValueError("scoring candidates of a language model needs the prefix of a text-completion sample")
        prefix_rows = prefix.tolist()
        inputs = [[eos] + prefix_rows[b] + t for b, t in zip(rows, toks)]  # N: EOS, prefix, candidate
        gold = _pad_rows([prefix_rows[b] + g for b, g in zip(rows, targets)], pad, device)  # N x T
        prev = _pad_rows([i[: len(prefix_rows[b]) + len(g)] for i, b, g in zip(inputs, rows, targets)], pad, device)
        lengths = prev.ne(pad).sum(-1)
        net_output = model(src_tokens=prev, src_lengths=lengths)
        offsets = [len(prefix_rows[b]) for b in rows]
    lprobs = model.get_normalized_probs(net_output, log_probs=True)  # N x T x V
    T = gold.size(1)
    lprobs = lprobs[:, :T]
    scored = torch.zeros_like(gold, dtype=torch.bool)  # N x T: the candidate's own positions
    for n, (o, g) in enumerate(zip(offsets, targets)):
        scored[n, o : o + len(g)] = True
    token_lp = lprobs.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # N x T
    seq_lp = token_lp.masked_fill(~scored, 0.0).sum(-1)  # N
    B, K = candidates.batch_size, candidates.width
    flat_index = torch.tensor(
        [b * K + k for b, row in enumerate(candidates.tokens) for k in range(len(row))], dtype=torch.long, device=device
    )  # N positions in B*K
    log_p = seq_lp.new_zeros(B * K).index_copy(0, flat_index, seq_lp).view(B, K)  # B x K
    lengths = candidates.scatter([float(len(g)) for g in targets]).to(device)  # B x K
    return log_p, lengths


# -- the objectives ----------------------------------------------------------------------------------------
def normalize_costs(costs: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """B x K costs, unchanged ("none") or divided by each sentence's largest candidate cost ("max", as the
    authors' MRT and PG baselines; a sentence whose costs are all 0 keeps them)."""
    if mode == "none":
        return costs
    if mode == "max":
        largest = costs.masked_fill(~mask, 0.0).abs().amax(dim=-1, keepdim=True)  # B x 1
        return costs / torch.where(largest > 0, largest, torch.ones_like(largest))
    raise ValueError(f"unknown cost normalization {mode!r}; choose one of {list(COST_NORMALIZATION_CHOICES)}")


def candidate_distribution(log_p: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, alpha: float,
                           kind: str) -> torch.Tensor:  # fmt: skip
    """q over each sentence's candidates, B x K (0 at empty slots), differentiable in ``log_p``.

    renormalized (eq. 6): q(Y) = p(Y)^alpha / sum_{Y' in S} p(Y')^alpha = softmax_k(alpha log p(Y_k)).
    classic (fairseq's former ``sequence_risk`` criterion of Edunov et al. 2018 and its copies):
        q(Y) = softmax_k(exp(log p(Y_k) / |Y_k|)), a softmax over the candidates' geometric-mean token
        probabilities, which lie in (0, 1]: q is never far from uniform; alpha does not apply.

    Args:
        log_p: B x K sequence log-probabilities. lengths: B x K scored tokens. mask: B x K real slots.
        alpha: the sharpness of eq. 6 (renormalized only).
        kind: "renormalized" or "classic".
    """
    if kind == "renormalized":
        scores = log_p * alpha
    elif kind == "classic":
        scores = torch.exp(log_p / lengths.to(log_p.dtype).clamp(min=1.0))
    else:
        raise ValueError(f"unknown candidate distribution {kind!r}; choose one of {list(DISTRIBUTION_CHOICES)}")
    scores = scores.masked_fill(~mask, -math.inf)  # B x K
    return torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)


def expected_risk(q: torch.Tensor, costs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """B expected costs sum_k q(Y_k) c(Y_k) (eq. 6's inner expectation)."""
    return (q * costs.to(q.dtype)).masked_fill(~mask, 0.0).sum(-1)


def policy_gradient_surrogate(log_p: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """B surrogate losses -(1/K_b) sum_k A_k log p(Y_k), whose gradient is minus the REINFORCE estimate of
    eq. 5 with reward r = -cost and A = r - b (the advantages carry no gradient)."""
    counts = mask.sum(-1).clamp(min=1).to(log_p.dtype)  # B
    weighted = (advantages.detach().to(log_p.dtype) * log_p).masked_fill(~mask, 0.0)  # B x K
    return -weighted.sum(-1) / counts
