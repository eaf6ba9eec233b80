"""FlowSeq's multi-scale prior flow p(z | x) (Ma et al., EMNLP 2019, §3.4, Figure 2), in the layout of
the authors' implementation (XuezheMax/flowseq, ``flownmt/flows/nmt.py``, ``NMTFlow``).

Layout (data -> noise, ``forward``; L = 3 levels and the reference's steps 4, 4, 2 shown, C =
``features``)::

    z                                                          B x T   x C
    level 0: PosAttnUnit                                       B x T   x C
             4 x FlowStep (units with time-split couplings)    B x T   x C
             prior coupling (channel halves, up)               B x T   x C
             split -> keep [:C/2]     | drop [C/2:] = n0       B x T   x C/2 each
             squeeze(keep)                                     B x T/2 x C
    level 1: the same at T/2 -> n1, squeeze                    B x T/4 x C
    level 2: PosAttnUnit, 2 x FlowStep (no time splits) -> n2  B x T/4 x C

    eps = merge(unsqueeze(merge(unsqueeze(n2), n1)), n0)       B x T   x C

A ``FlowStep`` is actnorm, multi-head linear A, a unit of couplings, actnorm, linear B, a unit; a unit is
2 couplings on channel halves, actnorm, 2 on interleaved channels and, in levels that split, actnorm
and 2 on even / odd time steps (see ``flows.py``).  With the reference's 4, 4, 2 steps that is
12 + 12 + 8 couplings per step pair, 48 / 48 / 16 couplings per level in the steps (the paper's
numbers), plus 2 in each level's positional-attention unit and 1 prior coupling per split.

Split-then-squeeze keeps the width at C while the length halves per level, so T must be a multiple of
``length_unit = 2 ** (L - 1)`` (4 for three levels; the model pads targets to it with EOS, as the
reference's data loader does).

Noise layout: the factored-out halves n0, n1, ... and the top-level output are packed into ONE
full-width B x T x C tensor by undoing the splits and squeezes, so ``forward`` returns noise of the
same shape as z and ``inverse`` distributes a full-width noise tensor the same way.  Hence
``log p(z|x) = log N(eps; 0, I) + logdet`` (Eq. 6) over the real positions of ``mask``, and
``sample(eps = 0)`` is the temperature-0 latent of the paper's argmax decoding.

Every level's masks, positions, key-padding masks and sinusoids are built once per call
(``LevelContext``), and the source once per call (``SourceMemory``; pass one from
:meth:`MultiScalePrior.source_memory` to share its projected keys and values across calls).  The
source may have fewer rows than z: B sentences for N = B * n sentence-major rows (candidates), whose
couplings then attend to each sentence's keys and values without copying them per candidate.
"""
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from fairseq_ext.modules.flows import (
    AffineCoupling,
    FlowStep,
    LevelContext,
    PosAttnUnit,
    SourceMemory,
    as_source,
    bool_mask,
    linear_head_size,
    logdet_dtype,
    merge,
    split,
    squeeze,
    squeeze_mask,
    standard_normal_log_prob,
    unsqueeze,
)

# checkpoint keys that only the earlier layout (one coupling per step, couplings at the hidden width) had
LEGACY_PRIOR_KEYS = ("prior.levels.", "prior.prior_couplings.")


class FlowBlock(nn.Module):
    """One level of the prior (the reference's ``NMTFlowBlock``): a positional-attention unit, ``num_steps``
    flow steps (with time-split couplings when ``splits``), and, when ``splits``, the prior coupling that
    prepares the channel half about to be factored out."""

    def __init__(self, num_steps: int, features: int, src_features: int, hidden: int, heads: int, splits: bool,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.pos_attn = PosAttnUnit(features, src_features, hidden, heads, dropout)
        self.steps = nn.ModuleList(
            FlowStep(features, src_features, hidden, heads, split_time=splits, dropout=dropout)
            for _ in range(num_steps)
        )
        self.prior = (
            AffineCoupling(features, src_features, hidden, heads, "channel_halves", True, dropout) if splits else None
        )

    def layers(self) -> List[nn.Module]:
        return [self.pos_attn, *self.steps] + ([self.prior] if self.prior is not None else [])

    def run(self, h: Tensor, ctx: LevelContext, init: bool) -> Tuple[Tensor, Tensor]:
        logdet = h.new_zeros(h.size(0), dtype=logdet_dtype(h))
        for layer in self.layers():
            h, ld = (layer.init_from_data if init else layer.forward)(h, ctx)
            logdet = logdet + ld
        return h, logdet

    def run_inverse(self, h: Tensor, ctx: LevelContext) -> Tuple[Tensor, Tensor]:
        logdet = h.new_zeros(h.size(0), dtype=logdet_dtype(h))
        for layer in reversed(self.layers()):
            h, ld = layer.inverse(h, ctx)
            logdet = logdet + ld
        return h, logdet


class MultiScalePrior(nn.Module):
    """The prior flow; see the module docstring for the layout.

    Args:
        features: latent width C (divisible by 2 * ``heads``; by 8 when >= 8, for the multi-head linear).
        src_features: source encoding width H.
        hidden: feed-forward width inside each coupling network (reference: 512 base, 1024 large).
        heads: attention heads of the coupling networks (the multi-head linears use the reference's head
            size of 32, 16 or 8 channels instead).
        steps_per_level: flow steps per level, bottom to top (reference: 4, 4, 2).
        dropout: dropout inside the coupling networks (reference configs: 0.0).
    """

    def __init__(
        self,
        features: int,
        src_features: int,
        hidden: int,
        heads: int,
        steps_per_level: Sequence[int] = (4, 4, 2),
        dropout: float = 0.0,
    ):
        super().__init__()
        assert len(steps_per_level) >= 1
        assert features % 2 == 0 and (features // 2) % heads == 0, (features, heads)
        self.features = features
        self.num_levels = len(steps_per_level)
        self.length_unit = 2 ** (self.num_levels - 1)
        self.blocks = nn.ModuleList(
            FlowBlock(n, features, src_features, hidden, heads, splits=level < self.num_levels - 1, dropout=dropout)
            for level, n in enumerate(steps_per_level)
        )

    # -- shapes ---------------------------------------------------------------------------------

    def check_lengths(self, z: Tensor, mask: Tensor) -> None:
        """T and every real length must be multiples of ``length_unit`` (one host sync)."""
        length = z.size(1)
        if length % self.length_unit:
            raise ValueError(f"padded length {length} is not a multiple of length_unit={self.length_unit}")
        if z.size(-1) != self.features:
            raise ValueError(f"width {z.size(-1)} != features={self.features}")
        if bool((bool_mask(mask).sum(dim=1) % self.length_unit != 0).any()):
            raise ValueError(f"real target lengths must be multiples of length_unit={self.length_unit}")

    def level_masks(self, mask: Tensor) -> List[Tensor]:
        """Masks of levels 0..L-1: B x T, B x T/2, ..."""
        masks = [bool_mask(mask)]
        for _ in range(self.num_levels - 1):
            masks.append(squeeze_mask(masks[-1]))
        return masks

    def level_contexts(self, mask: Tensor, source: Optional[SourceMemory]) -> List[LevelContext]:
        return [LevelContext(m, source) for m in self.level_masks(mask)]

    def source_memory(self, src: Tensor, src_mask: Optional[Tensor]) -> SourceMemory:
        """The source of one batch, to pass as ``src`` to several calls (its projected keys and values are
        kept between them: use only while the weights do not change, e.g. one decoding batch)."""
        return SourceMemory(src, src_mask)

    def pack_noise(self, parts: Sequence[Tensor]) -> Tensor:
        """[n0 (B x T x C/2), n1 (B x T/2 x C/2), ..., top (B x T/2^(L-1) x C)] -> B x T x C."""
        eps = parts[-1]
        for drop in reversed(parts[:-1]):
            eps = merge(unsqueeze(eps, None)[0], drop)  # B x T_l x C
        return eps

    def unpack_noise(self, eps: Tensor) -> List[Tensor]:
        """Inverse of :meth:`pack_noise`."""
        parts = []
        for _ in range(self.num_levels - 1):
            keep, drop = eps[..., : self.features // 2], eps[..., self.features // 2 :]
            parts.append(drop)
            eps = squeeze(keep, None)[0]  # B x T_l/2 x C
        parts.append(eps)
        return parts

    # -- flow interface ---------------------------------------------------------------------------

    def _forward(self, z: Tensor, mask: Tensor, src, src_mask, init: bool) -> Tuple[Tensor, Tensor]:
        self.check_lengths(z, mask)
        contexts = self.level_contexts(mask, as_source(src, src_mask))
        logdet = z.new_zeros(z.size(0), dtype=logdet_dtype(z))  # B
        parts, h = [], z
        for level, block in enumerate(self.blocks):
            h, ld = block.run(h, contexts[level], init)
            logdet = logdet + ld
            if level < self.num_levels - 1:
                keep, drop, _ = split(h, contexts[level].mask)  # B x T_l x C/2 each
                parts.append(drop)
                h = squeeze(keep, None)[0]  # B x T_l/2 x C
        parts.append(h)
        return self.pack_noise(parts), logdet

    def forward(self, z: Tensor, mask: Tensor, src=None, src_mask: Optional[Tensor] = None):
        """z (N x T x C) -> (eps N x T x C, log|det d eps/dz| N)."""
        return self._forward(z, mask, src, src_mask, init=False)

    def init_from_data(self, z: Tensor, mask: Tensor, src=None, src_mask: Optional[Tensor] = None):
        """Data-dependent init of every actnorm, level by level; returns forward's output after it."""
        return self._forward(z, mask, src, src_mask, init=True)

    def inverse(self, eps: Tensor, mask: Tensor, src=None, src_mask: Optional[Tensor] = None):
        """eps (N x T x C full-width noise) -> (z N x T x C, log|det dz/d eps| N)."""
        self.check_lengths(eps, mask)
        contexts = self.level_contexts(mask, as_source(src, src_mask))
        parts = self.unpack_noise(eps)
        logdet = eps.new_zeros(eps.size(0), dtype=logdet_dtype(eps))  # B
        h = parts[-1]
        for level in reversed(range(self.num_levels)):
            if level < self.num_levels - 1:
                h = merge(unsqueeze(h, None)[0], parts[level])  # B x T_l x C
            h, ld = self.blocks[level].run_inverse(h, contexts[level])
            logdet = logdet + ld
        return h, logdet

    # -- densities --------------------------------------------------------------------------------

    def log_prob(self, z: Tensor, mask: Tensor, src=None, src_mask: Optional[Tensor] = None) -> Tensor:
        """Eq. (6): log p(z|x) = log N(f(z); 0, I) + log|det df/dz|, over real positions. -> N."""
        eps, logdet = self.forward(z, mask, src, src_mask)
        return standard_normal_log_prob(eps, mask) + logdet

    def sample(self, eps: Tensor, mask: Tensor, src=None, src_mask: Optional[Tensor] = None):
        """Eq. (5): z = g(eps) for given noise (scale it by a temperature first; 0 = argmax decoding).

        Returns ``(z N x T x C, log p(z|x) N)`` with ``log p(z|x) = log N(eps) - log|det dz/deps|``.
        """
        z, logdet = self.inverse(eps, mask, src, src_mask)
        return z, standard_normal_log_prob(eps, mask) - logdet


def prior_parameter_count(features: int, src_features: int, hidden: int, heads: int,
                          steps_per_level: Sequence[int], weight_norm_gains: bool = False) -> int:  # fmt: skip
    """The parameter count of ``MultiScalePrior`` by formula (``weight_norm_gains``: plus the reference's
    weight-norm gain vector on every coupling output layer, i.e. the reference's own count).

    Per coupling network of width w with output 2o: source projection H*w when H != w; attention
    sublayers (2, or 3 with positional attention) of 3w^2 + 3w + 2w; feed-forward 2*w*hidden + hidden +
    w + 2w; output w*2o + 2o (+ 2o gains).  Actnorm 2C; multi-head linear d^2.
    """
    c = features
    d = linear_head_size(c)

    def net(w: int, pos_attn: bool = False) -> int:
        attn = 3 * w * w + 3 * w + 2 * w
        ffn = 2 * w * hidden + hidden + w + 2 * w
        out = w * 2 * w + 2 * w + (2 * w if weight_norm_gains else 0)
        return (src_features * w if src_features != w else 0) + (3 if pos_attn else 2) * attn + ffn + out

    actnorm, linear = 2 * c, d * d
    channel, time = net(c // 2), net(c)
    total = 0
    for level, n in enumerate(steps_per_level):
        splits = level < len(steps_per_level) - 1
        unit = 4 * channel + actnorm + ((actnorm + 2 * time) if splits else 0)
        step = 2 * (actnorm + linear + unit)
        pos_attn_unit = actnorm + net(c // 2, pos_attn=True) + channel
        total += pos_attn_unit + n * step + (channel if splits else 0)
    return total
