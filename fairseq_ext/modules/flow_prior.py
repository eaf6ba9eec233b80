"""FlowSeq's multi-scale prior flow p(z | x) (Ma et al., EMNLP 2019, §3.4, Figure 2).

Layout (data -> noise, ``forward``; L = 3 levels shown, C = ``features``)::

    z                                                     B x T   x C
    level 0: steps_per_level[0] x FlowStep                B x T   x C
             prior coupling (channel_halves, up)          B x T   x C
             split -> keep [:C/2]     | drop [C/2:] = n0  B x T   x C/2 each
             squeeze(keep)                                B x T/2 x C
    level 1: steps_per_level[1] x FlowStep                B x T/2 x C
             prior coupling, split -> keep | n1           B x T/2 x C/2 each
             squeeze(keep)                                B x T/4 x C
    level 2: steps_per_level[2] x FlowStep  -> n2         B x T/4 x C

    eps = merge(unsqueeze(merge(unsqueeze(n2), n1)), n0)  B x T   x C

Split-then-squeeze keeps the width at C while the length halves per level (the paper's "drops
half of the dimensions ... then the squeezing operation transforms the T x d/2 tensor into a
T/2 x d one"), so T must be a multiple of ``length_unit = 2 ** (L - 1)`` (4 for the paper's three
scales; the model pads targets to it, as the reference's data loader does with EOS).

Noise layout: the factored-out halves n0, n1, ... and the top-level output n2 are packed into ONE
full-width B x T x C tensor by undoing the splits and squeezes (the fixed permutation above), so
``forward`` returns noise of the same shape as z, every real entry of it is one N(0, 1) variable
at a real position of the original mask, and ``inverse`` distributes a full-width noise tensor the
same way.  Hence ``log p(z|x) = log N(eps; 0, I) + logdet`` (Eq. 6) with the Gaussian counted over
the real positions of ``mask`` only, and ``sample(eps = 0)`` is the temperature-0 latent of the
paper's argmax decoding (the image of the base mode, as in the reference; not the exact mode of
p(z|x), which the Jacobian term shifts).

Following the reference implementation, every non-final level ends with a "prior" coupling on
channel halves that transforms the half about to be factored out conditioned on the kept half
and the source; the factored half is then a plain N(0, I) (so it is a conditional Gaussian in
the coupling's input).  Steps are numbered globally across levels and take their layout from
:func:`fairseq_ext.modules.flows.step_layout` (linear A/B, split type and up/down alternate).
"""
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from fairseq_ext.modules.flows import (
    AffineCoupling,
    FlowStep,
    bool_mask,
    logdet_dtype,
    merge,
    split,
    squeeze,
    squeeze_mask,
    standard_normal_log_prob,
    step_layout,
    unsqueeze,
)


class MultiScalePrior(nn.Module):
    """The prior flow; see the module docstring for the layout.

    Args:
        features: latent width C (even; divisible by ``heads``).
        src_features: source encoding width H.
        hidden: width of each coupling's Transformer layer (divisible by ``heads``).
        heads: attention heads of the couplings and heads of the multi-head linear layers.
        steps_per_level: flow steps per scale, bottom to top (paper: 48, 48, 16).
        dropout: dropout inside the coupling Transformer layers (reference configs: 0.0).
    """

    def __init__(
        self,
        features: int,
        src_features: int,
        hidden: int,
        heads: int,
        steps_per_level: Sequence[int] = (48, 48, 16),
        dropout: float = 0.0,
    ):
        super().__init__()
        assert len(steps_per_level) >= 1
        assert features % 2 == 0 and features % heads == 0, (features, heads)
        self.features = features
        self.num_levels = len(steps_per_level)
        self.length_unit = 2 ** (self.num_levels - 1)
        levels, index = [], 0
        for num_steps in steps_per_level:
            steps = []
            for _ in range(num_steps):
                head_layout, split_type, up = step_layout(index)
                steps.append(FlowStep(features, src_features, hidden, heads, split_type, up, head_layout, dropout))
                index += 1
            levels.append(nn.ModuleList(steps))
        self.levels = nn.ModuleList(levels)
        self.prior_couplings = nn.ModuleList(
            AffineCoupling(features, src_features, hidden, heads, "channel_halves", dropout, up=True)
            for _ in range(self.num_levels - 1)
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
        masks = [mask]
        for _ in range(self.num_levels - 1):
            masks.append(squeeze_mask(masks[-1]))
        return masks

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
        logdet = z.new_zeros(z.size(0), dtype=logdet_dtype(z))  # B
        parts, h, m = [], z, mask
        for level, steps in enumerate(self.levels):
            for step in steps:
                h, ld = (step.init_from_data if init else step.forward)(h, m, src, src_mask)
                logdet = logdet + ld
            if level < self.num_levels - 1:
                coupling = self.prior_couplings[level]
                h, ld = (coupling.init_from_data if init else coupling.forward)(h, m, src, src_mask)
                logdet = logdet + ld
                keep, drop, _ = split(h, m)  # B x T_l x C/2 each
                parts.append(drop)
                h, m = squeeze(keep, m)  # B x T_l/2 x C
        parts.append(h)
        return self.pack_noise(parts), logdet

    def forward(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        """z (B x T x C) -> (eps B x T x C, log|det d eps/dz| B)."""
        return self._forward(z, mask, src, src_mask, init=False)

    def init_from_data(self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        """Data-dependent init of every actnorm, level by level; returns forward's output after it."""
        return self._forward(z, mask, src, src_mask, init=True)

    def inverse(self, eps: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        """eps (B x T x C full-width noise) -> (z B x T x C, log|det dz/d eps| B)."""
        self.check_lengths(eps, mask)
        parts = self.unpack_noise(eps)
        masks = self.level_masks(mask)
        logdet = eps.new_zeros(eps.size(0), dtype=logdet_dtype(eps))  # B
        h = parts[-1]
        for level in reversed(range(self.num_levels)):
            m = masks[level]
            if level < self.num_levels - 1:
                keep = unsqueeze(h, masks[level + 1])[0]  # B x T_l x C/2
                h, ld = self.prior_couplings[level].inverse(merge(keep, parts[level]), m, src, src_mask)
                logdet = logdet + ld
            for step in reversed(self.levels[level]):
                h, ld = step.inverse(h, m, src, src_mask)
                logdet = logdet + ld
        return h, logdet

    # -- densities --------------------------------------------------------------------------------

    def log_prob(
        self, z: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Eq. (6): log p(z|x) = log N(f(z); 0, I) + log|det df/dz|, over real positions. -> B."""
        eps, logdet = self.forward(z, mask, src, src_mask)
        return standard_normal_log_prob(eps, mask) + logdet

    def sample(self, eps: Tensor, mask: Tensor, src: Optional[Tensor] = None, src_mask: Optional[Tensor] = None):
        """Eq. (5): z = g(eps) for given noise (scale it by a temperature first; 0 = argmax decoding).

        Returns ``(z B x T x C, log p(z|x) B)`` with ``log p(z|x) = log N(eps) - log|det dz/deps|``.
        """
        z, logdet = self.inverse(eps, mask, src, src_mask)
        return z, standard_normal_log_prob(eps, mask) - logdet
