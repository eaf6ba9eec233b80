"""Model ``flowseq``: FlowSeq, non-autoregressive generation with a generative-flow prior.

Ma, Zhou, Li, Neubig and Hovy, "FlowSeq: Non-Autoregressive Conditional Sequence Generation
with Generative Flow", EMNLP 2019, sections 3.1-3.5 and 4.1.

    P(y | x) = integral P(y | z, x) p(z | x) dz                      (eq. 3)
    P(y | z, x) = prod_t P(y_t | z, x)                                 (eq. 4, the decoder)
    q(z | y, x) = prod_t N(z_t | mu_t(x, y), sigma_t^2(x, y))          (eq. 9, the posterior)
    log P(y | x) >= E_q[log P(y | z, x)] - KL(q(z | y, x) || p(z | x))  (eq. 8, the ELBO)

Components (all batch-first: B sentences, S source / T target positions, D model width, F latent
features, V target vocabulary, C length classes):

* encoder: fairseq's ``TransformerEncoderBase``; ``encode`` returns it batch-first, B x S x D,
  with a B x S mask (1 = real position), padded positions zeroed;
* posterior q(z|y,x): scaled target embeddings, whole-token dropout, positions, unmasked
  ``TransformerDecoderLayerBase`` layers (no ``self_attn_mask``) attending to the source, and
  ZERO-initialised linear heads for mu and log sigma^2, so that q starts as N(0, I) (section 3.2);
* prior p(z|x): the multi-scale Glow-style flow of section 3.4 in the reference implementation's
  layout and sizes (``fairseq_ext.modules.flow_prior.MultiScalePrior``; ``--flowseq-prior-steps``
  counts its composite steps, 4,4,2 as the reference); a checkpoint of this package's earlier prior
  layout is refused on loading with a message saying so;
* decoder P(y|z,x): z projected to D, positional attention (query = positional encodings, keys =
  z + positional encodings, values = z), or z + positions (``--flowseq-decoder-positions``),
  unmasked Transformer layers attending to the source, and an output projection (tied to the
  target embeddings with ``--share-decoder-input-output-embed``);
* length predictor: max-pooled source encodings (section 3.5; the reference takes the encoder
  state of the last source token instead, and the paper's footnote 2 reports no difference) ->
  2 x (Linear + ELU) -> dropout -> Linear, over the C = 2R + 1 classes of
  (target length - source length) in [-R, R] (``--flowseq-length-range R``, the paper's 20).

Target layout.  fairseq's ``target`` is ``y_1 .. y_n EOS`` (right-padded with pad).  The
multi-scale prior halves the length at each of its levels, so the model works on T positions, a
multiple of ``length_unit`` (4 for 3 levels): ``pad_to_length_unit`` appends EOS up to the next
multiple (the paper's "We pad each sentence with EOS tokens", the reference's ``pad_tgt``).  These
EOS positions are real model positions (decoded, reconstructed, covered by q and p); a generator
strips the trailing EOS.  Target lengths, length classes and masks are all in model positions.

Length classes whose implied target length S + d is not a multiple of ``length_unit``, is < 1,
or exceeds ``--max-target-positions`` are masked to -inf, in the training loss and in prediction
(the reference masks the non-multiples; lengths <= 0 at prediction only).  A target length
outside the range is trained towards the nearest valid class (the reference clamps the difference
to [-R, R], which can land on a masked class).

Where this departs from the reference implementation (XuezheMax/flowseq), and why:
* the target keeps fairseq's EOS before the EOS padding (the reference's target has none), so a
  length class counts it: decoding strips every trailing EOS either way;
* length from max-pooling (the paper) rather than the last source token;
* mu / log sigma^2 heads are plain zero-initialised linears (the paper's "Zero initialization")
  instead of weight-normalised ones with init scale 0.05;
* token dropout draws an explicit B x T keep mask (rescaled by 1 / (1 - p)), what the reference's
  ``F.dropout2d`` on B x T x D did in 2019, whose semantics newer PyTorch changes;
* the encoder's and posterior's embedding dropout is ``--dropout`` (the reference hard-codes 0.2);
* the decoder's positional attention also adds the positional encodings to its keys (the
  reference's keys are z alone, ``--flowseq-decoder-positions attn_z_keys``): a query then finds
  its own position's z at once.  Measured on the tiny reverse task (flowseq_tiny at width 32 /
  latent 16, 200 autoencoder updates, lr 0.005): label-smoothed reconstruction loss 0.97 bits per
  position with positional keys, 1.94 with the reference's, 0.94 with ``add``.  The output is added to the
  positional query and layer-normalised (a post-norm sublayer);
* under data parallelism the prior's data-dependent init is broadcast from rank 0, so every replica
  holds the same parameters (the reference's init ran on one process before training).
"""
import logging
import math
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerEncoderBase
from fairseq.modules import FairseqDropout, LayerNorm, MultiheadAttention, PositionalEmbedding
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.modules.flow_prior import LEGACY_PRIOR_KEYS, MultiScalePrior

logger = logging.getLogger(__name__)

POSITIONS_CHOICES = ChoiceEnum(["attn", "attn_z_keys", "add"])
WRONG_TASK = (
    "a FlowSeq model is decoded by its own generator (argmax / sample / NPD / IWD), not by fairseq's "
    "autoregressive SequenceGenerator or SequenceScorer: run fairseq-generate / fairseq-interactive with "
    "--task translation_flowseq (e.g. --flowseq-decoding argmax)"
)
LOG_2PI = math.log(2.0 * math.pi)
MAX_PRIOR_STEPS = 16
OLD_PRIOR_LAYOUT = (
    "this FlowSeq checkpoint has the earlier prior layout (one coupling per flow step, coupling networks at "
    "--flowseq-prior-hidden width; --flowseq-prior-steps counted couplings, e.g. 48,48,16), which this version "
    "no longer builds: the prior now has the reference implementation's layout and sizes, where "
    "--flowseq-prior-steps counts composite steps (4,4,2 = the paper's 48, 48, 16 couplings). Retrain the model "
    "(or decode it with the fairseq_ext version that trained it)"
)


@dataclass
class FlowSeqConfig(FairseqDataclass):
    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="relu", metadata={"help": "activation of the Transformer feed-forward blocks"}
    )
    dropout: float = field(
        default=0.1,
        metadata={
            "help": "dropout probability in the encoder, posterior and decoder layers and on their inputs (the "
            "reference hard-codes 0.2 on the encoder's and posterior's embeddings); 0 disables it"
        },
    )
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout probability on attention weights"})
    activation_dropout: float = field(
        default=0.0, metadata={"help": "dropout probability after the feed-forward activation"}
    )
    encoder_embed_dim: int = field(
        default=256,
        metadata={
            "help": "model width D of the encoder, posterior and decoder, and the size of both embeddings "
            "(the paper's d_model: 256 base, 512 large)"
        },
    )
    encoder_ffn_embed_dim: int = field(
        default=1024, metadata={"help": "feed-forward width of the encoder layers (reference base: 1024)"}
    )
    encoder_layers: int = field(default=6, metadata={"help": "encoder layers (paper: 6 for WMT, 5 for IWSLT)"})
    encoder_attention_heads: int = field(default=8, metadata={"help": "encoder attention heads"})
    encoder_learned_pos: bool = field(
        default=False, metadata={"help": "learned instead of sinusoidal positions in every component"}
    )
    decoder_layers: int = field(default=4, metadata={"help": "decoder layers (paper: 4 for WMT, 3 for IWSLT)"})
    decoder_attention_heads: int = field(
        default=8, metadata={"help": "attention heads of the decoder and of the posterior"}
    )
    decoder_ffn_embed_dim: int = field(
        default=1024, metadata={"help": "feed-forward width of the decoder and posterior layers"}
    )
    no_scale_embedding: bool = field(
        default=False, metadata={"help": "do not scale token embeddings by sqrt(D)"}
    )
    share_decoder_input_output_embed: bool = field(
        default=False,
        metadata={
            "help": "tie the decoder's output projection to the target embeddings the posterior reads "
            "(the reference ties them)"
        },
    )
    share_all_embeddings: bool = field(
        default=False,
        metadata={
            "help": "share source and target embeddings (needs a joined dictionary); implies "
            "--share-decoder-input-output-embed"
        },
    )
    flowseq_latent_dim: int = field(
        default=256, metadata={"help": "size F of each latent vector z_t (the paper's d_z; reference: = D)"}
    )
    flowseq_posterior_layers: int = field(
        default=4, metadata={"help": "posterior Transformer layers (paper: 4 for WMT, 3 for IWSLT)"}
    )
    flowseq_posterior_token_dropout: float = field(
        default=0.2,
        metadata={
            "help": "probability of zeroing a whole target token embedding in the posterior (section 3.2 "
            "'token dropout'; reference 0.2); 0 disables it"
        },
    )
    flowseq_decoder_positions: POSITIONS_CHOICES = field(
        default="attn",
        metadata={
            "help": "how the decoder gets positions: attn = positional attention, query = positional encodings, "
            "keys = projected z + positional encodings, values = projected z; attn_z_keys = the reference's "
            "positional attention, keys = values = projected z (slower to train: see the module docstring); "
            "add = projected z + positional encodings"
        },
    )
    flowseq_prior_hidden: int = field(
        default=512,
        metadata={
            "help": "feed-forward width inside the prior flow's coupling networks, which otherwise work at the "
            "width of the half they condition on (the paper's d_hidden: 512 base, 1024 large)"
        },
    )
    flowseq_prior_heads: int = field(
        default=8,
        metadata={
            "help": "attention heads of the coupling networks (latent-dim / 2 must be divisible by it); the "
            "invertible multi-head linears use heads of 32, 16 or 8 channels as the reference"
        },
    )
    flowseq_prior_steps: str = field(
        default="4,4,2",
        metadata={
            "help": "comma-separated flow steps per scale, bottom to top, in the reference implementation's layout "
            "(a step is actnorm, linear, 4-6 couplings, actnorm, linear, 4-6 couplings: 4,4,2 are the paper's 48, 48, "
            f"16 couplings); L scales give target lengths a multiple of 2^(L-1); at most {MAX_PRIOR_STEPS} per scale"
        },
    )
    flowseq_prior_dropout: float = field(
        default=0.0, metadata={"help": "dropout in the prior's coupling networks (reference: 0)"}
    )
    flowseq_length_range: int = field(
        default=20,
        metadata={
            "help": "R: the length predictor classifies (target length - source length) in [-R, R] (paper 20, "
            "reference IWSLT 16); must be >= length_unit - 1 so every source has a valid class"
        },
    )
    flowseq_length_dropout: float = field(
        default=0.33, metadata={"help": "dropout before the length predictor's output layer (reference 0.33)"}
    )
    max_source_positions: int = II("task.max_source_positions")
    max_target_positions: int = II("task.max_target_positions")


# -- pure helpers -----------------------------------------------------------------------------------
def parse_prior_steps(spec) -> List[int]:
    """``"48,48,16"`` (or a list) -> [48, 48, 16]; raises ValueError naming the flag when malformed."""
    try:
        steps = [int(s) for s in spec.split(",")] if isinstance(spec, str) else [int(s) for s in spec]
    except (ValueError, TypeError, AttributeError):
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise ValueError(
            f"--flowseq-prior-steps must be a comma-separated list of positive step counts per scale, "
            f"e.g. 48,48,16; got {spec!r}"
        )
    return steps


def length_unit_for_levels(levels: int) -> int:
    """Target lengths must be multiples of this: each of the L - 1 squeezes halves the length
    (``MultiScalePrior.length_unit``; the reference's ``max(2, ...)`` only matters for L = 1)."""
    return 2 ** (levels - 1)


def pad_to_length_unit(tokens: Tensor, pad: int, eos: int, unit: int) -> Tuple[Tensor, Tensor]:
    """Appends EOS to each right-padded row up to the next multiple of ``unit``.

    Args:
        tokens: B x T' token ids, each row ``real tokens`` then ``pad``s (fairseq's ``target``).
    Returns:
        (B x T tokens, B x T bool mask with True at the T_b = ceil(n_b / unit) * unit model positions
        of row b), T = max_b T_b; positions past T_b hold ``pad``.
    """
    real = tokens.ne(pad)  # B x T'
    lengths = real.long().sum(1)  # B
    bsz, width = tokens.shape
    if not torch.equal(real, torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]):
        raise ValueError(
            "flowseq: target rows must be right-padded (real tokens first); drop --left-pad-target True"
        )
    padded_lengths = (lengths + unit - 1) // unit * unit  # B
    out_len = int(padded_lengths.max()) if bsz > 0 else 0
    positions = torch.arange(out_len, device=tokens.device)[None, :]  # 1 x T
    mask = positions < padded_lengths[:, None]  # B x T
    out = tokens.new_full((bsz, out_len), pad)
    keep = min(width, out_len)
    out[:, :keep] = tokens[:, :keep]
    out = torch.where(mask & (positions >= lengths[:, None]), torch.full_like(out, eos), out)
    return out, mask


def length_classes(src_lengths: Tensor, length_range: int, unit: int, max_length: Optional[int] = None):
    """Target lengths and validity of the C = 2R + 1 length classes.

    Class c means target length L = S + (c - R).  Valid: L >= 1, L a multiple of ``unit`` and, when
    given, L <= ``max_length``.

    Args:
        src_lengths: B real source positions (with EOS).
    Returns:
        (lengths B x C long, valid B x C bool).
    """
    diffs = torch.arange(-length_range, length_range + 1, device=src_lengths.device)  # C
    lengths = src_lengths.long()[:, None] + diffs[None, :]  # B x C
    valid = (lengths >= 1) & (lengths % unit == 0)
    if max_length is not None:
        valid &= lengths <= max_length
    return lengths, valid


def length_target_class(tgt_lengths: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
    """Index of the valid class whose length is nearest to each target length (B): its own class
    when that lies in range (target lengths are multiples of the unit); otherwise the extreme valid
    class on its side (the reference clamps the difference to [-R, R])."""
    distance = (lengths - tgt_lengths.long()[:, None]).abs().float()  # B x C
    distance = distance.masked_fill(~valid, float("inf"))
    return distance.argmin(dim=1)


def masked_length_log_probs(logits: Tensor, valid: Tensor) -> Tensor:
    """log-softmax over the valid classes only (B x C, -inf at invalid classes), in float32."""
    return torch.log_softmax(logits.float().masked_fill(~valid, float("-inf")), dim=-1)


def diagonal_gaussian_log_prob(eps: Tensor, logvar: Tensor, mask: Tensor) -> Tensor:
    """log N(z | mu, sigma^2) summed over features and the masked positions, z = mu + sigma * eps.

        log N = sum_{t real, f} -0.5 * (eps_tf^2 + log sigma_tf^2 + log 2 pi)

    Args:
        eps: ... x T x F standard-normal noise (0 for the mean), logvar: ... x T x F, mask: ... x T.
    Returns:
        ... (one value per sequence).
    """
    per_position = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)  # ... x T
    return (per_position * mask.to(per_position.dtype)).sum(-1)


def sample_diagonal_gaussian(mu: Tensor, logvar: Tensor, mask: Tensor, n_samples: int, random: bool = True):
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) (or eps = 0), n per row, sentence-major.

    Args: mu, logvar: B x T x F; mask: B x T.
    Returns: (z (B*n) x T x F zero at padded positions, log q(z) (B*n)).
    """
    bsz, tgt_len, feats = mu.shape
    mu = mu.repeat_interleave(n_samples, dim=0) if n_samples > 1 else mu  # (B*n) x T x F
    logvar = logvar.repeat_interleave(n_samples, dim=0) if n_samples > 1 else logvar
    mask_n = mask.repeat_interleave(n_samples, dim=0) if n_samples > 1 else mask  # (B*n) x T
    m = mask_n.to(mu.dtype)[..., None]
    eps = standard_normal_like(mu) * m if random else torch.zeros_like(mu)
    z = (mu + torch.exp(0.5 * logvar) * eps) * m
    return z, diagonal_gaussian_log_prob(eps, logvar, mask_n)


def standard_normal_like(x: Tensor) -> Tensor:
    """The posterior's noise (a module-level function so that tests can substitute fixed noise)."""
    return torch.randn_like(x)


def _transformer_config(cfg: FlowSeqConfig, ffn_dim: int, heads: int, layers: int) -> TransformerConfig:
    """A fairseq TransformerConfig for one of our stacks (all stacks have width D)."""
    tcfg = TransformerConfig()
    tcfg.activation_fn = str(cfg.activation_fn)
    tcfg.dropout = cfg.dropout
    tcfg.attention_dropout = cfg.attention_dropout
    tcfg.activation_dropout = cfg.activation_dropout
    tcfg.max_source_positions = cfg.max_source_positions
    tcfg.max_target_positions = cfg.max_target_positions
    tcfg.no_scale_embedding = cfg.no_scale_embedding
    for part in (tcfg.encoder, tcfg.decoder):
        part.embed_dim = cfg.encoder_embed_dim
        part.ffn_embed_dim = ffn_dim
        part.attention_heads = heads
        part.layers = layers
        part.learned_pos = cfg.encoder_learned_pos
        part.normalize_before = False
    tcfg.decoder.input_dim = tcfg.decoder.output_dim = cfg.encoder_embed_dim
    return tcfg


def _position_tokens(mask: Tensor, pad: int) -> Tensor:
    """Stand-in tokens for fairseq's PositionalEmbedding: non-pad exactly at the masked positions, so
    positions follow the mask whatever the tokens there are (a decoded token may be pad)."""
    real = mask.bool()
    return torch.where(real, torch.full_like(real, pad + 1, dtype=torch.long), torch.full_like(real, pad, dtype=torch.long))


class _UnmaskedStack(nn.Module):
    """Positions + fairseq TransformerDecoderLayerBase layers WITHOUT a causal mask (no
    ``self_attn_mask``), self-attending over the masked positions and attending to the source."""

    def __init__(self, tcfg: TransformerConfig, layers: int):
        super().__init__()
        self.layers = nn.ModuleList([TransformerDecoderLayerBase(tcfg) for _ in range(layers)])

    def forward(self, x: Tensor, mask: Tensor, src: Tensor, src_mask: Tensor) -> Tensor:
        # x: B x T x D, src: B x S x D -> B x T x D
        h = x.transpose(0, 1)  # T x B x D
        enc = src.transpose(0, 1)  # S x B x D
        pad, src_pad = ~mask.bool(), ~src_mask.bool()
        for layer in self.layers:
            h, _, _ = layer(h, encoder_out=enc, encoder_padding_mask=src_pad, self_attn_padding_mask=pad)
        return h.transpose(0, 1) * mask.to(x.dtype)[..., None]


class FlowSeqPosterior(nn.Module):
    """q(z | y, x): a diagonal Gaussian per target position (eq. 9)."""

    def __init__(self, cfg: FlowSeqConfig, embed_tokens: nn.Embedding, tcfg: TransformerConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.embed_tokens = embed_tokens
        self.padding_idx = embed_tokens.padding_idx
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(dim)
        self.token_dropout = cfg.flowseq_posterior_token_dropout
        self.embed_positions = PositionalEmbedding(
            cfg.max_target_positions, dim, self.padding_idx, learned=cfg.encoder_learned_pos
        )
        self.dropout = FairseqDropout(cfg.dropout, module_name=self.__class__.__name__)
        self.stack = _UnmaskedStack(tcfg, cfg.flowseq_posterior_layers)
        self.mu = nn.Linear(dim, cfg.flowseq_latent_dim)
        self.logvar = nn.Linear(dim, cfg.flowseq_latent_dim)
        for head in (self.mu, self.logvar):  # section 3.2 "Zero initialization": q starts as N(0, I)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, tokens: Tensor, mask: Tensor, src: Tensor, src_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """(mu, logvar), each B x T x F, zero at padded positions."""
        x = self.embed_scale * self.embed_tokens(tokens)  # B x T x D
        if self.training and self.token_dropout > 0:
            # whole-token dropout (the reference's dropout2d over positions), rescaled like dropout
            keep = torch.rand(x.shape[:2], device=x.device) >= self.token_dropout  # B x T
            x = x * keep.to(x.dtype)[..., None] / (1.0 - self.token_dropout)
        x = self.dropout(x + self.embed_positions(_position_tokens(mask, self.padding_idx)))
        h = self.stack(x, mask, src, src_mask)  # B x T x D
        m = mask.to(h.dtype)[..., None]
        return self.mu(h) * m, self.logvar(h) * m


class FlowSeqDecoder(nn.Module):
    """P(y | z, x) = prod_t P(y_t | z, x) (eq. 4): non-autoregressive, no causal mask (section 3.3)."""

    def __init__(self, cfg: FlowSeqConfig, embed_tokens: nn.Embedding, tcfg: TransformerConfig, share_output: bool):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.padding_idx = embed_tokens.padding_idx
        self.project = nn.Linear(cfg.flowseq_latent_dim, dim)
        self.positions_mode = str(cfg.flowseq_decoder_positions)
        self.embed_positions = PositionalEmbedding(
            cfg.max_target_positions, dim, self.padding_idx, learned=cfg.encoder_learned_pos
        )
        if self.positions_mode in ("attn", "attn_z_keys"):
            self.pos_attn = MultiheadAttention(
                dim, cfg.decoder_attention_heads, dropout=cfg.attention_dropout, encoder_decoder_attention=True
            )
            self.pos_attn_norm = LayerNorm(dim)
        self.dropout = FairseqDropout(cfg.dropout, module_name=self.__class__.__name__)
        self.stack = _UnmaskedStack(tcfg, cfg.decoder_layers)
        vocab = embed_tokens.num_embeddings
        self.output_projection = nn.Linear(dim, vocab, bias=False)
        if share_output:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=dim**-0.5)

    def forward(self, z: Tensor, mask: Optional[Tensor] = None, src: Optional[Tensor] = None,
                src_mask: Optional[Tensor] = None, **kwargs) -> Tensor:  # fmt: skip
        """Logits B x T x V from z (B x T x F)."""
        if mask is None or src is None or src_mask is None or kwargs:
            # fairseq's SequenceGenerator (what --task translation builds) calls
            # decoder.forward(prev_output_tokens, encoder_out=...): say which task decodes FlowSeq
            called_with = ", ".join(sorted(kwargs)) or "no target mask or source"
            raise ValueError(f"flowseq: its decoder was called as an autoregressive one ({called_with}); {WRONG_TASK}")
        h = self.project(z)  # B x T x D
        pos = self.embed_positions(_position_tokens(mask, self.padding_idx))  # B x T x D
        if self.positions_mode in ("attn", "attn_z_keys"):
            # query = positional encodings, values = z; keys = z + positions (attn) or z (attn_z_keys)
            keys = h + pos if self.positions_mode == "attn" else h
            attended, _ = self.pos_attn(
                query=pos.transpose(0, 1), key=keys.transpose(0, 1), value=h.transpose(0, 1),
                key_padding_mask=~mask.bool(), need_weights=False,
            )  # fmt: skip
            h = self.pos_attn_norm(pos + self.dropout(attended.transpose(0, 1)))
        else:
            h = h + pos
        h = self.stack(self.dropout(h), mask, src, src_mask)  # B x T x D
        return self.output_projection(h)  # B x T x V


class FlowSeqLengthPredictor(nn.Module):
    """Max-pooled source encodings -> logits over the C = 2R + 1 length-difference classes."""

    def __init__(self, dim: int, length_range: int, dropout: float):
        super().__init__()
        self.length_range = length_range
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.ELU(), nn.Linear(dim, dim), nn.ELU(), nn.Dropout(dropout),
            nn.Linear(dim, 2 * length_range + 1),
        )  # fmt: skip

    def forward(self, src: Tensor, src_mask: Tensor) -> Tensor:
        pooled = src.masked_fill(~src_mask.bool()[..., None], float("-inf")).max(dim=1).values  # B x D
        return self.net(pooled)  # B x C


def _build_prior(cfg: FlowSeqConfig, steps: List[int]):
    return MultiScalePrior(
        features=cfg.flowseq_latent_dim,
        src_features=cfg.encoder_embed_dim,
        hidden=cfg.flowseq_prior_hidden,
        heads=cfg.flowseq_prior_heads,
        steps_per_level=tuple(steps),
        dropout=cfg.flowseq_prior_dropout,
    )


def check_flowseq_config(cfg: FlowSeqConfig) -> List[int]:
    """Refuses impossible settings before anything is built; returns the prior steps per scale."""
    steps = parse_prior_steps(cfg.flowseq_prior_steps)
    if max(steps) > MAX_PRIOR_STEPS:
        raise ValueError(
            f"--flowseq-prior-steps {cfg.flowseq_prior_steps}: at most {MAX_PRIOR_STEPS} steps per scale (each "
            "step holds 8-12 couplings; the reference uses 4,4,2). If this comes from a saved checkpoint: "
            + OLD_PRIOR_LAYOUT
        )
    unit = length_unit_for_levels(len(steps))
    if cfg.flowseq_length_range < max(1, unit - 1):
        raise ValueError(
            f"--flowseq-length-range must be >= {max(1, unit - 1)} (length_unit - 1 for {len(steps)} prior "
            f"scales, so that every source length has a target length class), got {cfg.flowseq_length_range}"
        )
    heads, latent = cfg.flowseq_prior_heads, cfg.flowseq_latent_dim
    if heads < 1 or latent % (2 * heads) or (latent >= 8 and latent % 8):
        raise ValueError(
            f"--flowseq-latent-dim ({latent}) must be divisible by 2 x --flowseq-prior-heads ({heads}): the channel "
            "couplings attend at half the latent width; and, when >= 8, by 8 (the multi-head linears' heads)"
        )
    if cfg.flowseq_prior_hidden < 1:
        raise ValueError(f"--flowseq-prior-hidden must be >= 1, got {cfg.flowseq_prior_hidden}")
    for dim_heads in ("encoder_attention_heads", "decoder_attention_heads"):
        if cfg.encoder_embed_dim % getattr(cfg, dim_heads):
            raise ValueError(
                f"--encoder-embed-dim ({cfg.encoder_embed_dim}) must be divisible by --{dim_heads.replace('_', '-')} "
                f"({getattr(cfg, dim_heads)})"
            )
    for name in ("flowseq_posterior_token_dropout", "flowseq_length_dropout", "dropout", "flowseq_prior_dropout"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    for name in ("encoder_layers", "decoder_layers", "flowseq_posterior_layers"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    return steps


@register_model("flowseq", dataclass=FlowSeqConfig)
class FlowSeqModel(BaseFairseqModel):
    """FlowSeq (see the module docstring).

    API used by ``flowseq_loss`` and ``fairseq_ext.generators.flowseq_generator`` (masks are float,
    1.0 at real positions; bool masks are accepted too; T is always a multiple of ``length_unit``):

    * ``encode(src_tokens, src_lengths) -> (src B x S x D, src_mask B x S)``
    * ``length_log_probs(src, src_mask) -> (log_probs B x C, lengths B x C)``
    * ``posterior(tgt_tokens, tgt_mask, src, src_mask, n_samples, random=True) -> (z (B*n) x T x F,
      log_q (B*n))``, sentence-major
    * ``decode(z, tgt_mask, src, src_mask) -> log_probs B x T x V``
    * ``expand_source(src, src_mask, n)``; ``prior``; ``length_unit``; ``prior_initialized``
    * ``forward(src_tokens, src_lengths, prev_output_tokens, target, ...)`` -> the dict documented there.
    """

    def __init__(self, cfg: FlowSeqConfig, encoder, posterior, decoder, length_predictor, prior, tgt_dict):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.posterior_net = posterior
        self.decoder = decoder
        self.length_predictor = length_predictor
        self.prior = prior
        self.pad = tgt_dict.pad()
        self.eos = tgt_dict.eos()
        self.length_range = cfg.flowseq_length_range
        # 1 once the prior had its data-dependent init (saved with the model: a resumed or loaded
        # model never re-initialises it)
        self.register_buffer("prior_initialized_flag", torch.zeros((), dtype=torch.long))

    @classmethod
    def build_model(cls, cfg, task):
        if isinstance(cfg, Namespace):  # a named architecture built from parsed arguments
            cfg = FlowSeqConfig.from_namespace(cfg)
        steps = check_flowseq_config(cfg)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        dim = cfg.encoder_embed_dim
        if cfg.share_all_embeddings and src_dict != tgt_dict:
            raise ValueError("--share-all-embeddings needs a joined dictionary (fairseq-preprocess --joined-dictionary)")
        src_embed = nn.Embedding(len(src_dict), dim, padding_idx=src_dict.pad())
        nn.init.normal_(src_embed.weight, mean=0, std=dim**-0.5)
        nn.init.constant_(src_embed.weight[src_dict.pad()], 0)
        if cfg.share_all_embeddings:
            tgt_embed = src_embed
        else:
            tgt_embed = nn.Embedding(len(tgt_dict), dim, padding_idx=tgt_dict.pad())
            nn.init.normal_(tgt_embed.weight, mean=0, std=dim**-0.5)
            nn.init.constant_(tgt_embed.weight[tgt_dict.pad()], 0)
        enc_cfg = _transformer_config(cfg, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads, cfg.encoder_layers)
        dec_cfg = _transformer_config(cfg, cfg.decoder_ffn_embed_dim, cfg.decoder_attention_heads, cfg.decoder_layers)
        encoder = TransformerEncoderBase(enc_cfg, src_dict, src_embed)
        posterior = FlowSeqPosterior(cfg, tgt_embed, dec_cfg)
        share = cfg.share_decoder_input_output_embed or cfg.share_all_embeddings
        decoder = FlowSeqDecoder(cfg, tgt_embed, dec_cfg, share_output=share)
        length_predictor = FlowSeqLengthPredictor(dim, cfg.flowseq_length_range, cfg.flowseq_length_dropout)
        prior = _build_prior(cfg, steps)
        model = cls(cfg, encoder, posterior, decoder, length_predictor, prior, tgt_dict)
        if model.length_unit != length_unit_for_levels(len(steps)):
            raise ValueError(
                f"flowseq: the prior's length_unit {model.length_unit} differs from the expected "
                f"{length_unit_for_levels(len(steps))} for --flowseq-prior-steps {cfg.flowseq_prior_steps}"
            )
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's load, refusing a checkpoint of the earlier prior layout with a message saying so
        (rather than a list of missing and unexpected keys)."""
        if any(key.startswith(LEGACY_PRIOR_KEYS) for key in state_dict):
            raise ValueError("flowseq: " + OLD_PRIOR_LAYOUT)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    # -- properties -----------------------------------------------------------------------------
    @property
    def length_unit(self) -> int:
        return int(self.prior.length_unit)

    @property
    def latent_dim(self) -> int:
        """F, the width of z (and of the prior's noise)."""
        return int(self.cfg.flowseq_latent_dim)

    @property
    def prior_initialized(self) -> bool:
        return bool(self.prior_initialized_flag.item())

    def max_positions(self):
        return (self.cfg.max_source_positions, self.cfg.max_target_positions)

    # -- components ------------------------------------------------------------------------------
    def encode(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Source encodings B x S x D (zero at padding) and mask B x S (1.0 at real positions)."""
        out = self.encoder(src_tokens, src_lengths=src_lengths)
        src = out["encoder_out"][0].transpose(0, 1)  # S x B x D -> B x S x D
        pad_mask = out["encoder_padding_mask"]
        src_mask = (~pad_mask[0]).to(src.dtype) if len(pad_mask) > 0 else src.new_ones(src.shape[:2])  # B x S
        return src * src_mask[..., None], src_mask

    def length_log_probs(self, src: Tensor, src_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """log P(length class | x), -inf at invalid classes (B x C), and each class's target length in
        model positions (B x C; a multiple of ``length_unit`` wherever the class is valid)."""
        lengths, valid = length_classes(
            src_mask.bool().long().sum(1), self.length_range, self.length_unit, self.cfg.max_target_positions
        )
        return masked_length_log_probs(self.length_predictor(src, src_mask), valid), lengths

    def posterior_params(self, tgt_tokens: Tensor, tgt_mask: Tensor, src: Tensor, src_mask: Tensor):
        """(mu, logvar) of q(z | y, x), each B x T x F."""
        return self.posterior_net(tgt_tokens, tgt_mask, src, src_mask)

    def posterior(self, tgt_tokens: Tensor, tgt_mask: Tensor, src: Tensor, src_mask: Tensor, n_samples: int = 1,
                  random: bool = True) -> Tuple[Tensor, Tensor]:  # fmt: skip
        """n reparameterised samples z ~ q(z | y, x) per sentence and their log q (with the 2 pi term).

        Returns:
            z: (B*n) x T x F, rows b*n .. b*n+n-1 for sentence b, zero at padded positions;
            log_q: (B*n), summed over real positions and features.
            random=False: z = mu (each of the n rows) and log_q = log q(mu | y, x).
        """
        mu, logvar = self.posterior_params(tgt_tokens, tgt_mask, src, src_mask)  # B x T x F
        return sample_diagonal_gaussian(mu, logvar, tgt_mask, n_samples, random)

    def decode(self, z: Tensor, tgt_mask: Tensor, src: Tensor, src_mask: Tensor) -> Tensor:
        """log P(y_t | z, x) for every position and word: B x T x V (float32 log-softmax)."""
        return utils.log_softmax(self.decoder(z, tgt_mask, src, src_mask), dim=-1)

    @staticmethod
    def expand_source(src: Tensor, src_mask: Tensor, n: int) -> Tuple[Tensor, Tensor]:
        """Repeats each sentence n times, sentence-major: (B*n) x S x D and (B*n) x S."""
        if n == 1:
            return src, src_mask
        return src.repeat_interleave(n, dim=0), src_mask.repeat_interleave(n, dim=0)

    def target_positions(self, target: Tensor) -> Tuple[Tensor, Tensor]:
        """fairseq's target (y EOS, right-padded) -> (B x T tokens EOS-padded to the length unit, float mask)."""
        tokens, mask = pad_to_length_unit(target, self.pad, self.eos, self.length_unit)
        return tokens, mask.float()

    @torch.no_grad()
    def initialize_prior(self, z: Tensor, mask: Tensor, src: Tensor, src_mask: Tensor):
        """Data-dependent init of the prior (actnorm statistics) on posterior samples, once.

        Under data parallelism every worker computes it on its own batch, then takes rank 0's
        parameters and buffers (a broadcast), so all replicas stay identical.
        """
        self.prior.init_from_data(z, mask, src, src_mask)
        broadcast_from_first_worker(list(self.prior.parameters()) + list(self.prior.buffers()))
        self.prior_initialized_flag.fill_(1)
        checksum = sum(p.double().sum().item() for p in self.prior.parameters())
        # the checksum lets one compare data-parallel replicas (every worker logs it)
        logger.info(f"flowseq: data-dependent init of the prior on {z.size(0)} posterior samples "
                    f"(prior parameter checksum {checksum!r})")  # fmt: skip

    # -- training forward ----------------------------------------------------------------------
    def forward(self, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Optional[Tensor] = None,
                target: Optional[Tensor] = None, n_samples: int = 1, random: bool = True, with_prior: bool = True,
                init_prior: bool = False, **kwargs) -> Dict[str, Dict[str, Tensor]]:  # fmt: skip
        """Everything the ELBO needs, in one pass (so that DDP wrappers see a single forward).

        ``prev_output_tokens`` is ignored (non-autoregressive); ``target`` is fairseq's target.
        ``random=False`` uses the posterior mean; ``with_prior=False`` skips the prior (the
        autoencoder pre-training phase); ``init_prior`` first runs the prior's data-dependent init on
        these posterior samples.

        Returns (K = n_samples; rows sentence-major):
            {"recon":  {"lprobs": (B*K) x T x V, "target": (B*K) x T, "mask": (B*K) x T bool},
             "kl":     {"log_q": B*K, "log_p": B*K or None},
             "length": {"log_probs": B x C (-inf at invalid classes), "target": B class indices,
                        "valid": B x C bool},
             "positions": B x T float mask of model positions}
        """
        if target is None:
            raise ValueError(
                "flowseq: forward needs the target (it trains on q(z | y, x)); to score or generate, " + WRONG_TASK
            )
        src, src_mask = self.encode(src_tokens, src_lengths)  # B x S x D, B x S
        tokens, mask = self.target_positions(target)  # B x T
        z, log_q = self.posterior(tokens, mask, src, src_mask, n_samples, random=random)  # (B*K) x T x F, (B*K)
        src_k, src_mask_k = self.expand_source(src, src_mask, n_samples)
        mask_k = mask.repeat_interleave(n_samples, dim=0) if n_samples > 1 else mask  # (B*K) x T
        if init_prior:
            self.initialize_prior(z.detach(), mask_k, src_k.detach(), src_mask_k)
        log_p = self.prior.log_prob(z, mask_k, src_k, src_mask_k) if with_prior else None  # (B*K)
        lprobs = self.decode(z, mask_k, src_k, src_mask_k)  # (B*K) x T x V
        length_lp, lengths = self.length_log_probs(src, src_mask)  # B x C
        valid = torch.isfinite(length_lp)
        length_target = length_target_class(mask.sum(1).long(), lengths, valid)  # B
        tokens_k = tokens.repeat_interleave(n_samples, dim=0) if n_samples > 1 else tokens
        return {
            "recon": {"lprobs": lprobs, "target": tokens_k, "mask": mask_k.bool()},
            "kl": {"log_q": log_q, "log_p": log_p},
            "length": {"log_probs": length_lp, "target": length_target, "valid": valid},
            "positions": mask,
        }


def broadcast_from_first_worker(tensors: List[Tensor]):
    """Copies data-parallel rank 0's values of ``tensors`` into every worker's (no-op on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from fairseq.distributed import utils as distributed_utils

    group = distributed_utils.get_data_parallel_group()
    if distributed_utils.get_world_size(group) <= 1:
        return
    src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
    for t in tensors:
        torch.distributed.broadcast(t.data, src=src, group=group)


# -- named architectures: each sets only its own defaults; every other field takes the dataclass
# default (the architecture ``flowseq`` itself, registered by register_model).
def _set(args, **defaults):
    for name, value in defaults.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("flowseq", "flowseq_base")
def flowseq_base(args):
    """Paper 4.1 FlowSeq-base (d_model / d_hidden = 256 / 512) with the WMT depths 6 / 4 / 4, 8 heads;
    FFN 1024 as in the reference's config-transformer-base.json."""
    _set(args, encoder_embed_dim=256, flowseq_latent_dim=256, flowseq_prior_hidden=512,
         encoder_ffn_embed_dim=1024, decoder_ffn_embed_dim=1024, encoder_layers=6, decoder_layers=4,
         flowseq_posterior_layers=4, encoder_attention_heads=8, decoder_attention_heads=8, flowseq_prior_heads=8)  # fmt: skip


@register_model_architecture("flowseq", "flowseq_large")
def flowseq_large(args):
    """Paper 4.1 FlowSeq-large (512 / 1024), WMT depths; FFN 2048."""
    _set(args, encoder_embed_dim=512, flowseq_latent_dim=512, flowseq_prior_hidden=1024,
         encoder_ffn_embed_dim=2048, decoder_ffn_embed_dim=2048)  # fmt: skip
    flowseq_base(args)


@register_model_architecture("flowseq", "flowseq_wmt_en_de")
def flowseq_wmt_en_de(args):
    """WMT14 / WMT16 base (the reference shares all embeddings there: pass --share-all-embeddings)."""
    flowseq_base(args)


@register_model_architecture("flowseq", "flowseq_iwslt_de_en")
def flowseq_iwslt_de_en(args):
    """Paper 4.1 IWSLT14: encoder 5, posterior and decoder 3 layers, 4 heads; reference: dropout 0.2,
    length range 16, separate vocabularies."""
    _set(args, encoder_layers=5, decoder_layers=3, flowseq_posterior_layers=3, encoder_attention_heads=4,
         decoder_attention_heads=4, flowseq_prior_heads=4, dropout=0.2, flowseq_length_range=16)  # fmt: skip
    flowseq_base(args)


@register_model_architecture("flowseq", "flowseq_tiny")
def flowseq_tiny(args):
    """For tests: width 16, latent 8, one layer each, a 3-scale prior with 1 step per scale (length_unit 4)."""
    _set(args, encoder_embed_dim=16, flowseq_latent_dim=8, flowseq_prior_hidden=16, encoder_ffn_embed_dim=32,
         decoder_ffn_embed_dim=32, encoder_layers=1, decoder_layers=1, flowseq_posterior_layers=1,
         encoder_attention_heads=2, decoder_attention_heads=2, flowseq_prior_heads=2, flowseq_prior_steps="1,1,1",
         flowseq_length_range=8, dropout=0.0, flowseq_posterior_token_dropout=0.0, flowseq_length_dropout=0.0)  # fmt: skip
