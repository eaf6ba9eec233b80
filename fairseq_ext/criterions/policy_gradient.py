"""Criterion ``policy_gradient``: REINFORCE (Williams, "Simple Statistical Gradient-Following Algorithms for
Connectionist Reinforcement Learning", Machine Learning 1992) with a running-average baseline and an
optional token-level loss, the policy-gradient baseline of Welleck and Cho, "MLE-Guided Parameter Search
for Task Loss Minimization in Neural Sequence Modeling" (AAAI 2021), section 3, equation 5.

Per training batch:

1. draw K samples per sentence from the current model (fairseq's SequenceGenerator with sampling, dropout
   off, ``--pg-temperature``, ``--pg-sampling-topk/topp``; at most ``--pg-max-len-ratio`` x the longest
   target); draws come from generators seeded by (``--seed``, update, micro-batch), so a resumed run draws
   the same samples;
2. reward r = -c(Y_hat, Y) (``--pg-task-loss``, the registry shared with ``mgs`` and ``mrt``), divided by the
   sentence's largest |cost| with ``--pg-cost-normalization max`` (the authors' code);
3. baseline: b <- decay b + (1 - decay) mean(r), the mean over all samples of the batch *and of every
   data-parallel worker* (all-reduced), updated before it is used (the first batch sets b = its mean);
4. loss = sum over sentences of -(1/K) sum_k (r_k - b) log p(Y_k | X) + ``--pg-mle-weight`` x token-level
   loss, with log p the sequence log-probability (sum of token log-probabilities, EOS included when
   emitted: eq. 5 scores whole sequences; the authors' code uses the mean token log-probability) and
   sample size the number of sentences.

Baseline decay.  ``--pg-baseline-decay`` defaults to 0.95, a running average over about 20 batches.  The
authors' ``AvgBaseline(alpha=0.95)`` computes ``0.05 b + 0.95 mean``: it mostly tracks the current batch;
``--pg-baseline-decay 0.05`` reproduces it.  A baseline that includes the current batch biases the estimate
slightly (by (1 - decay)/K of the reward's own score term); the running average keeps that small.

State.  The baseline lives in the criterion's state (an int64 parameter holding the float64 value and a
flag bit for bit, so that fp16/bf16 casts of the criterion leave it exact and the optimizer never sees it):
fairseq saves it in every checkpoint and a resumed run continues with it exactly.  A checkpoint without
criterion state (an MLE checkpoint) starts the baseline afresh.

Logged (training): ``loss``/``nll_loss`` the token-level loss; ``pg_reward`` the mean reward of the samples,
``pg_baseline`` the baseline used, ``pg_cost_best`` the lowest sample cost per sentence, ``pg_nonterm``
the share of samples cut at the maximum length.
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig
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
from fairseq_ext.modules.sequence_decoding import BatchDecoder
from fairseq_ext.modules.sequence_risk import (
    COST_NORMALIZATION_CHOICES,
    candidate_log_probs,
    hypotheses_to_candidates,
    normalize_costs,
    policy_gradient_surrogate,
)

logger = logging.getLogger(__name__)


@dataclass
class PolicyGradientConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pg_num_samples: int = field(default=4, metadata={"help": "K, samples per sentence (the paper uses 4)"})
    pg_baseline_decay: float = field(
        default=0.95,
        metadata={"help": "b <- decay b + (1 - decay) mean reward; 0: the batch mean; 0.05 reproduces the authors' "
                  "AvgBaseline(alpha=0.95)"},
    )
    pg_mle_weight: float = field(
        default=0.0, metadata={"help": "weight of the token-level loss (summed per sentence) added; 0: pure REINFORCE"}
    )
    pg_task_loss: str = field(
        default="bleu",
        metadata={"help": "sequence-level cost c(Y_hat, Y), reward -c, from fairseq_ext.modules.task_losses (bleu, "
                  "chrf, edit, lm, or one registered by a --user-dir module)"},
    )
    pg_lm_scorer_path: Optional[str] = field(
        default=None, metadata={"help": "with --pg-task-loss lm: the frozen --task language_modeling checkpoint"}
    )
    pg_cost_normalization: COST_NORMALIZATION_CHOICES = field(
        default="max", metadata={"help": "max: divide costs by the sentence's largest sample cost (authors' code)"}
    )
    pg_max_len_ratio: float = field(
        default=1.3, metadata={"help": "maximum sample length, as a multiple of the batch's longest target"}
    )
    pg_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the sampling"})
    pg_sampling_topk: int = field(default=-1, metadata={"help": "sample from the top k only (-1: all)"})
    pg_sampling_topp: float = field(default=-1.0, metadata={"help": "nucleus sampling mass (-1: off)"})
    pg_post_process: Optional[str] = field(
        default=None, metadata={"help": "how bleu/chrf turn tokens into text, as fairseq's --post-process"}
    )
    pg_sacrebleu_tokenize: str = field(default="none", metadata={"help": "sacreBLEU tokenizer of the bleu cost"})
    seed: int = II("common.seed")


def check_pg_options(cfg: PolicyGradientConfig):
    check_decoding_options("pg", True, cfg.pg_sampling_topk, cfg.pg_sampling_topp, cfg.pg_temperature,
                           cfg.pg_max_len_ratio, cfg.pg_num_samples, "--pg-num-samples")  # fmt: skip
    if not 0.0 <= cfg.pg_baseline_decay <= 1.0:
        raise ValueError(f"--pg-baseline-decay must lie in [0, 1], got {cfg.pg_baseline_decay}")
    if not (math.isfinite(cfg.pg_mle_weight) and cfg.pg_mle_weight >= 0):
        raise ValueError(f"--pg-mle-weight must be >= 0, got {cfg.pg_mle_weight}")
    check_label_smoothing(cfg.label_smoothing)
    check_task_loss_options("pg", cfg.pg_task_loss, cfg.pg_lm_scorer_path)


class RunningBaseline(torch.nn.Module):
    """b <- decay b + (1 - decay) x, with b = x at the first update; float64, stored bit for bit in int64."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = float(decay)
        # [value, initialised] as float64 bits: int64 is not cast by .half()/.to(dtype) and never trained
        self.state = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64).view(torch.int64), requires_grad=False)

    def _values(self):
        return self.state.data.view(torch.float64)

    @property
    def value(self) -> Optional[float]:
        v = self._values().tolist()
        return v[0] if v[1] else None

    def update(self, mean: float) -> float:
        """Moves b towards ``mean``; returns the new b."""
        old = self.value
        new = float(mean) if old is None else self.decay * old + (1.0 - self.decay) * float(mean)
        self.state.data.copy_(torch.tensor([new, 1.0], dtype=torch.float64).view(torch.int64))
        return new


@register_criterion("policy_gradient", dataclass=PolicyGradientConfig)
class PolicyGradientCriterion(SequenceLevelCriterionBase):
    FLAG_PREFIX = "pg"
    NAME = "policy_gradient"

    def __init__(self, task, cfg: PolicyGradientConfig):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        check_pg_options(cfg)
        self.mle_weight = float(cfg.pg_mle_weight)
        self.cost_normalization = str(cfg.pg_cost_normalization)
        self.seed = int(cfg.seed)
        K = cfg.pg_num_samples
        self.decoder = BatchDecoder(
            task.target_dictionary, beam=K, nbest=K, sampling=True, sampling_topk=cfg.pg_sampling_topk,
            sampling_topp=cfg.pg_sampling_topp, temperature=cfg.pg_temperature, max_len_ratio=cfg.pg_max_len_ratio,
        )  # fmt: skip
        self.baseline = RunningBaseline(cfg.pg_baseline_decay)
        self.setup_costs(cfg.pg_task_loss, cfg.pg_lm_scorer_path, cfg.pg_post_process, cfg.pg_sacrebleu_tokenize)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        """fairseq's trainer loads the criterion's state from every checkpoint; one saved by a criterion
        without state (an MLE run) has None there: the baseline then starts afresh."""
        if state_dict is None:
            logger.info("policy_gradient: the checkpoint has no criterion state; the reward baseline starts afresh")
            return None
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def forward(self, model, sample, reduce=True):
        if not model.training:
            return super().forward(model, sample, reduce=reduce)
        if not reduce:
            raise ValueError("--criterion policy_gradient sums its loss over the batch: reduce=False is not defined")
        from fairseq.distributed import utils as distributed_utils

        inner = self.scorable_model(model, sample)
        update, micro = self.next_position()
        rows = self.decoder.decode(inner, sample, seed=stream_seed(self.seed, update, micro, DECODE_STREAM))
        candidates = hypotheses_to_candidates(rows, unique=False)
        mask = candidates.mask(device=sample["target"].device)  # B x K
        raw_costs = self.candidate_costs(candidates, sample).to(mask.device)  # B x K
        rewards = -normalize_costs(raw_costs, mask, self.cost_normalization)  # B x K

        # the baseline: mean reward over every sample of every worker, then the running average
        pooled = torch.tensor([float(rewards.masked_fill(~mask, 0).sum()), float(mask.sum())], dtype=torch.float64)
        if distributed_utils.get_data_parallel_world_size() > 1:
            pooled = pooled.to(sample["target"].device)
            distributed_utils.all_reduce(pooled, distributed_utils.get_data_parallel_group())
            pooled = pooled.cpu()
        baseline = self.baseline.update(float(pooled[0]) / max(float(pooled[1]), 1.0))

        log_p, _ = candidate_log_probs(inner, sample, candidates, self.task.target_dictionary)  # B x K
        surrogate = policy_gradient_surrogate(log_p, rewards - baseline, mask)  # B
        mle, nll, net_output = self.mle_loss(inner, sample, with_grad=self.mle_weight > 0)
        loss = surrogate.sum() + (self.mle_weight * mle if self.mle_weight > 0 else 0.0)
        n_sentences = sample["target"].size(0)
        log = {
            "loss": mle.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": n_sentences,
            "sample_size": n_sentences if self.sentence_avg else sample["ntokens"],  # of the logged loss
            "pg_sentences": n_sentences,
            "pg_samples": int(mask.sum()),
            "pg_reward": float(rewards.masked_fill(~mask, 0).sum()),
            "pg_nonterm": sum(1 for row in candidates.terminated for d in row if not d),
            "pg_cost_best": float(raw_costs.masked_fill(~mask, math.inf).amin(-1).sum()),
            # the same on every worker and micro-batch of an update: averaged per call
            "pg_calls": 1,
            "pg_baseline": baseline,
        }
        if self.report_accuracy:
            n_correct, n_total = self.compute_accuracy(inner, net_output, sample)
            log["n_correct"] = utils.item(n_correct.data)
            log["total"] = utils.item(n_total.data)
        return loss, n_sentences, log

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        samples, sentences, calls = total("pg_samples"), total("pg_sentences"), total("pg_calls")
        if samples > 0:
            metrics.log_scalar("pg_reward", total("pg_reward") / samples, samples, round=4)
            metrics.log_scalar("pg_nonterm", total("pg_nonterm") / samples, samples, round=4)
        if sentences > 0:
            metrics.log_scalar("pg_cost_best", total("pg_cost_best") / sentences, sentences, round=4)
        if calls > 0:
            metrics.log_scalar("pg_baseline", total("pg_baseline") / calls, calls, round=4)
