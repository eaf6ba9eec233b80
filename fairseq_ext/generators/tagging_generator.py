"""Length-constrained decoding for tagging: exactly one label per source word, then EOS.

fairseq's SequenceGenerator does the search (beam search; greedy with ``--beam 1``; sampling and
the other search strategies too); only the ensemble's next-token log-probabilities are masked,
per hypothesis row:

    step < n (the sentence's number of words):  labels only (never bos, pad, unk, eos, nor the
                                                 ``madeupwordNNNN`` symbols fairseq-preprocess pads
                                                 dictionaries with);
    step >= n:                                   EOS only.

The number of words per row is counted once from ``src_tokens`` (neither pad nor EOS) and carried
next to the encoder outputs, so fairseq's beam expansion, reordering and removal of finished
sentences keep it aligned with the rows (and the mask does not depend on the model's encoder
output format).
"""
import math
from typing import Dict, List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from torch import Tensor

# fairseq-preprocess pads a dictionary to a multiple of --padding-factor (8) with these symbols
DICTIONARY_FILLER_PREFIX = "madeupword"


def label_mask(dictionary: Dictionary) -> Tensor:
    """V bool: True for the symbols that may be emitted as labels (not special, not filler)."""
    allowed = torch.ones(len(dictionary), dtype=torch.bool)
    allowed[: dictionary.nspecial] = False  # bos, pad, eos, unk (and any extra special symbols)
    for index in (dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk()):
        allowed[index] = False
    for index, symbol in enumerate(dictionary.symbols):
        if symbol.startswith(DICTIONARY_FILLER_PREFIX):
            allowed[index] = False
    return allowed


def source_word_counts(src_tokens: Tensor, pad: int, eos: int) -> Tensor:
    """B x S source tokens -> B number of words (tokens that are neither padding nor EOS)."""
    return (src_tokens.ne(pad) & src_tokens.ne(eos)).sum(dim=1)


def allowed_next_tokens(step: int, words: Tensor, labels: Tensor, eos: int) -> Tensor:
    """Which tokens each row may emit at ``step`` (0-based).

    Args:
        step: index of the label being predicted.
        words: N number of source words per hypothesis row.
        labels: V bool, the label symbols (see :func:`label_mask`).
        eos: end-of-sentence index.
    Returns:
        N x V bool: the labels where ``step < words``, else EOS alone.
    """
    eos_only = torch.zeros_like(labels)
    eos_only[eos] = True
    still_labelling = (words > step).unsqueeze(1)  # N x 1
    return torch.where(still_labelling, labels.unsqueeze(0), eos_only.unsqueeze(0))  # N x V


class TaggingEnsembleModel(EnsembleModel):
    """fairseq's ensemble whose next-token log-probabilities are restricted by :func:`allowed_next_tokens`.

    ``forward_encoder`` returns the models' encoder outputs followed by one extra entry,
    ``{"source_words": [N]}``; the base class only reads the first ``len(models)`` entries.
    """

    def __init__(self, models, tgt_dict: Dictionary):
        super().__init__(models)
        if not self.has_encoder():
            raise TypeError("the tagging generator needs encoder-decoder models: labels are aligned to source words")
        self.pad, self.eos = tgt_dict.pad(), tgt_dict.eos()
        self.register_buffer("labels", label_mask(tgt_dict), persistent=False)  # V
        if not self.labels.any():
            raise ValueError("the target dictionary holds no labels, only special symbols")

    def forward_encoder(self, net_input: Dict[str, Tensor]):
        encoder_outs = super().forward_encoder(net_input)
        words = source_word_counts(net_input["src_tokens"], self.pad, self.eos)  # B
        return encoder_outs + [{"source_words": [words]}]

    def reorder_encoder_out(self, encoder_outs: Optional[List[Dict[str, List[Tensor]]]], new_order):
        reordered = super().reorder_encoder_out(encoder_outs, new_order)
        words = encoder_outs[-1]["source_words"][0].index_select(0, new_order)  # N
        return reordered + [{"source_words": [words]}]

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        lprobs, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)  # N x V
        step = tokens.size(1) - 1  # tokens = [EOS, labels so far]
        words = encoder_outs[-1]["source_words"][0]
        allowed = allowed_next_tokens(step, words, self.labels.to(lprobs.device), self.eos)  # N x V
        return lprobs.masked_fill(~allowed, -math.inf), attn


class TaggingSequenceGenerator(SequenceGenerator):
    """SequenceGenerator over a :class:`TaggingEnsembleModel`; length options are fixed.

    ``max_len_a=1, max_len_b=0`` give a maximum length of the padded source width (words + EOS),
    never shorter than a sentence's labels, and ``min_len=0`` lets an empty sentence emit EOS at once.
    Any given ``max_len_a``, ``max_len_b``, ``min_len`` or ``match_source_len`` is overridden.
    """

    def __init__(self, models, tgt_dict: Dictionary, **kwargs):
        kwargs.update(max_len_a=1, max_len_b=0, min_len=0, match_source_len=False)
        if isinstance(models, EnsembleModel) and not isinstance(models, TaggingEnsembleModel):
            models = list(models.models)
        if not isinstance(models, TaggingEnsembleModel):
            models = TaggingEnsembleModel(models, tgt_dict)
        super().__init__(models, tgt_dict, **kwargs)

    def is_finished(self, step: int, unfin_idx: int, max_len: int, finalized_sent_len: int, beam_size: int):
        # Called only for a sentence that just finalised hypotheses, i.e. emitted EOS; EOS is allowed
        # at exactly one step (its number of words), where it is the only choice of every live
        # hypothesis, so no hypothesis of this sentence can end later.  fairseq would otherwise wait
        # for beam_size hypotheses, which never come when fewer label sequences exist (e.g. a
        # one-word sentence with fewer labels than the beam), and then fail at the maximum length.
        return True
