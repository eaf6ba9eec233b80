"""The elementary flow layers of FlowSeq's prior (Ma et al., EMNLP 2019, §3.4 and Figure 3).

One *step of flow* is actnorm (Eq. 10) -> invertible multi-head linear (Eq. 11) -> affine coupling
(the split / scale-and-shift / concat equations of §3.4).  The multi-scale stacking, squeeze and
split live in ``flow_prior.py``; the pure index and density helpers they need are defined here.

Layer contract (every layer here, and ``MultiScalePrior``)::

    forward(z, mask, src, src_mask)        -> (eps, logdet)   data -> noise (training direction)
    inverse(eps, mask, src, src_mask)      -> (z, logdet)     noise -> data (generation)
    init_from_data(z, mask, src, src_mask) -> (eps, logdet)   forward after data-dependent init

* ``z``/``eps``: B x T x C.  ``mask``: B x T, float or bool, 1 at real positions.
  ``src``: B x S x H source encodings (batch first), ``src_mask``: B x S, 1 at real positions.
  Layers that do not condition on the source accept and ignore ``src``/``src_mask``.
* ``logdet``: a B tensor, in at least float32 whatever the input dtype (fp16 models included;
  ``slogdet``/``inv`` also run in float32 there).  forward returns ``log|det d eps / d z|``,
  inverse returns ``log|det d z / d eps|``, so the two cancel at corresponding points and, by
  Eq. (6), ``log p(z|x) = log N(eps; 0, I) + forward logdet``.
* With dropout > 0 in training mode, forward and inverse draw different dropout masks and are
  not inverses of each other; invert (decode) in ``eval()``.
* Padding: outputs at masked positions are exactly the inputs there (updates are selected with
  ``torch.where`` rather than multiplied by the mask, so even inf/NaN padding cannot leak into a
  real position or into the log-determinant), and log-determinants count real positions only.
"""
import math
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor, nn

SPLITS = ("channel_halves", "channel_interleaved", "time_interleaved")
HEAD_LAYOUTS = ("contiguous", "strided")

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

    Positions are counted over real steps, so a sentence's positional encodings and time-split
    parities do not depend on how much padding surrounds it (batch invariance).
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
        torch.arange(half, device=positions.device, dtype=dtype) * (-2.0 * math.log(10000.0) / dim)
    )  # k
    angles = positions.to(dtype).unsqueeze(-1) * freqs  # B x T x k
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)  # B x T x 2k
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc


def standard_normal_log_prob(eps: Tensor, mask: Tensor) -> Tensor:
    """log N(eps; 0, I) summed over channels and real positions: B x T x C -> B."""
    per_entry = -0.5 * (eps.to(logdet_dtype(eps)).pow(2) + math.log(2 * math.pi))  # B x T x C
    return torch.where(bool_mask(mask).unsqueeze(-1), per_entry, per_entry.new_zeros(())).sum(dim=(1, 2))


def padding_mask_with_fallback(real: Tensor) -> Tensor:
    """B x T bool "real key" mask -> fairseq ``key_padding_mask`` (True at PADDING).

    A row with no real key would make the attention softmax all -inf (NaN).  Such a row only
    occurs where a layer's output is discarded anyway (an all-padding sentence, or a time-split
    coupling whose conditioning half is empty, e.g. length 1); there key 0 is unmasked.  Key 0's
    input is content-free in both cases (zeroed), so no dependence on the transformed half leaks in.
    """
    pad = ~real  # B x T
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

    The factored-out half is modelled as N(0, I) (plain standard normal; the conditioning on the
    kept half and the source is done by the prior coupling the prior runs just before the split,
    as the reference does).  Returns ``(kept B x T x C/2, dropped B x T x C/2, log N(dropped) B)``,
    the density counted at real positions only.
    """
    channels = z.size(-1)
    assert channels % 2 == 0, f"split needs an even width, got C={channels}"
    keep, drop = z[..., : channels // 2], z[..., channels // 2 :]
    return keep, drop, standard_normal_log_prob(drop, mask)


def merge(keep: Tensor, drop: Tensor) -> Tensor:
    """Inverse of :func:`split`: concatenate the kept and factored-out halves (B x T x C)."""
    return torch.cat([keep, drop], dim=-1)


def step_layout(index: int) -> Tuple[str, str, bool]:
    """Layout of the ``index``-th step of flow: ``(head_layout, split, up)``.

    The linear head layout alternates A/B (§3.4 "composed in an alternating pattern"), the
    coupling split cycles channel_halves -> channel_interleaved -> time_interleaved, and
    ``up`` alternates, so six consecutive steps visit all six (split, up) couplings.
    """
    return HEAD_LAYOUTS[index % 2], SPLITS[index % 3], index % 2 == 0


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

    def _logdet(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        return self.log_scale.sum().to(dtype) * real_counts(mask, dtype)  # B

    def forward(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        m = bool_mask(mask).unsqueeze(-1)  # B x T x 1
        eps = torch.where(m, z * self.log_scale.exp() + self.bias, z)  # B x T x C
        return eps, self._logdet(mask, logdet_dtype(z))

    def inverse(self, eps: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        m = bool_mask(mask).unsqueeze(-1)
        z = torch.where(m, (eps - self.bias) * torch.exp(-self.log_scale), eps)  # B x T x C
        return z, -self._logdet(mask, logdet_dtype(eps))

    @torch.no_grad()
    def _init_parameters(self, z: Tensor, mask: Tensor) -> None:
        m = bool_mask(mask).unsqueeze(-1)  # B x T x 1
        z = z.to(logdet_dtype(z))  # statistics in at least float32
        count = m.sum().clamp(min=1).to(z.dtype)
        real = torch.where(m, z, z.new_zeros(()))  # padding excluded (even if huge or inf)
        mean = real.sum(dim=(0, 1)) / count  # C
        var = torch.where(m, z - mean, z.new_zeros(())).pow(2).sum(dim=(0, 1)) / count  # C
        inv_std = 1.0 / (var.sqrt() + self.init_eps)
        self.log_scale.copy_(inv_std.log().to(self.log_scale.dtype))
        self.bias.copy_((-mean * inv_std).to(self.bias.dtype))

    def init_from_data(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        self._init_parameters(z, mask)
        return self.forward(z, mask, src, src_mask)


# ------------------------------------------------------------------------------------------------
# Invertible multi-head linear (Eq. 11)
# ------------------------------------------------------------------------------------------------


def split_heads(z: Tensor, heads: int, layout: str) -> Tensor:
    """B x T x C -> B x T x heads x d (d = C / heads).

    "contiguous" (type A): head h holds channels [h d, (h+1) d).
    "strided" (type B): head h holds channels h, h + heads, h + 2 heads, ...
    """
    bsz, length, channels = z.shape
    d = channels // heads
    if layout == "contiguous":
        return z.reshape(bsz, length, heads, d)
    return z.reshape(bsz, length, d, heads).transpose(2, 3)  # B x T x heads x d


def merge_heads(z: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`split_heads`: B x T x heads x d -> B x T x C."""
    bsz, length, heads, d = z.shape
    if layout == "contiguous":
        return z.reshape(bsz, length, heads * d)
    return z.transpose(2, 3).reshape(bsz, length, heads * d)


class InvertibleMultiHeadLinear(nn.Module):
    """Invertible multi-head linear layer (§3.4, Eq. 11 applied per head).

    Each head's ``d x d`` block (d = features / heads) maps ``eps_t[h] = z_t[h] W_h``;
    ``log|det| = (#real positions) * sum_h log|det W_h|``.  Weights start orthogonal (as in the
    reference), i.e. log-determinant 0.

    The inverse matrices are never stale (the reference kept them in a buffer refreshed only by
    ``sync()``): in training mode, or whenever a gradient through the weight is wanted, they are
    computed from the live weight on every call.  Otherwise (eval, no grad) they are cached,
    keyed on the weight's autograd version counter, storage pointer, dtype and device; the cache
    is also dropped on ``train()``/``eval()``, ``.to()``/``.double()`` and state-dict loading.
    (In-place writes through ``weight.data`` bypass the version counter; such a write made while
    staying in eval mode needs :meth:`invalidate_inverse_cache`.  Optimiser steps, ``copy_``
    under ``no_grad`` and ``load_state_dict`` are all detected.)
    """

    def __init__(self, features: int, heads: int, head_layout: str = "contiguous"):
        super().__init__()
        assert head_layout in HEAD_LAYOUTS, head_layout
        assert features % heads == 0, f"features={features} not divisible by heads={heads}"
        self.features = features
        self.heads = heads
        self.head_layout = head_layout
        d = features // heads
        self.weight = nn.Parameter(torch.empty(heads, d, d))  # heads x d x d
        self.reset_parameters()
        self._inverse_cache: Optional[Tuple[tuple, Tensor]] = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for h in range(self.heads):
                nn.init.orthogonal_(self.weight[h])

    def invalidate_inverse_cache(self) -> None:
        self._inverse_cache = None

    def train(self, mode: bool = True):
        self.invalidate_inverse_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_inverse_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_inverse_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def inverse_weight(self) -> Tensor:
        """heads x d x d inverses of the live weight (cached only in eval without grad)."""
        w = self.weight
        if self.training or (torch.is_grad_enabled() and w.requires_grad):
            return torch.linalg.inv(w.to(linalg_dtype(w))).to(w.dtype)
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            with torch.no_grad():
                self._inverse_cache = (key, torch.linalg.inv(w.to(linalg_dtype(w))).to(w.dtype))
        return self._inverse_cache[1]

    def _logdet(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        w = self.weight
        per_position = torch.linalg.slogdet(w.to(linalg_dtype(w))).logabsdet.sum().to(dtype)  # sum over heads
        return per_position * real_counts(mask, dtype)  # B

    def _apply_matrices(self, z: Tensor, mask: Tensor, matrices: Tensor) -> Tensor:
        """Per-head ``z_t[h] @ matrices[h]`` at real positions; padding passes through."""
        m = bool_mask(mask).unsqueeze(-1)  # B x T x 1
        # padding is zeroed before the matmul so that inf padding cannot give inf * 0 = NaN
        heads = split_heads(torch.where(m, z, z.new_zeros(())), self.heads, self.head_layout)  # B x T x heads x d
        out = merge_heads(torch.einsum("bthi,hij->bthj", heads, matrices.to(z.dtype)), self.head_layout)
        return torch.where(m, out, z)  # B x T x C

    def forward(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return self._apply_matrices(z, mask, self.weight), self._logdet(mask, logdet_dtype(z))

    def inverse(self, eps: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return self._apply_matrices(eps, mask, self.inverse_weight()), -self._logdet(mask, logdet_dtype(eps))

    def init_from_data(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return self.forward(z, mask, src, src_mask)


# ------------------------------------------------------------------------------------------------
# Affine coupling (§3.4, Figure 3 (b)-(c))
# ------------------------------------------------------------------------------------------------


def _decoder_layer_config(hidden: int, src_features: int, heads: int, dropout: float) -> SimpleNamespace:
    """The minimal config ``TransformerDecoderLayerBase`` reads (post-norm, ReLU, FFN = hidden).

    A plain namespace, not ``TransformerConfig()``, whose nested defaults are shared class objects.
    """
    no_xformers = None
    return SimpleNamespace(
        decoder=SimpleNamespace(
            embed_dim=hidden,
            ffn_embed_dim=hidden,
            attention_heads=heads,
            normalize_before=False,
            xformers_att_config=no_xformers,
        ),
        encoder=SimpleNamespace(embed_dim=src_features, xformers_att_config=no_xformers),
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=0.0,
        relu_dropout=0.0,
        activation_fn="relu",
        cross_self_attention=False,
        quant_noise=SimpleNamespace(pq=0.0, pq_block_size=8),
        export=False,
    )


class CouplingNet(nn.Module):
    """The NN of Figure 3 (c): z_a -> (mu, raw log-scale) for z_b, attending to the source.

    ``Linear(in -> hidden)`` + sinusoidal positions (added, the reference's additive ``pos_enc``),
    one fairseq ``TransformerDecoderLayerBase`` without causal masking (self-attention over the
    conditioning positions, cross-attention to ``src``), then a ZERO-initialised
    ``Linear(hidden -> 2 out)`` (the reference zero-inits its weight-normed output layer), so
    every coupling starts with mu = 0, raw = 0.
    """

    def __init__(self, in_features: int, out_features: int, src_features: int, hidden: int, heads: int, dropout: float):
        super().__init__()
        assert hidden % heads == 0, f"hidden={hidden} not divisible by heads={heads}"
        self.hidden = hidden
        self.in_proj = nn.Linear(in_features, hidden)
        self.layer = TransformerDecoderLayerBase(_decoder_layer_config(hidden, src_features, heads, dropout))
        self.layer.need_attn = False  # we never read attention weights; skip averaging them in eval
        self.out_proj = nn.Linear(hidden, 2 * out_features)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: Tensor, keys: Tensor, positions: Tensor, src: Optional[Tensor], src_mask: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """x: B x T x in (zero wherever it must not be seen); keys: B x T bool positions to attend.

        Returns ``(mu, raw)``, each B x T x out.
        """
        h = self.in_proj(x) + sinusoidal_encoding(positions, self.hidden, x.dtype)  # B x T x hidden
        h = h.transpose(0, 1)  # T x B x hidden
        encoder_out = encoder_pad = None
        if src is not None:
            encoder_out = src.to(x.dtype).transpose(0, 1)  # S x B x H
            if src_mask is not None:
                encoder_pad = padding_mask_with_fallback(bool_mask(src_mask))  # B x S, True = pad
        h, _, _ = self.layer(
            h,
            encoder_out=encoder_out,
            encoder_padding_mask=encoder_pad,
            self_attn_padding_mask=padding_mask_with_fallback(keys),  # B x T, True = pad
        )
        mu, raw = self.out_proj(h.transpose(0, 1)).chunk(2, dim=-1)  # B x T x out each
        return mu, raw


class AffineCoupling(nn.Module):
    """Affine coupling layer (§3.4): ``z_b' = s(z_a, x) * z_b + b(z_a, x)``, ``z_a' = z_a``.

    ``s = sigmoid(raw + 2)`` in (0, 1), the reference implementation's bounded scale; with the
    zero-initialised output layer a fresh coupling is ``eps_a = z_a``, ``eps_b = sigmoid(2) z_b``
    (scale ~0.881, log-det ``(#real entries of z_b) * log sigmoid(2)``).  We keep the reference's
    choice rather than renormalising to an exact identity: the actnorm data-dependent init that
    precedes every coupling absorbs the constant factor.

    Splits (Figure 3 (b)); ``up=True`` conditions on the first part and transforms the second,
    ``up=False`` swaps them:

    * "channel_halves": z_a = channels [0, C/2), z_b = [C/2, C)  (continuous).
    * "channel_interleaved": z_a = even channels, z_b = odd channels.
    * "time_interleaved": z_a = even (real) time steps, z_b = odd ones, all channels.  The net
      sees the whole sequence with the z_b steps and padding zeroed and excluded from the keys,
      and reads mu / scale off at the z_b steps.

    Channel splits need an even C.
    """

    def __init__(
        self,
        features: int,
        src_features: int,
        hidden: int,
        heads: int,
        split: str = "channel_halves",
        dropout: float = 0.0,
        up: bool = True,
    ):
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
            channels = torch.arange(features)
            if split == "channel_halves":
                first, second = channels[:part], channels[part:]
            else:
                first, second = channels[0::2], channels[1::2]
            cond, trans = (first, second) if up else (second, first)
            # derived from the constructor arguments, so kept out of checkpoints
            self.register_buffer("cond_channels", cond, persistent=False)
            self.register_buffer("trans_channels", trans, persistent=False)
            self.register_buffer("merge_order", torch.argsort(torch.cat([cond, trans])), persistent=False)
        self.net = CouplingNet(part, part, src_features, hidden, heads, dropout)

    def _params(self, z: Tensor, mask: Tensor, src, src_mask) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (z_b, mu, log_scale, where) with ``where`` the B x T x 1 bool of transformed steps."""
        real = bool_mask(mask)  # B x T
        positions = real_positions(mask)  # B x T
        if self.split == "time_interleaved":
            even = positions % 2 == 0
            cond = real & (even if self.up else ~even)  # B x T
            trans = real & ~cond
            x, z_b = z, z
        else:
            cond = trans = real
            x, z_b = z.index_select(-1, self.cond_channels), z.index_select(-1, self.trans_channels)
        x = torch.where(cond.unsqueeze(-1), x, x.new_zeros(()))  # only z_a at real steps is visible
        mu, raw = self.net(x, cond, positions, src, src_mask)  # B x T x part each
        log_scale = F.logsigmoid(raw + COUPLING_SCALE_SHIFT)  # log sigmoid(raw + 2) <= 0
        return z_b, mu, log_scale, trans.unsqueeze(-1)

    @staticmethod
    def _logdet(log_scale: Tensor, where: Tensor) -> Tensor:
        """sum of log s over the transformed entries: B x T x part -> B."""
        log_scale = log_scale.to(logdet_dtype(log_scale))
        return torch.where(where, log_scale, log_scale.new_zeros(())).sum(dim=(1, 2))

    def _assemble(self, z: Tensor, new_b: Tensor) -> Tensor:
        if self.split == "time_interleaved":
            return new_b
        z_a = z.index_select(-1, self.cond_channels)
        return torch.cat([z_a, new_b], dim=-1).index_select(-1, self.merge_order)  # B x T x C

    def forward(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        z_b, mu, log_scale, where = self._params(z, mask, src, src_mask)
        new_b = torch.where(where, z_b * log_scale.exp() + mu, z_b)
        return self._assemble(z, new_b), self._logdet(log_scale, where)

    def inverse(self, eps: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        # eps_a = z_a, so the net sees the same input as in forward and the params match exactly
        eps_b, mu, log_scale, where = self._params(eps, mask, src, src_mask)
        new_b = torch.where(where, (eps_b - mu) * torch.exp(-log_scale), eps_b)
        return self._assemble(eps, new_b), -self._logdet(log_scale, where)

    def init_from_data(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return self.forward(z, mask, src, src_mask)


# ------------------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------------------


def chain_forward(layers: Sequence[nn.Module], z: Tensor, mask, src, src_mask, init: bool = False):
    """Run ``layers`` in order (data -> noise), summing log-determinants; ``init`` uses init_from_data."""
    logdet = z.new_zeros(z.size(0), dtype=logdet_dtype(z))
    for layer in layers:
        z, ld = (layer.init_from_data if init else layer.forward)(z, mask, src, src_mask)
        logdet = logdet + ld
    return z, logdet


def chain_inverse(layers: Sequence[nn.Module], eps: Tensor, mask, src, src_mask):
    """Invert ``layers`` in reverse order (noise -> data), summing log-determinants."""
    logdet = eps.new_zeros(eps.size(0), dtype=logdet_dtype(eps))
    for layer in reversed(list(layers)):
        eps, ld = layer.inverse(eps, mask, src, src_mask)
        logdet = logdet + ld
    return eps, logdet


class FlowStep(nn.Module):
    """One step of flow (Figure 3 (a)): actnorm -> invertible multi-head linear -> affine coupling.

    Use :func:`step_layout` to get the alternating ``(head_layout, split, up)`` of the i-th step.
    We follow Ma et al., FlowSeq, Figure 3 (a); the reference implementation's ``NMTFlowStep`` is
    richer (actnorm, linear A, a unit of 4-6 couplings, actnorm, linear B, another unit).
    """

    def __init__(
        self,
        features: int,
        src_features: int,
        hidden: int,
        heads: int,
        split: str = "channel_halves",
        up: bool = True,
        head_layout: str = "contiguous",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.actnorm = ActNorm(features)
        self.linear = InvertibleMultiHeadLinear(features, heads, head_layout)
        self.coupling = AffineCoupling(features, src_features, hidden, heads, split, dropout, up=up)

    def layers(self):
        return [self.actnorm, self.linear, self.coupling]

    def forward(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return chain_forward(self.layers(), z, mask, src, src_mask)

    def inverse(self, eps: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return chain_inverse(self.layers(), eps, mask, src, src_mask)

    def init_from_data(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        return chain_forward(self.layers(), z, mask, src, src_mask, init=True)
