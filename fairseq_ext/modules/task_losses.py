"""Sequence-level task losses c(Y_hat, Y): a registry shared by sequence-level training criteria.

Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence
Modeling" (AAAI 2021), equation 1: C(theta) = sum over (X, Y) of c(F(theta, X), Y), with c an
arbitrary sequence-level loss; section 5.1 uses an LM loss and a normalised edit distance, section
5.2 sentence BLEU (and the introduction names METEOR, which is not provided here: its WordNet data
cannot be installed from PyPI).

Every cost is oriented so that **lower is better**, per sentence:

===========  =====================================================================================
name         cost
===========  =====================================================================================
``bleu``     1 - sentence BLEU / 100 (sacreBLEU, exponential smoothing, effective order), in [0, 1]
``chrf``     1 - sentence chrF / 100 (sacreBLEU's defaults: character 6-grams, beta 2), in [0, 1]
``edit``     token Levenshtein distance / reference length, EOS included on both sides (a
             hypothesis that never ends pays one edit for its missing EOS); 0 for an exact match
``lm``       -log p_score(Y_hat | prefix) in nats under a frozen fairseq language model, summed over
             the decoded tokens and, when the decoder emitted it, the EOS (section 5.1's c_LM)
===========  =====================================================================================

A user adds a loss by registering a function of a :class:`TaskLossBatch`::

    from fairseq_ext.modules.task_losses import register_task_loss

    @register_task_loss("length_gap", "|len(hyp) - len(ref)| / len(ref)")
    def length_gap(batch):
        return [abs(len(h) - len(r)) / max(len(r), 1) for h, r in zip(batch.hypotheses, batch.references)]

and selects it by name (``--mgs-task-loss length_gap``) from a module imported by ``--user-dir``.
"""
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


# -- the inputs of a task loss ----------------------------------------------------------------------
@dataclass
class TaskLossBatch:
    """What a task loss sees for B sentences.

    Token lists hold dictionary ids without EOS or padding; whether the decoder emitted its EOS is in
    ``terminated`` (a hypothesis cut at the maximum length is scored as decoded, without EOS).
    """

    hypotheses: Sequence[Sequence[int]]  # B decoded token lists
    terminated: Sequence[bool]  # B: True when the decoder emitted EOS
    references: Sequence[Sequence[int]]  # B reference token lists
    dictionary: Optional[object] = None  # fairseq Dictionary: turns ids into strings (bleu, chrf)
    eos: Optional[int] = None  # EOS id (edit); defaults to dictionary.eos()
    post_process: Optional[str] = None  # fairseq's --post-process for strings ("subword_nmt", "sentencepiece", ...)
    sacrebleu_tokenize: str = "none"  # tokenizer of sacreBLEU for bleu: "none" for already tokenised text
    prefixes: Optional[Sequence[Sequence[int]]] = None  # B conditioning prefixes (text completion), or None
    scorer: Optional["LanguageModelScorer"] = None  # the frozen LM of the lm loss
    _strings: Dict[str, List[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not len(self.hypotheses) == len(self.terminated) == len(self.references):
            raise ValueError(
                f"task loss inputs disagree: {len(self.hypotheses)} hypotheses, {len(self.terminated)} "
                f"termination flags, {len(self.references)} references"
            )

    def __len__(self) -> int:
        return len(self.hypotheses)

    def eos_id(self) -> int:
        if self.eos is not None:
            return self.eos
        if self.dictionary is None:
            raise ValueError("this task loss needs the EOS id: pass eos= or dictionary=")
        return self.dictionary.eos()

    def _to_strings(self, key: str, token_lists, escape_unk: bool) -> List[str]:
        if key not in self._strings:
            if self.dictionary is None:
                raise ValueError(f"this task loss compares strings: pass the target dictionary to {type(self).__name__}")
            self._strings[key] = [
                self.dictionary.string(
                    torch.tensor(list(tokens), dtype=torch.long), self.post_process, escape_unk=escape_unk
                )
                for tokens in token_lists
            ]
        return self._strings[key]

    def hypothesis_strings(self) -> List[str]:
        """Decoded strings, after --post-process."""
        return self._to_strings("hyp", self.hypotheses, escape_unk=False)

    def reference_strings(self) -> List[str]:
        """Reference strings; unknown words are escaped so that a hypothesis' <unk> never matches them
        (as fairseq's --eval-bleu does)."""
        return self._to_strings("ref", self.references, escape_unk=True)


TaskLossFunction = Callable[[TaskLossBatch], Sequence[float]]


@dataclass(frozen=True)
class TaskLoss:
    name: str
    function: TaskLossFunction
    description: str
    needs_scorer: bool = False  # True: the loss reads batch.scorer (a frozen LM named by a flag)


TASK_LOSSES: Dict[str, TaskLoss] = {}


def register_task_loss(name: str, description: str, needs_scorer: bool = False):
    """Decorator registering ``function(batch: TaskLossBatch) -> B costs (lower is better)`` as ``name``."""

    def wrap(function: TaskLossFunction) -> TaskLossFunction:
        if name in TASK_LOSSES:
            raise ValueError(f"task loss {name!r} is already registered ({TASK_LOSSES[name].description})")
        TASK_LOSSES[name] = TaskLoss(name, function, description, needs_scorer)
        return function

    return wrap


def get_task_loss(name: str, flag: str = "--mgs-task-loss") -> TaskLoss:
    """The registered loss ``name``; raises naming ``flag`` and the registered names otherwise."""
    if name not in TASK_LOSSES:
        known = ", ".join(f"{n} ({t.description})" for n, t in sorted(TASK_LOSSES.items()))
        raise ValueError(
            f"{flag} {name!r} is not a registered task loss; choose one of: {known}. A module imported through "
            "--user-dir can add one with fairseq_ext.modules.task_losses.register_task_loss"
        )
    return TASK_LOSSES[name]


def compute_task_loss(name: str, batch: TaskLossBatch) -> List[float]:
    """B costs of ``batch`` under the registered loss ``name`` (lower is better), as floats."""
    costs = [float(c) for c in get_task_loss(name).function(batch)]
    if len(costs) != len(batch):
        raise ValueError(f"task loss {name!r} returned {len(costs)} costs for {len(batch)} sentences")
    return costs


# -- built-in losses -----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _sentence_bleu_metric(tokenize: str):
    from sacrebleu.metrics import BLEU

    # effective_order: a short sentence without 4-grams is scored on the orders it has (sacreBLEU's
    # recommendation for sentence BLEU)
    return BLEU(tokenize=tokenize, smooth_method="exp", effective_order=True)


@lru_cache(maxsize=None)
def _sentence_chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


@register_task_loss("bleu", "1 - sentence BLEU/100 (sacreBLEU)")
def sentence_bleu_cost(batch: TaskLossBatch) -> List[float]:
    metric = _sentence_bleu_metric(batch.sacrebleu_tokenize)
    return [
        max(0.0, 1.0 - metric.sentence_score(hyp, [ref]).score / 100.0)  # sacreBLEU can return 100.00000000000004
        for hyp, ref in zip(batch.hypothesis_strings(), batch.reference_strings())
    ]


@register_task_loss("chrf", "1 - sentence chrF/100 (sacreBLEU)")
def sentence_chrf_cost(batch: TaskLossBatch) -> List[float]:
    metric = _sentence_chrf_metric()
    return [
        max(0.0, 1.0 - metric.sentence_score(hyp, [ref]).score / 100.0)
        for hyp, ref in zip(batch.hypothesis_strings(), batch.reference_strings())
    ]


def normalized_edit_distance(hypothesis: Sequence[int], reference: Sequence[int]) -> float:
    """Levenshtein distance between two token sequences divided by the reference length (section 5.1)."""
    import editdistance

    return editdistance.eval(list(hypothesis), list(reference)) / max(len(reference), 1)


@register_task_loss("edit", "token edit distance / reference length, EOS included")
def edit_distance_cost(batch: TaskLossBatch) -> List[float]:
    eos = batch.eos_id()
    return [
        normalized_edit_distance(list(hyp) + ([eos] if done else []), list(ref) + [eos])
        for hyp, done, ref in zip(batch.hypotheses, batch.terminated, batch.references)
    ]


@register_task_loss("lm", "NLL (nats) of the decoded tokens under a frozen language model", needs_scorer=True)
def language_model_cost(batch: TaskLossBatch) -> List[float]:
    if batch.scorer is None:
        raise ValueError("the lm task loss needs a frozen language model: --mgs-lm-scorer-path CHECKPOINT")
    return batch.scorer.nll(batch.hypotheses, batch.terminated, batch.prefixes)


# -- sequence statistics logged next to the costs ------------------------------------------------------
def ngram_repetition(tokens: Sequence[int], n: int = 4) -> Optional[float]:
    """1 - |unique n-grams| / |n-grams| of one sequence (section 5.1, after Welleck et al. 2020b), or
    None when it has no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


# -- the frozen language model of the lm loss ----------------------------------------------------------
class CheckpointKindError(ValueError):
    """A checkpoint that is not what a flag asks for (e.g. a translation model where an LM is needed)."""


class LanguageModelScorer:
    """A frozen fairseq language model scoring continuations: -log p(continuation [+ EOS] | prefix).

    Not a ``torch.nn.Module`` attribute of any criterion on purpose: its parameters must stay out of the
    trainer's optimizer, gradient all-reduce and checkpoints.  It follows the training model's device
    (see :meth:`to`).
    """

    def __init__(self, model, dictionary, flag: str = "--mgs-lm-scorer-path"):
        from fairseq.models import FairseqLanguageModel

        if not isinstance(model, FairseqLanguageModel):
            raise CheckpointKindError(f"{flag}: {type(model).__name__} is not a fairseq language model")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dictionary = dictionary
        self.flag = flag
        self.max_positions = _max_positions(model)
        self._warned_truncation = False

    SCORER_TASKS = ("language_modeling", "text_completion")  # both train the model on [EOS] + prefix + continuation

    @classmethod
    def from_checkpoint(cls, path: str, dictionary, flag: str = "--mgs-lm-scorer-path") -> "LanguageModelScorer":
        """Loads a ``--task language_modeling`` or ``--task text_completion`` checkpoint (a language model that
        reads ``[EOS] + prefix + continuation``, the layout scored here) whose vocabulary is ``dictionary``.

        Raises (naming ``flag``) for a missing file, a checkpoint of another kind (a translation model,
        ...) or a vocabulary of another size.
        """
        import os

        from fairseq import checkpoint_utils
        from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY, FairseqLanguageModel
        from fairseq.tasks.language_modeling import LanguageModelingTask

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file (the frozen language model of --mgs-task-loss lm)")
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        cfg = state.get("cfg")
        if cfg is None or "model" not in state:
            raise CheckpointKindError(f"{flag} {path} is not a fairseq training checkpoint (no 'cfg'/'model' entries)")
        task_name = getattr(cfg.task, "_name", None)
        arch = getattr(cfg.model, "_name", None) or getattr(cfg.model, "arch", None)
        model_class = ARCH_MODEL_REGISTRY.get(arch) or MODEL_REGISTRY.get(arch)
        if task_name not in cls.SCORER_TASKS or model_class is None or not issubclass(model_class, FairseqLanguageModel):
            raise CheckpointKindError(
                f"{flag} {path} holds a --task {task_name} / --arch {arch} model; the lm task loss needs a language "
                "model trained with --task language_modeling or text_completion (e.g. --arch transformer_lm) on the target "
                "dictionary"
            )
        task = LanguageModelingTask(cfg.task, dictionary, output_dictionary=dictionary)
        model = task.build_model(cfg.model)
        try:
            model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        except RuntimeError as error:
            raise CheckpointKindError(
                f"{flag} {path}: its weights do not fit a model over the target dictionary ({len(dictionary)} "
                f"symbols); train the scoring LM on the same dictionary. ({str(error).splitlines()[0]})"
            ) from None
        return cls(model, dictionary, flag)

    def to(self, device) -> "LanguageModelScorer":
        self.model.to(device)
        return self

    @torch.no_grad()
    def nll(
        self,
        continuations: Sequence[Sequence[int]],
        terminated: Sequence[bool],
        prefixes: Optional[Sequence[Sequence[int]]] = None,
    ) -> List[float]:
        """B sums of -log p over each continuation's tokens and, where ``terminated``, its EOS.

        Input row b is ``[EOS] + prefix_b + continuation_b`` (fairseq's language models read the previous
        sentence's EOS first); its targets are the inputs shifted left, with EOS last.
        """
        d = self.dictionary
        eos, pad = d.eos(), d.pad()
        prefixes = prefixes if prefixes is not None else [[] for _ in continuations]
        rows, scored = [], []
        for prefix, cont, done in zip(prefixes, continuations, terminated):
            tokens = [eos] + list(prefix) + list(cont)  # L + 1 inputs
            targets = list(prefix) + list(cont) + [eos]  # L + 1 targets
            first, last = len(prefix), len(prefix) + len(cont) + (1 if done else 0)  # scored targets [first, last)
            if self.max_positions is not None and len(tokens) > self.max_positions:
                if not self._warned_truncation:
                    logger.warning(
                        f"{self.flag}: a sequence of {len(tokens)} tokens exceeds the scoring LM's {self.max_positions} "
                        "positions; only its first positions are scored (this warning is shown once)"
                    )
                    self._warned_truncation = True
                tokens, targets = tokens[: self.max_positions], targets[: self.max_positions]
                last = min(last, self.max_positions)
            rows.append((tokens, targets))
            scored.append((first, last))
        device = next(self.model.parameters()).device
        width = max(len(t) for t, _ in rows)
        inputs = torch.full((len(rows), width), pad, dtype=torch.long)  # B x W, right-padded
        targets = torch.full((len(rows), width), pad, dtype=torch.long)  # B x W
        mask = torch.zeros(len(rows), width, dtype=torch.bool)  # B x W: the scored targets
        for b, ((tokens, tgt), (first, last)) in enumerate(zip(rows, scored)):
            inputs[b, : len(tokens)] = torch.tensor(tokens)
            targets[b, : len(tgt)] = torch.tensor(tgt)
            mask[b, first:last] = True
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        net_output = self.model(inputs)
        lprobs = self.model.get_normalized_probs(net_output, log_probs=True).float()  # B x W x V
        token_lprobs = lprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # B x W
        return (-torch.where(mask, token_lprobs, torch.zeros_like(token_lprobs))).sum(-1).tolist()


def _max_positions(model) -> Optional[int]:
    positions = model.max_positions()
    if isinstance(positions, (tuple, list)):
        positions = positions[0]
    return int(positions) if positions is not None else None
