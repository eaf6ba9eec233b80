"""Energies of target sequences under a conditional masked language model (CMLM).

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis,
CMU 2021), chapter 6 (Goyal, Dyer and Berg-Kirkpatrick), sections 6.2.1 and 6.2.4:

    E_raw(y)   = - sum_t logit_t(y_t | y_\\t)               (6.2.1, raw scoring: the raw output score)
    E_local(y) = - sum_t log p_mlm(y_t | y_\\t)             (6.2.4, locally normalized scoring)

where position t is replaced by the model's mask symbol and the rest of y is given.  Each energy
needs T decoder passes ("single-masked copies") per sequence; this module runs them as ONE batch:
the T copies of every sequence of a batch (many sentences, many chains, different lengths) go through
the decoder together, in chunks of at most ``max_tokens_per_pass`` tokens, and reuse the encoder
output of their sentence (``reorder_encoder_out``: the source is encoded once).

Which positions count.  fairseq's ``cmlm_transformer`` (``--task translation_lev --noise
random_mask``) lays a target out as ``BOS y_1 .. y_T EOS`` and never masks BOS or EOS, neither in
training (``random_mask`` draws only among the non-special tokens) nor in decoding (the length
predictor fixes where EOS is).  Their masked conditionals are therefore never trained, and they are
not random variables of the chain: the sampler never changes them.  So t runs over the T target
positions between BOS and EOS only; BOS and EOS are part of every copy's context.

The energy math is model-agnostic: everything below takes a *masked LM*, a callable

    mlm(tokens R x L, contexts R, positions R x K) -> logits R x K x V

that decodes R rows (``contexts[r]`` = which source sentence row r belongs to) and returns the raw
output scores at K positions of each row, plus ``mlm.mask_idx`` (the mask symbol).
:class:`CMLMMaskedLM` is that callable for a fairseq CMLM; tests use small stand-ins.

Cost accounting: :class:`PassCounter` counts decoder calls, rows (sequences decoded) and tokens.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_ext.modules import masked_position_decoder

ENERGY_KINDS = ("local", "raw")


@dataclass
class PassCounter:
    """Decoder work done: ``calls`` forward calls, ``rows`` sequences decoded, ``tokens`` positions."""

    calls: int = 0
    rows: int = 0
    tokens: int = 0

    def add(self, rows: int, length: int) -> None:
        self.calls += 1
        self.rows += rows
        self.tokens += rows * length


# ----------------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------------


def target_positions(lengths: Tensor, max_len: int) -> Tensor:
    """C lengths T_c (target tokens, BOS/EOS excluded) -> C x L bool, True at positions 1 .. T_c
    (the layout is ``BOS y_1 .. y_T EOS pad ..``)."""
    pos = torch.arange(max_len, device=lengths.device).unsqueeze(0)  # 1 x L
    return (pos >= 1) & (pos <= lengths.unsqueeze(1))


def layout_tokens(body: Tensor, lengths: Tensor, bos: int, eos: int, pad: int) -> Tensor:
    """C x Tmax target tokens (anything after T_c ignored) -> C x (Tmax + 2) ``BOS y EOS pad``."""
    c, tmax = body.shape
    out = body.new_full((c, tmax + 2), pad)
    out[:, 0] = bos
    real = target_positions(lengths, tmax + 2)  # C x L
    out[real] = body[real[:, 1:-1]]  # body column j is position j + 1
    out.scatter_(1, (lengths + 1).unsqueeze(1), eos)
    return out


def single_masked_copies(tokens: Tensor, positions: Tensor, mask_idx: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The copies of each sequence with exactly one position masked.

    Args:
        tokens: C x L sequences.
        positions: C x L bool, the positions to mask (one copy per True entry).
    Returns:
        copies R x L (R = positions.sum(), chain-major, positions in increasing order), and for each
        copy its chain ``rows`` R and masked column ``cols`` R.
    """
    rows, cols = positions.nonzero(as_tuple=True)  # R, R
    copies = tokens.index_select(0, rows).clone()  # R x L
    copies[torch.arange(rows.numel(), device=tokens.device), cols] = mask_idx
    return copies, rows, cols


# ----------------------------------------------------------------------------------------------------
# The energy math (section 6.2)
# ----------------------------------------------------------------------------------------------------


def energy_terms(logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-position contributions to E_local and E_raw.

    Args:
        logits: R x V raw output scores at a masked position (model dtype).
        targets: R the token of the sequence at that position.
    Returns:
        (local R, raw R) in float32 (float64 logits stay float64): ``-log softmax(logits)[y_t]`` (6.2.4) and
        ``-logits[y_t]`` (6.2.1).  E_local's softmax is the model's own, over its whole output vocabulary.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # R
    local = torch.logsumexp(logits, dim=-1) - picked  # R
    return local, -picked


def sum_per_chain(terms: Tensor, rows: Tensor, num_chains: int) -> Tensor:
    """R per-position terms and their chains -> C sums (0 for a chain without positions)."""
    return terms.new_zeros(num_chains).index_add_(0, rows, terms)


# ----------------------------------------------------------------------------------------------------
# The fairseq CMLM as a masked LM
# ----------------------------------------------------------------------------------------------------


class CMLMMaskedLM:
    """A fairseq CMLM (``CMLMNATransformerModel``) decoding rows against an already encoded batch.

    The decoder's features are projected onto the vocabulary at the requested positions only (the same
    numbers as ``decoder(normalize=False, ...)`` gathered there, at 1/L of the output layer's cost).
    Where the decoder allows it (:func:`masked_position_decoder.unsupported_reason`), the source's keys
    and values are projected once per sentence and the last layer runs at the requested positions only
    (``fairseq_ext/modules/masked_position_decoder.py``: the same numbers, less work); otherwise every
    chunk goes through fairseq's ``extract_features``.

    Args:
        model: the CMLM (eval mode; called under ``torch.no_grad`` by the caller).
        encoder_out: ``model.encoder``'s output for the B source sentences; rows name their sentence
            by index into it, and each chunk gets its own ``reorder_encoder_out`` view (no re-encoding).
        max_tokens_per_pass: at most this many decoder tokens (rows x padded length) per forward call;
            None = every row in one call.  A single row longer than it is decoded alone.
        counter: where decoder calls, rows and tokens are counted.
        positions_only: use the positions-only path when the decoder supports it (False: always
            fairseq's ``extract_features``, the reference the fast path is tested and benchmarked against).
    """

    def __init__(self, model, encoder_out, max_tokens_per_pass: Optional[int] = None,
                 counter: Optional[PassCounter] = None, positions_only: bool = True):  # fmt: skip
        self.model = model
        self.encoder_out = encoder_out
        self.max_tokens = max_tokens_per_pass
        self.counter = counter if counter is not None else PassCounter()
        self.mask_idx = model.unk
        self.pad = model.pad
        fast = positions_only and masked_position_decoder.unsupported_reason(model.decoder) is None
        self.source = masked_position_decoder.SourceCache(model.decoder, encoder_out) if fast else None

    def features(self, tokens: Tensor, contexts: Tensor, positions: Tensor) -> Tensor:
        """tokens r x L, contexts r, positions r x K -> the decoder's features r x K x D there."""
        if self.source is not None:
            key_values, source_pad = self.source.rows(contexts)
            return masked_position_decoder.features_at(self.model.decoder, tokens, positions, key_values, source_pad)
        enc = self.model.encoder.reorder_encoder_out(self.encoder_out, contexts)
        features, _ = self.model.decoder.extract_features(tokens, encoder_out=enc)  # r x L x D
        return features.gather(1, positions.unsqueeze(-1).expand(-1, -1, features.size(-1)))

    def __call__(self, tokens: Tensor, contexts: Tensor, positions: Tensor) -> Tensor:
        """tokens R x L, contexts R, positions R x K -> logits R x K x V at those positions."""
        r, length = tokens.shape
        real_len = tokens.ne(self.pad).sum(dim=1)  # R
        per_call = r if not self.max_tokens else max(1, self.max_tokens // max(length, 1))
        out = []
        for start in range(0, r, per_call):
            end = min(r, start + per_call)
            width = int(real_len[start:end].max())  # trim the chunk's common padding
            picked = self.features(tokens[start:end, :width], contexts[start:end], positions[start:end])  # r' x K x D
            self.counter.add(end - start, width)
            out.append(self.model.decoder.output_layer(picked))  # r' x K x V: projected at the K positions only
        if not out:
            return tokens.new_zeros(0, positions.size(1), 0).float()
        return torch.cat(out, dim=0)


# ----------------------------------------------------------------------------------------------------
# The cache: a state's energy and its T single-masked conditionals
# ----------------------------------------------------------------------------------------------------


@dataclass
class EnergyCache:
    """Everything the single-masked passes of C sequences give.

    ``logits`` C x L x V: the raw scores at position t of the pass with t masked (zero at BOS, EOS and
    pad); the proposal of a single-site move at i is read from ``logits[:, i]`` (the pass with i masked
    is the same for y and any y' that differs from y at i only), so it needs no decoder pass.
    ``local`` / ``raw`` C x L: per-position energy terms (0 outside the target positions).
    """

    logits: Tensor
    local: Tensor
    raw: Tensor

    @property
    def energy_local(self) -> Tensor:
        return self.local.sum(dim=1)  # C

    @property
    def energy_raw(self) -> Tensor:
        return self.raw.sum(dim=1)  # C

    def energy(self, kind: str) -> Tensor:
        return self.energy_local if kind == "local" else self.energy_raw

    def select(self, index: Tensor) -> "EnergyCache":
        return EnergyCache(self.logits.index_select(0, index), self.local.index_select(0, index),
                           self.raw.index_select(0, index))  # fmt: skip

    def assign(self, index: Tensor, other: "EnergyCache") -> None:
        """Rows ``index`` of this cache := ``other`` (in place)."""
        self.logits.index_copy_(0, index, other.logits.to(self.logits.dtype))
        self.local.index_copy_(0, index, other.local)
        self.raw.index_copy_(0, index, other.raw)


def masked_conditionals(mlm, tokens: Tensor, contexts: Tensor, lengths: Tensor,
                        known: Optional[Tuple[Tensor, Tensor]] = None) -> EnergyCache:  # fmt: skip
    """The T single-masked passes of C sequences, as one batch (chunked by the masked LM).

    Args:
        tokens: C x L sequences ``BOS y EOS pad``; contexts C their sentences; lengths C their T.
        known: optional (positions C, logits C x V): for chain c, the pass with ``positions[c]`` masked
            is already known (a single-site proposal's: the same pass for y and y'); its row is not
            decoded again (a position < 1 means none is known).
    Returns:
        the :class:`EnergyCache` of the C sequences.  Decoder rows: sum_c T_c (minus the known ones).
    """
    c, length = tokens.shape
    todo = target_positions(lengths, length)  # C x L
    if known is not None:
        known_pos, known_logits = known
        has = known_pos >= 1
        todo[has, known_pos[has]] = False
    copies, rows, cols = single_masked_copies(tokens, todo, mlm.mask_idx)  # R x L, R, R
    parts = []
    if rows.numel():
        parts.append((rows, cols, mlm(copies, contexts.index_select(0, rows), cols.unsqueeze(1))[:, 0]))  # R x V
    if known is not None and bool(has.any()):
        idx = has.nonzero(as_tuple=True)[0]
        parts.append((idx, known_pos[idx], known_logits[idx]))
    if not parts:  # no target positions at all
        raise ValueError("masked_conditionals: no target positions and no known conditionals to size the cache")
    vocab, dtype = parts[0][2].size(-1), parts[0][2].dtype
    table = torch.zeros(c, length, vocab, dtype=dtype, device=tokens.device)  # C x L x V
    local = torch.zeros(c, length, device=tokens.device)
    raw = torch.zeros(c, length, device=tokens.device)
    for r, k, logits in parts:
        table[r, k] = logits.to(dtype)
        local[r, k], raw[r, k] = (term.float() for term in energy_terms(logits, tokens[r, k]))
    return EnergyCache(table, local, raw)


def masked_terms(mlm, tokens: Tensor, contexts: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-position energy terms (local C x L, raw C x L; 0 outside the target positions) of C sequences,
    without keeping the conditionals: only R x V logits at the masked positions live at a time, reduced
    at once to the two terms (sections 6.2.1, 6.2.4).  Decoder rows: sum_c T_c."""
    c, length = tokens.shape
    copies, rows, cols = single_masked_copies(tokens, target_positions(lengths, length), mlm.mask_idx)
    local = torch.zeros(c, length, device=tokens.device)
    raw = torch.zeros(c, length, device=tokens.device)
    if rows.numel():
        logits = mlm(copies, contexts.index_select(0, rows), cols.unsqueeze(1))[:, 0]  # R x V
        local[rows, cols], raw[rows, cols] = (term.float() for term in energy_terms(logits, tokens[rows, cols]))
    return local, raw


def sequence_energies(mlm, tokens: Tensor, contexts: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """(E_local C, E_raw C) of C sequences ``BOS y EOS pad`` (sections 6.2.1, 6.2.4)."""
    local, raw = masked_terms(mlm, tokens, contexts, lengths)
    return local.sum(dim=1), raw.sum(dim=1)


def positions_per_epoch_cost(length: int) -> Tuple[int, int]:
    """(rows, calls) of decoder work for one single-site MH epoch over a sequence of length T, cached
    and batched (this package) -- T proposals, each decoding the T - 1 single-masked copies of the
    proposed state that differ from the current state's (one call) -- against the thesis's Algorithm 4
    loop without a cache (per proposal: T passes for E_old, 1 for the proposal, T for E_new)."""
    t = length
    return t * (t - 1), t


def naive_epoch_cost(length: int) -> int:
    """Decoder passes (one row each) of one epoch of Algorithm 4 as written: T (2T + 1)."""
    return length * (2 * length + 1)

