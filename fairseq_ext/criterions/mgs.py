"""Criterion ``mgs``: MLE-guided parameter search (Welleck and Cho, "MLE-Guided Parameter Search for
Task Loss Minimization in Neural Sequence Modeling", AAAI 2021, Algorithm 1).

Every training batch (micro-batch under ``--update-freq``):

1. decode it with the current parameters (greedy by default, fairseq's SequenceGenerator, dropout
   off, at most 1.3 x the longest target) and pool the task loss: C(theta) = mean_i c(Y_hat_i, Y_i);
2. compute the MLE gradient (fairseq's label-smoothed cross-entropy, per target token or, with
   ``--sentence-avg``, per sentence) and clip it to ``--mgs-mle-clip-norm`` (Appendix A.4);
3. draw K candidates Delta_k from the mixture pi N(0, sigma^2) + (1 - pi) N(m, sigma^2) around 0 and
   around the MLE step m = -clip(grad) (eq. 4; :mod:`fairseq_ext.modules.parameter_search`), decode
   the batch with theta + Delta_k and pool its task loss C(theta + Delta_k);
4. weight them, w_k proportional to exp(alpha (C(theta) - C(theta + Delta_k))) / q(Delta_k)
   (eq. 3, 9), and hand Delta_MGS = sum_k w_k Delta_k to fairseq's optimizer as the gradient -Delta_MGS
   (fairseq's optimizers step theta <- theta - lr * grad).

How the direction reaches the optimizer.  fairseq's trainer back-propagates whatever loss a criterion
returns, sums the gradients over micro-batches and workers, and divides by the summed sample sizes.
This criterion returns a surrogate whose gradient is exactly -Delta_MGS, sum_p <-Delta_MGS_p, theta_p>
(one multiply-add per parameter, no extra graph), with sample size 1: the trainer then applies the
mean of the micro-batches' directions (each already pooled over all workers), its ``--clip-norm``
clips it (the authors' code clips the direction to norm 1 before its optimizer step) and its LR
scheduler steps as for any criterion (the authors' code never steps one).  The surrogate's *value*
is the MLE loss (the surrogate minus its detached self is 0), so the returned number means something.

Logged (training): ``loss``/``nll_loss`` are the MLE loss, as in validation; ``mgs_cost`` the pooled
task loss of the current parameters, ``mgs_best_cost`` that of the best candidate (Figure 1),
``mgs_weight_std`` the standard deviation of the K normalised weights (Figure 2), ``mgs_mle_weight``
the total weight of MLE-component candidates (Figure 3), ``mgs_mle_won`` the share of updates whose
largest weight went to an MLE-component candidate, ``mgs_nonterm`` / ``mgs_repetition`` /
``mgs_length`` the non-termination rate, 4-gram repetition and length of the current decodes (section
5.1), ``mgs_grad_norm`` the MLE gradient's norm before clipping.

Validation computes the plain MLE loss (label-smoothed cross-entropy), not the task loss: select
checkpoints by a decoding metric (``--eval-bleu``) as the paper does.

Random streams.  Candidate noise, component choices and sampled decodes are drawn from generators
seeded by (``--seed``, update count, micro-batch index, candidate, tensor), never from the global RNG:
a resumed run draws exactly the candidates the uninterrupted run would, and all data-parallel workers
draw the same ones.  Each worker decodes its own shard; the task-loss sums, sentence counts, MLE
gradient and its normaliser are all-reduced with fairseq's ``distributed_utils.all_reduce``, so every
worker computes the same direction, and 2 workers equal 1 worker on the same global batch.

Text completion (section 5.1): under ``--task text_completion`` a decoder-only language model
(``--arch transformer_lm``) is searched the same way; every decode continues the examples' prefixes and the
MLE loss covers the continuations only.

Memory: the candidates are regenerated from their seeds, never stored (Appendix A.3); one copy of the
parameters restores them bit for bit after each candidate; the MLE gradient and the direction add one
parameter-sized tensor each: peak = an MLE step + 2 x parameters.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics
from omegaconf import II

from fairseq_ext.modules.decoder_driver import UnsupportedModelError, submodules_callable_directly, unwrap_model
from fairseq_ext.modules.option_checks import check_label_smoothing
from fairseq_ext.modules.parameter_search import (
    ASSIGNMENT_CHOICES,
    DENSITY_CHOICES,
    NOISE_SCALE_CHOICES,
    CandidateSampler,
    ParameterSnapshot,
    apply_candidate_,
    assign_components,
    clip_global_norm_,
    importance_weights,
    noise_scales,
    proposal_log_density,
    stream_seed,
    weight_statistics,
)
from fairseq_ext.modules.sequence_decoding import BatchDecoder, prefixes, references
from fairseq_ext.modules.task_losses import (
    TASK_LOSSES,
    LanguageModelScorer,
    TaskLossBatch,
    compute_task_loss,
    get_task_loss,
    ngram_repetition,
)
from fairseq_ext.modules.update_count import UpdateCountReader

# stream tags: which random stream of an update a seed is for (candidate noise uses (k, tensor) instead)
COMPONENT_STREAM = 0x434F4D50  # "COMP"
DECODE_STREAM = 0x4445434F  # "DECO"
REPETITION_ORDER = 4  # section 5.1: duplicate 4-grams


@dataclass
class MLEGuidedParameterSearchConfig(LabelSmoothedCrossEntropyCriterionConfig):
    mgs_num_candidates: int = field(
        default=4, metadata={"help": "K, candidate directions per batch (the paper uses 4; Algorithm 1)"}
    )
    mgs_alpha: float = field(
        default=100.0,
        metadata={
            "help": "temperature alpha of the weights exp(alpha (C(theta) - C(theta + Delta))) (eq. 2): 0 gives "
            "uniform task-loss weights, large values put all weight on the best candidate. The paper uses 100 "
            "for MT fine-tuning and 1 for training from scratch and for its GPT-2 MGS-LM runs"
        },
    )
    mgs_noise: float = field(
        default=1.0,
        metadata={
            "help": "noise level: sigma = noise * mean |grad| of each tensor (--mgs-noise-scale tensor, Appendix "
            "A.4); 0 makes every candidate exactly 0 or the MLE step. The paper's grid: 0.01, 0.1, 1"
        },
    )
    mgs_noise_scale: NOISE_SCALE_CHOICES = field(
        default="tensor",
        metadata={
            "help": "tensor: sigma_p = noise * mean |g_p| per weight tensor (the paper's experiments); global: one "
            "sigma = noise * mean |g| over all parameters; constant: sigma = noise (an option of the authors' code)"
        },
    )
    mgs_mix_prob: float = field(
        default=0.5,
        metadata={
            "help": "pi, the probability of the zero-mean component of the proposal (eq. 4); 1 - pi goes to the "
            "component around the MLE step. 0.5 in the paper"
        },
    )
    mgs_zero_only: bool = field(
        default=False,
        metadata={"help": "ablation q_zero (Table 7): only the zero-mean component (pi = 1)"},
    )
    mgs_mle_only: bool = field(
        default=False,
        metadata={"help": "ablation q_MLE (Table 7): only the component around the MLE step (pi = 0)"},
    )
    mgs_component_assignment: ASSIGNMENT_CHOICES = field(
        default="sample",
        metadata={
            "help": "sample: each candidate's component drawn with probability pi (Algorithm 1); alternate: "
            "deterministic, evenly spread (with pi = 0.5: MLE, zero, MLE, zero, as the authors' code)"
        },
    )
    mgs_proposal_density: DENSITY_CHOICES = field(
        default="unit",
        metadata={
            "help": "log q(Delta) in the importance weights: unit: the mixture with unit variances, as the authors' "
            "code (the default, pending a measured comparison); exact: eq. 4 with the real sigmas (its log "
            "spreads by about sqrt(D/2) nats over D parameters, which can swamp the task loss); none: no "
            "correction"
        },
    )
    mgs_task_loss: str = field(
        default="bleu",
        metadata={
            "help": "sequence-level cost c(Y_hat, Y), lower is better, from fairseq_ext.modules.task_losses: bleu "
            "(1 - sentence BLEU/100), chrf (1 - chrF/100), edit (token edit distance / reference length), lm "
            "(NLL under --mgs-lm-scorer-path), or any loss registered by a --user-dir module"
        },
    )
    mgs_lm_scorer_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "with --mgs-task-loss lm: a --task language_modeling checkpoint over the target dictionary, "
            "kept frozen, that scores the decoded tokens (the paper uses the MLE model MGS starts from)"
        },
    )
    mgs_mle_clip_norm: float = field(
        default=1.0,
        metadata={"help": "clip the MLE gradient to this L2 norm before sampling (Appendix A.4: 1.0); 0: no clipping"},
    )
    mgs_beam: int = field(
        default=1, metadata={"help": "beam size of the training decodes (1: greedy, as the paper)"}
    )
    mgs_sampling: bool = field(
        default=False,
        metadata={"help": "sample the training decodes instead of searching (the same seed for every candidate)"},
    )
    mgs_sampling_topk: int = field(default=-1, metadata={"help": "with --mgs-sampling: sample from the top k only"})
    mgs_sampling_topp: float = field(
        default=-1.0, metadata={"help": "with --mgs-sampling: sample from the smallest set of mass >= p only"}
    )
    mgs_max_len_ratio: float = field(
        default=1.3,
        metadata={"help": "maximum training decode length, as a multiple of the batch's longest target (paper: 1.3)"},
    )
    mgs_post_process: Optional[str] = field(
        default=None,
        metadata={
            "help": "how bleu/chrf turn tokens into text, as fairseq's --post-process (subword_nmt, sentencepiece, "
            "'@@ ', ...); default: tokens joined by spaces"
        },
    )
    mgs_sacrebleu_tokenize: str = field(
        default="none",
        metadata={"help": "sacreBLEU tokenizer of the bleu cost: none for already tokenised text, 13a for raw text"},
    )
    seed: int = II("common.seed")


def check_mgs_options(cfg: MLEGuidedParameterSearchConfig) -> float:
    """Refuses impossible settings before training, naming the flag; returns the effective pi."""
    if cfg.mgs_num_candidates < 1:
        raise ValueError(f"--mgs-num-candidates must be >= 1 (the paper uses 4), got {cfg.mgs_num_candidates}")
    if not (math.isfinite(cfg.mgs_alpha) and cfg.mgs_alpha >= 0):
        raise ValueError(f"--mgs-alpha must be a finite number >= 0 (paper: 1 to 100), got {cfg.mgs_alpha}")
    if not (math.isfinite(cfg.mgs_noise) and cfg.mgs_noise >= 0):
        raise ValueError(f"--mgs-noise must be a finite number >= 0 (paper: 0.01 to 1), got {cfg.mgs_noise}")
    if not 0.0 <= cfg.mgs_mix_prob <= 1.0:
        raise ValueError(f"--mgs-mix-prob is a probability: it must lie in [0, 1], got {cfg.mgs_mix_prob}")
    if cfg.mgs_zero_only and cfg.mgs_mle_only:
        raise ValueError("--mgs-zero-only and --mgs-mle-only exclude each other: pass at most one")
    mix_prob = 1.0 if cfg.mgs_zero_only else 0.0 if cfg.mgs_mle_only else cfg.mgs_mix_prob
    if (cfg.mgs_zero_only or cfg.mgs_mle_only) and cfg.mgs_mix_prob != 0.5 and cfg.mgs_mix_prob != mix_prob:
        flag = "--mgs-zero-only" if cfg.mgs_zero_only else "--mgs-mle-only"
        raise ValueError(f"{flag} sets pi = {mix_prob:g}, which contradicts --mgs-mix-prob {cfg.mgs_mix_prob}: drop one")
    if not (math.isfinite(cfg.mgs_mle_clip_norm) and cfg.mgs_mle_clip_norm >= 0):
        raise ValueError(f"--mgs-mle-clip-norm must be >= 0 (0: no clipping), got {cfg.mgs_mle_clip_norm}")
    if cfg.mgs_beam < 1:
        raise ValueError(f"--mgs-beam must be >= 1 (1: greedy), got {cfg.mgs_beam}")
    if not (math.isfinite(cfg.mgs_max_len_ratio) and cfg.mgs_max_len_ratio > 0):
        raise ValueError(f"--mgs-max-len-ratio must be > 0 (paper: 1.3), got {cfg.mgs_max_len_ratio}")
    if not cfg.mgs_sampling and (cfg.mgs_sampling_topk != -1 or cfg.mgs_sampling_topp != -1.0):
        raise ValueError("--mgs-sampling-topk / --mgs-sampling-topp only apply with --mgs-sampling")
    if cfg.mgs_sampling_topp != -1.0 and not 0.0 < cfg.mgs_sampling_topp <= 1.0:
        raise ValueError(f"--mgs-sampling-topp must lie in (0, 1], got {cfg.mgs_sampling_topp}")
    check_label_smoothing(cfg.label_smoothing)
    loss = get_task_loss(cfg.mgs_task_loss, flag="--mgs-task-loss")
    if loss.needs_scorer and not cfg.mgs_lm_scorer_path:
        raise ValueError(
            f"--mgs-task-loss {loss.name} scores decodes with a frozen language model: pass --mgs-lm-scorer-path "
            "CHECKPOINT (a --task language_modeling checkpoint over the target dictionary)"
        )
    if cfg.mgs_lm_scorer_path and not loss.needs_scorer:
        raise ValueError(
            f"--mgs-lm-scorer-path is only read by --mgs-task-loss lm (got --mgs-task-loss {loss.name}): drop it"
        )
    return mix_prob


@register_criterion("mgs", dataclass=MLEGuidedParameterSearchConfig)
class MLEGuidedParameterSearchCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, cfg: MLEGuidedParameterSearchConfig):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        self.mix_prob = check_mgs_options(cfg)
        self.num_candidates = cfg.mgs_num_candidates
        self.alpha = float(cfg.mgs_alpha)
        self.noise = float(cfg.mgs_noise)
        self.noise_scale = str(cfg.mgs_noise_scale)
        self.assignment = str(cfg.mgs_component_assignment)
        self.density = str(cfg.mgs_proposal_density)
        self.task_loss = cfg.mgs_task_loss
        self.mle_clip_norm = float(cfg.mgs_mle_clip_norm)
        self.post_process = cfg.mgs_post_process
        self.sacrebleu_tokenize = cfg.mgs_sacrebleu_tokenize
        self.seed = int(cfg.seed)
        dictionary = task.target_dictionary
        self.decoder = BatchDecoder(
            dictionary, beam=cfg.mgs_beam, sampling=cfg.mgs_sampling, sampling_topk=cfg.mgs_sampling_topk,
            sampling_topp=cfg.mgs_sampling_topp, max_len_ratio=cfg.mgs_max_len_ratio,
        )  # fmt: skip
        # a plain attribute holding a plain object: the scorer's weights are not the criterion's parameters
        self.scorer = (
            LanguageModelScorer.from_checkpoint(cfg.mgs_lm_scorer_path, dictionary)
            if TASK_LOSSES[self.task_loss].needs_scorer
            else None
        )
        self.update_count = UpdateCountReader()
        self._position = (None, -1)  # (update count, micro-batch index) of the last training call

    # -- plumbing --------------------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int):
        """Fixes the update count the random streams read (otherwise: the fairseq trainer's)."""
        self.update_count.set_num_updates(num_updates)

    def next_position(self):
        """(update count, micro-batch index within the update) of this training call."""
        update = self.update_count()
        last_update, micro = self._position
        self._position = (update, micro + 1 if update == last_update else 0)
        return self._position

    def searchable_model(self, model, sample):
        """The unwrapped model (encoder-decoder, or a language model on text-completion samples); refuses
        wrappers and models MGS cannot drive."""
        if not submodules_callable_directly(model):
            raise UnsupportedModelError(
                "--criterion mgs computes and all-reduces its own update direction and cannot run under "
                "--ddp-backend pytorch_ddp/c10d or fully_sharded: use --ddp-backend legacy_ddp (or no_c10d)"
            )
        from fairseq.models import FairseqEncoderDecoderModel, FairseqLanguageModel

        inner = unwrap_model(model)
        if isinstance(inner, FairseqLanguageModel) and sample.get("prefix_tokens") is not None:
            return inner  # text completion (section 5.1): continuations of each example's prefix
        if not isinstance(inner, FairseqEncoderDecoderModel):
            raise UnsupportedModelError(
                f"--criterion mgs decodes with fairseq's SequenceGenerator and needs an encoder-decoder model "
                f"(translation: --arch transformer, lstm, fconv, ...) or a language model under --task "
                f"text_completion (prefix -> continuation pairs); got {type(inner).__name__}"
            )
        return inner

    def costs(self, hypotheses, terminated, refs, prefix_lists=None) -> List[float]:
        batch = TaskLossBatch(
            hypotheses, terminated, refs, dictionary=self.task.target_dictionary, post_process=self.post_process,
            sacrebleu_tokenize=self.sacrebleu_tokenize, prefixes=prefix_lists, scorer=self.scorer,
        )  # fmt: skip
        return compute_task_loss(self.task_loss, batch)

    def forward(self, model, sample, reduce=True):
        """Compute the loss for the given sample.

        Returns a tuple with three elements:
        1) the loss (training: the surrogate whose gradient is -Delta_MGS, valued as the MLE loss;
           validation: the label-smoothed cross-entropy)
        2) the sample size, which is used as the denominator for the gradient (training: 1)
        3) logging outputs to display while training
        """
        if not model.training:
            return super().forward(model, sample, reduce=reduce)
        if not reduce:
            raise ValueError("--criterion mgs computes one update direction per batch: reduce=False is not defined")
        return self.search_step(model, sample)

    def search_step(self, model, sample):
        from fairseq.distributed import utils as distributed_utils

        inner = self.searchable_model(model, sample)
        params = [p for p in inner.parameters() if p.requires_grad]
        update, micro = self.next_position()
        group = distributed_utils.get_data_parallel_group()
        world = distributed_utils.get_data_parallel_world_size()
        if self.scorer is not None:
            self.scorer.to(params[0].device)
        decode_seed = stream_seed(self.seed, update, micro, DECODE_STREAM)
        refs = references(sample, self.task.target_dictionary)
        prefix_lists = prefixes(sample)  # text completion: the lm cost scores continuations of them

        # 1. decode with the current parameters; pooled task loss C(theta)
        hyps, done = self.decoder.decode_best(inner, sample, seed=decode_seed)
        current_costs = self.costs(hyps, done, refs, prefix_lists)

        # 2. the MLE gradient, pooled over workers, clipped (Appendix A.4); m = -g is the MLE step
        net_output = inner(**sample["net_input"])
        mle_loss, nll_loss = self.compute_loss(inner, net_output, sample, reduce=True)
        denominator = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        grads = torch.autograd.grad(mle_loss, params, allow_unused=True)
        mle_step = [
            torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().to(torch.float32, copy=True)
            for p, g in zip(params, grads)
        ]  # fmt: skip
        del grads
        total = torch.tensor([float(denominator)], dtype=torch.float64, device=params[0].device)
        if world > 1:
            for g in mle_step:
                distributed_utils.all_reduce(g, group)
            distributed_utils.all_reduce(total, group)
        for g in mle_step:
            g.div_(max(float(total), 1.0)).neg_()
        grad_norm = clip_global_norm_(mle_step, self.mle_clip_norm)

        # 3. K candidates around 0 and m, each decoded with theta + Delta_k, then theta restored exactly
        sigmas = noise_scales(mle_step, self.noise, self.noise_scale)
        from_mle = assign_components(
            self.num_candidates, self.mix_prob, self.assignment, stream_seed(self.seed, update, micro, COMPONENT_STREAM)
        )
        sampler = CandidateSampler(mle_step, sigmas, from_mle, (self.seed, update, micro))
        snapshot = ParameterSnapshot(params)
        norms, candidate_sums = [], []
        try:
            for k in range(self.num_candidates):
                norms.append(apply_candidate_(params, sampler, k))
                cand_hyps, cand_done = self.decoder.decode_best(inner, sample, seed=decode_seed)
                candidate_sums.append(math.fsum(self.costs(cand_hyps, cand_done, refs, prefix_lists)))
                snapshot.restore()
        finally:
            snapshot.restore()
            snapshot.release()

        # 4. pool the task losses over workers; weights (eq. 3, 9); the direction sum_k w_k Delta_k
        pooled = torch.tensor([math.fsum(current_costs), *candidate_sums, float(len(refs))], dtype=torch.float64)
        if world > 1:
            pooled = pooled.to(params[0].device)
            distributed_utils.all_reduce(pooled, group)
            pooled = pooled.cpu()
        count = max(float(pooled[-1]), 1.0)
        current_cost, candidate_costs = float(pooled[0]) / count, pooled[1:-1] / count  # C(theta); K
        log_q = proposal_log_density(norms, self.mix_prob, self.density)  # K
        weights = importance_weights(current_cost, candidate_costs, log_q, self.alpha)  # K, sum 1
        direction = sampler.direction(weights.tolist())
        del mle_step, sampler

        # 5. the surrogate: gradient -Delta_MGS (fairseq steps theta - lr * grad), value the MLE loss
        surrogate = sum((-(d.to(p.dtype) * p)).sum() for d, p in zip(direction, params))
        loss = mle_loss.detach() + (surrogate - surrogate.detach())

        std, mle_weight, mle_won = weight_statistics(weights, from_mle)
        best = int(torch.argmin(candidate_costs))
        repetitions = [r for r in (ngram_repetition(h, REPETITION_ORDER) for h in hyps) if r is not None]
        logging_output = {
            "loss": mle_loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": denominator,  # of the logged MLE loss; the trainer gets 1 (see the module docstring)
            "mgs_sentences": len(refs),
            "mgs_cost": math.fsum(current_costs),
            "mgs_best_cost": candidate_sums[best],
            "mgs_nonterm": sum(1 for d in done if not d),
            "mgs_length": sum(len(h) for h in hyps),
            "mgs_repetition": math.fsum(repetitions),
            "mgs_repetition_count": len(repetitions),
            # per-update values, equal on every worker and micro-batch: reduce_metrics averages them
            "mgs_steps": 1,
            "mgs_weight_std": std,
            "mgs_mle_weight": mle_weight,
            "mgs_mle_won": mle_won,
            "mgs_grad_norm": grad_norm,
        }
        if self.report_accuracy:
            n_correct, n_total = self.compute_accuracy(inner, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(n_total.data)
        return loss, 1, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sentences, steps = total("mgs_sentences"), total("mgs_steps")
        if sentences > 0:
            for key in ("mgs_cost", "mgs_best_cost", "mgs_nonterm", "mgs_length"):
                metrics.log_scalar(key, total(key) / sentences, sentences, round=4)
        repeated = total("mgs_repetition_count")
        if repeated > 0:
            metrics.log_scalar("mgs_repetition", total("mgs_repetition") / repeated, repeated, round=4)
        if steps > 0:
            for key in ("mgs_weight_std", "mgs_mle_weight", "mgs_mle_won", "mgs_grad_norm"):
                metrics.log_scalar(key, total(key) / steps, steps, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
