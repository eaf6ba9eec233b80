"""Shared plumbing of the sampling-based sequence-level criteria ``mrt`` and ``policy_gradient``.

Both decode each training batch with fairseq's SequenceGenerator (:mod:`fairseq_ext.modules.sequence_decoding`),
cost the candidates with a task loss of :mod:`fairseq_ext.modules.task_losses`, score them with the model
(:func:`fairseq_ext.modules.sequence_risk.candidate_log_probs`: one encoder pass per sentence, the decoder
over all candidates) and may add the token-level loss.  They run on translation models and, under
``--task text_completion``, on decoder-only language models continuing a prefix (Welleck and Cho,
AAAI 2021, section 5.1).  Validation computes the plain token-level loss (fairseq's label-smoothed
cross-entropy), as criterion ``mgs`` does.
"""
import math
from typing import List, Optional

import torch
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from fairseq_ext.modules.decoder_driver import UnsupportedModelError, submodules_callable_directly, unwrap_model
from fairseq_ext.modules.sequence_decoding import prefixes, references
from fairseq_ext.modules.sequence_risk import Candidates
from fairseq_ext.modules.task_losses import (
    TASK_LOSSES,
    LanguageModelScorer,
    TaskLossBatch,
    compute_task_loss,
    get_task_loss,
)
from fairseq_ext.modules.update_count import UpdateCountReader

DECODE_STREAM = 0x4445434F  # "DECO": the random stream of sampled candidates (see parameter_search.stream_seed)


def check_task_loss_options(prefix: str, task_loss: str, lm_scorer_path: Optional[str]):
    """Refuses an unknown task loss and a scorer path given to (or missing from) the lm loss, naming the flags."""
    loss = get_task_loss(task_loss, flag=f"--{prefix}-task-loss")
    if loss.needs_scorer and not lm_scorer_path:
        raise ValueError(
            f"--{prefix}-task-loss {loss.name} scores decodes with a frozen language model: pass "
            f"--{prefix}-lm-scorer-path CHECKPOINT (a --task language_modeling checkpoint over the target dictionary)"
        )
    if lm_scorer_path and not loss.needs_scorer:
        raise ValueError(
            f"--{prefix}-lm-scorer-path is only read by --{prefix}-task-loss lm (got --{prefix}-task-loss "
            f"{loss.name}): drop it"
        )


def check_decoding_options(prefix: str, sampling: bool, topk: int, topp: float, temperature: float,
                           max_len_ratio: float, num_candidates: int, count_flag: str):  # fmt: skip
    """Refuses impossible decoding settings, naming the flags (``count_flag``: the number of candidates)."""
    if num_candidates < 1:
        raise ValueError(f"{count_flag} must be >= 1, got {num_candidates}")
    if not (math.isfinite(max_len_ratio) and max_len_ratio > 0):
        raise ValueError(f"--{prefix}-max-len-ratio must be > 0 (paper: 1.3), got {max_len_ratio}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--{prefix}-temperature must be > 0, got {temperature}")
    if not sampling and (topk != -1 or topp != -1.0):
        raise ValueError(f"--{prefix}-sampling-topk / --{prefix}-sampling-topp only apply to sampled candidates")
    if topp != -1.0 and not 0.0 < topp <= 1.0:
        raise ValueError(f"--{prefix}-sampling-topp must lie in (0, 1], got {topp}")


class SequenceLevelCriterionBase(LabelSmoothedCrossEntropyCriterion):
    """Plumbing only: the model checks, random-stream positions, task-loss costs and the MLE term."""

    FLAG_PREFIX = "?"
    NAME = "?"

    def setup_costs(self, task_loss: str, lm_scorer_path: Optional[str], post_process: Optional[str],
                    sacrebleu_tokenize: str):  # fmt: skip
        self.task_loss = task_loss
        self.post_process = post_process
        self.sacrebleu_tokenize = sacrebleu_tokenize
        dictionary = self.task.target_dictionary
        # a plain attribute holding a plain object: the scorer's weights are not the criterion's parameters
        self.scorer = (
            LanguageModelScorer.from_checkpoint(lm_scorer_path, dictionary, flag=f"--{self.FLAG_PREFIX}-lm-scorer-path")
            if TASK_LOSSES[task_loss].needs_scorer
            else None
        )
        self.update_count = UpdateCountReader()
        self._position = (None, -1)

    # -- random streams ---------------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int):
        """Fixes the update count the random streams read (otherwise: the fairseq trainer's)."""
        self.update_count.set_num_updates(num_updates)

    def next_position(self):
        """(update count, micro-batch index within the update) of this training call."""
        update = self.update_count()
        last_update, micro = self._position
        self._position = (update, micro + 1 if update == last_update else 0)
        return self._position

    # -- the model -------------------------------------------------------------------------------------------
    def scorable_model(self, model, sample):
        """The unwrapped model: encoder-decoder, or a language model on text-completion samples."""
        from fairseq.models import FairseqEncoderDecoderModel, FairseqLanguageModel

        if not submodules_callable_directly(model):
            raise UnsupportedModelError(
                f"--criterion {self.NAME} runs the encoder once and the decoder over all candidates, which "
                "bypasses --ddp-backend pytorch_ddp/c10d and fully_sharded: use --ddp-backend legacy_ddp (or no_c10d)"
            )
        inner = unwrap_model(model)
        if isinstance(inner, FairseqEncoderDecoderModel):
            return inner
        if isinstance(inner, FairseqLanguageModel):
            if sample.get("prefix_tokens") is None:
                raise UnsupportedModelError(
                    f"--criterion {self.NAME} trains a language model on text completion only (prefix -> "
                    "continuation pairs): use --task text_completion"
                )
            return inner
        raise UnsupportedModelError(
            f"--criterion {self.NAME} needs an encoder-decoder model (translation) or a language model under "
            f"--task text_completion; got {type(inner).__name__}"
        )

    # -- costs ----------------------------------------------------------------------------------------------
    def costs(self, hypotheses, terminated, refs, prefix_lists) -> List[float]:
        batch = TaskLossBatch(
            hypotheses, terminated, refs, dictionary=self.task.target_dictionary, post_process=self.post_process,
            sacrebleu_tokenize=self.sacrebleu_tokenize, prefixes=prefix_lists, scorer=self.scorer,
        )  # fmt: skip
        return compute_task_loss(self.task_loss, batch)

    def candidate_costs(self, candidates: Candidates, sample) -> torch.Tensor:
        """B x K costs (float64, 0 at empty slots) of every candidate against its sentence's reference."""
        if self.scorer is not None:
            self.scorer.to(sample["target"].device)
        refs = references(sample, self.task.target_dictionary)
        pre = prefixes(sample)
        rows, toks, done = candidates.flat()
        flat = self.costs(toks, done, [refs[b] for b in rows], None if pre is None else [pre[b] for b in rows])
        return candidates.scatter(flat)

    def mle_loss(self, model, sample, with_grad: bool):
        """(label-smoothed loss, nll) summed over the target tokens, and the net output."""
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            net_output = model(**sample["net_input"])
            loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=True)
        return loss, nll_loss, net_output

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
