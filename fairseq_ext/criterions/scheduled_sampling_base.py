"""What parallel_ss, sequential_ss and differentiable_ss share: the mixing schedule's options,
the update count, logging and the loss.

All subclass fairseq's label-smoothed cross-entropy and reuse its loss (``label_smoothed_nll_loss``
through ``compute_loss``), accuracy and metrics; only the decoder inputs of the loss pass change.
Scheduled sampling applies in training only: validation is teacher-forced, as in tensor2tensor
("only in TRAIN mode"), so validation losses stay comparable with a teacher-forced baseline and
across updates.  The training loss is not: it is conditioned on inputs drawn with the current p
(and, for differentiable_ss, relaxed with the current alpha), which the schedules change.

With ``--ignore-prefix-size N`` the first N target tokens (a forced prefix such as a target-language
tag) carry no loss and are always fed gold, as inference forces them; BOS is always fed gold.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from fairseq_ext.modules.decoder_driver import DecoderDriver, check_teacher_forcing_shift
from fairseq_ext.modules.option_checks import check_label_smoothing
from fairseq_ext.modules.scheduled_sampling import (
    CONDITIONING_CHOICES,
    draw_tokens,
    left_padded,
    replaceable_positions,
    timesteps,
)
from fairseq_ext.modules.schedules import SCHEDULE_CHOICES, MixingSchedule
from fairseq_ext.modules.update_count import UpdateCountReader


@dataclass
class MixingScheduleConfig(LabelSmoothedCrossEntropyCriterionConfig):
    ss_prob: float = field(
        default=0.5,
        metadata={
            "help": "maximum probability of feeding the model's OWN prediction instead of the gold token "
            "(the gold token is fed with probability 1 - p); the schedule rises to it. 0 = teacher forcing. "
            "tensor2tensor's scheduled_sampling_gold_mixin_prob, despite its name, is this probability"
        },
    )
    ss_schedule: SCHEDULE_CHOICES = field(
        default="constant",
        metadata={
            "help": "how p grows with the update count after --ss-warmup-updates: constant (p from the start), "
            "exponential / linear / sigmoid (tensor2tensor's exp, linear, sigmoid: from 0.001*p to p over "
            "--ss-ramp-updates), inverse_sigmoid (p * (1 - k/(k+exp(u/k))), Bengio et al. 2015)"
        },
    )
    ss_warmup_updates: int = field(
        default=0,
        metadata={"help": "updates of pure teacher forcing (p = 0) before the schedule starts"},
    )
    ss_ramp_updates: Optional[int] = field(
        default=None,
        metadata={
            "help": "updates over which an exponential / linear / sigmoid schedule rises to --ss-prob "
            "(tensor2tensor's scheduled_sampling_warmup_steps; the paper's Table 1 'Warm-up Steps'); "
            "required by those schedules, rejected by the others"
        },
    )
    ss_inverse_sigmoid_k: Optional[float] = field(
        default=None,
        metadata={
            "help": "strength k >= 1 of the inverse sigmoid schedule: the GOLD token is fed with probability "
            "k/(k+exp(u/k)) at update u; required by --ss-schedule inverse_sigmoid, rejected by the others"
        },
    )


@dataclass
class ScheduledSamplingConfig(MixingScheduleConfig):
    ss_conditioning: CONDITIONING_CHOICES = field(
        default="sample",
        metadata={
            "help": "how the model's token is chosen: sample from its distribution (the paper and tensor2tensor) "
            "or argmax (its greedy prediction)"
        },
    )
    ss_temperature: Optional[float] = field(
        default=None,
        metadata={
            "help": "temperature of --ss-conditioning sample: tokens are drawn from softmax(log p / T); "
            "default 1 (the model's distribution); rejected with argmax"
        },
    )


def check_conditioning_arguments(conditioning: str, temperature: Optional[float]):
    if str(conditioning) == "argmax" and temperature is not None:
        raise ValueError("--ss-temperature only applies to --ss-conditioning sample; drop it with argmax")
    if temperature is not None and not temperature > 0.0:
        raise ValueError(f"--ss-temperature must be > 0, got {temperature}")


def check_prefix_and_padding(task, ignore_prefix_size: int):
    """Refuse --ignore-prefix-size with --left-pad-target True: fairseq's loss drops the first N target
    COLUMNS, which in a left-padded row are padding rather than the row's first N tokens, while the
    inputs fed gold are the row's first N tokens; the two would disagree on every shorter row."""
    task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
    if ignore_prefix_size > 0 and getattr(task_cfg, "left_pad_target", False):
        raise ValueError(
            f"--ignore-prefix-size {ignore_prefix_size} needs right-padded targets (fairseq's loss drops the "
            "first target columns): drop --left-pad-target"
        )


class MixingCriterionBase(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy conditioned on decoder inputs that mix gold and model predictions.

    Subclasses define ``conditioned_forward(driver, sample, prob)``, returning the net_output of the
    loss pass, the B x T conditioning tokens (for a relaxation: the argmax ids of the soft inputs)
    and the B x T bool mask of inputs the model supplied.
    """

    criterion_name = "scheduled_sampling"

    def __init__(self, task, cfg: MixingScheduleConfig, default_inverse_sigmoid_k: Optional[float] = None):
        # fairseq's build_criterion passes the whole config to a parameter named cfg
        check_label_smoothing(cfg.label_smoothing)
        check_prefix_and_padding(task, cfg.ignore_prefix_size)
        super().__init__(
            task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy
        )
        inverse_sigmoid_k = cfg.ss_inverse_sigmoid_k
        if str(cfg.ss_schedule) == "inverse_sigmoid" and inverse_sigmoid_k is None:
            inverse_sigmoid_k = default_inverse_sigmoid_k
        self.schedule = MixingSchedule(
            name=str(cfg.ss_schedule),
            max_prob=cfg.ss_prob,
            warmup_updates=cfg.ss_warmup_updates,
            ramp_updates=cfg.ss_ramp_updates,
            inverse_sigmoid_k=inverse_sigmoid_k,
        )
        self.update_count = UpdateCountReader()
        self._driver: Optional[DecoderDriver] = None

    # -- plumbing ---------------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int):
        """Fixes the update count the schedule reads (otherwise: the fairseq trainer's)."""
        self.update_count.set_num_updates(num_updates)

    def current_prob(self) -> float:
        return self.schedule(self.update_count())

    def driver(self, model) -> DecoderDriver:
        if self._driver is None or self._driver.model is not model:
            self._driver = DecoderDriver(model, self.criterion_name)  # raises for a model it cannot drive
        return self._driver

    def replaceable(self, gold):
        """B x T bool: decoder inputs the model may supply: not BOS, not the --ignore-prefix-size forced
        tokens after it, not padding (left or right)."""
        return replaceable_positions(gold, self.padding_idx, self.ignore_prefix_size)

    def timesteps(self, gold):
        """B x T timestep of each decoder input within its row (the column, unless left-padded)."""
        return timesteps(gold, self.padding_idx)

    def step_state(self, gold):
        """A fresh incremental decoding state for a step-by-step pass over ``gold``, or None to re-run
        the causal decoder on the whole prefix at each step.

        fairseq's incremental decoding assumes right padding: a transformer decoder then gives every
        row the position of the step (not of the row's own token count) and, at a left-padded row's
        leading padding, attends over padding only (NaN).  A left-padded batch is therefore decoded
        with the full prefix at each step, which computes positions and padding masks as the
        teacher-forced pass does (T passes over prefixes, quadratic in T instead of linear)."""
        return None if left_padded(gold, self.padding_idx) else {}

    def get_lprobs_and_target(self, model, net_output, sample):
        """fairseq's, with the log-probabilities from the driver: the same values, but with a backward
        pass under an adaptive softmax (whose get_log_prob has none)."""
        driver = self.driver(model)
        if not driver.differentiable_adaptive_softmax:
            return super().get_lprobs_and_target(model, net_output, sample)
        lprobs = driver.log_probs(net_output)  # B x T x V
        target = model.get_targets(sample, net_output)  # B x T
        if self.ignore_prefix_size > 0:
            lprobs = lprobs[:, self.ignore_prefix_size :, :].contiguous()
            target = target[:, self.ignore_prefix_size :].contiguous()
        return lprobs.view(-1, lprobs.size(-1)), target.view(-1)

    def forward(self, model, sample, reduce=True):
        """Compute the loss for the given sample.

        Returns a tuple with three elements:
        1) the loss
        2) the sample size, which is used as the denominator for the gradient
        3) logging outputs to display while training
        """
        driver = self.driver(model)
        prob = self.current_prob() if model.training else 0.0
        gold = driver.decoder_inputs(sample)
        if prob > 0.0:
            check_teacher_forcing_shift(gold, sample["target"], self.padding_idx, self.criterion_name)
            net_output, tokens, from_model = self.conditioned_forward(driver, sample, prob)
        else:
            net_output, tokens, from_model = model(**sample["net_input"]), gold, None
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        replaceable = self.replaceable(gold)
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            "ss_prob_sum": prob,
            "ss_prob_count": 1,
            "ss_positions": utils.item(replaceable.sum()),
            "ss_replaced": utils.item((tokens.ne(gold) & replaceable).sum()),
            "ss_from_model": 0 if from_model is None else utils.item((from_model & replaceable).sum()),
        }
        if model.training:
            logging_output.update(self.extra_logging_output())
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def extra_logging_output(self) -> dict:
        """Further per-batch logging values of a subclass (training batches only: validation is
        teacher-forced, and fairseq's validation metrics do not see the update count)."""
        return {}

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        prob_count = total("ss_prob_count")
        if prob_count > 0:
            # p is the same on every worker and micro-batch: the mean recovers it
            metrics.log_scalar("ss_prob", total("ss_prob_sum") / prob_count, prob_count, round=4)
        positions = total("ss_positions")
        if positions > 0:
            # fraction of conditioning tokens that differ from gold / that the model supplied
            metrics.log_scalar("ss_replaced", total("ss_replaced") / positions, positions, round=4)
            metrics.log_scalar("ss_from_model", total("ss_from_model") / positions, positions, round=4)


class ScheduledSamplingCriterionBase(MixingCriterionBase):
    """Hard scheduled sampling: the model's inputs are tokens it samples or argmaxes (--ss-conditioning)."""

    def __init__(self, task, cfg: ScheduledSamplingConfig):
        super().__init__(task, cfg)
        check_conditioning_arguments(cfg.ss_conditioning, cfg.ss_temperature)
        self.conditioning = str(cfg.ss_conditioning)
        self.temperature = 1.0 if cfg.ss_temperature is None else cfg.ss_temperature

    def draw(self, lprobs):
        return draw_tokens(lprobs, self.conditioning, self.temperature, banned=(self.padding_idx,))


def stack_net_output(step_outputs: torch.Tensor):
    """A net_output tuple for B x T x C outputs gathered step by step (no attention kept)."""
    return step_outputs, {"attn": [None], "inner_states": None}

