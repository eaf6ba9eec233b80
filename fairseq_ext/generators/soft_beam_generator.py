"""Soft beam search decoding (Goyal, Continuous relaxation of beam search, thesis chapter 4, section 4.3.4).

Decoding "closely follows Algorithm 3": the continuous relaxation of beam search
(:class:`fairseq_ext.modules.soft_beam_search.SoftBeamSearch`) runs with k = ``--beam`` elements, its
soft backpointers mixing the elements' decoder states, running scores and input embeddings, while
the hard backpointers (the MAP of the soft ones) are followed to read each element's token sequence.
With a large alpha it is hard beam search with absorbing finished hypotheses; with a small alpha the
soft choices change the scores, states and inputs of later steps, so its outputs can differ.

What fairseq-generate gets, per sentence, is what fairseq's SequenceGenerator returns: a list of
hypothesis dicts, best first, with

* ``tokens``: the element's hard path up to and including its first EOS (no padding).  An element
  that had not emitted EOS when the horizon was reached (translation only) is cut there and gets
  an EOS appended, with positional score 0;
* ``score``: the element's final running score s_T, divided by ``len(tokens) ** len_penalty`` (EOS
  counted) as fairseq's ``normalize_scores`` does, or as it is with ``normalize_scores=False``
  (``--unnormalized``).  With a finite alpha s_T is the soft recurrence's score, which need not equal
  the sum of the hard path's positional scores; hypotheses are sorted by it;
* ``positional_scores``: the local scores f(h, y_t) of the hard path's tokens (log-probabilities, or
  raw scores with ``normalization="global"``);
* ``attention`` None and ``alignment`` an empty tensor (no attention is kept), as fairseq-generate
  expects without ``--print-alignment``.

Elements whose hard path had to take a banned token (more elements than possible sequences, e.g. a
one-word sentence with fewer labels than k) are dropped; every sentence keeps its best element.

Horizons (the number of soft beam steps per sentence):

* translation: ``max_len`` steps, ``max_len = min(int(max_len_a * n + max_len_b), max_decoder_positions - 1)`` (at least
  1) with n the sentence's source length in tokens (EOS included): fairseq's maximum output length
  for that sentence decoded alone (fairseq takes n from the batch's padded width, so its limit
  depends on the batch; here it does not).  An element may emit EOS at any of these steps; one
  still unfinished after them gets EOS appended (positional score 0), so that, as with fairseq, a
  hypothesis has at most ``max_len`` tokens before its EOS.  (fairseq forces EOS at one more step,
  ``max_len``, and counts its score; the soft recurrence has no such forced step outside tagging.)
  Decoding stops once every element's hard path has emitted EOS.
* tagging (``fixed_length=True``): the number of source words + 1 (the EOS step); EOS is banned before the last
  step and forced at it, and only labels (``label_mask``) may be emitted: one label per word.
"""
from typing import Dict, List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.sequence_generator import EnsembleModel
from torch import Tensor, nn

from fairseq_ext.generators.tagging_generator import label_mask, source_word_counts
from fairseq_ext.modules.soft_beam_search import BANNED_SCORE, GLOBAL, LOCAL, SoftBeamResult, SoftBeamSearch


def translation_horizons(src_tokens: Tensor, pad: int, max_len_a: float, max_len_b: int, max_positions: int) -> Tensor:
    """B decoding steps per sentence: fairseq's maximum output length for it alone (EOS not counted), >= 1."""
    src_lengths = src_tokens.ne(pad).sum(dim=1)  # B, EOS included
    max_len = (max_len_a * src_lengths.double() + max_len_b).long()  # fairseq's int(a * src_len + b), per sentence
    return max_len.clamp(min=1, max=max_positions - 1)


def tagging_horizons(src_tokens: Tensor, pad: int, eos: int) -> Tensor:
    """B decoding steps per sentence for tagging: one label per source word, then EOS."""
    return source_word_counts(src_tokens, pad, eos) + 1


def first_step_choices(tgt_dict: Dictionary, allowed: Optional[Tensor]) -> int:
    """How many distinct first tokens a hypothesis can take: the largest usable beam size.

    Tagging (``allowed`` = the labels): the labels, EOS being banned before the last step.  Otherwise the
    whole dictionary but padding and BOS (EOS and unknown included)."""
    if allowed is not None:
        allowed = allowed.clone()
        allowed[tgt_dict.eos()] = False
        return int(allowed.sum())
    return len(tgt_dict) - len({tgt_dict.pad(), tgt_dict.bos()})


def hypotheses_of_sentence(result: SoftBeamResult, b: int, pad: int, eos: int, normalize_scores: bool = True,
                           len_penalty: float = 1.0, nbest: Optional[int] = None) -> List[Dict]:  # fmt: skip
    """fairseq hypothesis dicts, best first, for sentence ``b`` of a :class:`SoftBeamResult` (see the module docstring)."""
    hypos = []
    for i in range(result.tokens.size(1)):
        tokens, positional = result.tokens[b, i], result.positional_scores[b, i]  # T, T
        if bool((positional <= BANNED_SCORE / 2).any()):
            continue  # the hard path took a banned token: no valid sequence behind this element
        ends = tokens.eq(eos).nonzero()
        if ends.numel():
            length = int(ends[0]) + 1
            tokens, positional = tokens[:length], positional[:length]
        else:  # the horizon came first (padding follows it): cut there and close with EOS
            length = int(tokens.ne(pad).sum())
            tokens = torch.cat([tokens[:length], tokens.new_full((1,), eos)])
            positional = torch.cat([positional[:length], positional.new_zeros(1)])
        score = result.scores[b, i].float()
        if normalize_scores:
            score = score / tokens.numel() ** len_penalty
        hypos.append(
            {
                "tokens": tokens.clone(),
                "score": score,
                "attention": None,
                "alignment": torch.empty(0),
                "positional_scores": positional.float().clone(),
            }
        )
    if not hypos:  # element 0 follows the best finite successor at every step, so this cannot happen
        raise RuntimeError(f"soft beam decoding: no element of sentence {b} has a valid hard path")
    hypos.sort(key=lambda h: float(h["score"]), reverse=True)
    return hypos[:nbest] if nbest else hypos


class SoftBeamGenerator(nn.Module):
    """Soft beam search decoding with fairseq's generator interface (``generate(models, sample)``).

    Args:
        models: one fairseq encoder-decoder model with an incremental decoder (a list of one, or an
            EnsembleModel of one).
        tgt_dict: target dictionary.
        beam_size: k, the number of soft beam elements (``--beam``).
        alpha: peakedness of the continuous top-k-argmax (``--soft-beam-decoding-alpha``), > 0.
        normalization: ``local`` (log-softmax scores, ``--search-scores normalized``) or ``global``
            (raw scores, ``--search-scores raw``).
        max_len_a, max_len_b: translation horizons (see the module docstring); unused with ``fixed_length``.
        fixed_length: tagging: one label per source word, then EOS (labels only).
        nbest: hypotheses returned per sentence (None: all valid elements, at most k).
        normalize_scores, len_penalty: as fairseq's SequenceGenerator (``--unnormalized``, ``--lenpen``).
    """

    def __init__(self, models, tgt_dict: Dictionary, beam_size: int, alpha: float, normalization: str = LOCAL,
                 max_len_a: float = 0, max_len_b: int = 200, fixed_length: bool = False, nbest: Optional[int] = None,
                 normalize_scores: bool = True, len_penalty: float = 1.0):  # fmt: skip
        super().__init__()
        models = list(models.models) if isinstance(models, EnsembleModel) else list(models)
        if len(models) != 1:
            raise ValueError(
                f"--soft-beam-decoding: got an ensemble of {len(models)} models (--path a:b); it runs one model"
            )
        if not alpha > 0:
            raise ValueError(f"--soft-beam-decoding-alpha must be > 0, got {alpha}")
        if normalization not in (LOCAL, GLOBAL):
            raise ValueError(f"soft beam decoding: normalization must be {LOCAL!r} or {GLOBAL!r}, got {normalization!r}")
        self.model = models[0]
        self.tgt_dict = tgt_dict
        self.pad, self.eos = tgt_dict.pad(), tgt_dict.eos()
        self.symbols_to_strip_from_output = {self.eos}  # what fairseq-generate strips from printed hypotheses
        self.beam_size, self.alpha, self.normalization = beam_size, float(alpha), normalization
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.fixed_length, self.nbest = fixed_length, nbest
        self.normalize_scores, self.len_penalty = normalize_scores, len_penalty
        allowed = None
        if fixed_length:
            allowed = label_mask(tgt_dict)
            if not allowed.any():
                raise ValueError("the target dictionary holds no labels, only special symbols")
        limit = first_step_choices(tgt_dict, allowed)
        if beam_size > limit:
            raise ValueError(
                f"--beam {beam_size} with --soft-beam-decoding exceeds the {limit} "
                f"{'labels' if fixed_length else 'tokens'} a hypothesis can start with: use --beam {limit} or less"
            )
        self.search = SoftBeamSearch(
            self.model, tgt_dict, beam_size, normalization=normalization, allowed=allowed,
            name="soft beam decoding", label="--soft-beam-decoding",
        )  # fmt: skip

    @classmethod
    def from_args(cls, models, tgt_dict: Dictionary, cfg, args, fixed_length: bool) -> "SoftBeamGenerator":
        """The generator a task builds: ``cfg`` its config (SearchDecodingConfig fields), ``args`` fairseq's
        generation config (``--beam``, ``--nbest``, ``--max-len-a/b``, ``--lenpen``, ``--unnormalized``)."""
        return cls(
            models, tgt_dict,
            beam_size=getattr(args, "beam", 5),
            alpha=cfg.soft_beam_decoding_alpha,
            normalization=GLOBAL if str(cfg.search_scores) == "raw" else LOCAL,
            max_len_a=getattr(args, "max_len_a", 0),
            max_len_b=getattr(args, "max_len_b", 200),
            fixed_length=fixed_length,
            nbest=getattr(args, "nbest", None),
            normalize_scores=not getattr(args, "unnormalized", False),
            len_penalty=getattr(args, "lenpen", 1),
        )  # fmt: skip

    def horizons(self, src_tokens: Tensor) -> Tensor:
        """B soft beam steps per sentence (see the module docstring)."""
        if self.fixed_length:
            return tagging_horizons(src_tokens, self.pad, self.eos)
        max_positions = self.model.max_decoder_positions() if hasattr(self.model, "max_decoder_positions") else None
        max_positions = max_positions or 1024
        return translation_horizons(src_tokens, self.pad, self.max_len_a, self.max_len_b, max_positions)

    @torch.no_grad()
    def generate(self, models, sample: Dict, prefix_tokens: Optional[Tensor] = None, constraints=None,
                 bos_token: Optional[int] = None, **kwargs) -> List[List[Dict]]:  # fmt: skip
        """Per sentence of ``sample``, its hypotheses (fairseq's dicts), best first."""
        if prefix_tokens is not None:
            raise ValueError("--prefix-size is not supported by --soft-beam-decoding")
        if constraints is not None:
            raise ValueError("--constraints is not supported by --soft-beam-decoding")
        if bos_token is not None and bos_token != self.eos:
            raise ValueError("soft beam decoding starts every hypothesis with EOS, as fairseq does: no bos_token")
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        result = self.search.run(
            src_tokens, src_lengths, self.horizons(src_tokens), self.alpha,
            fixed_length=self.fixed_length, stop_when_finished=True,
        )  # fmt: skip
        return [
            hypotheses_of_sentence(result, b, self.pad, self.eos, self.normalize_scores, self.len_penalty, self.nbest)
            for b in range(src_tokens.size(0))
        ]
