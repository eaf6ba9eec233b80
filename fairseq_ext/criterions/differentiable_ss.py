"""Criterion ``differentiable_ss``: Differentiable Scheduled Sampling (Goyal, Dyer, Berg-Kirkpatrick
2017; thesis chapter 3).

Where the mixing coin picks the model (probability p, scheduled by the update count: Bengio's
inverse sigmoid by default, as in the paper), the decoder input is the soft embedding of the
previous step's scores, relaxed argmax (``--dss-mode greedy``, section 3.1) or relaxed Gumbel
sample (``--dss-mode sample``, section 3.2), with peakedness alpha fixed or annealed exponentially
(``--dss-alpha-schedule``).  Gradients flow through the soft embeddings into the earlier steps.
The loss is label-smoothed cross-entropy of the gold targets at every step; predictions at test
time stay hard (the generator's argmax / beam search).  The algorithms are in
:mod:`fairseq_ext.modules.differentiable_scheduled_sampling`; this class is plumbing.

``--dss-decoding sequential`` (default) is the paper's step-by-step decoder with fairseq's
incremental state; ``parallel`` runs K full passes (``--dss-num-passes``), exact when K >= T - 1
and an approximation with credit reaching back K predictions otherwise (see the module docstring).
The paper has only the sequential decoder.  "Exact" holds with dropout off: in training mode every
pass draws its own dropout masks, so the parallel mode then matches the sequential one in
distribution only.

With ``--dss-alpha-schedule exponential`` (and any rising --ss-schedule), the training loss at an
update is conditioned on inputs relaxed with that update's alpha, so training losses are not
comparable across updates; validation is teacher-forced (see ``scheduled_sampling_base``), so the
validation loss does not depend on alpha or p.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq import utils

from fairseq_ext.criterions.scheduled_sampling_base import (
    MixingCriterionBase,
    MixingScheduleConfig,
    stack_net_output,
)
from fairseq_ext.modules.decoder_driver import UnsupportedModelError
from fairseq_ext.modules.differentiable_scheduled_sampling import (
    parallel_differentiable_ss,
    sequential_differentiable_ss,
)
from fairseq_ext.modules.relaxations import (
    RELAXATION_CHOICES,
    gumbel_noise,
    relaxation_ranking,
    relaxed_embeddings,
)
from fairseq_ext.modules.schedules import ALPHA_SCHEDULE_CHOICES, SCHEDULE_CHOICES, AlphaSchedule

DSS_DECODING_CHOICES = ChoiceEnum(["sequential", "parallel"])

# The paper decays the gold probability as Bengio's inverse sigmoid of *epochs* (k = 100 best,
# Table 2); here the schedule counts updates, so the default strength is in updates: the model is
# fed with probability 1/2 after k ln k ~ 6,900 updates and ~0.96 after 10,000.
DEFAULT_INVERSE_SIGMOID_K = 1000.0


@dataclass
class DifferentiableScheduledSamplingConfig(MixingScheduleConfig):
    ss_prob: float = field(
        default=1.0,
        metadata={
            "help": "maximum probability of feeding the relaxed prediction instead of the gold token's embedding "
            "(the schedule rises to it; the gold-mixing probability is 1 - p). 0 = teacher forcing; 1 with "
            "--ss-schedule constant = the paper's 'always' setting"
        },
    )
    ss_schedule: SCHEDULE_CHOICES = field(
        default="inverse_sigmoid",
        metadata={
            "help": "how p grows with the update count after --ss-warmup-updates: inverse_sigmoid (default, as in "
            "the paper: p * (1 - k/(k+exp(u/k)))), constant, or exponential / linear / sigmoid ramps over --ss-ramp-updates"
        },
    )
    ss_inverse_sigmoid_k: Optional[float] = field(
        default=None,
        metadata={
            "help": f"strength k >= 1 of the inverse sigmoid schedule, in updates: the gold embedding is fed with "
            f"probability k/(k+exp(u/k)) at update u (default {DEFAULT_INVERSE_SIGMOID_K:g} with inverse_sigmoid; "
            "rejected by the other schedules)"
        },
    )
    dss_mode: RELAXATION_CHOICES = field(
        default="greedy",
        metadata={
            "help": "greedy: soft argmax, sum_y e(y) softmax(alpha s)_y (section 3.1); sample: soft reparametrised "
            "sample, the same with Gumbel noise added to the scores (section 3.2)"
        },
    )
    dss_alpha: float = field(
        default=1.0,
        metadata={
            "help": "peakedness alpha of the relaxation (its initial value with --dss-alpha-schedule exponential); "
            "large alpha approaches hard argmax / sampling"
        },
    )
    dss_alpha_schedule: ALPHA_SCHEDULE_CHOICES = field(
        default="fixed",
        metadata={
            "help": "fixed ('alpha-soft fixed' of Table 1) or exponential: alpha * G ** ((u - warmup) / N), "
            "('alpha-soft annealed': the paper grows alpha exponentially with the epochs)"
        },
    )
    dss_alpha_growth: Optional[float] = field(
        default=None,
        metadata={"help": "factor G by which exponential annealing multiplies alpha every --dss-alpha-period-updates"},
    )
    dss_alpha_period_updates: Optional[int] = field(
        default=None,
        metadata={"help": "updates N per factor G of exponential annealing (an epoch's worth follows the paper)"},
    )
    dss_alpha_max: Optional[float] = field(
        default=None,
        metadata={"help": "cap on the annealed alpha, at least --dss-alpha (default: none beyond the 1e20 "
                  "ceiling every alpha schedule stops at, where the relaxations are already hard in float32)"},
    )
    dss_top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": "restrict each relaxation to the K highest scores (of s + G with --dss-mode sample): an "
            "approximation that drops the weights outside them (at most (V - K) exp(-alpha * gap) of the mass) "
            "and saves the vocabulary-sized mixture and, in parallel mode, the projection's backward pass. "
            "Default: the whole vocabulary, as in the paper"
        },
    )
    dss_decoding: DSS_DECODING_CHOICES = field(
        default="sequential",
        metadata={
            "help": "sequential: step-by-step decoding with incremental state, as in the paper (transformer, lstm, "
            "...); parallel: --dss-num-passes full passes with the soft embeddings kept in the graph, equal to "
            "sequential when K >= target length - 1, much faster for transformers"
        },
    )
    dss_num_passes: Optional[int] = field(
        default=None,
        metadata={"help": "K >= 1 passes of --dss-decoding parallel (default 1); rejected with sequential"},
    )


@register_criterion("differentiable_ss", dataclass=DifferentiableScheduledSamplingConfig)
class DifferentiableScheduledSamplingCriterion(MixingCriterionBase):
    criterion_name = "differentiable_ss"

    def __init__(self, task, cfg: DifferentiableScheduledSamplingConfig):
        super().__init__(task, cfg, default_inverse_sigmoid_k=DEFAULT_INVERSE_SIGMOID_K)
        self.alpha_schedule = AlphaSchedule(
            name=str(cfg.dss_alpha_schedule),
            alpha=cfg.dss_alpha,
            growth=cfg.dss_alpha_growth,
            period_updates=cfg.dss_alpha_period_updates,
            alpha_max=cfg.dss_alpha_max,
            start_updates=cfg.ss_warmup_updates,
        )
        self.mode = str(cfg.dss_mode)
        self.decoding = str(cfg.dss_decoding)
        if self.decoding == "sequential" and cfg.dss_num_passes is not None:
            raise ValueError("--dss-num-passes only applies to --dss-decoding parallel: drop it or choose parallel")
        if cfg.dss_num_passes is not None and cfg.dss_num_passes < 1:
            raise ValueError(f"--dss-num-passes must be >= 1, got {cfg.dss_num_passes}")
        self.num_passes = 1 if cfg.dss_num_passes is None else cfg.dss_num_passes
        if cfg.dss_top_k is not None and cfg.dss_top_k < 1:
            raise ValueError(f"--dss-top-k must be >= 1, got {cfg.dss_top_k}")
        self.top_k = cfg.dss_top_k

    def current_alpha(self) -> float:
        return self.alpha_schedule(self.update_count())

    def extra_logging_output(self) -> dict:
        return {"dss_alpha_sum": self.current_alpha(), "dss_alpha_count": 1}

    def relaxation(self, driver, use_model):
        """The callbacks ``relax(scores, where, candidates=None)`` -> (N x D soft embeddings, N argmax
        ids) for the input positions ``where`` (a subset of ``use_model``), and ``rank(scores, where)``,
        which orders the vocabulary for --dss-top-k.  Gumbel noise is drawn once per batch for the
        positions in ``use_model``, so every pass of the parallel mode relaxes a position with the same noise."""
        embedding = driver.input_embedding_matrix()  # V x D
        alpha, banned = self.current_alpha(), (self.padding_idx,)
        noise = row_of = None
        if self.mode == "sample":
            dtype = torch.promote_types(embedding.dtype, torch.float32)
            noise = gumbel_noise((int(use_model.sum()), embedding.size(0)), embedding.new_empty((), dtype=dtype))
            row_of = use_model.flatten().long().cumsum(0).sub_(1).view_as(use_model)  # B x T: row of noise

        def noise_at(where):
            return None if noise is None else noise[row_of[where]]  # N x V

        def relax(scores, where, candidates=None):
            return relaxed_embeddings(scores, alpha, embedding, noise_at(where), banned, candidates)

        def rank(scores, where):
            return relaxation_ranking(scores, noise_at(where), banned)

        return relax, rank

    def conditioned_forward(self, driver, sample, prob):
        gold = driver.decoder_inputs(sample)
        use_model = self.replaceable(gold)
        use_model &= torch.rand(gold.shape, device=gold.device) < prob  # coins, drawn once per batch
        relax, rank = self.relaxation(driver, use_model)
        gold_vectors = driver.embed(gold)  # B x T x D
        if self.decoding == "sequential":
            net_output, hard = self.sequential(driver, sample, gold, gold_vectors, use_model, relax, rank)
        else:
            net_output, hard = self.parallel(driver, sample, gold, gold_vectors, use_model, relax, rank)
        return net_output, hard, use_model

    def sequential(self, driver, sample, gold, gold_vectors, use_model, relax, rank):
        if not driver.direct:
            raise UnsupportedModelError(
                "--criterion differentiable_ss --dss-decoding sequential steps the decoder directly, which torch "
                "DDP/FSDP wrappers do not synchronise: use --ddp-backend legacy_ddp, or --dss-decoding parallel"
            )
        encoder_out = driver.encode(sample)
        incremental_state = self.step_state(gold)  # None: full prefixes (left-padded batch)

        def step(prefix, prefix_vectors):
            return driver.step_from_embeddings(prefix, prefix_vectors, encoder_out, incremental_state)  # B x C

        def relax_outputs(outputs, where):
            scores = driver.scores(outputs)  # N x V
            if self.top_k is None:
                return relax(scores, where)
            with torch.no_grad():
                candidates = rank(scores, where).topk(min(self.top_k, scores.size(-1)), dim=-1).indices
            return relax(scores.gather(-1, candidates), where, candidates)

        outputs, _, hard = sequential_differentiable_ss(gold, gold_vectors, use_model, step, relax_outputs)
        return stack_net_output(outputs), hard

    def parallel(self, driver, sample, gold, gold_vectors, use_model, relax, rank):
        encoder_out = driver.encode(sample)  # reused by every pass, with gradient
        top_k = None if self.top_k is None else min(self.top_k, driver.input_embedding_matrix().size(0))

        def predict(vectors, outputs):
            if top_k is None:
                return driver.selected_scores_from_embeddings(sample, gold, vectors, outputs, encoder_out)
            # the inputs fed from these outputs, for the noise rows: output i feeds input i + 1
            where = torch.zeros_like(outputs)
            where[:, 1:] = outputs[:, :-1]
            return driver.selected_candidate_scores_from_embeddings(
                sample, gold, vectors, outputs, lambda scores: rank(scores, where), top_k, encoder_out
            )

        def relax_predicted(predicted, where):
            return relax(predicted, where) if top_k is None else relax(predicted[0], where, predicted[1])

        vectors, hard = parallel_differentiable_ss(
            gold, gold_vectors, use_model, self.num_passes, predict, relax_predicted, timestep=self.timesteps(gold)
        )
        return driver.forward_from_embeddings(sample, gold, vectors, encoder_out), hard

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        count = utils.item(sum(log.get("dss_alpha_count", 0) for log in logging_outputs))
        if count > 0:
            alpha = utils.item(sum(log.get("dss_alpha_sum", 0) for log in logging_outputs))
            metrics.log_scalar("dss_alpha", alpha / count, count, round=4)
