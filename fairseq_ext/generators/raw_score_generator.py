"""Beam search over raw, unnormalised decoder scores (K. Goyal, "Characterizing and Overcoming
the Limitations of Neural Autoregressive Models", PhD thesis, Carnegie Mellon University, 2021, section 5.2).

A globally normalised sequence model scores a sequence by the sum of its decoder's raw output scores
(logits) ``s(y) = sum_t f(h_t, y_t)``, with no softmax at each step, so its beam search ranks
prefixes by running sums of logits instead of log-probabilities.  A locally normalised model decoded
this way degrades badly (Table 5.1's remark: 27.62 -> 4.30 BLEU), since its logits carry an
arbitrary per-step offset ``log Z_t``.

fairseq's SequenceGenerator does the whole search unchanged (beam search, greedy with ``--beam 1``,
``--lenpen``, ``--unnormalized``, ``--max-len-a/b``, ``--prefix-size``, ``--temperature``...): the
only difference from its usual search is one call, ``model.get_normalized_probs(...)``, which
fairseq's ``EnsembleModel.forward_decoder`` makes on the (temperature-scaled) last-step decoder
output.  :class:`RawScoreModel` is a view of a model whose ``get_normalized_probs`` returns that
output itself, in float; everything else (encoder, incremental decoder, attention, beam-size hints)
is the model's own.  Wrapping the models, not subclassing the ensemble, keeps one implementation
for every ensemble class that fairseq or this plugin builds around them: fairseq's
``EnsembleModel`` (translation, :class:`RawScoreSequenceGenerator`), its
``EnsembleModelWithAlignment`` (``--print-alignment``) and the tagging generator's
``TaggingEnsembleModel``, whose one-label-per-word mask then applies to raw scores (its masked
entries are -inf whatever the scores are).

Only single models: fairseq averages an ensemble's probabilities (logsumexp of log-probs minus
log M), which has no meaning for unnormalised scores, so :func:`raw_score_models` refuses an
ensemble, as it refuses decoders with an adaptive softmax (no single vector of logits).
"""
from typing import List, Sequence

import torch
from fairseq import search
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from torch import Tensor, nn


class RawScoreModel(nn.Module):
    """A view of a fairseq model whose ``get_normalized_probs`` returns the raw decoder output scores.

    Any other attribute is the wrapped model's (``encoder``, ``decoder``, ``max_decoder_positions``,
    ``set_beam_size``...), so fairseq's ensembles drive it as they drive the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, RawScoreModel):
            model = model.model
        decoder = getattr(model, "decoder", model)
        if getattr(decoder, "adaptive_softmax", None) is not None:
            raise ValueError(
                "--search-scores raw: the decoder has an adaptive softmax (--adaptive-softmax-cutoff), whose output "
                "is not one vector of scores over the vocabulary"
            )
        self.model = model

    def get_normalized_probs(self, net_output, log_probs: bool = True, sample=None) -> Tensor:
        """The decoder's raw scores ``net_output[0]`` (... x V, float32 at least) in place of log-probabilities."""
        if not log_probs:
            raise ValueError("raw scores are not probabilities; only log_probs=True (scores for search) is defined")
        scores = net_output[0]
        return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def raw_score_models(models: Sequence[nn.Module]) -> List[RawScoreModel]:
    """The models (an ensemble of one, or an EnsembleModel of one) as :class:`RawScoreModel` views."""
    if isinstance(models, EnsembleModel):
        models = list(models.models)
    models = list(models)
    if len(models) != 1:
        raise ValueError(
            f"--search-scores raw: got an ensemble of {len(models)} models (--path a:b); fairseq averages an "
            "ensemble's probabilities, which has no meaning for unnormalised scores; give one --path"
        )
    return [RawScoreModel(models[0])]


class RawScoreSequenceGenerator(SequenceGenerator):
    """fairseq's SequenceGenerator over a model's raw scores (any search strategy but sampling).

    Hypothesis ``score`` and ``positional_scores`` are then sums and steps of raw scores (divided by
    the length unless ``normalize_scores=False``, as fairseq does with log-probabilities).
    """

    def __init__(self, models, tgt_dict, **kwargs):
        if kwargs.get("lm_model") is not None:
            raise ValueError("--lm-path: language-model fusion is not supported with --search-scores raw")
        if isinstance(kwargs.get("search_strategy"), search.Sampling):
            raise ValueError("--sampling: fairseq samples from exp(scores), which must be probabilities, not raw scores")
        super().__init__(EnsembleModel(raw_score_models(models)), tgt_dict, **kwargs)
