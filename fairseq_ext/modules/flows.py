"""The elementary flow layers of FlowSeq's prior (Ma et al., EMNLP 2019, §3.4 and Figure 3), at the
shapes of the authors' implementation (XuezheMax/flowseq, ``flownmt/flows``).

Layers, data -> noise (``forward``):

* :class:`ActNorm` (Eq. 10): per-channel scale and bias, data-dependent init.
* :class:`InvertibleMultiHeadLinear` (Eq. 11): the C channels in heads of ``d`` (32, 16 or 8, the
  largest that divides C), ONE ``d x d`` matrix shared by all heads; type A groups the heads'
  channels contiguously, type B strided.
* :class:`AffineCoupling` (§3.4): ``z_b' = sigmoid(raw + 2) * z_b + mu`` with ``(mu, raw)`` a
  network of ``z_a`` and the source.  Splits: channel halves, interleaved channels, and even / odd
  TIME steps; for a time split the network runs on the T/2 conditioning steps only.
* The coupling network (the reference's self-attention coupling block) works at the width of
  ``z_a`` (C/2 for channel splits, C for time splits): sinusoidal positions added to ``z_a`` (or,
  for the coupling that opens each level, a positional attention whose queries are the
  sinusoids), one post-norm Transformer decoder layer (self-attention, cross-attention to the
  source projected to that width, feed-forward block through ``hidden``), and a zero-initialised
  linear output.  The hidden width is used only inside the feed-forward block.
* Composites: :class:`FlowUnit` (coupling pairs up/down on channel halves, actnorm, on interleaved
  channels, and, in levels that split, actnorm + a time-split pair), :class:`FlowStep` (actnorm,
  linear A, unit, actnorm, linear B, unit) and :class:`PosAttnUnit` (actnorm, positional-attention
  coupling up, coupling down), which opens every level.  The multi-scale stacking lives in
  ``flow_prior.py``.

Layer contract (every layer here, and ``MultiScalePrior``)::

    forward(z, mask, src, src_mask)        -> (eps, logdet)   data -> noise (training direction)
    inverse(eps, mask, src, src_mask)      -> (z, logdet)     noise -> data (generation)
    init_from_data(z, mask, src, src_mask) -> (eps, logdet)   forward after data-dependent init

* ``z``/``eps``: N x T x C.  ``mask``: N x T, float or bool, 1 at real positions, or a
  :class:`LevelContext` built from one (the prior builds one per level, so masks, positions,
  key-padding masks and sinusoids are made once per level, not once per layer).
* ``src``: B x S x H source encodings (batch first) with ``src_mask`` B x S (1 = real), or a
  :class:`SourceMemory`.  B may divide N: rows ``b*n .. b*n+n-1`` of z are candidates of sentence b
  (sentence-major, n = N / B), and every coupling projects each SENTENCE's source keys and values
  once (queries of a sentence's n candidates attend to them together).  A ``SourceMemory`` reused
  across calls (the generator's) also keeps those keys and values between calls.
  Layers that do not condition on the source accept and ignore ``src``/``src_mask``.
* ``logdet``: an N tensor, in at least float32 whatever the input dtype (``slogdet``/``inv`` also
  run in float32 for half-precision weights).  forward returns ``log|det d eps / d z|``, inverse
  ``log|det d z / d eps|``, so the two cancel at corresponding points and, by Eq. (6),
  ``log p(z|x) = log N(eps; 0, I) + forward logdet``.
* With dropout > 0 in training mode, forward and inverse draw different dropout masks and are not
  inverses of each other; invert (decode) in ``eval()``.
* Padding: outputs at masked positions are exactly the inputs there (updates are selected with
  ``torch.where``, and padded inputs are zeroed before any network or matrix sees them, so even
  inf/NaN padding cannot leak into a real position or into the log-determinant), and
  log-determinants count real positions only.

Where this departs from the reference implementation, and why: the coupling output layer is a plain
zero-initialised linear rather than a weight-normalised one (whose data-dependent init at scale 0
also starts at zero; the reference's extra weight-norm gains are the whole parameter difference
printed by ``bench/flowseq_param_count.py``); actnorm's init statistics skip padding; the inverse of
the multi-head linear is cached against the live weight's content (never stale), where the
reference keeps a buffer refreshed only by ``sync()``; positions count real steps from 0.
"""
import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLITS = ("channel_halves", "channel_interleaved", "time_interleaved")
HEAD_LAYOUTS = ("contiguous", "strided")  # the reference's type A and type B
LINEAR_HEAD_SIZES = (32, 16, 8)  # the reference's head size choice for the multi-head linear

# Reference implementation (XuezheMax/flowseq, affine coupling): the scale is sigmoid(raw + 2),
# bounded in (0, 1), so a zero-initialised coupling net starts at scale sigmoid(2) ~ 0.881, not 1.
COUPLING_SCALE_SHIFT = 2.0


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------


def bool_mask(mask: Tensor) -> Tensor:
    """B x T float or bool mask (1 = real) -> B x T bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def logdet_dtype(x: Tensor) -> torch.dtype:
    """Log-determinants and log-densities are accumulated in at least float32 (sums over a
    sentence's entries overflow or lose all precision in half precision)."""
    return torch.promote_types(x.dtype, torch.float32)


def linalg_dtype(w: Tensor) -> torch.dtype:
    """``slogdet``/``inv`` are run in at least float32 (they do not support half precision)."""
    return torch.promote_types(w.dtype, torch.float32)


def real_counts(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """B x T mask -> B number of real positions, in ``dtype``."""
    return bool_mask(mask).sum(dim=1).to(dtype)


def real_positions(mask: Tensor) -> Tensor:
    """B x T mask -> B x T long index of each position among the real ones (0, 1, ...).

    Positions are counted over real steps, so a sentence's positional encodings do not depend on
    how much padding surrounds it (batch invariance).
    """
    return (bool_mask(mask).long().cumsum(dim=1) - 1).clamp(min=0)


def sinusoidal_encoding(positions: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """B x T integer positions -> B x T x dim sinusoids (Vaswani et al., 2017, §3.5).

    ``[sin(p w_0) .. sin(p w_{k-1}), cos(p w_0) .. cos(p w_{k-1})]`` with k = dim // 2 and
    ``w_i = 10000^(-2i / dim)`` (halves concatenated, as fairseq does); an odd dim gets one zero
    channel.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / dim)
    )  # k
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # B x T x k
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)  # B x T x 2k
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc.to(dtype)


def standard_normal_log_prob(eps: Tensor, mask: Tensor) -> Tensor:
    """log N(eps; 0, I) summed over channels and real positions: B x T x C -> B."""
    per_entry = -0.5 * (eps.to(logdet_dtype(eps)).pow(2) + math.log(2 * math.pi))  # B x T x C
    return torch.where(bool_mask(mask).unsqueeze(-1), per_entry, per_entry.new_zeros(())).sum(dim=(1, 2))


def padding_mask_with_fallback(real: Tensor) -> Tensor:
    """B x T bool "real key" mask -> key padding mask (True at PADDING).

    A row with no real key would make the attention softmax all -inf (NaN).  Such a row only
    occurs where a layer's output is discarded anyway (an all-padding sentence, or an empty
    source); there key 0 is unmasked.  Key 0's input is zeroed (content-free) in both cases.
    """
    pad = ~real  # B x T
    if pad.size(1) == 0:
        return pad
    empty = pad.all(dim=1, keepdim=True)  # B x 1
    first = torch.zeros_like(pad)
    first[:, 0] = True
    return pad & ~(empty & first)


def squeeze(z: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Multi-scale squeeze (§3.4): B x T x C -> B x T/2 x 2C, pairing time steps (2t, 2t+1).

    Squeezed position t holds ``concat(z[2t], z[2t+1])`` and is real iff both halves are real
    (exact when real lengths are even, which the prior's length unit guarantees).  The mask keeps
    its dtype.  A permutation: log-determinant 0.
    """
    bsz, length, channels = z.shape
    assert length % 2 == 0, f"squeeze needs an even length, got T={length}"
    out_mask = None if mask is None else squeeze_mask(mask)  # B x T/2
    return z.reshape(bsz, length // 2, 2 * channels), out_mask  # B x T/2 x 2C


def squeeze_mask(mask: Tensor) -> Tensor:
    """B x T -> B x T/2 (same dtype): squeezed step t is real iff steps 2t and 2t+1 both are."""
    bsz, length = mask.shape
    return bool_mask(mask).reshape(bsz, length // 2, 2).all(dim=-1).to(mask.dtype)


def unsqueeze(z: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Inverse of :func:`squeeze`: B x T x 2C -> B x 2T x C, mask B x T -> B x 2T (or None)."""
    bsz, length, channels = z.shape
    assert channels % 2 == 0, f"unsqueeze needs an even width, got C={channels}"
    out = z.reshape(bsz, 2 * length, channels // 2)  # B x 2T x C/2
    return out, None if mask is None else mask.repeat_interleave(2, dim=1)


def split(z: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Multi-scale split (§3.4): keep the first half of the channels, factor out the second.

    The factored-out half is modelled as N(0, I) (the conditioning on the kept half and the source
    is done by the prior coupling the prior runs just before the split, as the reference does).
    Returns ``(kept B x T x C/2, dropped B x T x C/2, log N(dropped) B)``, the density counted at
    real positions only.
    """
    channels = z.size(-1)
    assert channels % 2 == 0, f"split needs an even width, got C={channels}"
    keep, drop = z[..., : channels // 2], z[..., channels // 2 :]
    return keep, drop, standard_normal_log_prob(drop, mask)


def merge(keep: Tensor, drop: Tensor) -> Tensor:
    """Inverse of :func:`split`: concatenate the kept and factored-out halves (B x T x C)."""
    return torch.cat([keep, drop], dim=-1)


def interleave(first: Tensor, second: Tensor, dim: int) -> Tensor:
    """Inverse of ``(x.narrow-even, x.narrow-odd)`` along ``dim`` (1 = time, -1 = channels)."""
    dim = dim % first.dim()
    stacked = torch.stack([first, second], dim=dim + 1)  # ... x n x 2 x ...
    shape = list(first.shape)
    shape[dim] *= 2
    return stacked.reshape(shape)


def linear_head_size(features: int) -> int:
    """The reference's head size of the multi-head linear: 32, 16 or 8, the first dividing C (else C)."""
    for unit in LINEAR_HEAD_SIZES:
        if features % unit == 0:
            return unit
    if features >= 8:
        raise ValueError(f"the invertible multi-head linear needs a width divisible by 8 or below 8, got {features}")
    return features


# ------------------------------------------------------------------------------------------------
# contexts: what depends only on a level's mask, and the source
# ------------------------------------------------------------------------------------------------


class SourceMemory(object):
    """The source of a prior call: B x S x H encodings (zeroed at padding) and their key-padding mask.

    ``keys_values(net, make)`` caches each coupling network's projected source keys and values for
    the memory's lifetime: a memory built per call (the default) projects once per call, and one
    reused across calls with unchanged weights (the generator's, under ``no_grad``) once per batch.
    Do not keep a memory across weight updates.
    """

    def __init__(self, src: Tensor, src_mask: Optional[Tensor]):
        if src_mask is None:
            real = torch.ones(src.shape[:2], dtype=torch.bool, device=src.device)
        else:
            real = bool_mask(src_mask)
        self.src = torch.where(real.unsqueeze(-1), src, src.new_zeros(()))  # B x S x H
        self.key_padding = padding_mask_with_fallback(real)  # B x S, True = pad
        self._cache: Dict[int, Tuple[Tensor, Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return self.src.size(0)

    def keys_values(self, owner: nn.Module, make, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        key = id(owner)
        hit = self._cache.get(key)
        if hit is None or hit[0].dtype != dtype:
            hit = make(self.src.to(dtype))
            self._cache[key] = hit
        return hit


def as_source(src, src_mask) -> Optional[SourceMemory]:
    if src is None or isinstance(src, SourceMemory):
        return src
    return SourceMemory(src, src_mask)


class LevelContext(object):
    """Everything a level's layers need that depends only on its mask (and the source), built once.

    ``mask`` N x T bool; ``counts(dtype)`` real positions per row; ``key_padding`` N x T (True at
    padding, with the empty-row fallback); ``sinusoids(dim, dtype)`` N x T x dim, zero at padding;
    ``half()`` the context of the T/2 even (equally, odd) steps a time-split coupling conditions on.
    """

    def __init__(self, mask: Tensor, source: Optional[SourceMemory]):
        self.mask = bool_mask(mask)  # N x T
        self.source = source
        if source is not None and self.mask.size(0) % source.batch_size:
            raise ValueError(
                f"{self.mask.size(0)} flow rows are not a whole number of candidates for each of the "
                f"{source.batch_size} source sentences (rows must be sentence-major)"
            )
        self._counts: Dict[torch.dtype, Tensor] = {}
        self._key_padding: Optional[Tensor] = None
        self._sinusoids: Dict[Tuple[int, torch.dtype], Tensor] = {}
        self._half: Optional["LevelContext"] = None

    @property
    def group(self) -> int:
        """Candidates per source sentence (n = N / B)."""
        return self.mask.size(0) // self.source.batch_size

    def counts(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._counts:
            self._counts[dtype] = self.mask.sum(dim=1).to(dtype)
        return self._counts[dtype]

    @property
    def key_padding(self) -> Tensor:
        if self._key_padding is None:
            self._key_padding = padding_mask_with_fallback(self.mask)
        return self._key_padding

    def sinusoids(self, dim: int, dtype: torch.dtype) -> Tensor:
        key = (dim, dtype)
        if key not in self._sinusoids:
            enc = sinusoidal_encoding(real_positions(self.mask), dim, dtype)  # N x T x dim
            self._sinusoids[key] = enc * self.mask.unsqueeze(-1).to(dtype)
        return self._sinusoids[key]

    def half(self) -> "LevelContext":
        """The context of steps 0, 2, 4, ... (equal to that of steps 1, 3, 5, ...): needs an even T
        and every real length even (pairs of steps both real or both padding)."""
        if self._half is None:
            length = self.mask.size(1)
            even, odd = self.mask[:, 0::2], self.mask[:, 1::2]
            if length % 2 or not torch.equal(even, odd):
                raise ValueError(
                    "a time-split coupling needs an even padded length and even real lengths "
                    f"(got T={length}, real lengths {self.mask.sum(1).tolist()})"
                )
            self._half = LevelContext(even, self.source)
        return self._half


def as_context(mask, src=None, src_mask=None) -> LevelContext:
    if isinstance(mask, LevelContext):
        return mask
    return LevelContext(mask, as_source(src, src_mask))


# ------------------------------------------------------------------------------------------------
# ActNorm (Eq. 10)
# ------------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """Actnorm, Eq. (10): ``eps_t = z_t * exp(log_scale) + bias`` per channel.

    Data-dependent init (:meth:`init_from_data`) sets ``log_scale = -log(std)`` and
    ``bias = -mean / std`` so that the output has zero mean and unit (population) variance per
    channel over the REAL positions of the init batch.  The reference computed the statistics
    over all positions including padding, which biases them; we do not.  The inverse is exact
    (``(eps - bias) * exp(-log_scale)``; the reference divides by ``exp(log_scale) + 1e-8``).
    Before init the layer is the identity (log_scale = bias = 0).
    """

    def __init__(self, features: int, init_eps: float = 1e-6):
        super().__init__()
        self.features = features
        self.init_eps = init_eps
        self.log_scale = nn.Parameter(torch.zeros(features))  # C
        self.bias = nn.Parameter(torch.zeros(features))  # C

    def _logdet(self, ctx: LevelContext, dtype: torch.dtype) -> Tensor:
        return self.log_scale.sum().to(dtype) * ctx.counts(dtype)  # N

    def forward(self, z: Tensor, mask, src=None, src_mask=None):
        ctx = as_context(mask)
        m = ctx.mask.unsqueeze(-1)  # N x T x 1
        eps = torch.where(m, z * self.log_scale.exp() + self.bias, z)  # N x T x C
        return eps, self._logdet(ctx, logdet_dtype(z))

    def inverse(self, eps: Tensor, mask, src=None, src_mask=None):
        ctx = as_context(mask)
        m = ctx.mask.unsqueeze(-1)
        z = torch.where(m, (eps - self.bias) * torch.exp(-self.log_scale), eps)  # N x T x C
        return z, -self._logdet(ctx, logdet_dtype(eps))

    @torch.no_grad()
    def _init_parameters(self, z: Tensor, mask: Tensor) -> None:
        m = bool_mask(mask).unsqueeze(-1)  # N x T x 1
        z = z.to(logdet_dtype(z))  # statistics in at least float32
        count = m.sum().clamp(min=1).to(z.dtype)
        real = torch.where(m, z, z.new_zeros(()))  # padding excluded (even if huge or inf)
        mean = real.sum(dim=(0, 1)) / count  # C
        var = torch.where(m, z - mean, z.new_zeros(())).pow(2).sum(dim=(0, 1)) / count  # C
        inv_std = 1.0 / (var.sqrt() + self.init_eps)
        self.log_scale.copy_(inv_std.log().to(self.log_scale.dtype))
        self.bias.copy_((-mean * inv_std).to(self.bias.dtype))

    def init_from_data(self, z: Tensor, mask, src=None, src_mask=None):
        ctx = as_context(mask)
        self._init_parameters(z, ctx.mask)
        return self.forward(z, ctx)


# ------------------------------------------------------------------------------------------------
# Invertible multi-head linear (Eq. 11)
# ------------------------------------------------------------------------------------------------


def split_heads(z: Tensor, head_size: int, layout: str) -> Tensor:
    """N x T x C -> N x T x heads x d (d = ``head_size``, heads = C / d).

    "contiguous" (type A): head h holds channels [h d, (h+1) d).
    "strided" (type B): head h holds channels h, h + heads, h + 2 heads, ...
    """
    bsz, length, channels = z.shape
    heads = channels // head_size
    if layout == "contiguous":
        return z.reshape(bsz, length, heads, head_size)
    return z.reshape(bsz, length, head_size, heads).transpose(2, 3)  # N x T x heads x d


def merge_heads(z: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`split_heads`: N x T x heads x d -> N x T x C."""
    bsz, length, heads, d = z.shape
    if layout == "contiguous":
        return z.reshape(bsz, length, heads * d)
    return z.transpose(2, 3).reshape(bsz, length, heads * d)


_INVERSE_CACHE = {"enabled": True}


@contextlib.contextmanager
def inverse_cache(enabled: bool):
    """Turns the multi-head linears' inverse cache on or off inside the block (tests, benchmarks)."""
    previous = _INVERSE_CACHE["enabled"]
    _INVERSE_CACHE["enabled"] = enabled
    try:
        yield
    finally:
        _INVERSE_CACHE["enabled"] = previous


class InvertibleMultiHeadLinear(nn.Module):
    """Invertible multi-head linear layer (§3.4, Eq. 11; the reference's ``InvertibleMultiHeadFlow``).

    The C channels are cut into ``heads = C / d`` heads of ``d`` channels (d = ``head_size`` or the
    reference's choice, :func:`linear_head_size`); every head is mapped by the SAME ``d x d`` matrix,
    ``eps_t[h] = z_t[h] W``, so ``log|det| = (#real positions) * heads * log|det W|``.  The weight
    starts orthogonal (log-determinant 0), as in the reference.

    The inverse and log-determinant of W are cached and the cache is keyed on W's CONTENT: every
    call compares the live weight with the copy the cache was computed from (d x d entries), and
    recomputes on any difference, however the weight changed (an optimiser step, a write through
    ``.data``, ``load_state_dict``, ``.to()``).  So the cache survives ``train()``/``eval()`` and
    batches but is never stale.  When a gradient through W is wanted (grad enabled and W requires
    it), both are computed from the live weight instead.
    """

    def __init__(self, features: int, head_layout: str = "contiguous", head_size: Optional[int] = None):
        super().__init__()
        assert head_layout in HEAD_LAYOUTS, head_layout
        d = head_size or linear_head_size(features)
        assert features % d == 0, f"features={features} not divisible by the head size {d}"
        self.features = features
        self.head_size = d
        self.heads = features // d
        self.head_layout = head_layout
        self.weight = nn.Parameter(torch.empty(d, d))  # d x d, shared by the heads
        self.reset_parameters()
        self._cache: Optional[Tuple[Tensor, Tensor, Tensor]] = None  # (weight copy, inverse, logabsdet)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.orthogonal_(self.weight)

    def invalidate_inverse_cache(self) -> None:
        self._cache = None

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_inverse_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def _live(self) -> Tuple[Tensor, Tensor]:
        w = self.weight.to(linalg_dtype(self.weight))
        return torch.linalg.inv(w), torch.linalg.slogdet(w).logabsdet

    def inverse_and_logdet(self) -> Tuple[Tensor, Tensor]:
        """(W^-1 d x d in W's dtype, log|det W| in float32 or wider)."""
        w = self.weight
        if (torch.is_grad_enabled() and w.requires_grad) or not _INVERSE_CACHE["enabled"]:
            inv, logdet = self._live()
            return inv.to(w.dtype), logdet
        cache = self._cache
        if (
            cache is None
            or cache[0].shape != w.shape
            or cache[0].dtype != w.dtype
            or cache[0].device != w.device
            or not torch.equal(cache[0], w.detach())
        ):
            with torch.no_grad():
                inv, logdet = self._live()
                cache = (w.detach().clone(), inv.to(w.dtype), logdet)
            self._cache = cache
        return cache[1], cache[2]

    def inverse_weight(self) -> Tensor:
        return self.inverse_and_logdet()[0]

    def _logdet(self, ctx: LevelContext, dtype: torch.dtype, logabsdet: Tensor) -> Tensor:
        return (logabsdet.to(dtype) * self.heads) * ctx.counts(dtype)  # N

    def _apply_matrix(self, z: Tensor, ctx: LevelContext, matrix: Tensor) -> Tensor:
        """Per-head ``z_t[h] @ matrix`` at real positions; padding passes through."""
        m = ctx.mask.unsqueeze(-1)  # N x T x 1
        # padding is zeroed before the matmul so that inf padding cannot give inf * 0 = NaN
        heads = split_heads(torch.where(m, z, z.new_zeros(())), self.head_size, self.head_layout)
        out = merge_heads(torch.matmul(heads, matrix.to(z.dtype)), self.head_layout)  # N x T x C
        return torch.where(m, out, z)

    def forward(self, z: Tensor, mask, src=None, src_mask=None):
        ctx = as_context(mask)
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            logabsdet = torch.linalg.slogdet(w.to(linalg_dtype(w))).logabsdet
        else:
            logabsdet = self.inverse_and_logdet()[1]
        return self._apply_matrix(z, ctx, w), self._logdet(ctx, logdet_dtype(z), logabsdet)

    def inverse(self, eps: Tensor, mask, src=None, src_mask=None):
        ctx = as_context(mask)
        inv, logabsdet = self.inverse_and_logdet()
        return self._apply_matrix(eps, ctx, inv), -self._logdet(ctx, logdet_dtype(eps), logabsdet)

    def init_from_data(self, z: Tensor, mask, src=None, src_mask=None):
        return self.forward(z, mask, src, src_mask)


# ------------------------------------------------------------------------------------------------
# the coupling network (the reference's self-attention coupling block)
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Post-norm multi-head attention sublayer: ``LayerNorm(residual + dropout(attn(q, k, v)))``.

    Parameters as the reference's ``MultiHeadAttention``: a fused ``3w x w`` input projection with
    bias (q, k, v) and a LayerNorm; no output projection.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f"attention width {dim} not divisible by {heads} heads"
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.layer_norm = nn.LayerNorm(dim)
        for i in range(3):
            nn.init.xavier_uniform_(self.in_proj_weight.data[i * dim : (i + 1) * dim])

    def _heads(self, x: Tensor) -> Tensor:  # R x L x w -> R x h x L x w/h
        r, length, _ = x.shape
        return x.view(r, length, self.heads, self.dim // self.heads).transpose(1, 2)

    def project_kv(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """R x S x w -> keys and values, each R x h x S x w/h."""
        k, v = F.linear(x, self.in_proj_weight[self.dim :], self.in_proj_bias[self.dim :]).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor, residual: Tensor) -> Tensor:
        """q R x L x w (projected), k/v R x h x S x w/h, key_padding R x S (True = pad)."""
        r, length, _ = q.shape
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            self._heads(q), k, v, attn_mask=~key_padding[:, None, None, :], dropout_p=drop
        )  # R x h x L x w/h
        out = out.transpose(1, 2).reshape(r, length, self.dim)
        return self.layer_norm(residual + F.dropout(out, p=self.dropout, training=self.training))

    def self_attention(self, x: Tensor, key_padding: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self._attend(q, self._heads(k), self._heads(v), key_padding, x)

    def query_attention(self, query: Tensor, x: Tensor, key_padding: Tensor) -> Tensor:
        """Positional attention: queries from ``query`` (which is also the residual), keys = values = x."""
        q = F.linear(query, self.in_proj_weight[: self.dim], self.in_proj_bias[: self.dim])
        k, v = self.project_kv(x)
        return self._attend(q, k, v, key_padding, query)

    def grouped_cross_attention(self, x: Tensor, kv: Tuple[Tensor, Tensor], key_padding: Tensor, group: int):
        """x N x L x w (N = B * group, sentence-major) attends to B sentences' keys / values (B x h x S x d).

        The n = group candidates of a sentence are folded into its query length (B x nL), so keys and
        values are neither recomputed nor copied per candidate.
        """
        n_rows, length, _ = x.shape
        q = F.linear(x, self.in_proj_weight[: self.dim], self.in_proj_bias[: self.dim])
        q = q.reshape(n_rows // group, group * length, self.dim)  # B x nL x w
        out = self._attend(q, kv[0], kv[1], key_padding, x.reshape(q.shape))
        return out.reshape(n_rows, length, self.dim)


class FeedForward(nn.Module):
    """Post-norm position-wise feed-forward sublayer ``LayerNorm(x + W2 relu(W1 x))``, w -> hidden -> w."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.linear1(x)), p=self.dropout, training=self.training)
        return self.layer_norm(x + F.dropout(self.linear2(h), p=self.dropout, training=self.training))


class CouplingNet(nn.Module):
    """The NN of Figure 3 (c) at the reference's shapes: z_a (N x L x w) -> (mu, raw), each N x L x out.

    ``w`` is the width of z_a (C/2 or C).  Positions: sinusoids added to z_a, or (``pos_attn``) a
    positional attention with the sinusoids as queries and z_a as keys and values.  Then one
    Transformer decoder layer at width w without causal mask: self-attention over the real
    positions, cross-attention to the source (projected H -> w without bias when H != w, then to
    keys / values: once per source sentence), feed-forward w -> ``hidden`` -> w.  The output linear
    w -> 2 out is ZERO-initialised, so every coupling starts with mu = 0, raw = 0.
    """

    def __init__(self, in_features: int, out_features: int, src_features: int, hidden: int, heads: int,
                 dropout: float = 0.0, pos_attn: bool = False):  # fmt: skip
        super().__init__()
        self.in_features = in_features
        self.src_proj = nn.Linear(src_features, in_features, bias=False) if src_features != in_features else None
        self.pos_attn = Attention(in_features, heads, dropout) if pos_attn else None
        self.self_attn = Attention(in_features, heads, dropout)
        self.enc_attn = Attention(in_features, heads, dropout)
        self.ffn = FeedForward(in_features, hidden, dropout)
        self.out_proj = nn.Linear(in_features, 2 * out_features)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _source_kv(self, src: Tensor) -> Tuple[Tensor, Tensor]:
        if self.src_proj is not None:
            src = self.src_proj(src)
        return self.enc_attn.project_kv(src)

    def forward(self, x: Tensor, ctx: LevelContext) -> Tuple[Tensor, Tensor]:
        """x: N x L x w, zero wherever it must not be seen; ``ctx``: the context of these L positions."""
        pos = ctx.sinusoids(self.in_features, x.dtype)  # N x L x w
        if self.pos_attn is None:
            h = x + pos
        else:
            h = self.pos_attn.query_attention(pos, x, ctx.key_padding)
        h = self.self_attn.self_attention(h, ctx.key_padding)
        if ctx.source is not None:
            kv = ctx.source.keys_values(self, self._source_kv, h.dtype)
            h = self.enc_attn.grouped_cross_attention(h, kv, ctx.source.key_padding, ctx.group)
        h = self.ffn(h)
        mu, raw = self.out_proj(h).chunk(2, dim=-1)
        return mu, raw


# ------------------------------------------------------------------------------------------------
# Affine coupling (§3.4, Figure 3 (b)-(c))
# ------------------------------------------------------------------------------------------------


class AffineCoupling(nn.Module):
    """Affine coupling layer (§3.4): ``z_b' = s(z_a, x) * z_b + mu(z_a, x)``, ``z_a' = z_a``.

    ``s = sigmoid(raw + 2)`` in (0, 1), the reference implementation's bounded scale; with the
    zero-initialised output layer a fresh coupling is ``eps_a = z_a``, ``eps_b = sigmoid(2) z_b``.

    Splits (Figure 3 (b)); ``up=True`` conditions on the first part and transforms the second,
    ``up=False`` swaps them:

    * "channel_halves": first = channels [0, C/2), second = [C/2, C); the net has width C/2.
    * "channel_interleaved": first = even channels, second = odd channels; width C/2.
    * "time_interleaved": first = even time steps, second = odd ones, all channels; the net has
      width C and runs on the T/2 conditioning steps only.  Needs an even T and even real lengths
      (true in every level of the prior that splits, where the reference places these couplings).

    ``pos_attn``: the network reads positions through positional attention (the coupling that
    opens each level of the reference's prior) instead of adding them.
    """

    def __init__(self, features: int, src_features: int, hidden: int, heads: int, split: str = "channel_halves",
                 up: bool = True, dropout: float = 0.0, pos_attn: bool = False):  # fmt: skip
        super().__init__()
        assert split in SPLITS, split
        self.features = features
        self.split = split
        self.up = up
        if split == "time_interleaved":
            part = features
        else:
            assert features % 2 == 0, f"channel splits need an even width, got {features}"
            part = features // 2
        self.net = CouplingNet(part, part, src_features, hidden, heads, dropout, pos_attn)

    def _parts(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (z_a, z_b)."""
        if self.split == "channel_halves":
            half = self.features // 2
            first, second = z[..., :half], z[..., half:]
        elif self.split == "channel_interleaved":
            first, second = z[..., 0::2], z[..., 1::2]
        else:
            first, second = z[:, 0::2], z[:, 1::2]
        return (first, second) if self.up else (second, first)

    def _assemble(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        first, second = (z_a, z_b) if self.up else (z_b, z_a)
        if self.split == "channel_halves":
            return torch.cat([first, second], dim=-1)
        if self.split == "channel_interleaved":
            return interleave(first, second, dim=-1)
        return interleave(first, second, dim=1)

    def _params(self, z: Tensor, ctx: LevelContext):
        """-> (z_a, z_b, mu, log_scale, where) with ``where`` the bool of transformed entries (... x 1)."""
        if self.split == "time_interleaved":
            ctx = ctx.half()
        z_a, z_b = self._parts(z)
        m = ctx.mask.unsqueeze(-1)  # rows x L x 1
        x = torch.where(m, z_a, z_a.new_zeros(()))  # only z_a at real steps is visible
        mu, raw = self.net(x, ctx)
        log_scale = F.logsigmoid(raw + COUPLING_SCALE_SHIFT)  # log sigmoid(raw + 2) <= 0
        return z_a, z_b, mu, log_scale, m

    @staticmethod
    def _logdet(log_scale: Tensor, where: Tensor) -> Tensor:
        """sum of log s over the transformed entries: N x L x part -> N."""
        log_scale = log_scale.to(logdet_dtype(log_scale))
        return torch.where(where, log_scale, log_scale.new_zeros(())).sum(dim=(1, 2))

    def forward(self, z: Tensor, mask, src=None, src_mask=None):
        ctx = as_context(mask, src, src_mask)
        z_a, z_b, mu, log_scale, where = self._params(z, ctx)
        new_b = torch.where(where, z_b * log_scale.exp() + mu, z_b)
        return self._assemble(z_a, new_b), self._logdet(log_scale, where)

    def inverse(self, eps: Tensor, mask, src=None, src_mask=None):
        # eps_a = z_a, so the net sees the same input as in forward and the params match exactly
        ctx = as_context(mask, src, src_mask)
        eps_a, eps_b, mu, log_scale, where = self._params(eps, ctx)
        new_b = torch.where(where, (eps_b - mu) * torch.exp(-log_scale), eps_b)
        return self._assemble(eps_a, new_b), -self._logdet(log_scale, where)

    def init_from_data(self, z: Tensor, mask, src=None, src_mask=None):
        return self.forward(z, mask, src, src_mask)


# ------------------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------------------


def chain_forward(layers: Sequence[nn.Module], z: Tensor, ctx: LevelContext, init: bool = False):
    """Run ``layers`` in order (data -> noise), summing log-determinants; ``init`` uses init_from_data."""
    logdet = z.new_zeros(z.size(0), dtype=logdet_dtype(z))
    for layer in layers:
        z, ld = (layer.init_from_data if init else layer.forward)(z, ctx)
        logdet = logdet + ld
    return z, logdet


def chain_inverse(layers: Sequence[nn.Module], eps: Tensor, ctx: LevelContext):
    """Invert ``layers`` in reverse order (noise -> data), summing log-determinants."""
    logdet = eps.new_zeros(eps.size(0), dtype=logdet_dtype(eps))
    for layer in reversed(list(layers)):
        eps, ld = layer.inverse(eps, ctx)
        logdet = logdet + ld
    return eps, logdet


class _Composite(nn.Module):
    """A fixed sequence of layers (``layers()``) behind the layer contract."""

    def layers(self) -> List[nn.Module]:
        raise NotImplementedError

    def forward(self, z: Tensor, mask, src=None, src_mask=None):
        return chain_forward(self.layers(), z, as_context(mask, src, src_mask))

    def inverse(self, eps: Tensor, mask, src=None, src_mask=None):
        return chain_inverse(self.layers(), eps, as_context(mask, src, src_mask))

    def init_from_data(self, z: Tensor, mask, src=None, src_mask=None):
        return chain_forward(self.layers(), z, as_context(mask, src, src_mask), init=True)


class FlowUnit(_Composite):
    """The reference's ``NMTFlowUnit``: couplings up / down on channel halves, actnorm, couplings up /
    down on interleaved channels and, with ``split_time`` (the levels that split), actnorm and
    couplings up / down on even / odd time steps: 4 or 6 couplings."""

    def __init__(self, features: int, src_features: int, hidden: int, heads: int, split_time: bool,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        args = (features, src_features, hidden, heads)
        self.coupling1_up = AffineCoupling(*args, "channel_halves", True, dropout)
        self.coupling1_down = AffineCoupling(*args, "channel_halves", False, dropout)
        self.actnorm1 = ActNorm(features)
        self.coupling2_up = AffineCoupling(*args, "channel_interleaved", True, dropout)
        self.coupling2_down = AffineCoupling(*args, "channel_interleaved", False, dropout)
        self.split_time = split_time
        if split_time:
            self.actnorm2 = ActNorm(features)
            self.coupling3_up = AffineCoupling(*args, "time_interleaved", True, dropout)
            self.coupling3_down = AffineCoupling(*args, "time_interleaved", False, dropout)

    def layers(self):
        out = [self.coupling1_up, self.coupling1_down, self.actnorm1, self.coupling2_up, self.coupling2_down]
        if self.split_time:
            out += [self.actnorm2, self.coupling3_up, self.coupling3_down]
        return out


class FlowStep(_Composite):
    """One step of flow, the reference's ``NMTFlowStep`` (Figure 3 (a) with richer coupling units):
    actnorm -> multi-head linear type A -> unit -> actnorm -> multi-head linear type B -> unit."""

    def __init__(self, features: int, src_features: int, hidden: int, heads: int, split_time: bool,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.actnorm1 = ActNorm(features)
        self.linear1 = InvertibleMultiHeadLinear(features, "contiguous")
        self.unit1 = FlowUnit(features, src_features, hidden, heads, split_time, dropout)
        self.actnorm2 = ActNorm(features)
        self.linear2 = InvertibleMultiHeadLinear(features, "strided")
        self.unit2 = FlowUnit(features, src_features, hidden, heads, split_time, dropout)

    def layers(self):
        return [self.actnorm1, self.linear1, self.unit1, self.actnorm2, self.linear2, self.unit2]


class PosAttnUnit(_Composite):
    """The reference's ``NMTFlowPOSAttnUnit``, which opens every level: actnorm, a channel-halves coupling
    (up) whose net reads positions by positional attention, a channel-halves coupling (down)."""

    def __init__(self, features: int, src_features: int, hidden: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.actnorm = ActNorm(features)
        self.coupling_up = AffineCoupling(features, src_features, hidden, heads, "channel_halves", True, dropout,
                                          pos_attn=True)  # fmt: skip
        self.coupling_down = AffineCoupling(features, src_features, hidden, heads, "channel_halves", False, dropout)

    def layers(self):
        return [self.actnorm, self.coupling_up, self.coupling_down]
