"""Decoding FlowSeq: argmax, sampling, noisy parallel decoding (NPD) and importance-weighted decoding (IWD).

Ma et al. 2019, "FlowSeq: Non-Autoregressive Conditional Sequence Generation with Generative Flow",
EMNLP 2019, section 3.6 "Decoding Process".
Every mode works on *candidates*: the top ``l`` target lengths of the length predictor (§3.5) times ``r``
latent samples per length, all flattened sentence-major into the batch dimension
(``N = B*l*r``, candidate ``b*l*r + j*r + s`` is sentence b, length rank j, sample s) and padded to
the longest candidate with a mask, so no step loops over sentences or candidates:

    eps ~ N(0, T^2 I) (eps = 0 for T = 0)       N x T x F
    z   = prior^{-1}(eps | x)                   N x T x F   (the flow's inverse; eps = 0 gives the mode)
    y   = argmax_y P(y | z, x) per position     N x T       (non-autoregressive)

and then ranks the candidates of each sentence:

========  =========================  ==================================================================
mode      candidates                 ranked by (and returned as the hypothesis ``score``)
========  =========================  ==================================================================
argmax    top-1 length, eps = 0      (one candidate) FlowSeq's own mean token log-prob
sample    top-l x r, T > 0           FlowSeq's own log P(y | z, x), per token (see below)
npd       top-l x r                  the autoregressive teacher's teacher-forced log P_AR(y | x), summed
                                     over the tokens and EOS (Gu et al. 2018, whom §3.6 follows); the
                                     ``score`` printed is that sum per token
iwd       top-l x r, the first       [log (1/K) sum_k P(y|z_k,x) p(z_k|x) / q(z_k|y,x) + log P(len|x)]
          sample per length eps = 0  / len, z_k ~ q(z | y, x) (§3.6, Burda et al. 2015's estimate)
========  =========================  ==================================================================

Choices the paper leaves open, and what this file does:

* ``sample`` ranks by the decoder's log-likelihood of its own argmax, per token; the reference code
  ranks by the prior's log-density of z, which is not comparable across lengths (z has T x F
  dimensions).
* NPD needs ``--flowseq-teacher-path`` (the reference code has no teacher).  There is no fall-back
  to FlowSeq's own decoder: that is ``--flowseq-decoding sample``.
* IWD follows the reference code: ``K = 4`` posterior samples by default, the first sample of every
  length is the prior's mode (``include_zero``), the length log-prob is added, and the sum is divided
  by the candidate's length in model positions (a multiple of ``length_unit``, EOS padding included).
* Hypotheses: the model's targets are the sentence, its EOS and EOS padding up to a multiple of
  ``length_unit``.  A candidate's trailing EOS run is replaced by exactly one EOS; pad and BOS are
  never emitted (their log-probs are masked before the argmax); an EOS inside the sentence is kept
  (fairseq's string() drops it when printing).  ``positional_scores`` are FlowSeq's token log-probs
  given the candidate's z (for NPD: the teacher's), the final EOS carrying the log-probs of the whole
  trailing EOS run (0 when the model filled every position), so that they sum to log P(y | z, x)
  over the model positions.  Hypotheses are sorted by the ranking criterion above, best first (so for
  NPD by the teacher's sum, while its ``score`` is per token), and duplicates (the same tokens from
  several candidates) are dropped, keeping the best; ``alignment`` is an empty tensor, ``attention``
  None, ``steps`` 0.

Cost and memory:

* the prior runs once over all N candidates, but every coupling projects the source keys and values
  once per SENTENCE (``prior.source_memory``: the candidates of a sentence attend to them together),
  and IWD's K prior passes reuse them; the multi-head linears' inverses are cached across batches
  (recomputed only when the weights change);
* decoder (and NPD teacher) log-probabilities are computed over chunks of candidates
  (:func:`candidate_chunks`): at most ``DECODE_CHUNK_ELEMENTS`` log-probs, and with several candidates
  per sentence at most B candidates, at a time, so no B x l x r x T x V tensor is ever held.  IWD
  draws and scores its K posterior samples one at a time.

The model API used (``fairseq_ext/models/flowseq.py``): ``encode``, ``length_log_probs``,
``expand_source``, ``prior.sample``, ``prior.log_prob`` (and ``prior.source_memory`` when the prior
has it), ``posterior``, ``decode``, ``length_unit`` and ``latent_dim``.
"""
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.data import Dictionary
from torch import Tensor

logger = logging.getLogger(__name__)

DECODING_CHOICES = ChoiceEnum(["argmax", "sample", "npd", "iwd"])
# the most decoder log-probabilities (candidates x positions x vocabulary) held at once: 2^25 floats = 128 MiB
DECODE_CHUNK_ELEMENTS = 1 << 25


@dataclass
class FlowSeqGenerationConfig(FairseqDataclass):
    """Decoding options of FlowSeq; a task config inherits them (fairseq's GenerationConfig is closed)."""

    flowseq_decoding: DECODING_CHOICES = field(
        default="argmax",
        metadata={
            "help": "FlowSeq decoding (Ma et al. 2019, sec. 3.6): argmax = the top length and the prior's mode "
            "(eps = 0), one pass; sample = top --flowseq-length-candidates lengths x --flowseq-samples latent "
            "samples at --flowseq-temperature, best by FlowSeq's own per-token log P(y|z,x); npd = the same "
            "candidates rescored by an autoregressive teacher (--flowseq-teacher-path); iwd = the same candidates "
            "(the first sample of each length at eps = 0) ranked by an importance-weighted estimate of log P(y|x) "
            "with --flowseq-iwd-samples posterior samples"
        },
    )
    flowseq_temperature: float = field(
        default=0.0,
        metadata={
            "help": "standard deviation T of the prior's base noise, eps ~ N(0, T^2 I); 0 = the prior's mode "
            "(argmax needs 0; the paper tunes T in {0.1 .. 0.5, 1.0} for npd/iwd and finds 0.3-0.5 best); must be "
            "> 0 when --flowseq-samples > 1, otherwise the samples of a length are identical"
        },
    )
    flowseq_length_candidates: int = field(
        default=1,
        metadata={
            "help": "l: the number of most probable target lengths decoded per sentence (argmax: 1; the paper's "
            "npd/iwd: e.g. l = 3 with r = 5 samples, n = l x r = 15 candidates); lengths the predictor rules out "
            "are skipped"
        },
    )
    flowseq_samples: int = field(
        default=1,
        metadata={
            "help": "r: latent samples per length candidate (argmax: 1); for iwd the first one is the mode (eps = 0)"
        },
    )
    flowseq_iwd_samples: int = field(
        default=4,
        metadata={
            "help": "K: posterior samples z ~ q(z|y,x) per candidate in the iwd importance weight (the reference "
            "code's fixed value is 4); >= 1; used by --flowseq-decoding iwd only"
        },
    )
    flowseq_teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "npd only, and required by it: an autoregressive fairseq checkpoint (e.g. --task translation "
            "--arch transformer trained on the same binarised data) whose teacher-forced log-likelihood, summed over "
            "the tokens and EOS, ranks the l x r candidates; its dictionaries must equal this model's. There is no "
            "teacher-free npd: rescoring by FlowSeq's own decoder is --flowseq-decoding sample"
        },
    )


def validate_generation_config(cfg, teacher_given: bool = False) -> None:
    """Raises ValueError, naming the flag, for a combination of FlowSeq decoding options that cannot work.

    ``teacher_given``: an NPD teacher model is passed directly (no --flowseq-teacher-path needed).
    """
    mode = str(getattr(cfg, "flowseq_decoding", "argmax"))
    temperature = float(getattr(cfg, "flowseq_temperature", 0.0))
    lengths = int(getattr(cfg, "flowseq_length_candidates", 1))
    samples = int(getattr(cfg, "flowseq_samples", 1))
    iwd_samples = int(getattr(cfg, "flowseq_iwd_samples", 4))
    teacher = getattr(cfg, "flowseq_teacher_path", None) or teacher_given
    if mode not in ("argmax", "sample", "npd", "iwd"):
        raise ValueError(f"--flowseq-decoding {mode}: choose argmax, sample, npd or iwd")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"--flowseq-temperature {temperature}: must be a finite number >= 0")
    if lengths < 1:
        raise ValueError(f"--flowseq-length-candidates {lengths}: must be >= 1")
    if samples < 1:
        raise ValueError(f"--flowseq-samples {samples}: must be >= 1")
    if iwd_samples < 1:
        raise ValueError(f"--flowseq-iwd-samples {iwd_samples}: must be >= 1 (the reference code uses 4)")
    if mode == "argmax":
        if lengths != 1 or samples != 1:
            raise ValueError(
                f"--flowseq-decoding argmax decodes one candidate (the top length, the prior's mode) but got "
                f"--flowseq-length-candidates {lengths} --flowseq-samples {samples}; to rank several candidates use "
                "--flowseq-decoding sample, npd or iwd"
            )
        if temperature != 0:
            raise ValueError(
                f"--flowseq-decoding argmax uses the prior's mode (eps = 0) but got --flowseq-temperature "
                f"{temperature}; for a random latent sample use --flowseq-decoding sample"
            )
    else:
        if samples > 1 and temperature == 0:
            raise ValueError(
                f"--flowseq-samples {samples} with --flowseq-temperature 0: every sample of a length is the prior's "
                "mode, so the candidates are identical; set --flowseq-temperature > 0 (the paper uses 0.1-1.0) or "
                "--flowseq-samples 1"
            )
        if mode in ("npd", "iwd") and lengths * samples < 2:
            raise ValueError(
                f"--flowseq-decoding {mode} ranks several candidates but --flowseq-length-candidates {lengths} x "
                f"--flowseq-samples {samples} gives one; e.g. --flowseq-length-candidates 3 --flowseq-samples 5"
            )
        if mode == "sample" and lengths * samples == 1 and temperature == 0:
            raise ValueError(
                "--flowseq-decoding sample with one candidate at --flowseq-temperature 0 is argmax decoding; use "
                "--flowseq-decoding argmax or set --flowseq-temperature > 0"
            )
    if mode == "npd" and not teacher:
        raise ValueError(
            "--flowseq-decoding npd rescores the candidates with an autoregressive teacher: give its checkpoint with "
            "--flowseq-teacher-path (without a teacher, --flowseq-decoding sample ranks by FlowSeq's own decoder)"
        )
    if mode != "npd" and teacher:
        raise ValueError(f"--flowseq-teacher-path is used by --flowseq-decoding npd only, not {mode}; drop it")


# ----------------------------------------------------------------------------------------------------
# Index helpers and the math, as functions of tensors
# ----------------------------------------------------------------------------------------------------


def select_lengths(log_probs: Tensor, lengths: Tensor, l: int, length_unit: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The top-``l`` length classes of each sentence.

    Args:
        log_probs: B x C log-probabilities of the length classes (-inf for invalid ones).
        lengths: B x C target length (model positions) of each class.
        l: number of candidates; more than C are cut to C.
        length_unit: lengths are clamped to >= this (an invalid class may imply length <= 0).
    Returns:
        cand_lengths B x l (long), cand_log_probs B x l, valid B x l (bool: finite log-prob; the best
        class is always valid so that every sentence gets a hypothesis).  An invalid class (whose length
        may be no multiple of ``length_unit``) takes the best class's length: it is decoded, then dropped.
    """
    l = min(l, log_probs.size(1))
    top_lp, top_idx = log_probs.topk(l, dim=1)  # B x l, best first
    cand_lengths = lengths.gather(1, top_idx).long().clamp(min=length_unit)  # B x l
    valid = torch.isfinite(top_lp)
    valid[:, 0] = True
    cand_lengths = torch.where(valid, cand_lengths, cand_lengths[:, :1])
    return cand_lengths, top_lp, valid


def candidate_chunks(n_rows: int, per_sentence: int, length: int, vocab: int,
                     budget: int = DECODE_CHUNK_ELEMENTS) -> List[Tuple[int, int]]:  # fmt: skip
    """Row ranges [a, b) covering N = ``n_rows`` candidates for the vocabulary-sized decoding steps.

    Each holds at most ``budget`` log-probs (rows x ``length`` x ``vocab``; at least one row) and, when a
    sentence has several candidates (``per_sentence`` > 1), at most N / per_sentence rows, so that the
    l x r candidates of a batch never have their log-probabilities in memory all at once.
    """
    rows = max(1, budget // max(1, length * vocab))
    if per_sentence > 1:
        rows = min(rows, max(1, n_rows // per_sentence))
    return [(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


def decode_argmax(model, z: Tensor, mask: Tensor, src: Tensor, src_mask: Tensor, chunks, banned: List[int],
                  pad: int) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`argmax_tokens` of ``model.decode`` over the rows of each chunk: tokens and their log-probs, N x T."""
    tokens, token_lp = [], []
    for a, b in chunks:
        log_probs = model.decode(z[a:b], mask[a:b], src[a:b], src_mask[a:b]).float()  # rows x T x V
        t, lp = argmax_tokens(log_probs, mask[a:b], banned, pad)
        del log_probs
        tokens.append(t)
        token_lp.append(lp)
    return torch.cat(tokens), torch.cat(token_lp)


def decode_sequence_log_prob(model, z: Tensor, tokens: Tensor, mask: Tensor, src: Tensor, src_mask: Tensor,
                             chunks) -> Tensor:  # fmt: skip
    """:func:`sequence_log_prob` of ``model.decode`` over the rows of each chunk: N."""
    out = []
    for a, b in chunks:
        log_probs = model.decode(z[a:b], mask[a:b], src[a:b], src_mask[a:b]).float()
        out.append(sequence_log_prob(log_probs, tokens[a:b], mask[a:b]))
        del log_probs
    return torch.cat(out)


def flatten_candidates(x: Tensor, r: int) -> Tensor:
    """B x l (x ...) -> (B*l*r) (x ...): each entry repeated for the r samples, sentence-major."""
    return x.repeat_interleave(r, dim=1).reshape(-1, *x.shape[2:])


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """N lengths -> N x max_len bool, True at the first ``lengths[n]`` positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def base_noise(mask: Tensor, features: int, r: int, temperature: float, include_zero: bool, dtype) -> Tensor:
    """eps ~ N(0, T^2 I) for N = B*l*r candidates, zero at padded positions.

    Args:
        mask: N x T bool, the candidates' positions.
        r: samples per length; with ``include_zero`` sample 0 of every length is eps = 0 (the mode).
    Returns:
        N x T x F.
    """
    n, t = mask.shape
    if temperature == 0:
        return mask.new_zeros(n, t, features, dtype=dtype)
    eps = torch.randn(n, t, features, device=mask.device, dtype=dtype) * temperature
    if include_zero:
        first = (torch.arange(n, device=mask.device) % r).eq(0)  # N: sample 0 of each length
        eps = eps.masked_fill(first.view(n, 1, 1), 0.0)
    return eps * mask.unsqueeze(-1).to(dtype)


def argmax_tokens(log_probs: Tensor, mask: Tensor, banned: List[int], pad: int) -> Tuple[Tensor, Tensor]:
    """Per-position argmax of the non-autoregressive decoder (paper eq. 4 / argmax decoding).

    Args:
        log_probs: N x T x V; its ``banned`` columns are overwritten with -inf (in place: no copy of the
            largest tensor of the decoding).
        mask: N x T bool.
        banned: symbols never emitted (pad, bos).
    Returns:
        tokens N x T (pad at padded positions), token_log_probs N x T (0 at padded positions).
    """
    log_probs[..., banned] = -math.inf
    tokens = log_probs.argmax(dim=-1)  # N x T
    token_lp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # N x T (never a banned column)
    return tokens.masked_fill(~mask, pad), token_lp.masked_fill(~mask, 0.0)


def sequence_log_prob(log_probs: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """log P(y | z, x) = sum over the real positions of log P(y_t | z, x): N x T x V, N x T, N x T -> N."""
    picked = log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # N x T
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=1)


def strip_eos_padding(
    tokens: Tensor, token_lp: Tensor, mask: Tensor, eos: int, pad: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Turns EOS-padded model outputs into fairseq hypotheses ending with exactly one EOS.

    Args:
        tokens: N x T decoded tokens (pad at padded positions).
        token_lp: N x T their log-probs (0 at padded positions).
        mask: N x T bool.
    Returns:
        hyp_tokens N x (T+1): the tokens before the trailing EOS run, one EOS, then pad;
        hyp_scores N x (T+1): their log-probs, the EOS carrying the sum over the trailing EOS run (0 when
        there is none), 0 after; hyp_lengths N: tokens including the EOS.
    """
    n, t = tokens.shape
    positions = torch.arange(1, t + 1, device=tokens.device).unsqueeze(0)  # 1 x T
    content = ((tokens.ne(eos) & mask).long() * positions).max(dim=1).values  # N: end of the last non-EOS token
    body = positions <= content.unsqueeze(1)  # N x T: kept positions
    hyp_tokens = torch.cat([tokens.masked_fill(~body, pad), tokens.new_full((n, 1), pad)], dim=1)  # N x (T+1)
    hyp_tokens.scatter_(1, content.unsqueeze(1), eos)
    tail = mask & ~body  # the trailing EOS run
    eos_lp = torch.where(tail, token_lp, torch.zeros_like(token_lp)).sum(dim=1)  # N
    hyp_scores = torch.cat([token_lp.masked_fill(~body, 0.0), token_lp.new_zeros(n, 1)], dim=1)
    hyp_scores.scatter_(1, content.unsqueeze(1), eos_lp.unsqueeze(1))
    return hyp_tokens, hyp_scores, content + 1


def importance_weighted_log_likelihood(log_p_y: Tensor, log_p_z: Tensor, log_q_z: Tensor) -> Tensor:
    """IWD's estimate (paper sec. 3.6; Burda et al. 2015) of log P(y | x) from K posterior samples:

        log (1/K) sum_k exp(log P(y|z_k,x) + log p(z_k|x) - log q(z_k|y,x))

    Args: each N x K. Returns: N.
    """
    k = log_p_y.size(1)
    return torch.logsumexp(log_p_y + log_p_z - log_q_z, dim=1) - math.log(k)


def shift_right(hyp_tokens: Tensor, eos: int, pad: int) -> Tensor:
    """fairseq's prev_output_tokens for teacher forcing: EOS, then the tokens without their last, pad after.

    N x L (each row: tokens, EOS, pad...) -> N x L.
    """
    prev = torch.cat([hyp_tokens.new_full((hyp_tokens.size(0), 1), eos), hyp_tokens[:, :-1]], dim=1)
    return prev.masked_fill(hyp_tokens.eq(pad), pad)


def teacher_log_likelihood(teacher, src_tokens: Tensor, src_lengths: Tensor, new_order: Tensor, hyp_tokens: Tensor,
                           eos: int, pad: int, chunks=None) -> Tensor:  # fmt: skip
    """Teacher-forced token log-probs of every candidate under an autoregressive encoder-decoder.

    One encoder pass per sentence (reordered to the candidates with fairseq's ``reorder_encoder_out``)
    and one decoder pass per chunk of candidates (``chunks``: row ranges; default all at once).

    Args:
        src_tokens: B x S, src_lengths: B (the sample's source).
        new_order: N, the sentence of each candidate.
        hyp_tokens: N x L candidates (tokens, EOS, pad).
    Returns:
        N x L log P_AR(y_t | y_<t, x), 0 at pad.
    """
    encoder_out = teacher.encoder(src_tokens, src_lengths=src_lengths)
    out = []
    for a, b in chunks or [(0, hyp_tokens.size(0))]:
        rows = hyp_tokens[a:b]
        enc = teacher.encoder.reorder_encoder_out(encoder_out, new_order[a:b])
        net_output = teacher.decoder(shift_right(rows, eos, pad), encoder_out=enc)
        lprobs = teacher.get_normalized_probs(net_output, log_probs=True)  # rows x L x V
        out.append(lprobs.gather(-1, rows.unsqueeze(-1)).squeeze(-1).float())  # rows x L
        del lprobs, net_output
    return torch.cat(out).masked_fill(hyp_tokens.eq(pad), 0.0)


# ----------------------------------------------------------------------------------------------------
# Teacher loading
# ----------------------------------------------------------------------------------------------------


def _same_symbols(a: Dictionary, b: Dictionary) -> bool:
    return a is not None and b is not None and list(a.symbols) == list(b.symbols)


def load_teacher(path: str, tgt_dict: Dictionary, src_dict: Optional[Dictionary] = None, data: Optional[str] = None):
    """Loads the NPD teacher and checks that it is an autoregressive encoder-decoder on our dictionaries.

    fairseq checkpoints store no dictionaries: the teacher's task reads them from the data directory it
    was trained on.  When that directory is gone, ``data`` (this task's) is used instead with a warning:
    then only the embedding sizes can disagree, which the state-dict load reports.
    """
    from fairseq import checkpoint_utils
    from fairseq.models import FairseqEncoderDecoderModel, FairseqIncrementalDecoder

    flag = "--flowseq-teacher-path"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such checkpoint file")
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    except FileNotFoundError as err:
        if not data:
            raise ValueError(f"{flag} {path}: cannot read the teacher's dictionaries ({err})") from err
        logger.warning(
            f"{flag} {path}: the teacher's training data directory is not readable ({err}); using this task's "
            f"dictionaries from {data}, so the teacher's symbols cannot be compared"
        )
        try:
            models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
        except RuntimeError as err2:
            raise ValueError(f"{flag} {path}: the teacher does not fit this task's dictionaries: {err2}") from err2
    except Exception as err:
        raise ValueError(f"{flag} {path}: cannot load it as a fairseq checkpoint: {err}") from err
    teacher = models[0]
    is_nat = hasattr(teacher, "length_log_probs") or type(teacher).__module__.startswith("fairseq.models.nat")
    if (not isinstance(teacher, FairseqEncoderDecoderModel) or is_nat
            or not isinstance(teacher.decoder, FairseqIncrementalDecoder)):  # fmt: skip
        raise ValueError(
            f"{flag} {path}: {type(teacher).__name__} is not an autoregressive encoder-decoder (e.g. --task "
            "translation --arch transformer); NPD rescoring needs left-to-right teacher-forced log-likelihoods"
        )
    sides = (("target", tgt_dict, task.target_dictionary), ("source", src_dict, task.source_dictionary))
    for side, ours, theirs in sides:
        if ours is not None and not _same_symbols(ours, theirs):
            sizes = f"{len(theirs) if theirs is not None else 'no'} vs {len(ours)} symbols"
            raise ValueError(
                f"{flag} {path}: the teacher's {side} dictionary differs from this model's ({sizes}); train the "
                "teacher on the same binarised data (fairseq-preprocess dictionaries)"
            )
    teacher.eval()
    return teacher


# ----------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------


class FlowSeqGenerator(object):
    """Non-autoregressive decoding of a FlowSeq model (see the module docstring for the modes).

    Args:
        models: a list holding one FlowSeq model (ensembles are not supported).
        tgt_dict: the target dictionary.
        cfg: any object with the ``flowseq_*`` fields of :class:`FlowSeqGenerationConfig` (the task config);
            its ``data`` is used as the dictionaries' directory when the teacher's is gone.
        src_dict: the source dictionary; when given, the NPD teacher's must equal it too.
        teacher: an already loaded autoregressive model instead of ``cfg.flowseq_teacher_path``.
    """

    def __init__(self, models, tgt_dict: Dictionary, cfg, src_dict: Optional[Dictionary] = None, teacher=None):
        validate_generation_config(cfg, teacher_given=teacher is not None)
        if len(models) != 1:
            raise ValueError(f"FlowSeqGenerator decodes with one model; got an ensemble of {len(models)}")
        self.tgt_dict = tgt_dict
        self.pad, self.eos, self.bos = tgt_dict.pad(), tgt_dict.eos(), tgt_dict.bos()
        self.mode = str(cfg.flowseq_decoding)
        self.temperature = float(cfg.flowseq_temperature)
        self.length_candidates = int(cfg.flowseq_length_candidates)
        self.samples = int(cfg.flowseq_samples)
        self.iwd_samples = int(cfg.flowseq_iwd_samples)
        self.teacher = teacher.eval() if teacher is not None else None
        if self.mode == "npd" and teacher is None:
            self.teacher = load_teacher(cfg.flowseq_teacher_path, tgt_dict, src_dict, data=getattr(cfg, "data", None))

    @torch.no_grad()
    def generate(self, models, sample: Dict, prefix_tokens=None, constraints=None, **kwargs) -> List[List[Dict]]:
        """Per sentence of ``sample``, its hypotheses sorted best first (fairseq's hypothesis dicts)."""
        if prefix_tokens is not None or constraints is not None:
            raise ValueError("FlowSeq decodes all positions at once: --prefix-size and constraints are not supported")
        model = models[0] if isinstance(models, (list, tuple)) else models
        was_training = model.training
        model.eval()
        try:
            return self._generate(model, sample)
        finally:
            model.train(was_training)

    def _generate(self, model, sample: Dict) -> List[List[Dict]]:
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        bsz = src_tokens.size(0)
        l, r = (1, 1) if self.mode == "argmax" else (self.length_candidates, self.samples)

        src, src_mask = model.encode(src_tokens, src_lengths)  # B x S x H, B x S
        len_lp, len_values = model.length_log_probs(src, src_mask)  # B x C, B x C
        cand_lengths, cand_len_lp, valid = select_lengths(len_lp, len_values, l, model.length_unit)  # B x l
        l = cand_lengths.size(1)
        n = l * r  # candidates per sentence
        lengths = flatten_candidates(cand_lengths, r)  # N
        length_lp = flatten_candidates(cand_len_lp, r)  # N
        valid = flatten_candidates(valid, r)  # N
        mask = length_mask(lengths, int(lengths.max()))  # N x T
        src_n, src_mask_n = model.expand_source(src, src_mask, n)  # N x S x H, N x S
        # the prior takes the B sentences once (their keys and values are projected per sentence)
        if hasattr(model.prior, "source_memory"):
            prior_src, prior_src_mask = model.prior.source_memory(src, src_mask), None
        else:
            prior_src, prior_src_mask = src_n, src_mask_n
        chunks = candidate_chunks(mask.size(0), n, mask.size(1), len(self.tgt_dict))

        eps = base_noise(mask, model.latent_dim, r, self.temperature, self.mode == "iwd", src.dtype)  # N x T x F
        z, _log_p_z = model.prior.sample(eps, mask, prior_src, prior_src_mask)  # N x T x F, N
        banned = sorted({self.pad, self.bos})
        tokens, token_lp = decode_argmax(model, z, mask, src_n, src_mask_n, chunks, banned, self.pad)  # N x T
        hyp_tokens, hyp_scores, hyp_lengths = strip_eos_padding(tokens, token_lp, mask, self.eos, self.pad)

        if self.mode in ("argmax", "sample"):
            ranking = hyp_scores.sum(dim=1) / hyp_lengths  # N: mean token log-prob
            score = ranking
        elif self.mode == "npd":
            teacher = self._teacher_on(src_tokens.device, z.dtype)
            new_order = torch.arange(bsz, device=src_tokens.device).repeat_interleave(n)  # N
            hyp_tokens = hyp_tokens[:, : int(hyp_lengths.max())]  # N x L
            teacher_chunks = candidate_chunks(hyp_tokens.size(0), n, hyp_tokens.size(1), len(self.tgt_dict))
            hyp_scores = teacher_log_likelihood(
                teacher, src_tokens, src_lengths, new_order, hyp_tokens, self.eos, self.pad, teacher_chunks
            )  # N x L
            ranking = hyp_scores.sum(dim=1)  # N: log P_AR(y | x), summed as Gu et al. 2018
            score = ranking / hyp_lengths
        else:  # iwd
            log_lik = self._importance_weighted(
                model, tokens, mask, src_n, src_mask_n, (prior_src, prior_src_mask), chunks
            )  # N
            ranking = (log_lik + length_lp) / lengths  # N, per model position as the reference code
            score = ranking
        ranking = ranking.masked_fill(~valid, -math.inf)
        return self._hypotheses(bsz, n, ranking, score, hyp_tokens, hyp_scores, hyp_lengths, valid)

    def _importance_weighted(self, model, tokens: Tensor, mask: Tensor, src: Tensor, src_mask: Tensor, prior_src,
                             chunks) -> Tensor:  # fmt: skip
        """IWD's log P(y|x) estimate for N candidates; the K posterior samples are drawn one at a time (memory).

        ``src``/``src_mask``: expanded to the N candidates; ``prior_src``: what the prior takes (its source
        memory of the B sentences, shared by the K prior passes)."""
        weights = []
        for _ in range(self.iwd_samples):
            z, log_q = model.posterior(tokens, mask, src, src_mask, 1, random=True)  # N x T x F, N
            log_p_z = model.prior.log_prob(z, mask, *prior_src)  # N
            log_p_y = decode_sequence_log_prob(model, z, tokens, mask, src, src_mask, chunks)  # N
            weights.append((log_p_y, log_p_z.float(), log_q.float()))
        log_p_y, log_p_z, log_q = (torch.stack(w, dim=1) for w in zip(*weights))  # N x K each
        return importance_weighted_log_likelihood(log_p_y, log_p_z, log_q)

    def _teacher_on(self, device, dtype):
        """The teacher on the model's device, in half precision when the model is (fairseq-generate --fp16)."""
        param = next(iter(self.teacher.parameters()), None)
        if param is not None and param.device != device:
            self.teacher.to(device)
        if param is not None and dtype in (torch.float16, torch.bfloat16) and param.dtype != dtype:
            self.teacher.to(dtype)
        return self.teacher

    def _hypotheses(self, bsz, n, ranking, score, hyp_tokens, hyp_scores, hyp_lengths, valid) -> List[List[Dict]]:
        """Hypothesis dicts per sentence, best first; invalid lengths and duplicate token sequences dropped."""
        order = ranking.view(bsz, n).argsort(dim=1, descending=True).tolist()  # B x n
        valid_cpu, lengths_cpu, tokens_cpu = valid.tolist(), hyp_lengths.tolist(), hyp_tokens.cpu()
        finalized = []
        for b in range(bsz):
            hypos, seen = [], set()
            for j in order[b]:
                c, length = b * n + j, lengths_cpu[b * n + j]
                key = tuple(tokens_cpu[c, :length].tolist())
                if not valid_cpu[c] or key in seen:
                    continue
                seen.add(key)
                hypos.append({
                    "tokens": hyp_tokens[c, :length],
                    "score": score[c],
                    "positional_scores": hyp_scores[c, :length].float().clone(),  # fairseq-generate divides it in place
                    "alignment": torch.empty(0),
                    "attention": None,
                    "steps": 0,
                })  # fmt: skip
            finalized.append(hypos)
        return finalized
