"""Metropolis-Hastings (and degenerate Gibbs) sampling from the energy of a masked language model.

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis,
CMU 2021), chapter 6 (Goyal, Dyer and Berg-Kirkpatrick):

* target p(y) ∝ exp(-E(y) / T_target), E = E_local or E_raw (sections 6.2.1, 6.2.4, 6.8);
* proposal (6.4): mask a block I of positions of the current state y (|I| = 1: single-site) and draw
  y'_I from the product of the masked conditionals, q(y'|y) = prod_{i in I} p_mlm(y'_i | y_\\I); the
  reverse move has q(y|y') = prod_{i in I} p_mlm(y_i | y_\\I) from the SAME pass (y_\\I = y'_\\I);
* acceptance (6.3): a = min(1, exp(-(E(y') - E(y)) / T_target) q(y|y') / q(y'|y));
* variants (6.4.1): proposal temperature softmax(logits / T_q), nucleus (top-p) truncation, blocks; the
  same truncated, tempered distribution gives the forward and the reverse probability, so a reverse
  move outside the nucleus has probability 0 and the proposal is rejected -- the ratio stays exact;
* an epoch is one sweep over the positions (6.4), in random order without replacement (default; a
  fresh permutation per chain and epoch, 6.5 "Index selection") or left to right; block epochs split the
  sweep into consecutive groups of b positions;
* block size annealed linearly from b to 1 over the epochs (6.7.3), target temperature lowered by a
  constant per epoch down to a floor > 0 (6.8), every proposal accepted during the first n epochs
  ("forced acceptance", 6.8, Table 6.6's setup);
* degenerate Gibbs (6.6): the same proposals, always accepted (not a valid sampler of any E, 6.2.1).

Support.  Proposals never produce BOS, pad, EOS or the mask symbol (their logits are set to -inf
before the temperature and the nucleus); the target distribution is over sequences of the other
symbols, and the warm start (the generator's greedy fill) lies in it.

Randomness is counter-based: every random number is a hash of (seed, sentence id, length rank,
chain, epoch, step, slot, purpose) (:func:`counter_uniform`), so a chain's trajectory does not depend on
which other sentences or chains share its batch, on padding, or on chunking of the decoder passes.

Cost (decoder rows per epoch and chain of length T, single-site MH): the proposal reads the cached
conditional of the current state (0 rows); the proposed state y' needs its T single-masked passes for
E(y'), of which the one at the proposed position equals the current state's (T - 1 rows); a proposal
that equals the current token needs none.  Hence <= T (T - 1) rows in T batched decoder calls per epoch,
against T (2T + 1) single-row passes for Algorithm 4 as written (E_old, the proposal pass and E_new
for each of the T positions).  Block proposals add one row (the pass with the block masked) and need
all T passes of y'.  Degenerate Gibbs: one row per proposal, plus T rows per epoch for the statistics.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fairseq_ext.modules.mlm_energy import EnergyCache, masked_conditionals, masked_terms, target_positions

SAMPLERS = ("mh", "gibbs")
ORDERS = ("random", "left_to_right")
ENERGIES = ("local", "raw")

# purposes of the counter-based random numbers
_ORDER, _PROPOSAL, _ACCEPT = 1, 2, 3


@dataclass
class SamplerSettings:
    """The chain's options (the generator fills them from the ``--mh-*`` flags of the same names)."""

    sampler: str = "mh"
    energy: str = "local"
    proposal_temperature: float = 1.0
    top_p: float = 1.0
    block_size: int = 1
    block_anneal: bool = False
    order: str = "random"
    burn_in_epochs: int = 7
    sample_epochs: int = 26
    target_temperature: float = 1.0
    target_temperature_step: float = 0.0
    target_temperature_floor: float = 0.05
    forced_accept_epochs: int = 0
    seed: int = 1

    @property
    def total_epochs(self) -> int:
        return self.burn_in_epochs + self.sample_epochs


def check_settings(s: SamplerSettings) -> None:
    """Raises ValueError naming the ``--mh-*`` flag for options that cannot define a valid sampler."""

    def finite(x):
        return isinstance(x, (int, float)) and math.isfinite(x)

    if s.sampler not in SAMPLERS:
        raise ValueError(f"--mh-sampler {s.sampler}: choose one of {', '.join(SAMPLERS)} (or mask_predict)")
    if s.energy not in ENERGIES:
        raise ValueError(f"--mh-energy {s.energy}: choose local or raw")
    if s.order not in ORDERS:
        raise ValueError(f"--mh-order {s.order}: choose random or left_to_right")
    if not finite(s.proposal_temperature) or s.proposal_temperature <= 0:
        raise ValueError(f"--mh-proposal-temperature {s.proposal_temperature}: must be a finite number > 0")
    if not finite(s.top_p) or not 0 < s.top_p <= 1:
        raise ValueError(f"--mh-top-p {s.top_p}: the nucleus must lie in (0, 1] (1 = no truncation)")
    if int(s.block_size) < 1:
        raise ValueError(f"--mh-block-size {s.block_size}: must be >= 1")
    if int(s.burn_in_epochs) < 0:
        raise ValueError(f"--mh-burn-in-epochs {s.burn_in_epochs}: must be >= 0")
    if int(s.sample_epochs) < 0:
        raise ValueError(f"--mh-sample-epochs {s.sample_epochs}: must be >= 0")
    if int(s.forced_accept_epochs) < 0:
        raise ValueError(f"--mh-forced-accept-epochs {s.forced_accept_epochs}: must be >= 0")
    if not finite(s.target_temperature) or s.target_temperature <= 0:
        raise ValueError(f"--mh-target-temperature {s.target_temperature}: must be a finite number > 0")
    if not finite(s.target_temperature_step) or s.target_temperature_step < 0:
        raise ValueError(
            f"--mh-target-temperature-step {s.target_temperature_step}: must be >= 0 (subtracted from the target "
            "temperature once per epoch; 0 = no annealing)"
        )
    if not finite(s.target_temperature_floor) or s.target_temperature_floor <= 0:
        raise ValueError(
            f"--mh-target-temperature-floor {s.target_temperature_floor}: must be > 0: annealing may not drive "
            "the target temperature to zero or below (p ∝ exp(-E/T) is undefined there)"
        )
    if s.target_temperature_step > 0 and s.target_temperature_floor > s.target_temperature:
        raise ValueError(
            f"--mh-target-temperature-floor {s.target_temperature_floor} is above --mh-target-temperature "
            f"{s.target_temperature}: annealing lowers the temperature towards the floor"
        )


# ----------------------------------------------------------------------------------------------------
# Counter-based random numbers
# ----------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow (c split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply; good avalanche), elementwise on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: int, *keys, device=None) -> Tensor:
    """A uniform number in (0, 1) (float64, 53 random bits) per element of the broadcast ``keys``.

    A pure function of (seed, keys): the same keys give the same number wherever and whenever they are
    drawn.  Keys are non-negative integers below 2^32 (ints or int64 tensors).
    """
    tensors = [k for k in keys if torch.is_tensor(k)]
    device = device or (tensors[0].device if tensors else None)
    h = torch.tensor((seed & _MASK32) ^ 0x3C6EF372, dtype=torch.long, device=device)
    h = _mix32(_mix32(h) ^ ((seed >> 32) & _MASK32))
    for k in keys:
        k = k if torch.is_tensor(k) else torch.tensor(int(k), dtype=torch.long, device=device)
        h = _mix32(h ^ (k.long() & _MASK32))
    hi = _mix32(h ^ 0x68E31DA4) >> 5  # 27 bits
    lo = _mix32(h ^ 0x1B56C4E9) >> 6  # 26 bits
    return ((hi.double() * 67108864.0 + lo.double()) + 0.5) / 9007199254740992.0  # (n + 0.5) / 2^53


# ----------------------------------------------------------------------------------------------------
# Schedules (6.7.3, 6.8)
# ----------------------------------------------------------------------------------------------------


def block_size_at(epoch: int, block_size: int, total_epochs: int, anneal: bool) -> int:
    """The block size of epoch ``epoch`` (1-based): b, or with annealing linear from b at epoch 1 to 1
    at the last epoch (rounded half up), as section 6.7.3 ("eventually reducing to blocksize of 1")."""
    if not anneal or total_epochs <= 1 or block_size == 1:
        return block_size
    frac = (total_epochs - epoch) / (total_epochs - 1)  # 1 at the first epoch, 0 at the last
    return 1 + int(math.floor((block_size - 1) * frac + 0.5))


def target_temperature_at(epoch: int, start: float, step: float, floor: float) -> float:
    """T_target of epoch ``epoch`` (1-based): ``start - step (epoch - 1)``, never below ``floor`` (6.8)."""
    if step <= 0:
        return start
    return max(floor, start - step * (epoch - 1))


# ----------------------------------------------------------------------------------------------------
# Proposals and acceptance (6.3, 6.4, 6.4.1)
# ----------------------------------------------------------------------------------------------------


def proposal_log_probs(logits: Tensor, temperature: float, top_p: float, banned: Optional[Tensor]) -> Tensor:
    """log q over the vocabulary: softmax(logits / T_q), then the nucleus, renormalised (6.4.1).

    Args:
        logits: ... x V raw scores at a masked position.
        banned: V bool, symbols never proposed (-inf before anything else), or None.
        top_p: keep the smallest set of most probable symbols whose (tempered) mass is >= top_p
            (the most probable symbol always); 1 keeps everything.
    Returns:
        ... x V float32 log-probabilities, -inf outside the support.
    """
    x = logits.float() / temperature
    if banned is not None:
        x = x.masked_fill(banned, -math.inf)
    logq = torch.log_softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_lq, order = logq.sort(dim=-1, descending=True)
        mass_before = sorted_lq.exp().cumsum(dim=-1) - sorted_lq.exp()  # mass of strictly more probable symbols
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logq = torch.log_softmax(logq.masked_fill(drop, -math.inf), dim=-1)
    return logq


def sample_tokens(logq: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw from ``exp(logq)``: ... x V log-probs, ... uniforms in (0, 1) -> ... tokens.

    Deterministic given (logq, u); symbols of probability 0 are never drawn."""
    p = logq.double().exp()  # ... x V
    cdf = p.cumsum(dim=-1)
    total = cdf[..., -1:]
    idx = torch.searchsorted(cdf, (u.double().unsqueeze(-1) * total).contiguous(), right=True).squeeze(-1)
    last = torch.where(p > 0, torch.arange(p.size(-1), device=p.device), -1).max(dim=-1).values  # last support
    return torch.minimum(idx, last)


def log_acceptance(energy_new: Tensor, energy_old: Tensor, logq_reverse: Tensor, logq_forward: Tensor,
                   target_temperature: float) -> Tensor:  # fmt: skip
    """log a(y'; y) before the min with 0 (6.3, 6.8):
    -(E(y') - E(y)) / T_target + log q(y | y') - log q(y' | y); -inf when the reverse move is impossible."""
    return -(energy_new - energy_old) / target_temperature + logq_reverse - logq_forward


def accept_moves(log_a: Tensor, u: Tensor, forced: bool) -> Tensor:
    """Accept with probability min(1, exp(log_a)): u < exp(log_a), i.e. log u < log_a; all when forced."""
    if forced:
        return torch.ones_like(log_a, dtype=torch.bool)
    return torch.log(u.double()) < log_a.double()


def visiting_order(lengths: Tensor, max_len: int, order: str, seed: int, ids: Tensor, epoch: int) -> Tensor:
    """C x L positions of an epoch's sweep: the first T_c entries of row c are its target positions
    (random: a permutation drawn from the chain's counter stream; left_to_right: 1 .. T_c), then others."""
    pos = torch.arange(max_len, device=lengths.device).unsqueeze(0).expand(lengths.numel(), -1)  # C x L
    real = target_positions(lengths, max_len)
    if order == "random":
        key = counter_uniform(seed, ids[:, 0:1], ids[:, 1:2], ids[:, 2:3], epoch, _ORDER, pos)  # C x L
    else:
        key = pos.double()
    key = torch.where(real, key, key.new_full((), float(max_len) + 2.0) + pos)
    return key.argsort(dim=1, stable=True)


# ----------------------------------------------------------------------------------------------------
# The chains
# ----------------------------------------------------------------------------------------------------


@dataclass
class Chains:
    """C chains sampled side by side (the generator's flattening: sentence x length rank x chain).

    tokens C x L (``BOS y EOS pad``), lengths C (T), contexts C (sentence index into the encoded batch),
    ids C x 3 (sentence id, length rank, chain: the random stream's key); energy_local / energy_raw C and
    terms_local / terms_raw C x L of the current state; cache: its single-masked conditionals (MH only);
    best_*: the lowest-energy state seen so far; samples: (tokens, terms_local, terms_raw) per sample epoch.
    """

    tokens: Tensor
    lengths: Tensor
    contexts: Tensor
    ids: Tensor
    terms_local: Tensor
    terms_raw: Tensor
    cache: Optional[EnergyCache] = None
    best_tokens: Optional[Tensor] = None
    best_terms_local: Optional[Tensor] = None
    best_terms_raw: Optional[Tensor] = None
    samples: List[Tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    @property
    def num(self) -> int:
        return self.tokens.size(0)

    def energy(self, kind: str) -> Tensor:
        return (self.terms_local if kind == "local" else self.terms_raw).sum(dim=1)


class MetropolisHastingsSampler:
    """Runs the chains of :class:`Chains` epoch by epoch with a masked LM (see :mod:`mlm_energy`).

    Args:
        mlm: the masked LM callable (``mlm(tokens, contexts, positions) -> logits``, ``mlm.mask_idx``).
        settings: :class:`SamplerSettings` (checked here).
        banned: V bool, symbols the proposals never produce (BOS, pad, EOS, mask).
    """

    def __init__(self, mlm, settings: SamplerSettings, banned: Optional[Tensor] = None):
        check_settings(settings)
        self.mlm = mlm
        self.s = settings
        self.banned = banned

    # -- set-up ---------------------------------------------------------------------------------------
    def start(self, tokens: Tensor, lengths: Tensor, contexts: Tensor, ids: Tensor) -> Chains:
        """Chains at the given states (the warm start): their energies (and, for MH, the cache)."""
        b = int(self.s.block_size)
        short = (lengths < b).nonzero(as_tuple=True)[0]
        if short.numel():
            c = int(short[0])
            raise ValueError(
                f"--mh-block-size {b} is larger than the target length {int(lengths[c])} of sentence "
                f"{int(ids[c, 0])} (length rank {int(ids[c, 1])}): a block cannot mask more positions than the "
                "target has; lower --mh-block-size"
            )
        chains = Chains(tokens.clone(), lengths, contexts, ids, *self._terms(tokens, lengths, contexts))
        chains.best_tokens = chains.tokens.clone()
        chains.best_terms_local, chains.best_terms_raw = chains.terms_local.clone(), chains.terms_raw.clone()
        return chains

    def _terms(self, tokens, lengths, contexts) -> Tuple[Tensor, Tensor, Optional[EnergyCache]]:
        """Per-position energy terms of the states, and for MH the cache of their conditionals."""
        if self.s.sampler != "mh":
            return (*masked_terms(self.mlm, tokens, contexts, lengths), None)
        cache = masked_conditionals(self.mlm, tokens, contexts, lengths)
        return cache.local, cache.raw, cache

    # -- one epoch ------------------------------------------------------------------------------------
    def run_epoch(self, ch: Chains, epoch: int) -> Dict[str, float]:
        """One sweep of every chain (``epoch`` >= 1); returns the epoch's statistics averaged over chains."""
        s = self.s
        b = block_size_at(epoch, int(s.block_size), s.total_epochs, bool(s.block_anneal))
        tau = target_temperature_at(epoch, s.target_temperature, s.target_temperature_step, s.target_temperature_floor)
        forced = epoch <= int(s.forced_accept_epochs)
        c, length = ch.tokens.shape
        order = visiting_order(ch.lengths, length, s.order, s.seed, ch.ids, epoch)  # C x L
        steps = (ch.lengths + b - 1) // b  # C
        proposals = torch.zeros(c, device=ch.tokens.device)
        accepted = torch.zeros_like(proposals)
        novel = torch.zeros_like(proposals)
        for step in range(int(steps.max()) if c else 0):
            act = (steps > step).nonzero(as_tuple=True)[0]  # A
            acc, changed = self._step(ch, act, order, step, b, tau, forced, epoch)
            proposals[act] += 1
            accepted[act] += acc.float()
            novel[act] += (acc & changed).float()
        if s.sampler != "mh":  # Gibbs keeps no energies along the way: the end state's, for the statistics
            ch.terms_local, ch.terms_raw, _ = self._terms(ch.tokens, ch.lengths, ch.contexts)
            self._track_best(ch, torch.arange(c, device=ch.tokens.device))
        if epoch > s.burn_in_epochs:
            ch.samples.append((ch.tokens.clone(), ch.terms_local.clone(), ch.terms_raw.clone()))
        has = proposals > 0
        rate = lambda x: float((x[has] / proposals[has]).mean()) if bool(has.any()) else None  # noqa: E731
        return {
            "chains": c,
            "acceptance_rate": rate(accepted),
            "novel_rate": rate(novel),
            "energy_local": float(ch.energy("local").mean()) if c else None,
            "energy_raw": float(ch.energy("raw").mean()) if c else None,
            "target_temperature": float(tau),
            "block_size": int(b),
        }

    def _step(self, ch: Chains, act: Tensor, order: Tensor, step: int, b: int, tau: float, forced: bool,
              epoch: int) -> Tuple[Tensor, Tensor]:  # fmt: skip
        """One proposal for each chain in ``act`` (A); returns (accepted A, changed A) and updates ``ch``."""
        s = self.s
        a = act.numel()
        lengths = ch.lengths[act]  # A
        slot = torch.arange(b, device=act.device)  # b
        col = step * b + slot  # b: index into the sweep
        valid = col.unsqueeze(0) < lengths.unsqueeze(1)  # A x b
        pos = order[act].gather(1, col.clamp(max=order.size(1) - 1).unsqueeze(0).expand(a, -1))  # A x b
        pos = torch.where(valid, pos, torch.zeros_like(pos))  # invalid slots point at BOS (left unchanged)
        tokens = ch.tokens[act]  # A x L
        cur = tokens.gather(1, pos)  # A x b
        use_cache = s.sampler == "mh" and b == 1 and ch.cache is not None
        if use_cache:
            logits = ch.cache.logits[act, pos[:, 0]].unsqueeze(1)  # A x 1 x V: the pass with pos masked
        else:
            masked = tokens.scatter(1, pos, torch.where(valid, self.mlm.mask_idx, cur))  # A x L
            logits = self.mlm(masked, ch.contexts[act], pos)  # A x b x V
        logq = proposal_log_probs(logits, s.proposal_temperature, s.top_p, self.banned)  # A x b x V
        ids = ch.ids[act]
        u = counter_uniform(s.seed, ids[:, 0:1], ids[:, 1:2], ids[:, 2:3], epoch, step, slot.unsqueeze(0), _PROPOSAL)
        new = torch.where(valid, sample_tokens(logq, u), cur)  # A x b
        zero = torch.zeros((), device=logq.device)
        lq_fwd = torch.where(valid, logq.gather(-1, new.unsqueeze(-1)).squeeze(-1), zero).sum(dim=1)  # A
        lq_rev = torch.where(valid, logq.gather(-1, cur.unsqueeze(-1)).squeeze(-1), zero).sum(dim=1)  # A
        changed = (new != cur).any(dim=1)  # A
        proposed = tokens.scatter(1, pos, new)  # A x L

        if s.sampler != "mh":  # degenerate Gibbs (6.6): always accept
            ch.tokens[act] = proposed
            return torch.ones(a, dtype=torch.bool, device=act.device), changed

        accept = torch.ones(a, dtype=torch.bool, device=act.device)  # an unchanged state: ratio 1
        idx = changed.nonzero(as_tuple=True)[0]  # A'
        if idx.numel():
            chains_idx = act[idx]
            known = (pos[idx, 0], logits[idx, 0]) if use_cache else None
            new_cache = masked_conditionals(self.mlm, proposed[idx], ch.contexts[chains_idx], lengths[idx], known)
            e_new = new_cache.energy(s.energy)  # A'
            e_old = ch.energy(s.energy)[chains_idx]  # A'
            log_a = log_acceptance(e_new, e_old, lq_rev[idx], lq_fwd[idx], tau)
            u_acc = counter_uniform(s.seed, ids[idx, 0], ids[idx, 1], ids[idx, 2], epoch, step, 0, _ACCEPT)
            ok = accept_moves(log_a, u_acc, forced)  # A'
            accept[idx] = ok
            take = idx[ok]
            if take.numel():
                rows = act[take]
                ch.tokens[rows] = proposed[take]
                sub = new_cache.select(ok.nonzero(as_tuple=True)[0])
                ch.cache.assign(rows, sub)
                ch.terms_local[rows] = sub.local
                ch.terms_raw[rows] = sub.raw
                self._track_best(ch, rows)
        return accept, changed

    def _track_best(self, ch: Chains, rows: Tensor) -> None:
        kind = self.s.energy
        e = (ch.terms_local if kind == "local" else ch.terms_raw)[rows].sum(dim=1)
        best = (ch.best_terms_local if kind == "local" else ch.best_terms_raw)[rows].sum(dim=1)
        better = rows[e < best]
        if better.numel():
            ch.best_tokens[better] = ch.tokens[better]
            ch.best_terms_local[better] = ch.terms_local[better]
            ch.best_terms_raw[better] = ch.terms_raw[better]

