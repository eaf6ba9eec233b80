"""Criterion ``mrt``: minimum risk training (Shen et al., "Minimum Risk Training for Neural Machine
Translation", ACL 2016, section 3), as written in Welleck and Cho, "MLE-Guided Parameter Search for Task
Loss Minimization in Neural Sequence Modeling" (AAAI 2021), section 3, equations 6 and 7.

Per training batch:

1. decode K candidates per sentence with the current parameters, dropout off (fairseq's
   SequenceGenerator: the n-best list of a beam of K, ``--mrt-candidates beam``, or K samples,
   ``--mrt-candidates sample``), at most ``--mrt-max-len-ratio`` x the longest target; duplicates are
   removed (S is a set), and ``--mrt-include-reference`` adds the reference (section 3: MRT then
   contains the maximum-likelihood direction);
2. cost every candidate with ``--mrt-task-loss`` (the task-loss registry shared with ``mgs``),
   optionally divided by the sentence's largest cost (``--mrt-cost-normalization max``);
3. score the candidates with the model, with gradient: log p(Y | X) = the sum of the token
   log-probabilities, EOS included when emitted; the encoder runs once per sentence and the decoder over
   all candidates;
4. the risk of a sentence is sum_{Y in S} q(Y) c(Y) with
   ``renormalized`` (default, eq. 6): q(Y) = p(Y)^alpha / sum_{Y' in S} p(Y')^alpha (``--mrt-alpha``); or
   ``classic``: q = softmax over S of exp(mean token log-probability), the form of fairseq's former
   ``sequence_risk`` criterion (Edunov et al., "Classical Structured Prediction Losses for Sequence to
   Sequence Learning", NAACL 2018) and of the MGS authors' MRT baseline.  Its scores lie in (0, 1], so q
   stays close to uniform whatever the model prefers; it is offered for comparison with those numbers.

The loss is sum over sentences of [risk + ``--mrt-mle-weight`` x token-level loss of the reference] with
sample size the number of sentences: 0 gives pure MRT, a positive weight the combined objective of
Edunov et al. (their ``--seq-combined-loss-alpha``, here with the token loss summed per sentence).  The
gradient of the risk is eq. 7 (tested against it on an enumerable toy).  Validation computes the plain
token-level loss.

Logged (training): ``loss``/``nll_loss`` the token-level loss (as in validation); ``mrt_risk`` the
expected cost per sentence; ``mrt_cost_mean`` / ``mrt_cost_best`` the mean and lowest candidate cost
(before normalisation); ``mrt_candidates`` the distinct candidates per sentence; ``mrt_q_max`` the
largest q per sentence (1/K: uniform).

Sampled candidates draw from generators seeded by (``--seed``, update, micro-batch): a resumed run
draws the same ones.  The loss is an ordinary differentiable loss: fairseq's trainer all-reduces its
gradient (``--ddp-backend legacy_ddp``; the encoder reuse calls the submodules directly).
"""
import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from fairseq_ext.criterions.sequence_level_base import (
    DECODE_STREAM,
    SequenceLevelCriterionBase,
    check_decoding_options,
    check_task_loss_options,
)
from fairseq_ext.modules.option_checks import check_label_smoothing
from fairseq_ext.modules.parameter_search import stream_seed
from fairseq_ext.modules.sequence_decoding import BatchDecoder, references
from fairseq_ext.modules.sequence_risk import (
    COST_NORMALIZATION_CHOICES,
    DISTRIBUTION_CHOICES,
    candidate_distribution,
    candidate_log_probs,
    expected_risk,
    hypotheses_to_candidates,
    normalize_costs,
)

CANDIDATE_CHOICES = ChoiceEnum(["beam", "sample"])


@dataclass
class MinimumRiskTrainingConfig(LabelSmoothedCrossEntropyCriterionConfig):
    mrt_candidates: CANDIDATE_CHOICES = field(
        default="beam",
        metadata={"help": "beam: the n-best list of a beam of --mrt-num-candidates (Edunov et al. 2018); sample: "
                  "that many samples (Shen et al. 2016; the MGS authors' baseline)"},
    )
    mrt_num_candidates: int = field(default=4, metadata={"help": "K, candidates per sentence (the paper uses 4)"})
    mrt_include_reference: bool = field(
        default=False, metadata={"help": "add the reference to each candidate set (section 3, after eq. 7)"}
    )
    mrt_distribution: DISTRIBUTION_CHOICES = field(
        default="renormalized",
        metadata={"help": "renormalized: q = p(y)^alpha / Z over the candidates (eq. 6); classic: softmax of exp(mean "
                  "token log-prob), as fairseq's former sequence_risk criterion (alpha does not apply)"},
    )
    mrt_alpha: float = field(
        default=1.0,
        metadata={"help": "alpha of q = p^alpha / Z (eq. 6): < 1 flattens q (Shen et al. use 5e-3 with 100 samples), "
                  "1 the model's own renormalised probabilities"},
    )
    mrt_mle_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the token-level loss (summed per sentence) added to the risk; 0: pure MRT"},
    )
    mrt_task_loss: str = field(
        default="bleu",
        metadata={"help": "sequence-level cost c(Y_hat, Y), lower is better, from fairseq_ext.modules.task_losses "
                  "(bleu, chrf, edit, lm, or one registered by a --user-dir module)"},
    )
    mrt_lm_scorer_path: Optional[str] = field(
        default=None, metadata={"help": "with --mrt-task-loss lm: the frozen --task language_modeling checkpoint"}
    )
    mrt_cost_normalization: COST_NORMALIZATION_CHOICES = field(
        default="none", metadata={"help": "max: divide costs by the sentence's largest candidate cost (authors' code)"}
    )
    mrt_max_len_ratio: float = field(
        default=1.3, metadata={"help": "maximum candidate length, as a multiple of the batch's longest target"}
    )
    mrt_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the candidate decoding"})
    mrt_sampling_topk: int = field(default=-1, metadata={"help": "with --mrt-candidates sample: top-k sampling"})
    mrt_sampling_topp: float = field(default=-1.0, metadata={"help": "with --mrt-candidates sample: nucleus sampling"})
    mrt_post_process: Optional[str] = field(
        default=None, metadata={"help": "how bleu/chrf turn tokens into text, as fairseq's --post-process"}
    )
    mrt_sacrebleu_tokenize: str = field(default="none", metadata={"help": "sacreBLEU tokenizer of the bleu cost"})
    seed: int = II("common.seed")


def check_mrt_options(cfg: MinimumRiskTrainingConfig):
    """Refuses impossible settings before training, naming the flag."""
    sampling = cfg.mrt_candidates == "sample"
    check_decoding_options("mrt", sampling, cfg.mrt_sampling_topk, cfg.mrt_sampling_topp, cfg.mrt_temperature,
                           cfg.mrt_max_len_ratio, cfg.mrt_num_candidates, "--mrt-num-candidates")  # fmt: skip
    if cfg.mrt_num_candidates == 1 and not cfg.mrt_include_reference:
        raise ValueError(
            "--mrt-num-candidates 1 without --mrt-include-reference: q of a single candidate is 1 and the risk has "
            "no gradient; use more candidates or add the reference"
        )
    if not (math.isfinite(cfg.mrt_alpha) and cfg.mrt_alpha > 0):
        raise ValueError(f"--mrt-alpha must be a finite number > 0, got {cfg.mrt_alpha}")
    if cfg.mrt_distribution == "classic" and cfg.mrt_alpha != 1.0:
        raise ValueError("--mrt-alpha only applies to --mrt-distribution renormalized (classic has no alpha)")
    if not (math.isfinite(cfg.mrt_mle_weight) and cfg.mrt_mle_weight >= 0):
        raise ValueError(f"--mrt-mle-weight must be >= 0, got {cfg.mrt_mle_weight}")
    check_label_smoothing(cfg.label_smoothing)
    check_task_loss_options("mrt", cfg.mrt_task_loss, cfg.mrt_lm_scorer_path)


@register_criterion("mrt", dataclass=MinimumRiskTrainingConfig)
class MinimumRiskTrainingCriterion(SequenceLevelCriterionBase):
    FLAG_PREFIX = "mrt"
    NAME = "mrt"

    def __init__(self, task, cfg: MinimumRiskTrainingConfig):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        check_mrt_options(cfg)
        self.sampling = cfg.mrt_candidates == "sample"
        self.include_reference = bool(cfg.mrt_include_reference)
        self.distribution = str(cfg.mrt_distribution)
        self.alpha = float(cfg.mrt_alpha)
        self.mle_weight = float(cfg.mrt_mle_weight)
        self.cost_normalization = str(cfg.mrt_cost_normalization)
        self.seed = int(cfg.seed)
        K = cfg.mrt_num_candidates
        self.decoder = BatchDecoder(
            task.target_dictionary, beam=K, nbest=K, sampling=self.sampling, sampling_topk=cfg.mrt_sampling_topk,
            sampling_topp=cfg.mrt_sampling_topp, temperature=cfg.mrt_temperature, max_len_ratio=cfg.mrt_max_len_ratio,
        )  # fmt: skip
        self.setup_costs(cfg.mrt_task_loss, cfg.mrt_lm_scorer_path, cfg.mrt_post_process, cfg.mrt_sacrebleu_tokenize)

    def forward(self, model, sample, reduce=True):
        """Training: (sum over sentences of risk + mle_weight x token loss, number of sentences, logs);
        validation: fairseq's label-smoothed cross-entropy."""
        if not model.training:
            return super().forward(model, sample, reduce=reduce)
        if not reduce:
            raise ValueError("--criterion mrt sums its risk over the batch: reduce=False is not defined")
        inner = self.scorable_model(model, sample)
        update, micro = self.next_position()
        rows = self.decoder.decode(inner, sample, seed=stream_seed(self.seed, update, micro, DECODE_STREAM))
        refs = references(sample, self.task.target_dictionary) if self.include_reference else None
        candidates = hypotheses_to_candidates(rows, unique=True, reference=refs)
        loss, log = self.risk_loss(inner, sample, candidates)
        return loss, sample["target"].size(0), log

    def risk_loss(self, model, sample, candidates):
        """The training loss over given candidates and its logging output (the tests call it directly)."""
        mask = candidates.mask(device=sample["target"].device)  # B x K
        raw_costs = self.candidate_costs(candidates, sample).to(mask.device)  # B x K
        costs = normalize_costs(raw_costs, mask, self.cost_normalization)
        log_p, lengths = candidate_log_probs(model, sample, candidates, self.task.target_dictionary)  # B x K
        q = candidate_distribution(log_p, lengths, mask, self.alpha, self.distribution)  # B x K
        risk = expected_risk(q, costs, mask)  # B
        mle, nll, net_output = self.mle_loss(model, sample, with_grad=self.mle_weight > 0)
        loss = risk.sum() + (self.mle_weight * mle if self.mle_weight > 0 else 0.0)
        n_candidates = mask.sum(-1)  # B
        log = {
            "loss": mle.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample["target"].size(0) if self.sentence_avg else sample["ntokens"],  # of the logged loss
            "mrt_sentences": sample["target"].size(0),
            "mrt_risk": float(risk.detach().double().sum()),
            "mrt_cost_mean": float((raw_costs.masked_fill(~mask, 0).sum(-1) / n_candidates.clamp(min=1)).sum()),
            "mrt_cost_best": float(raw_costs.masked_fill(~mask, math.inf).amin(-1).sum()),
            "mrt_candidates": int(n_candidates.sum()),
            "mrt_q_max": float(q.detach().double().amax(-1).sum()),
        }
        if self.report_accuracy:
            n_correct, n_total = self.compute_accuracy(model, net_output, sample)
            log["n_correct"] = utils.item(n_correct.data)
            log["total"] = utils.item(n_total.data)
        return loss, log

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sentences = utils.item(sum(log.get("mrt_sentences", 0) for log in logging_outputs))
        if sentences > 0:
            for key in ("mrt_risk", "mrt_cost_mean", "mrt_cost_best", "mrt_candidates", "mrt_q_max"):
                total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
                metrics.log_scalar(key, total / sentences, sentences, round=4)
