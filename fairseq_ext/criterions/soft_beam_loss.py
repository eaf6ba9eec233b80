"""Criterion ``soft_beam_loss``: training through a continuous relaxation of beam search (Goyal,
Rakesh, Dyer, Berg-Kirkpatrick 2018; thesis chapter 4) with local or global normalization (Goyal,
Dyer, Berg-Kirkpatrick 2019; thesis chapter 5).

The relaxed beam (Algorithm 3, :mod:`fairseq_ext.modules.soft_beam_search`) runs k soft beam
elements for the sentence's horizon, mixing their decoder states by soft backpointers and feeding
soft embeddings, and tracks each element's running Hamming loss D.  Objectives:

* ``--soft-beam-objective direct`` (G~_DL, eq. 4.2): L = peaked-softmax_alpha(s_T) . D_T;
* ``hinge`` (G~_hinge, section 4.4): successor scores are cost-augmented (s~ + d(w)), and
  L = max(0, s_max - s(y*)) with s_max = peaked-softmax_alpha(s_T) . s_T and s(y*) the
  teacher-forced score of the gold sequence.

Successor scores are log-probabilities (``--soft-beam-normalization local``) or the decoder's raw
scores (``global``, section 5.2: a globally normalised model; warm-start it from a
``self_normalized_cross_entropy`` checkpoint, section 5.3.1).  Warm starts go through fairseq's
usual flags: ``--restore-file CKPT --reset-optimizer --reset-dataloader --reset-meters
--reset-lr-scheduler``.

Lengths (``--soft-beam-length``): ``gold`` runs exactly the gold length, EOS forced at its end
(tagging: one label per word; the default for ``--task tagging``); ``free`` runs the gold length
plus ``--soft-beam-extra-steps`` with finished hypotheses absorbing and the gold padded with EOS,
so a hypothesis that stops early pays one unit per missing token and one that runs on pays one per
extra token (the default for translation).

The loss is summed over sentences and divided, as fairseq does, by the number of target tokens
(``--sentence-avg``: sentences), so the logged ``loss`` is the expected Hamming loss per token of
the relaxed beam (direct) or the hinge per token.  Validation computes the same loss at the current
alpha.  ``map_errors`` is the Hamming error rate of the hard path of the best element.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_ext.generators.soft_beam_generator import first_step_choices
from fairseq_ext.generators.tagging_generator import label_mask
from fairseq_ext.modules.schedules import ALPHA_CEILING, ALPHA_SCHEDULE_CHOICES, AlphaSchedule, check_alpha_arguments
from fairseq_ext.modules.soft_beam_search import (
    SoftBeamSearch,
    gold_padded_with_eos,
    hamming_step_costs,
    soft_select,
)
from fairseq_ext.modules.update_count import UpdateCountReader

OBJECTIVE_CHOICES = ChoiceEnum(["direct", "hinge"])
NORMALIZATION_CHOICES = ChoiceEnum(["local", "global"])
LENGTH_CHOICES = ChoiceEnum(["auto", "gold", "free"])
DEFAULT_EXTRA_STEPS = 5
LEFT_PAD_TARGET_MESSAGE = (
    "--criterion soft_beam_loss reads the gold target step by step from its first column and pads it with EOS on "
    "the right, so it needs right-padded targets (fairseq's default): drop --left-pad-target"
)


@dataclass
class SoftBeamLossConfig(FairseqDataclass):
    soft_beam_size: int = field(
        default=3, metadata={"help": "beam size k of the relaxed beam search (the thesis trains with 3; 5 for CCG)"}
    )
    soft_beam_alpha: float = field(
        default=1.0,
        metadata={
            "help": "peakedness alpha of the continuous top-k-argmax and of the final soft selection (its initial "
            f"value with --soft-beam-alpha-schedule exponential); large alpha approaches hard beam search. "
            f"Values above {ALPHA_CEILING:g} act as {ALPHA_CEILING:g}, where the relaxation is already hard in float32"
        },
    )
    soft_beam_alpha_schedule: ALPHA_SCHEDULE_CHOICES = field(
        default="fixed",
        metadata={
            "help": "fixed (the thesis's 'alpha = 1.0' rows) or exponential: alpha * G ** (u / N), capped by "
            f"--soft-beam-alpha-max and always by {ALPHA_CEILING:g} (the 'annealed alpha' rows: from smooth to "
            "peaked across epochs)"
        },
    )
    soft_beam_alpha_growth: Optional[float] = field(
        default=None, metadata={"help": "factor G by which exponential annealing multiplies alpha every N updates"}
    )
    soft_beam_alpha_period_updates: Optional[int] = field(
        default=None, metadata={"help": "updates N per factor G of exponential annealing (an epoch's worth: the thesis)"}
    )
    soft_beam_alpha_max: Optional[float] = field(
        default=None,
        metadata={
            "help": f"cap on the annealed alpha, >= --soft-beam-alpha (default: {ALPHA_CEILING:g}, where the "
            "relaxation is already hard in float32; a larger cap acts as it: beyond it alpha times a squared score "
            "gap would overflow float32 and the loss turn NaN)"
        },
    )
    soft_beam_objective: OBJECTIVE_CHOICES = field(
        default="direct",
        metadata={
            "help": "direct: the relaxed direct loss peaked-softmax(s_T) . D_T (eq. 4.2); hinge: the relaxed "
            "structured hinge max(0, s_max - s(y*)) over cost-augmented scores (section 4.4)"
        },
    )
    soft_beam_normalization: NORMALIZATION_CHOICES = field(
        default="local",
        metadata={
            "help": "local: log-normalised successor scores (log-softmax); global: the decoder's raw scores, a "
            "globally normalised model (section 5.2; warm-start it from self_normalized_cross_entropy)"
        },
    )
    soft_beam_cost_weights: str = field(
        default="",
        metadata={
            "help": "per-label weights of the Hamming cost, 'LABEL:W,LABEL:W': predicting LABEL wrongly costs W "
            "instead of 1. The thesis doubles the cost of a wrong 'O' for NER: 'O:2'. Default: all 1"
        },
    )
    soft_beam_length: LENGTH_CHOICES = field(
        default="auto",
        metadata={
            "help": "gold: exactly the gold length with EOS forced at its end (tagging); free: the gold length plus "
            "--soft-beam-extra-steps, finished hypotheses absorbing, the gold EOS-padded (translation); "
            "auto: gold for --task tagging, free otherwise"
        },
    )
    soft_beam_extra_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": f"with free length: steps beyond the gold length over which longer hypotheses are costed "
            f"(default {DEFAULT_EXTRA_STEPS}); rejected with gold length"
        },
    )
    sentence_avg: bool = II("optimization.sentence_avg")


def parse_cost_weights(spec: str, dictionary) -> torch.Tensor:
    """'O:2,B-PER:1.5' -> V weights (1 elsewhere); raises naming --soft-beam-cost-weights."""
    weights = torch.ones(len(dictionary))
    for item in filter(None, (part.strip() for part in spec.split(","))):
        label, sep, value = item.rpartition(":")
        if not sep or not label:
            raise ValueError(f"--soft-beam-cost-weights: {item!r} is not LABEL:WEIGHT (e.g. 'O:2')")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--soft-beam-cost-weights: weight {value!r} of {label!r} is not a number") from None
        if not weight >= 0.0:
            raise ValueError(f"--soft-beam-cost-weights: weight of {label!r} must be >= 0, got {weight}")
        index = dictionary.index(label)
        if index == dictionary.unk() and label != dictionary.unk_word:
            raise ValueError(
                f"--soft-beam-cost-weights: label {label!r} is not in the target dictionary "
                f"({len(dictionary)} symbols, e.g. {', '.join(dictionary.symbols[dictionary.nspecial:][:6])})"
            )
        weights[index] = weight
    return weights


@register_criterion("soft_beam_loss", dataclass=SoftBeamLossConfig)
class SoftBeamLossCriterion(FairseqCriterion):
    def __init__(self, task, cfg: SoftBeamLossConfig):
        super().__init__(task)
        if cfg.soft_beam_size < 1:
            raise ValueError(f"--soft-beam-size must be >= 1, got {cfg.soft_beam_size}")
        if getattr(getattr(task, "cfg", None), "left_pad_target", False):
            raise ValueError(LEFT_PAD_TARGET_MESSAGE)
        if cfg.soft_beam_extra_steps is not None and cfg.soft_beam_extra_steps < 0:
            raise ValueError(f"--soft-beam-extra-steps must be >= 0, got {cfg.soft_beam_extra_steps}")
        check_alpha_arguments(
            cfg.soft_beam_alpha_schedule, cfg.soft_beam_alpha, cfg.soft_beam_alpha_growth,
            cfg.soft_beam_alpha_period_updates, cfg.soft_beam_alpha_max, flag_prefix="--soft-beam-alpha",
        )  # fmt: skip
        self.alpha_schedule = AlphaSchedule(
            name=str(cfg.soft_beam_alpha_schedule),
            alpha=cfg.soft_beam_alpha,
            growth=cfg.soft_beam_alpha_growth,
            period_updates=cfg.soft_beam_alpha_period_updates,
            alpha_max=cfg.soft_beam_alpha_max,
            flag_prefix="--soft-beam-alpha",
        )
        from fairseq_ext.tasks.tagging import TaggingTask  # the task imports the generators, not criterions

        tagging = isinstance(task, TaggingTask)
        length = str(cfg.soft_beam_length)
        self.fixed_length = tagging if length == "auto" else length == "gold"
        if self.fixed_length and cfg.soft_beam_extra_steps is not None:
            raise ValueError(
                "--soft-beam-extra-steps only applies to free length (translation); with gold length (tagging: "
                "one label per word) the horizon is the gold length: drop it or set --soft-beam-length free"
            )
        if self.fixed_length:
            self.extra_steps = 0
        else:
            self.extra_steps = DEFAULT_EXTRA_STEPS if cfg.soft_beam_extra_steps is None else cfg.soft_beam_extra_steps
        dictionary = task.target_dictionary
        self.allowed = label_mask(dictionary) if tagging else None
        limit = first_step_choices(dictionary, self.allowed)
        if cfg.soft_beam_size > limit:
            # the first step expands one element: each beam element needs its own first token
            raise ValueError(
                f"--soft-beam-size {cfg.soft_beam_size} exceeds the {limit} "
                f"{'labels' if tagging else 'tokens of the target dictionary'} a hypothesis can start with: "
                f"use --soft-beam-size {limit} or less"
            )
        self.cost_weights = parse_cost_weights(cfg.soft_beam_cost_weights, dictionary)
        self.beam_size = cfg.soft_beam_size
        self.objective = str(cfg.soft_beam_objective)
        self.normalization = str(cfg.soft_beam_normalization)
        self.sentence_avg = cfg.sentence_avg
        self.eos = dictionary.eos()
        self.update_count = UpdateCountReader()
        self._search: Optional[SoftBeamSearch] = None

    def set_num_updates(self, num_updates: int):
        """Fixes the update count the alpha schedule reads (otherwise: the fairseq trainer's)."""
        self.update_count.set_num_updates(num_updates)

    def current_alpha(self) -> float:
        return self.alpha_schedule(self.update_count())

    def search(self, model) -> SoftBeamSearch:
        if self._search is None or self._search.driver.model is not model:
            self._search = SoftBeamSearch(
                model, self.task.target_dictionary, self.beam_size, self.normalization, self.allowed,
                name="soft_beam_loss",
            )  # raises for a model it cannot drive
        return self._search

    def forward(self, model, sample, reduce=True):
        """Compute the loss for the given sample.

        Returns a tuple with three elements:
        1) the loss
        2) the sample size, which is used as the denominator for the gradient
        3) logging outputs to display while training
        """
        search = self.search(model)
        target = sample["target"]  # B x T, EOS-terminated, right-padded
        if bool(target[:, 0].eq(self.padding_idx).any()):  # a right-padded row starts with a token, at least EOS
            raise ValueError(LEFT_PAD_TARGET_MESSAGE)
        lengths = target.ne(self.padding_idx).sum(-1)  # B, the EOS included
        horizons = lengths + self.extra_steps
        gold = gold_padded_with_eos(target, self.padding_idx, self.eos, int(horizons.max()))  # B x H
        weights = self.cost_weights.to(target.device)
        alpha = self.current_alpha()
        net_input = sample["net_input"]
        result = search.run(
            net_input["src_tokens"], net_input["src_lengths"], horizons, alpha,
            step_costs=lambda t: hamming_step_costs(gold[:, t], weights),
            cost_augmented=self.objective == "hinge", fixed_length=self.fixed_length,
        )  # fmt: skip
        if self.objective == "direct":
            losses = soft_select(result.scores, result.losses, alpha)  # B (line 19)
        else:
            best_cost_augmented = soft_select(result.scores, result.scores, alpha)  # s_max
            losses = torch.relu(best_cost_augmented - search.gold_scores(sample))  # B
        loss = losses.sum() if reduce else losses
        sample_size = target.size(0) if self.sentence_avg else sample["ntokens"]

        with torch.no_grad():
            best = result.scores.argmax(-1)  # B: the element with the highest score, its hard path
            path = result.tokens[torch.arange(target.size(0), device=target.device), best]  # B x H
            within = torch.arange(path.size(1), device=path.device).unsqueeze(0) < horizons.unsqueeze(1)
            map_errors = (path.ne(gold[:, : path.size(1)]) & within).sum()
            soft_hamming = soft_select(result.scores, result.losses, alpha).sum()
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": target.size(0),
            "sample_size": sample_size,
            "soft_hamming": soft_hamming.data,
            "map_errors": utils.item(map_errors),
            "horizon_tokens": utils.item(horizons.sum()),
        }
        if model.training:
            logging_output.update({"sb_alpha_sum": alpha, "sb_alpha_count": 1})
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=4)
        ntokens, horizon = total("ntokens"), total("horizon_tokens")
        metrics.log_scalar("soft_hamming", total("soft_hamming") / max(ntokens, 1), ntokens, round=4)
        if horizon > 0:
            metrics.log_scalar("map_errors", total("map_errors") / horizon, horizon, round=4)
        count = total("sb_alpha_count")
        if count > 0:  # alpha is the same on every worker and micro-batch: the mean recovers it
            metrics.log_scalar("sb_alpha", total("sb_alpha_sum") / count, count, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
