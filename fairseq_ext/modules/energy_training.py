"""Training a bidirectional masked LM as the energy model E_raw, on enumerable sequence spaces.

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis,
CMU 2021), chapter 6 (Goyal, Dyer and Berg-Kirkpatrick), sections 6.2.1-6.2.3:

    E_raw(y) = - sum_t logit_t(y_t | y_\\t)                                   (6.2.1)
    p(y)     = exp(-E_raw(y)) / Z,   Z = sum_{y' in V^T} exp(-E_raw(y'))

and four training objectives over a data sequence y (all per sequence, in nats, to be minimised):

* likelihood (6.2.2 "LL"):      E_raw(y) + log Z, log Z by enumerating all |V|^T sequences;
* pseudolikelihood (6.2.2 "PLL"): - sum_i log p(y_i | y_\\i) with the TRUE conditionals of the MRF,
  p(y_i = v | y_\\i) ∝ exp(-E_raw(y with y_i := v)): |V| energies (each a full pass) per position;
* MLM (6.2.1, "degenerate pseudolikelihood"): - sum_i log softmax(logit_i)[y_i], the free conditionals;
* KL projection (6.2.2 "Adapting MLM Free Conditionals"): sum_i KL(p_mlm(. | y_\\i) || p(. | y_\\i; theta))
  from a frozen teacher MLM's free conditionals to the model's true conditionals.

Everything here is in *symbol-index space*: a sequence is T indices into the set V of real symbols
(0 .. |V|-1), and the model is a callable ``logits_fn(seqs N x T) -> N x T x |V|`` returning at each
position t the raw score of every symbol with y_t itself unseen (the criteria map V to dictionary ids
and drop the other outputs).  The per-position terms are the shared ones of
:func:`fairseq_ext.modules.mlm_energy.energy_terms`, and the single-site variants of a sequence are built
from :func:`fairseq_ext.modules.mlm_energy.single_masked_copies`.
"""
from typing import Callable, Iterator, List, Sequence

import torch
from torch import Tensor

from fairseq_ext.modules.mlm_energy import energy_terms, single_masked_copies

LogitsFn = Callable[[Tensor], Tensor]  # N x T long -> N x T x V

# Fairseq pads a dictionary to a multiple of --padding-factor with these filler symbols.
FILLER_PREFIX = "madeupword"


def real_symbols(dictionary) -> Tensor:
    """Dictionary ids of the real symbols V: every entry after the special ones (BOS, pad, EOS, unk and
    any added specials, ``dictionary.nspecial``) except fairseq's ``madeupwordNNNN`` fillers."""
    ids = [i for i in range(dictionary.nspecial, len(dictionary)) if not dictionary[i].startswith(FILLER_PREFIX)]
    return torch.tensor(ids, dtype=torch.long)


def to_symbol_index(tokens: Tensor, symbol_ids: Tensor) -> Tensor:
    """N x T dictionary ids -> N x T indices into ``symbol_ids`` (V); raises ValueError on a token that is not
    a real symbol (unk, a special or a filler), which has no place in the enumerated space V^T."""
    lookup = torch.full((int(max(int(symbol_ids.max()), int(tokens.max()))) + 1,), -1, dtype=torch.long,
                        device=tokens.device)  # fmt: skip
    lookup[symbol_ids.to(tokens.device)] = torch.arange(symbol_ids.numel(), device=tokens.device)
    idx = lookup[tokens]
    if bool((idx < 0).any()):
        bad = sorted(set(tokens[idx < 0].tolist()))
        raise ValueError(f"tokens {bad} are not real symbols of the dictionary (specials, unk or fillers): the energy "
                         "model is defined over sequences of real symbols only; clean the data or the dictionary")
    return idx


# ----------------------------------------------------------------------------------------------------
# Energies and the partition function (6.2.1, 6.2.2 "LL")
# ----------------------------------------------------------------------------------------------------


def raw_energy(logits: Tensor, seqs: Tensor) -> Tensor:
    """E_raw: logits N x T x V, seqs N x T -> N  (= - sum_t logit_t[y_t], via the shared energy_terms)."""
    n, t, v = logits.shape
    _, raw = energy_terms(logits.reshape(n * t, v), seqs.reshape(n * t))  # N*T
    return raw.view(n, t).sum(dim=1)


def mlm_nll(logits: Tensor, seqs: Tensor) -> Tensor:
    """Degenerate pseudo-NLL under the free conditionals: - sum_t log softmax_V(logit_t)[y_t]: N x T x V,
    N x T -> N (energy_terms's E_local terms, here over V only)."""
    n, t, v = logits.shape
    local, _ = energy_terms(logits.reshape(n * t, v), seqs.reshape(n * t))  # N*T
    return local.view(n, t).sum(dim=1)


def enumeration_size(vocab_size: int, length: int) -> int:
    return vocab_size**length


def check_enumeration(vocab_size: int, length: int, limit: int) -> None:
    """Raises ValueError naming |V|, T and ``--energy-max-enumeration`` when |V|^T > limit."""
    size = enumeration_size(vocab_size, length)
    if size > limit:
        raise ValueError(f"exact enumeration needs |V|^T = {vocab_size}^{length} = {size} sequences (|V| real symbols, "
                         f"T = sequence length), more than --energy-max-enumeration {limit}; raise the flag or use "
                         "shorter sequences / a smaller vocabulary")


def enumerate_sequences(vocab_size: int, length: int, start: int, count: int, device=None) -> Tensor:
    """Rows start .. start + count - 1 of V^T in lexicographic order (row r = r written in base |V|): count x T."""
    r = torch.arange(start, start + count, device=device).unsqueeze(1)  # count x 1
    powers = vocab_size ** torch.arange(length - 1, -1, -1, device=device)  # T
    return torch.div(r, powers, rounding_mode="floor") % vocab_size


def chunked_logits(logits_fn: LogitsFn, seqs: Tensor, batch_rows: int) -> Iterator[Tensor]:
    for s in range(0, seqs.size(0), batch_rows):
        yield logits_fn(seqs[s : s + batch_rows])


def log_partition(logits_fn: LogitsFn, vocab_size: int, length: int, batch_rows: int, limit: int,
                  device=None) -> Tensor:  # fmt: skip
    """log Z = logsumexp over all y in V^T of -E_raw(y), enumerated in batches of ``batch_rows`` sequences;
    differentiable (the graph of every batch is kept).  Refuses when |V|^T > ``limit``."""
    check_enumeration(vocab_size, length, limit)
    total = enumeration_size(vocab_size, length)
    parts: List[Tensor] = []
    for s in range(0, total, batch_rows):
        seqs = enumerate_sequences(vocab_size, length, s, min(batch_rows, total - s), device)  # n x T
        parts.append(torch.logsumexp(-raw_energy(logits_fn(seqs), seqs), dim=0, keepdim=True))  # 1
    return torch.logsumexp(torch.cat(parts), dim=0)


def exact_nll(logits_fn: LogitsFn, seqs: Tensor, log_z: Tensor, batch_rows: int) -> Tensor:
    """-log p(y) = E_raw(y) + log Z for N x T sequences -> N."""
    return torch.cat([raw_energy(lg, s) for lg, s in zip(chunked_logits(logits_fn, seqs, batch_rows),
                                                        seqs.split(batch_rows))]) + log_z  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# True conditionals and the objectives built on them (6.2.1, 6.2.2)
# ----------------------------------------------------------------------------------------------------


def single_site_variants(seqs: Tensor, vocab_size: int) -> Tensor:
    """N x T -> (N * T * V) x T: for every sequence n, position i and symbol v, y with y_i := v, ordered
    (n, i, v).  Built on the shared single-masked copies (the masked slot is then filled with v)."""
    n, t = seqs.shape
    copies, _, cols = single_masked_copies(seqs, torch.ones_like(seqs, dtype=torch.bool), -1)  # N*T x T, N*T
    variants = copies.repeat_interleave(vocab_size, dim=0)  # N*T*V x T
    slot = cols.repeat_interleave(vocab_size)  # N*T*V
    symbol = torch.arange(vocab_size, device=seqs.device).repeat(n * t)  # N*T*V
    variants[torch.arange(variants.size(0), device=seqs.device), slot] = symbol
    return variants


def exact_conditionals(logits_fn: LogitsFn, seqs: Tensor, vocab_size: int, batch_rows: int) -> Tensor:
    """log p(y_i = v | y_\\i) of the MRF E_raw for N x T sequences -> N x T x V (6.2.1: the |V| energies per
    position, every variant a full pass, run in batches of ``batch_rows`` sequences)."""
    n, t = seqs.shape
    variants = single_site_variants(seqs, vocab_size)  # N*T*V x T
    energies = torch.cat([raw_energy(lg, s) for lg, s in zip(chunked_logits(logits_fn, variants, batch_rows),
                                                             variants.split(batch_rows))])  # fmt: skip
    return torch.log_softmax(-energies.view(n, t, vocab_size), dim=-1)  # N x T x V


def pseudo_nll(cond_logp: Tensor, seqs: Tensor) -> Tensor:
    """- sum_i log p(y_i | y_\\i): N x T x V conditionals, N x T -> N."""
    return -cond_logp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(dim=1)


def kl_projection(teacher_logits: Tensor, cond_logp: Tensor) -> Tensor:
    """sum_i KL(p_mlm(. | y_\\i) || p(. | y_\\i; theta)): teacher raw scores N x T x V (softmax over V: its free
    conditionals) and the model's true log-conditionals N x T x V -> N."""
    teacher_logp = torch.log_softmax(teacher_logits.to(cond_logp.dtype), dim=-1)  # N x T x V
    return (teacher_logp.exp() * (teacher_logp - cond_logp)).sum(dim=(1, 2))


def group_by_length(lengths: Tensor) -> Sequence[int]:
    return sorted(set(lengths.tolist()))
