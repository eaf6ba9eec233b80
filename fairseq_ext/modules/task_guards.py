"""What every task of this package guarantees on top of fairseq's: every sentence of an evaluated split
is decoded, and the best-checkpoint metric is read in its right direction.

Every sentence decoded.  fairseq's ``data_utils.batch_by_size`` drops the last batch of a split when its
size is not a multiple of ``--required-batch-size-multiple`` (default 8; fairseq issue 5036), so
``fairseq-generate``, ``fairseq-validate`` and validation during training score a subset (37
sentences at batch size 8: 32).  The multiple is an efficiency hint for training batches on GPUs;
:class:`TaskGuardsMixin` keeps it for the trainer's training iterator only and uses 1 for every other
iterator, whatever the flag says.  Only the last batch of an evaluated split can change size; the
others are unchanged.

Best checkpoint.  ``--best-checkpoint-metric span_f1`` (or ``bleu``) without
``--maximize-best-checkpoint-metric`` keeps the *worst* epoch as ``checkpoint_best.pt``, and a metric
the task never logs stops training with a ``KeyError`` after the first validation.  A task that
knows its metrics refuses both when the model is built for training, before any update.

Applying both to a task is one line: make :class:`TaskGuardsMixin` the first base class
(``class MyTask(TaskGuardsMixin, TranslationTask)``); the metric check also needs the task config
to inherit :class:`CheckpointMetricConfig` (without it the check is skipped).
"""
import logging
import sys
from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence, Tuple

import numpy as np
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

logger = logging.getLogger(__name__)

# Metrics every fairseq task logs, where lower is better.
MINIMIZED_METRICS = frozenset({"loss", "nll_loss", "ppl"})


@dataclass
class CheckpointMetricConfig(FairseqDataclass):
    # Read-only views of the checkpoint options (no help text: fairseq adds no flag for them), so that a
    # task sees them before training; fairseq resolves the interpolations when it builds the config.
    best_checkpoint_metric: str = II("checkpoint.best_checkpoint_metric")
    maximize_best_checkpoint_metric: bool = II("checkpoint.maximize_best_checkpoint_metric")


# -- every sentence decoded -----------------------------------------------------------------------------
def evaluation_batch_multiple(requested: int, training_iterator: bool) -> int:
    """The batch-size multiple to use: the requested one for training batches, else 1.

    With 1, ``batch_by_size`` never drops a batch, so an evaluated split keeps every sentence.
    """
    return requested if training_iterator else 1


def called_from_training_iterator(max_depth: int = 12) -> bool:
    """True when fairseq's ``Trainer.get_train_iterator`` is on the call stack (its training batches).

    Matched by code object, so a Trainer subclass that extends ``get_train_iterator`` and calls the
    base method is recognised; any other caller (generate, validate, the valid iterator, a user's
    script) is treated as evaluation, which can only keep more sentences.
    """
    try:
        from fairseq.trainer import Trainer
    except ImportError:  # pragma: no cover - fairseq is a dependency
        return False
    target = Trainer.get_train_iterator.__code__
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False


# -- best-checkpoint metric ---------------------------------------------------------------------------
def check_best_checkpoint_metric(metric: str, maximize: bool, maximized: FrozenSet[str],
                                 minimized: FrozenSet[str] = MINIMIZED_METRICS,
                                 not_logged: Optional[str] = None) -> None:  # fmt: skip
    """Raises ValueError when ``metric`` is read in the wrong direction, or is never logged.

    Args:
        metric: ``--best-checkpoint-metric``.
        maximize: ``--maximize-best-checkpoint-metric``.
        maximized / minimized: the task's metrics where higher / lower is better; others are not judged.
        not_logged: why the task will never log ``metric`` under the current options (None: it will).
    """
    if not_logged:
        raise ValueError(f"--best-checkpoint-metric {metric}: {not_logged}")
    if metric in maximized and not maximize:
        raise ValueError(
            f"--best-checkpoint-metric {metric}: higher is better, so checkpoint_best.pt would keep the worst "
            f"validation {metric}; add --maximize-best-checkpoint-metric"
        )
    if metric in minimized and maximize:
        raise ValueError(
            f"--best-checkpoint-metric {metric} with --maximize-best-checkpoint-metric: lower is better, so "
            f"checkpoint_best.pt would keep the worst validation {metric}; drop --maximize-best-checkpoint-metric"
        )


def _resolved(cfg, name: str):
    """A config value, or None when it is absent or an unresolved interpolation (a config built
    outside fairseq's command line, or read from an older checkpoint)."""
    try:
        value = getattr(cfg, name, None)
    except Exception:  # omegaconf raises its own errors for interpolations it cannot resolve
        return None
    if isinstance(value, str) and value.startswith("${"):
        return None
    return value


# -- fairseq's reserved symbols inside sentences --------------------------------------------------------
def misplaced_special(sentences: Sequence, specials: Sequence[int], eos: int) -> Optional[Tuple[int, int, int]]:
    """(sentence, position, symbol) of the first reserved symbol inside a binarised sentence, or None.

    fairseq-preprocess maps the words ``<s>``, ``<pad>``, ``</s>`` to the dictionary's reserved indices;
    inside a sentence they are then taken for beginning, padding and end of sentence: a ``<pad>`` word
    shortens the source length every model and generator reads, so a tagger emits one label fewer.

    Args:
        sentences: indexable of 1-D integer tensors or arrays, each ending with ``eos``.
        specials: reserved indices that may not appear anywhere (bos, pad).
        eos: may only appear as the last token.
    """
    specials = np.asarray(list(specials), dtype=np.int64)
    for index in range(len(sentences)):
        tokens = np.asarray(sentences[index])  # T
        body = tokens[:-1] if tokens.size and tokens[-1] == eos else tokens
        bad = np.nonzero(np.isin(body, specials) | (body == eos))[0]
        if bad.size:
            position = int(bad[0])
            return index, position, int(body[position])
    return None


class TaskGuardsMixin:
    """Mix into a fairseq task (first base class) for every sentence decoded and a checked best metric.

    ``MAXIMIZED_METRICS``: the task's validation metrics where higher is better; a task that logs more
    metrics extends it and may override :meth:`unlogged_metric_reason`.
    """

    MAXIMIZED_METRICS: FrozenSet[str] = frozenset({"bleu"})

    def get_batch_iterator(self, dataset, *args, **kwargs):
        # required_batch_size_multiple is the fifth parameter after dataset in FairseqTask's signature
        position = 4
        if "required_batch_size_multiple" in kwargs:
            requested = kwargs["required_batch_size_multiple"]
        elif len(args) > position:
            requested = args[position]
        else:
            requested = 1
        requested = requested or 1
        multiple = evaluation_batch_multiple(requested, called_from_training_iterator())
        if multiple != requested:
            logger.info(
                f"--required-batch-size-multiple {requested} applies to training batches only: "
                "evaluation batches use 1 so that no sentence is dropped"
            )
        if len(args) > position:
            args = args[:position] + (multiple,) + args[position + 1:]
        else:
            kwargs["required_batch_size_multiple"] = multiple
        return super().get_batch_iterator(dataset, *args, **kwargs)

    def unlogged_metric_reason(self, metric: str) -> Optional[str]:
        """Why ``metric`` will never be logged under this task's options, or None."""
        if metric == "bleu" and not _resolved(self.cfg, "eval_bleu"):
            return "the task logs bleu only with --eval-bleu; add it (with --eval-bleu-args) or pick another metric"
        return None

    def check_checkpoint_metric(self):
        metric = _resolved(self.cfg, "best_checkpoint_metric")
        maximize = _resolved(self.cfg, "maximize_best_checkpoint_metric")
        if metric is None or maximize is None:
            return
        check_best_checkpoint_metric(metric, bool(maximize), frozenset(self.MAXIMIZED_METRICS),
                                     not_logged=self.unlogged_metric_reason(metric))  # fmt: skip

    def build_model(self, cfg, from_checkpoint=False):
        # a model built from a checkpoint is for decoding or evaluation: only training is checked
        if not from_checkpoint:
            self.check_checkpoint_metric()
        return super().build_model(cfg, from_checkpoint)
