"""Criterion ``self_normalized_cross_entropy``: cross-entropy plus an L2 penalty on the local
log-normaliser (Goyal's thesis, section 5.3.1; Devlin et al. 2014; Andreas and Klein 2015).

    loss = sum_i [ -log p(y*_i | x, y*_<i) ] + lambda * sum_i (log Z_i)^2,    log Z_i = logsumexp_y s_i(y)

(the thesis's L2-regularised objective; with --label-smoothing the first term is fairseq's
label-smoothed cross-entropy, reused).  A model trained so that log Z_i ~ 0 can be read as a
globally normalised one (its raw scores are log-probabilities), which is how the soft beam search
loss with global normalisation is warm-started.  It logs the mean and variance of log Z over the
target positions, on training and validation batches alike (the quantities of Table 5.1).
lambda = 0 is exactly ``label_smoothed_cross_entropy`` (tested).
"""
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics
from torch import Tensor

from fairseq_ext.modules.option_checks import check_label_smoothing


@dataclass
class SelfNormalizedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    self_norm_lambda: float = field(
        default=0.1,
        metadata={
            "help": "weight lambda of the penalty lambda * sum_i (log Z_i)^2 on the local log-normalisers; "
            "0 = cross-entropy"
        },
    )


def log_normalizers(logits: Tensor) -> Tensor:
    """log Z_i = logsumexp_y s_i(y): B x T x V raw scores -> B x T (in float32 at least)."""
    return torch.logsumexp(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)


def squared_log_normalizer_penalty(log_z: Tensor, mask: Tensor) -> Tensor:
    """sum over the ``mask``ed (B x T bool) positions of (log Z_i)^2, per position (B x T, 0 elsewhere)."""
    return log_z.pow(2).masked_fill(~mask, 0.0)


def log_z_moments(meters):
    """(mean, population variance) of log Z from the summed meters."""
    count = meters["_log_z_count"].sum
    mean = meters["_log_z_sum"].sum / count
    return mean, max(meters["_log_z_sq_sum"].sum / count - mean * mean, 0.0)


@register_criterion("self_normalized_cross_entropy", dataclass=SelfNormalizedCrossEntropyConfig)
class SelfNormalizedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, cfg: SelfNormalizedCrossEntropyConfig):
        check_label_smoothing(cfg.label_smoothing)
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        if not cfg.self_norm_lambda >= 0.0:
            raise ValueError(f"--self-norm-lambda must be >= 0, got {cfg.self_norm_lambda}")
        self.self_norm_lambda = cfg.self_norm_lambda

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        if getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is not None:
            raise ValueError(
                "--criterion self_normalized_cross_entropy needs the decoder's full vocabulary scores; "
                "an adaptive softmax has no single log-normaliser per step: drop --adaptive-softmax-cutoff"
            )
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        logits, target = net_output[0], sample["target"]  # B x T x V, B x T
        if self.ignore_prefix_size > 0:
            logits, target = logits[:, self.ignore_prefix_size :], target[:, self.ignore_prefix_size :]
        mask = target.ne(self.padding_idx)  # B x T
        log_z = log_normalizers(logits)  # B x T
        penalty = squared_log_normalizer_penalty(log_z, mask)  # B x T
        if reduce:
            loss = loss + self.self_norm_lambda * penalty.sum()
        else:
            loss = loss + self.self_norm_lambda * penalty.reshape(loss.shape)  # loss is (B*T) x 1 unreduced
        sample_size = target.size(0) if self.sentence_avg else sample["ntokens"]
        log_z_kept = log_z.detach()[mask].double()
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": target.size(0),
            "sample_size": sample_size,
            "log_z_sum": utils.item(log_z_kept.sum()),
            "log_z_sq_sum": utils.item(log_z_kept.pow(2).sum()),
            "log_z_count": utils.item(mask.sum()),
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        count = sum(log.get("log_z_count", 0) for log in logging_outputs)
        if count > 0:
            # sums over the logging interval (or the whole validation set), so the variance is the
            # variance over all its target positions, not an average of per-batch variances
            metrics.log_scalar_sum("_log_z_sum", sum(log.get("log_z_sum", 0.0) for log in logging_outputs))
            metrics.log_scalar_sum("_log_z_sq_sum", sum(log.get("log_z_sq_sum", 0.0) for log in logging_outputs))
            metrics.log_scalar_sum("_log_z_count", count)
            metrics.log_derived("log_z_mean", lambda meters: round(log_z_moments(meters)[0], 3))
            metrics.log_derived("log_z_var", lambda meters: round(log_z_moments(meters)[1], 3))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
