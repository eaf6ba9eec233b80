"""Task ``text_completion``: a language model continues the first k tokens of each line (Welleck and Cho,
"MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence Modeling", AAAI 2021, section 5.1).

Data: a ``fairseq-preprocess --only-source`` directory (``dict.txt``, ``train/valid/test`` .bin/.idx), one
example per line (:mod:`fairseq_ext.data.text_completion`): prefix = its first ``--completion-prefix-length``
tokens (the paper: 10), continuation = the rest, ending in EOS; lines of k tokens or fewer, and lines longer
than the model's positions, are dropped and counted in the log.  Training with a token-level criterion
(``label_smoothed_cross_entropy``, ``cross_entropy``) is MLE on the continuation only; ``mgs``, ``mrt`` and
``policy_gradient`` decode continuations of the prefix.

Generation (``fairseq-generate --task text_completion``): the generator is forced through each example's
prefix (``--prefix-size`` is refused: the prefix comes from the data), decodes greedily with ``--beam 1``, and
the continuation of a sentence is cut at ceil(``--completion-max-len-ratio`` x its reference continuation
length, EOS included) tokens (the paper's training decodes: 1.3); a continuation without EOS by then is
non-terminating: its hypothesis carries ``terminated = False`` and ends at the cut (fairseq prints it as
decoded).  Each hypothesis holds the continuation only.  Every kept line gets one hypothesis (the task
guards use batch-size multiple 1 for evaluation).
"""
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.data import data_utils
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from fairseq_ext.data.text_completion import TextCompletionDataset
from fairseq_ext.modules.task_guards import CheckpointMetricConfig, TaskGuardsMixin

logger = logging.getLogger(__name__)


@dataclass
class TextCompletionConfig(LanguageModelingConfig, CheckpointMetricConfig):
    completion_prefix_length: int = field(
        default=10, metadata={"help": "k: the first k tokens of a line are the prefix (the paper: 10)"}
    )
    completion_max_len_ratio: float = field(
        default=1.3,
        metadata={"help": "generation: a continuation is cut at ceil(ratio x its reference length incl. EOS) tokens "
                  "and counts as non-terminating without EOS by then"},
    )


# language_modeling options that the line-by-line examples do not read: refused unless at their defaults
_UNUSED_LM_OPTIONS = {
    "sample_break_mode": ("none", "eos"),
    "shorten_method": ("none",),
    "shorten_data_split_list": ("",),
    "add_bos_token": (False,),
    "self_target": (False,),
    "future_target": (False,),
    "past_target": (False,),
    "output_dictionary_size": (-1,),
    "pad_to_fixed_length": (False,),
    "pad_to_fixed_bsz": (False,),
}


def check_text_completion_options(cfg):
    if cfg.completion_prefix_length < 1:
        raise ValueError(f"--completion-prefix-length must be >= 1, got {cfg.completion_prefix_length}")
    if not (math.isfinite(cfg.completion_max_len_ratio) and cfg.completion_max_len_ratio > 0):
        raise ValueError(f"--completion-max-len-ratio must be > 0, got {cfg.completion_max_len_ratio}")
    for name, allowed in _UNUSED_LM_OPTIONS.items():
        value = getattr(cfg, name, allowed[0])
        value = str(value) if name in ("sample_break_mode", "shorten_method") else value
        if value not in allowed:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value} does not apply to --task text_completion, which makes one prefix -> continuation "
                f"example per line: drop {flag}"
            )


@register_task("text_completion", dataclass=TextCompletionConfig)
class TextCompletionTask(TaskGuardsMixin, LanguageModelingTask):
    MAXIMIZED_METRICS = frozenset()

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        check_text_completion_options(args)
        super().__init__(args, dictionary, output_dictionary, targets)

    def max_line_tokens(self) -> int:
        """The longest line kept (EOS included): the model's positions."""
        return int(getattr(self.args, "max_target_positions", None) or self.args.tokens_per_sample)

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.args.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        lines = data_utils.load_indexed_dataset(split_path, self.dictionary, self.args.dataset_impl, combine=combine)
        if lines is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({split_path})")
        dataset = TextCompletionDataset(
            lines, self.args.completion_prefix_length, self.dictionary, max_tokens=self.max_line_tokens(),
            shuffle=split == getattr(self.args, "train_subset", "train"), seed=self.args.seed,
        )  # fmt: skip
        logger.info(f"text_completion {split}: {dataset.account}")
        if len(dataset) == 0:
            raise ValueError(
                f"text_completion {split}: no line has more than --completion-prefix-length "
                f"{self.args.completion_prefix_length} tokens ({dataset.account})"
            )
        self.datasets[split] = dataset

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        raise NotImplementedError("--task text_completion reads its prefixes from a binarised split (fairseq-generate)")

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Greedy (or beam) continuations of each example's prefix; see the module docstring."""
        if prefix_tokens is not None:
            raise ValueError("--task text_completion takes each prefix from the data: drop --prefix-size")
        if constraints is not None:
            raise ValueError("--task text_completion does not support constrained decoding")
        prefix = sample["prefix_tokens"]  # B x k
        k = prefix.size(1)
        eos, pad = self.dictionary.eos(), self.dictionary.pad()
        limits = [
            int(math.ceil(self.args.completion_max_len_ratio * int(n))) for n in sample["target"].ne(pad).sum(-1)
        ]  # B: continuation tokens allowed, EOS included
        saved = (generator.max_len_a, generator.max_len_b)
        generator.max_len_a, generator.max_len_b = 0, k + max(limits)
        try:
            with torch.no_grad():
                outputs = generator.generate(models, sample, prefix_tokens=prefix, bos_token=eos)
        finally:
            generator.max_len_a, generator.max_len_b = saved
        for hypos, limit in zip(outputs, limits):
            for hypo in hypos:
                tokens = hypo["tokens"][k:]  # continuation, ending in a natural or forced EOS
                scores = hypo["positional_scores"][k:]
                ends = tokens.eq(eos).nonzero()
                first_eos = int(ends[0]) if ends.numel() else len(tokens)
                # a natural EOS within the sentence's limit (a forced one comes at max(limits) >= limit)
                terminated = first_eos < limit
                cut = first_eos + 1 if terminated else min(limit, first_eos)
                hypo["tokens"], hypo["positional_scores"] = tokens[:cut], scores[:cut]
                hypo["terminated"] = terminated
                hypo["alignment"] = None
        return outputs
