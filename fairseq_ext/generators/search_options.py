"""Decoding options of search-aware models (K. Goyal, "Characterizing and Overcoming the Limitations of Neural
Autoregressive Models", PhD thesis, Carnegie Mellon University, 2021, chapters 4-5).

fairseq's ``GenerationConfig`` cannot be extended by a plugin, so these knobs live in the task
config (``--task tagging``, ``--task search_aware_translation``), which inherits
:class:`SearchDecodingConfig`; the task's ``build_generator`` reads them next to fairseq's
generation flags (``--beam``, ``--nbest``, ``--max-len-a/b``, ``--lenpen``, ``--unnormalized``):

* ``--search-scores raw``: beam search over the decoder's raw, unnormalised output scores (logits)
  instead of its log-softmax (section 5.2: search over a globally normalised model's scores).
  A locally normalised (cross-entropy) model decoded this way degrades badly (Table 5.1's remark:
  27.62 -> 4.30 BLEU).  fairseq's SequenceGenerator does the search, so every search flag it
  supports applies, except ``--sampling`` (fairseq samples from ``exp`` of the scores, which must
  then be probabilities).
* ``--soft-beam-decoding``: soft beam search decoding (section 4.3.4): the continuous relaxation of
  beam search (Algorithm 3) with ``k = --beam``, whose hypotheses follow the hard backpointers, the
  MAP of the soft ones.  ``--search-scores`` picks its successor scores (normalized: local
  log-softmax; raw: global, unnormalised).

:func:`check_search_options` rejects impossible combinations with an error naming the flag, before
anything is decoded.
"""
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

SEARCH_SCORES_CHOICES = ChoiceEnum(["normalized", "raw"])

DEFAULT_SOFT_BEAM_DECODING_ALPHA = 10.0


@dataclass
class SearchDecodingConfig(FairseqDataclass):
    search_scores: SEARCH_SCORES_CHOICES = field(
        default="normalized",
        metadata={
            "help": "successor scores that decoding searches over: normalized = the decoder's log-softmax "
            "(fairseq's usual search, unchanged); raw = its raw unnormalised output scores (logits), for "
            "globally normalised models (Goyal's thesis section 5.2, e.g. a soft_beam_loss model trained with "
            "global normalization). A cross-entropy model decoded with raw scores degrades badly (Table 5.1: "
            "27.62 -> 4.30 BLEU). Single models only (no ensembles, no --lm-path, no --sampling)"
        },
    )
    soft_beam_decoding: bool = field(
        default=False,
        metadata={
            "help": "decode with soft beam search (thesis section 4.3.4): the continuous relaxation of beam search "
            "(Algorithm 3) with k = --beam elements, soft backpointers mixing decoder states, scores and input "
            "embeddings, and hypotheses read along the hard backpointers (the MAP of the soft ones); "
            "--search-scores picks local (normalized) or global (raw) scores. Returns the k elements' sequences, "
            "best first (--nbest <= --beam). Not combinable with --sampling, --diverse-beam-groups, "
            "--diversity-rate, --prefix-size, --match-source-len, --constraints, --print-alignment, "
            "--no-repeat-ngram-size, --temperature, --unkpen, --min-len > 1, --lm-path, --score-reference "
            "or ensembles. Off: hard beam search"
        },
    )
    soft_beam_decoding_alpha: float = field(
        default=DEFAULT_SOFT_BEAM_DECODING_ALPHA,
        metadata={
            "help": "peakedness alpha of the continuous top-k-argmax (Algorithm 2) in --soft-beam-decoding, > 0; the "
            "thesis decodes with the alpha the model was trained with (the final value of soft_beam_loss's "
            "schedule); as alpha grows, soft beam decoding tends to hard beam search (e.g. 1e4)"
        },
    )


def _positive(value) -> bool:
    return value is not None and value > 0


# generation flags that soft beam decoding cannot honour: flag -> (attribute, "is it used?")
_SOFT_BEAM_UNSUPPORTED = {
    "--sampling": ("sampling", bool),
    "--diverse-beam-groups": ("diverse_beam_groups", _positive),
    "--diversity-rate": ("diversity_rate", _positive),
    "--prefix-size": ("prefix_size", _positive),
    "--match-source-len": ("match_source_len", bool),
    "--constraints": ("constraints", bool),
    "--print-alignment": ("print_alignment", bool),
    "--no-repeat-ngram-size": ("no_repeat_ngram_size", _positive),
    "--temperature": ("temperature", lambda t: t is not None and float(t) != 1.0),
    "--unkpen": ("unkpen", lambda u: u is not None and float(u) != 0.0),
    "--min-len": ("min_len", lambda n: n is not None and n > 1),  # fairseq's default 1 only bans an empty output
}


def check_search_options(
    cfg: SearchDecodingConfig,
    args,
    num_models: int = 1,
    extra_gen_cls_kwargs: Optional[Mapping[str, Any]] = None,
):
    """Raises ValueError, naming the flag, for decoding options that cannot go together.

    Args:
        cfg: the task config (its :class:`SearchDecodingConfig` fields).
        args: fairseq's generation config (``cfg.generation``), or any namespace with its fields;
            missing fields count as fairseq's defaults.
        num_models: size of the ensemble (``--path a.pt:b.pt`` gives 2).
        extra_gen_cls_kwargs: the keyword arguments fairseq-generate adds (``lm_model`` with ``--lm-path``).
    """
    raw = str(cfg.search_scores) == "raw"
    soft = bool(cfg.soft_beam_decoding)
    if not (raw or soft):
        return
    what = "--soft-beam-decoding" if soft else "--search-scores raw"
    if num_models > 1:
        reason = "soft beam search runs one model" if soft else "averaging unnormalised scores has no meaning"
        raise ValueError(f"{what}: got an ensemble of {num_models} models (--path a:b); {reason}, give one --path")
    if (extra_gen_cls_kwargs or {}).get("lm_model") is not None:
        raise ValueError(f"--lm-path: language-model fusion is not supported with {what}")
    if getattr(args, "score_reference", False):
        raise ValueError(
            f"--score-reference: scores references with fairseq's log-probabilities, not with {what}; drop one of them"
        )
    if raw and not soft and getattr(args, "sampling", False):
        raise ValueError(
            "--sampling: fairseq samples from exp(scores), which must be probabilities; --search-scores raw "
            "works with beam search only"
        )
    if not soft:
        return
    alpha = cfg.soft_beam_decoding_alpha
    if not alpha > 0:
        raise ValueError(f"--soft-beam-decoding-alpha must be > 0, got {alpha}")
    for flag, (name, used) in _SOFT_BEAM_UNSUPPORTED.items():
        value = getattr(args, name, None)
        if used(value):
            raise ValueError(f"{flag} ({value}) is not supported by --soft-beam-decoding; drop one of them")
    beam, nbest = getattr(args, "beam", 5), getattr(args, "nbest", 1)
    if beam < 1:
        raise ValueError(f"--beam ({beam}) must be >= 1 with --soft-beam-decoding (it is the soft beam's k)")
    if nbest > beam:
        raise ValueError(
            f"--nbest ({nbest}) > --beam ({beam}): --soft-beam-decoding returns its k = --beam elements only"
        )
