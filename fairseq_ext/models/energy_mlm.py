"""Model ``energy_mlm``: a bidirectional masked LM over target sequences, the network behind E_raw.

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis,
CMU 2021), chapter 6, section 6.2.3 ("all of the systems share the same high-capacity underlying
architecture which consists of a bidirectional LSTMs to represent the left and right contexts of the
tokens") and section 6.2.1 (the representation h(y_\\t) of position t depends on the other tokens only):

    f_t = LSTM_fwd(e(y_1) .. e(y_t))            left context read left to right
    b_t = LSTM_bwd(e(y_T) .. e(y_t))            right context read right to left
    h_t = tanh(W_c [f_{t-1}; b_{t+1}] + b_c)    f_0 = b_{T+1} = 0: y_t itself is never seen
    logit_t = W_o h_t + b_o                     raw scores over the dictionary at position t

One pass gives the T conditionals of a sequence at once -- exactly what the single-masked passes of a
masked LM give (tested: masking position t does not change logit_t).  The two directions are separate
(possibly multi-layer) unidirectional LSTMs: a stacked ``bidirectional=True`` LSTM would feed layer 2 of
one direction with the other direction's states, which contain y_t, and leak it.

Input: B x L dictionary ids, right-padded; every non-pad token is a position (the energy criteria pass
the bare sequences, without EOS).  Output: (B x L x |dictionary| logits, {}), zero-context logits at pad.
"""
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqDecoder, FairseqLanguageModel, register_model, register_model_architecture
from fairseq.modules import FairseqDropout
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor, nn


@dataclass
class EnergyMLMConfig(FairseqDataclass):
    embed_dim: int = field(default=64, metadata={"help": "token embedding size"})
    hidden_size: int = field(
        default=64, metadata={"help": "units of each directional LSTM (the left and the right context LSTMs)"}
    )
    layers: int = field(default=1, metadata={"help": "layers of each directional LSTM"})
    combine_dim: int = field(
        default=64, metadata={"help": "size of h_t = tanh(W_c [left; right]), the input of the output layer"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on embeddings, between LSTM layers and on h_t; 0 disables it"}
    )
    max_target_positions: int = II("task.tokens_per_sample")


def reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """B x L x D -> each row's first ``lengths[b]`` steps reversed, the padding left in place."""
    bsz, length = x.shape[:2]
    pos = torch.arange(length, device=x.device).unsqueeze(0)  # 1 x L
    idx = torch.where(pos < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - pos, pos)  # B x L
    return x.gather(1, idx.unsqueeze(-1).expand_as(x))


def context_states(forward_states: Tensor, backward_states: Tensor, lengths: Tensor) -> Tensor:
    """[f_{t-1}; b_{t+1}] at every position: B x L x H each (b_t aligned with position t) -> B x L x 2H, with
    f_0 = 0, b_{T+1} = 0 (and zeros at padding)."""
    bsz, length, h = forward_states.shape
    zero = forward_states.new_zeros(bsz, 1, h)
    left = torch.cat([zero, forward_states[:, :-1]], dim=1)  # B x L x H
    right = torch.cat([backward_states[:, 1:], zero], dim=1)  # B x L x H
    pad = torch.arange(length, device=lengths.device).unsqueeze(0) >= (lengths - 1).unsqueeze(1)  # t >= T_b - 1
    right = right.masked_fill(pad.unsqueeze(-1), 0.0)  # the last position has no right context
    return torch.cat([left, right], dim=-1)


class EnergyMLMDecoder(FairseqDecoder):
    def __init__(self, dictionary, cfg: EnergyMLMConfig):
        super().__init__(dictionary)
        self.padding_idx = dictionary.pad()
        self.max_target_positions = cfg.max_target_positions
        self.embed_tokens = nn.Embedding(len(dictionary), cfg.embed_dim, padding_idx=self.padding_idx)
        self.dropout = FairseqDropout(cfg.dropout, module_name=self.__class__.__name__)
        lstm = lambda: nn.LSTM(cfg.embed_dim, cfg.hidden_size, num_layers=cfg.layers, batch_first=True,  # noqa: E731
                               dropout=cfg.dropout if cfg.layers > 1 else 0.0)  # fmt: skip
        self.left_lstm, self.right_lstm = lstm(), lstm()
        self.combine = nn.Linear(2 * cfg.hidden_size, cfg.combine_dim)
        self.fc_out = nn.Linear(cfg.combine_dim, len(dictionary))

    def extract_features(self, tokens: Tensor, **kwargs):
        """B x L tokens -> B x L x combine_dim features h_t (zero-padded), {}."""
        mask = tokens.ne(self.padding_idx)  # B x L
        lengths = mask.sum(dim=1)  # B
        x = self.dropout(self.embed_tokens(tokens))  # B x L x E
        fwd, _ = self.left_lstm(x)  # B x L x H: padding only follows the real steps, so it cannot leak left
        bwd_rev, _ = self.right_lstm(reverse_within_lengths(x, lengths))  # B x L x H, reversed rows
        bwd = reverse_within_lengths(bwd_rev, lengths)  # b_t at position t
        ctx = context_states(fwd, bwd, lengths)  # B x L x 2H
        h = self.dropout(torch.tanh(self.combine(ctx))).masked_fill(~mask.unsqueeze(-1), 0.0)
        return h, {}

    def output_layer(self, features: Tensor, **kwargs) -> Tensor:
        return self.fc_out(features)

    def forward(self, src_tokens: Tensor, **kwargs):
        h, extra = self.extract_features(src_tokens)
        return self.output_layer(h), extra

    def max_positions(self):
        return self.max_target_positions


@register_model("energy_mlm", dataclass=EnergyMLMConfig)
class EnergyMLMModel(FairseqLanguageModel):
    """The bidirectional masked LM; ``model(tokens)[0]`` are the position logits (see the module doc)."""

    @classmethod
    def build_model(cls, cfg, task):
        base_architecture(cfg)
        return cls(EnergyMLMDecoder(task.target_dictionary, cfg))


def base_architecture(args):
    """Every field's default (fairseq drops dataclass defaults from the command line of an --arch)."""
    defaults = EnergyMLMConfig()
    for name in ("embed_dim", "hidden_size", "layers", "combine_dim", "dropout"):
        setattr(args, name, safe_getattr(args, name, getattr(defaults, name)))
    if safe_getattr(args, "max_target_positions", None) is None:
        args.max_target_positions = safe_getattr(args, "tokens_per_sample", 1024)


@register_model_architecture("energy_mlm", "energy_mlm_tiny")
def energy_mlm_tiny(args):
    """For tests and the toy data of section 6.2.3 (|V| = 5, T = 5)."""
    args.embed_dim = safe_getattr(args, "embed_dim", 16)
    args.hidden_size = safe_getattr(args, "hidden_size", 16)
    args.combine_dim = safe_getattr(args, "combine_dim", 16)
    args.layers = safe_getattr(args, "layers", 1)
    base_architecture(args)


@register_model_architecture("energy_mlm", "energy_mlm_small")
def energy_mlm_small(args):
    args.embed_dim = safe_getattr(args, "embed_dim", 64)
    args.hidden_size = safe_getattr(args, "hidden_size", 64)
    args.combine_dim = safe_getattr(args, "combine_dim", 64)
    args.layers = safe_getattr(args, "layers", 1)
    base_architecture(args)


@register_model_architecture("energy_mlm", "energy_mlm_base")
def energy_mlm_base(args):
    """The thesis does not give sizes ("high-capacity"); two layers of 256 units per direction."""
    args.embed_dim = safe_getattr(args, "embed_dim", 128)
    args.hidden_size = safe_getattr(args, "hidden_size", 256)
    args.combine_dim = safe_getattr(args, "combine_dim", 256)
    args.layers = safe_getattr(args, "layers", 2)
    base_architecture(args)
