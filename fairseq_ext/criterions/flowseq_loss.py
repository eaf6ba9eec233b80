"""Criterion ``flowseq_loss``: the negative ELBO of FlowSeq plus its length loss.

Ma, Zhou, Li, Neubig and Hovy, "FlowSeq: Non-Autoregressive Conditional Sequence Generation with
Generative Flow", EMNLP 2019, eq. 8 and sections 3.5, 4.1:

    loss(y | x) = -log P(y | z, x) + w_KL * [log q(z | y, x) - log p(z | x)] - log P(|y| | x),
                  z ~ q(z | y, x)   (single sample; the mean over --flowseq-posterior-samples k)

* reconstruction: fairseq's ``label_smoothed_nll_loss`` (``--label-smoothing``) over the model
  positions (the target, its EOS and the EOS padding up to the prior's length unit);
* KL: the single-sample (or k-sample) Monte Carlo estimate log q - log p of KL(q || p), as in the
  reference implementation (the prior is a flow: no closed form);
* length: cross-entropy over the valid length classes, with label smoothing spread over the valid
  classes only (the -inf-masked ones get no mass; the reference's criterion does the same).

Schedule (on the trainer's update count u, the one it passes to ``train_step``; read through
``fairseq_ext.modules.update_count`` so that a resumed run continues exactly):

* u < N = ``--flowseq-init-updates``: autoencoder pre-training, reconstruction + length with the
  posterior MEAN (no sampling, no KL); the prior is not run, so it gets no gradient (the
  reference's ``init_steps``, the paper's "KL weight zero for 30,000 updates");
* the first update with u >= N: data-dependent init of the prior on that batch's posterior samples
  (``FlowSeqModel.initialize_prior``), once: a model buffer records it, so a resumed or loaded model
  never re-initialises;
* then w_KL = 0 for ``--flowseq-kl-hold-updates`` H more updates, then rises linearly,
  w_KL = min(1, (u - N - H + 1) / W) with W = ``--flowseq-kl-warmup-updates`` (the reference's
  min(1, (step + 1) / 10000) counted from the end of pre-training); W = 0 means w_KL = 1 at once.

Validation reports the ELBO itself (w_KL = 1, posterior samples) once the prior is initialised,
and the pre-training loss (posterior mean, no KL) before.

Normalisation: the loss is summed over sentences and divided by the number of model positions
(or sentences with ``--sentence-avg``), as fairseq's criterions do with tokens.
"""
import math
from dataclasses import dataclass, field

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor

from fairseq_ext.modules.option_checks import check_label_smoothing
from fairseq_ext.modules.update_count import UpdateCountReader


@dataclass
class FlowSeqLossConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.1,
        metadata={"help": "epsilon for label smoothing of the reconstruction term, 0 means none (paper: 0.1)"},
    )
    flowseq_length_label_smoothing: float = field(
        default=0.1,
        metadata={
            "help": "epsilon for label smoothing of the length loss, spread over the valid length classes "
            "only; 0 means none (reference: 0.1)"
        },
    )
    flowseq_length_loss_weight: float = field(
        default=1.0, metadata={"help": "weight of the length loss (reference: 1); 0 leaves the length predictor untrained"}
    )
    flowseq_posterior_samples: int = field(
        default=1,
        metadata={"help": "posterior samples k per sentence for the ELBO's Monte Carlo estimate (reference train_k: 1)"},
    )
    flowseq_init_updates: int = field(
        default=30000,
        metadata={
            "help": "updates of autoencoder pre-training (posterior mean, reconstruction + length loss, no KL, "
            "prior untouched) before the prior's data-dependent init (paper section 4.1 and the reference's "
            "WMT command: 30000; the reference's option default: 5000); 0 starts with the ELBO"
        },
    )
    flowseq_kl_hold_updates: int = field(
        default=0,
        metadata={"help": "further updates with KL weight 0 (posterior sampled, prior trained) after the prior's init"},
    )
    flowseq_kl_warmup_updates: int = field(
        default=10000,
        metadata={
            "help": "updates over which the KL weight then rises linearly to 1 (paper and reference: 10000); "
            "0 means weight 1 at once"
        },
    )
    sentence_avg: bool = II("optimization.sentence_avg")


# -- schedule and losses (pure functions) -------------------------------------------------------
def in_pretraining(update: int, init_updates: int) -> bool:
    """True while the model trains as an autoencoder (posterior mean, no KL, no prior)."""
    return update < init_updates


def kl_weight(update: int, init_updates: int, hold_updates: int, warmup_updates: int) -> float:
    """w_KL at update count ``update`` (0-based, as the trainer passes it to train_step)."""
    start = init_updates + hold_updates
    if update < start:
        return 0.0
    if warmup_updates <= 0:
        return 1.0
    return min(1.0, (update - start + 1) / warmup_updates)


def masked_label_smoothed_nll(log_probs: Tensor, target: Tensor, valid: Tensor, epsilon: float):
    """Label-smoothed cross-entropy over the valid classes only.

        loss = (1 - eps) * -log p(target) + eps * mean_{c valid} -log p(c)

    Args:
        log_probs: B x C, -inf at invalid classes; target: B valid class indices; valid: B x C bool.
    Returns:
        (loss B, nll B).
    """
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)  # B
    smooth = -log_probs.masked_fill(~valid, 0.0).sum(1) / valid.sum(1).clamp(min=1)  # B
    return (1.0 - epsilon) * nll + epsilon * smooth, nll


def unwrap_flowseq(model, who: str):
    """The FlowSeqModel inside DDP / proxy wrappers, or a ValueError naming --arch."""
    from fairseq_ext.models.flowseq import FlowSeqModel

    inner = model
    while not isinstance(inner, FlowSeqModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, FlowSeqModel):
        raise ValueError(
            f"{who} needs a FlowSeq model (--arch flowseq, flowseq_base, flowseq_large, flowseq_iwslt_de_en, "
            f"flowseq_wmt_en_de or flowseq_tiny), got {type(inner).__name__}; change --arch"
        )
    return inner


@register_criterion("flowseq_loss", dataclass=FlowSeqLossConfig)
class FlowSeqLossCriterion(FairseqCriterion):
    def __init__(self, task, cfg: FlowSeqLossConfig):
        super().__init__(task)
        check_label_smoothing(cfg.label_smoothing)
        check_label_smoothing(cfg.flowseq_length_label_smoothing, "--flowseq-length-label-smoothing")
        for name in ("flowseq_init_updates", "flowseq_kl_hold_updates", "flowseq_kl_warmup_updates"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        if cfg.flowseq_posterior_samples < 1:
            raise ValueError(f"--flowseq-posterior-samples must be >= 1, got {cfg.flowseq_posterior_samples}")
        if not cfg.flowseq_length_loss_weight >= 0.0:
            raise ValueError(f"--flowseq-length-loss-weight must be >= 0, got {cfg.flowseq_length_loss_weight}")
        self.cfg = cfg
        self.eps = cfg.label_smoothing
        self.sentence_avg = cfg.sentence_avg
        self.update_count = UpdateCountReader()

    # -- schedule ---------------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int):
        """Fixes the update count the schedule reads (otherwise: the fairseq trainer's)."""
        self.update_count.set_num_updates(num_updates)

    def freezes_prior(self, update: int) -> bool:
        """Whether the prior must get no update at this update count (pre-training)."""
        return in_pretraining(update, self.cfg.flowseq_init_updates)

    def current_kl_weight(self, update: int) -> float:
        c = self.cfg
        return kl_weight(update, c.flowseq_init_updates, c.flowseq_kl_hold_updates, c.flowseq_kl_warmup_updates)

    # -- loss ---------------------------------------------------------------------------------------
    def forward(self, model, sample, reduce=True):
        """Compute the loss for the given sample.

        Returns a tuple with three elements:
        1) the loss
        2) the sample size, which is used as the denominator for the gradient
        3) logging outputs to display while training
        """
        flow = unwrap_flowseq(model, "--criterion flowseq_loss")
        if model.training:
            update = self.update_count()
            pretraining = in_pretraining(update, self.cfg.flowseq_init_updates)
            weight = 0.0 if pretraining else self.current_kl_weight(update)
            init_prior = not pretraining and not flow.prior_initialized
        else:  # validation: the ELBO once the prior exists
            pretraining = not flow.prior_initialized
            weight, init_prior = (0.0 if pretraining else 1.0), False
        k = 1 if pretraining else self.cfg.flowseq_posterior_samples
        out = model(
            **sample["net_input"], target=sample["target"], n_samples=k, random=not pretraining,
            with_prior=not pretraining, init_prior=init_prior,
        )  # fmt: skip
        terms = self.compute_terms(out, k)
        per_sentence = (
            terms["recon"] + weight * terms["kl"] + self.cfg.flowseq_length_loss_weight * terms["length"]
        )  # B
        loss = per_sentence.sum() if reduce else per_sentence
        npositions = out["positions"].sum()
        bsz = sample["target"].size(0)
        sample_size = bsz if self.sentence_avg else utils.item(npositions)
        logging_output = {
            "loss": utils.item(per_sentence.detach().sum()),
            "nll_loss": utils.item(terms["nll"].detach().sum()),
            "recon": utils.item(terms["recon"].detach().sum()),
            "kl": utils.item(terms["kl"].detach().sum()),
            "length_loss": utils.item(terms["length"].detach().sum()),
            "length_nll": utils.item(terms["length_nll"].detach().sum()),
            "kl_weight_sum": weight,
            "kl_weight_count": 1,
            "ntokens": sample["ntokens"],
            "npositions": utils.item(npositions),
            "nsentences": bsz,
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def compute_terms(self, out, k: int):
        """Per-sentence (B) terms from the model's forward dict (see FlowSeqModel.forward)."""
        rec = out["recon"]
        mask = rec["mask"]  # (B*k) x T
        loss, nll = label_smoothed_nll_loss(rec["lprobs"], rec["target"], self.eps, ignore_index=None, reduce=False)
        m = mask.to(loss.dtype)
        recon = (loss * m).sum(1).view(-1, k).mean(1)  # B
        nll = (nll * m).sum(1).view(-1, k).mean(1)  # B
        log_q, log_p = out["kl"]["log_q"], out["kl"]["log_p"]
        kl = (log_q - log_p).float().view(-1, k).mean(1) if log_p is not None else recon.new_zeros(recon.shape)
        lengths = out["length"]
        length, length_nll = masked_label_smoothed_nll(
            lengths["log_probs"], lengths["target"], lengths["valid"], self.cfg.flowseq_length_label_smoothing
        )
        return {"recon": recon, "nll": nll, "kl": kl, "length": length, "length_nll": length_nll}

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        positions = total("npositions")
        sentences = total("nsentences")
        skipped = total("nonfinite_skipped")
        if any("nonfinite_skipped" in log for log in logging_outputs):
            metrics.log_scalar_sum("nonfinite_skipped", skipped)
        for key in ("loss", "recon", "kl", "length_loss"):
            # an update whose every batch was skipped (non-finite) logs 0 with weight 0: it shows as 0
            # on its own log line and leaves the averages over longer intervals unchanged
            value = total(key) / sample_size / math.log(2) if sample_size > 0 else 0.0
            metrics.log_scalar(key, value, sample_size, round=3)
        if positions > 0:
            metrics.log_scalar("nll_loss", total("nll_loss") / positions / math.log(2), positions, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        if sentences > 0:
            metrics.log_scalar("length_nll", total("length_nll") / sentences / math.log(2), sentences, round=3)
        count = total("kl_weight_count")
        if count > 0:
            # the same weight on every worker and micro-batch: the mean recovers it
            metrics.log_scalar("kl_weight", total("kl_weight_sum") / count, count, round=5)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
