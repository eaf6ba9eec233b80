"""Model ``seq2seq_tagger``: the seq2seq tagging model with fixed monotone attention.

K. Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis,
Carnegie Mellon University, 2021), section 5.4.2 "Tagging model for ablation study", and sections
4.5.1-4.5.2; Goyal, Dyer and Berg-Kirkpatrick, "Differentiable Scheduled Sampling for Credit
Assignment" (ACL 2017), section 5 and its footnote 4:

* an LSTM encoder, bidirectional in both papers' NER and supertagging experiments; with a
  unidirectional encoder step ``i`` sees only words ``1..i`` (the thesis's label-bias ablation,
  ``p(y_i | x, y_<i) = p(y_i | x_1:i, y_<i)``);
* an LSTM decoder whose initial state is zero, so the input reaches it only through attention;
* "fixed attention": when predicting label ``i`` the decoder attends to the ``i``-th encoder
  state only, so the attention has no parameters and the context vector is that state.

Layout (0-based, fairseq's teacher-forcing shift):
    source:   ``x_0 .. x_{n-1} EOS``            (n words, S = n + 1 positions)
    inputs:   ``EOS y_0 .. y_{n-1}``            (prev_output_tokens, T = n + 1 steps)
    outputs:  ``y_0 .. y_{n-1} EOS``            step i predicts label i from encoder position i;
                                                the last step (the source's EOS) predicts EOS.
A step past a sentence's source length gets a zero context vector.

Step ``i`` (c_i the encoder state of position i, e(y) the label embedding):
    h_i        = LSTM([e(y_{i-1}); c_i], h_{i-1}),   h_{-1} = 0
    features_i = tanh(W_c [h_i; c_i])               Luong et al. (2015) eq. 5, the attentional state
    logits_i   = W_o features_i + b_o
The tanh projection over ``[h_i; c_i]`` is the output of an attention decoder whose attention
weights are one-hot; ``extract_features`` returns ``features_i`` and ``output_layer`` applies
``W_o``, so a criterion can project only the positions it needs.
"""
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
    register_model_architecture,
)
from fairseq.modules import FairseqDropout
from fairseq.utils import convert_padding_direction, safe_getattr
from omegaconf import II
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

BOOL_CHOICES = ChoiceEnum(["true", "false"])


@dataclass
class Seq2SeqTaggerConfig(FairseqDataclass):
    encoder_embed_dim: int = field(
        default=256,
        metadata={
            "help": "word embedding size; neither paper gives it: the named architectures set it equal to "
            "--encoder-hidden-size"
        },
    )
    encoder_hidden_size: int = field(
        default=256,
        metadata={
            "help": "encoder LSTM units per direction (a bidirectional encoder's states have twice this size)"
        },
    )
    encoder_layers: int = field(default=1, metadata={"help": "encoder LSTM layers"})
    encoder_bidirectional: BOOL_CHOICES = field(
        default="true",
        metadata={
            "help": "true: bidirectional LSTM encoder, so every step sees the whole sentence (the thesis's "
            "section 4.5 and the DSS paper's footnote 4); false: left-to-right encoder, so step i sees words "
            "0..i only (the thesis's section 5.4.2 label-bias ablation)"
        },
    )
    decoder_embed_dim: int = field(
        default=64,
        metadata={"help": "label embedding size (the thesis: 8 for NER, 512 for CCG supertags)"},
    )
    decoder_hidden_size: int = field(
        default=256,
        metadata={"help": "decoder LSTM units; also the size of the tanh attentional state fed to the output layer"},
    )
    decoder_layers: int = field(default=1, metadata={"help": "decoder LSTM layers"})
    dropout: float = field(
        default=0.1,
        metadata={
            "help": "dropout probability on word and label embeddings, encoder states, between stacked LSTM "
            "layers and on the attentional state; 0 disables it"
        },
    )
    max_source_positions: int = II("task.max_source_positions")
    max_target_positions: int = II("task.max_target_positions")


def source_positions_for_steps(states: Tensor, start: int, steps: int) -> Tensor:
    """Fixed attention: the context of decoder step ``t`` is encoder position ``t``.

    Args:
        states: B x S x C encoder states, zero at padded positions.
        start: index of the first step.
        steps: number of consecutive steps.
    Returns:
        B x steps x C: position ``start + k`` for step k, and zeros for steps at or past S.
    """
    bsz, src_len, dim = states.shape
    picked = states[:, start : start + steps]  # B x min(steps, S - start) x C, possibly empty
    missing = steps - picked.size(1)
    if missing > 0:
        picked = torch.cat([picked, states.new_zeros(bsz, missing, dim)], dim=1)  # B x steps x C
    return picked


def right_padded(tokens: Tensor, pad: int) -> Tensor:
    """B x S tokens with any padding moved to the right (fairseq left-pads sources by default).

    Each row keeps its order, so word i of every sentence sits at position i, which is what the
    fixed attention indexes.
    """
    return convert_padding_direction(tokens, pad, left_to_right=True)


class Seq2SeqTaggerEncoder(FairseqEncoder):
    """Word embeddings and an LSTM over the (right-padded) source.

    Output: ``{"states": [B x S x C], "padding_mask": [B x S]}`` with position i = word i of each
    sentence, whichever side the batch was padded on; padded positions are zero.  Batch-first, not
    fairseq's time-first ``encoder_out``, hence the distinct key names.
    """

    def __init__(self, dictionary, embed_dim: int, hidden_size: int, layers: int, bidirectional: bool,
                 dropout: float, max_positions: int):  # fmt: skip
        super().__init__(dictionary)
        self.padding_idx = dictionary.pad()
        self.max_source_positions = max_positions
        self.embed_tokens = nn.Embedding(len(dictionary), embed_dim, padding_idx=self.padding_idx)
        self.dropout = FairseqDropout(dropout, module_name=self.__class__.__name__)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.output_dim = hidden_size * (2 if bidirectional else 1)

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, **kwargs):
        # lengths come from the tokens: they decide where the right padding starts
        tokens = right_padded(src_tokens, self.padding_idx)  # B x S
        bsz, src_len = tokens.shape
        padding_mask = tokens.eq(self.padding_idx)  # B x S
        lengths = (~padding_mask).sum(dim=1)  # B
        x = self.dropout(self.embed_tokens(tokens))  # B x S x E
        # packing keeps the backward direction from reading padding before the last word
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src_len)  # B x S x C
        states = self.dropout(states).masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return {"states": [states], "padding_mask": [padding_mask]}

    def reorder_encoder_out(self, encoder_out: Dict, new_order: Tensor):
        return {
            "states": [encoder_out["states"][0].index_select(0, new_order)],
            "padding_mask": [encoder_out["padding_mask"][0].index_select(0, new_order)],
        }

    def max_positions(self):
        return self.max_source_positions


class Seq2SeqTaggerDecoder(FairseqIncrementalDecoder):
    """LSTM over ``[label embedding; context]`` with zero initial state and fixed attention.

    The label embedding is ``self.embed_tokens``, called once per forward on the (incrementally
    sliced) tokens, so that ``fairseq_ext.modules.embedding_inputs`` can feed soft embeddings.
    Incremental decoding caches (h, c) of every layer and the next step's index; the cached
    tensors keep their autograd history, so step-by-step training back-propagates through them.
    """

    def __init__(self, dictionary, embed_dim: int, context_dim: int, hidden_size: int, layers: int,
                 dropout: float, max_positions: int):  # fmt: skip
        super().__init__(dictionary)
        self.max_target_positions = max_positions
        self.embed_tokens = nn.Embedding(len(dictionary), embed_dim, padding_idx=dictionary.pad())
        self.dropout = FairseqDropout(dropout, module_name=self.__class__.__name__)
        self.lstm = nn.LSTM(
            embed_dim + context_dim,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.combine = nn.Linear(hidden_size + context_dim, hidden_size)
        self.fc_out = nn.Linear(hidden_size, len(dictionary))

    def forward(self, prev_output_tokens: Tensor, encoder_out: Optional[Dict] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                features_only: bool = False, **kwargs):  # fmt: skip
        x, extra = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, prev_output_tokens: Tensor, encoder_out: Optional[Dict] = None,
                         incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                         **kwargs):  # fmt: skip
        """B x T attentional states (B x 1 in incremental mode) and an extra dict."""
        if encoder_out is None:
            raise ValueError("seq2seq_tagger's decoder needs the encoder output (its fixed attention reads it)")
        cached = self.get_incremental_state(incremental_state, "lstm_state")
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]  # only the newest input is new
        start = 0 if cached is None else int(cached["step"])
        bsz, steps = prev_output_tokens.shape

        labels = self.dropout(self.embed_tokens(prev_output_tokens))  # B x T x E
        context = source_positions_for_steps(encoder_out["states"][0], start, steps)  # B x T x C
        if cached is None:
            prev_state = None  # nn.LSTM starts from zeros: the thesis's zero initial decoder state
        else:
            # cached batch-first so that reordering is index_select on dim 0
            prev_state = (cached["h"].transpose(0, 1).contiguous(), cached["c"].transpose(0, 1).contiguous())
        hidden, (h, c) = self.lstm(torch.cat([labels, context], dim=-1), prev_state)  # B x T x H; L x B x H
        if incremental_state is not None:
            self.set_incremental_state(
                incremental_state,
                "lstm_state",
                {"h": h.transpose(0, 1), "c": c.transpose(0, 1), "step": torch.tensor(start + steps)},
            )
        features = torch.tanh(self.combine(torch.cat([hidden, context], dim=-1)))  # B x T x H
        return self.dropout(features), {"attn": [None], "inner_states": None}

    def output_layer(self, features: Tensor) -> Tensor:
        """... x H attentional states -> ... x V logits."""
        return self.fc_out(features)

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        cached = self.get_incremental_state(incremental_state, "lstm_state")
        if cached is None:
            return
        # every row is at the same step, so the step index is shared
        reordered = {
            "h": cached["h"].index_select(0, new_order),  # B x L x H
            "c": cached["c"].index_select(0, new_order),
            "step": cached["step"],
        }
        self.set_incremental_state(incremental_state, "lstm_state", reordered)

    def max_positions(self):
        return self.max_target_positions


@register_model("seq2seq_tagger", dataclass=Seq2SeqTaggerConfig)
class Seq2SeqTaggerModel(FairseqEncoderDecoderModel):
    """Seq2seq tagger with fixed monotone attention (see the module docstring).

    For ``--task tagging`` (one label per source word); it also runs on ``--task translation``,
    where target steps past the source length get a zero context.
    """

    @classmethod
    def build_model(cls, cfg, task):
        if isinstance(cfg, Namespace):  # a named architecture built from parsed arguments
            cfg = Seq2SeqTaggerConfig.from_namespace(cfg)
        encoder = Seq2SeqTaggerEncoder(
            task.source_dictionary,
            embed_dim=cfg.encoder_embed_dim,
            hidden_size=cfg.encoder_hidden_size,
            layers=cfg.encoder_layers,
            bidirectional=str(cfg.encoder_bidirectional) == "true",
            dropout=cfg.dropout,
            max_positions=cfg.max_source_positions,
        )
        decoder = Seq2SeqTaggerDecoder(
            task.target_dictionary,
            embed_dim=cfg.decoder_embed_dim,
            context_dim=encoder.output_dim,
            hidden_size=cfg.decoder_hidden_size,
            layers=cfg.decoder_layers,
            dropout=cfg.dropout,
            max_positions=cfg.max_target_positions,
        )
        return cls(encoder, decoder)


# Named architectures: each sets only its own defaults; every other field takes the dataclass
# default (the architecture ``seq2seq_tagger`` itself, registered by register_model).
@register_model_architecture("seq2seq_tagger", "seq2seq_tagger_ner")
def seq2seq_tagger_ner(args):
    """DSS paper section 5 / thesis 4.5.1: 1-layer LSTMs of 64 units, 8-dim label embeddings."""
    args.encoder_hidden_size = safe_getattr(args, "encoder_hidden_size", 64)
    args.decoder_hidden_size = safe_getattr(args, "decoder_hidden_size", 64)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 8)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", args.encoder_hidden_size)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 1)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 1)


@register_model_architecture("seq2seq_tagger", "seq2seq_tagger_supertag")
def seq2seq_tagger_supertag(args):
    """Thesis 4.5.2 (CCG supertagging): hidden layers of 512, 512-dim label embeddings."""
    args.encoder_hidden_size = safe_getattr(args, "encoder_hidden_size", 512)
    args.decoder_hidden_size = safe_getattr(args, "decoder_hidden_size", 512)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 512)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", args.encoder_hidden_size)
