"""Prefix -> continuation pairs from the lines of a binarised text file (Welleck and Cho, "MLE-Guided
Parameter Search for Task Loss Minimization in Neural Sequence Modeling", AAAI 2021, section 5.1).

Every line (one item of a ``fairseq-preprocess --only-source`` dataset, ending with EOS) of more than k
tokens gives one example: the prefix is its first k tokens, the continuation the rest, ending with the EOS.
A line of k tokens or fewer has no continuation and is dropped; so is a line longer than the model's
positions (``max_tokens``).  :class:`TextCompletionDataset` records how many lines each rule dropped, so that
every line is accounted for.

A collated batch holds, per example b (right-padded):

* ``net_input.src_tokens``: ``[EOS] + prefix + continuation[:-1]`` (fairseq's language models read the
  previous sentence's EOS first), ``net_input.src_lengths``;
* ``target``: padding under the k prefix positions, then the continuation: the loss covers the
  continuation only; ``ntokens`` counts its tokens (EOS included);
* ``prefix_tokens``: B x k, which generators are forced through (sequence-level criteria and
  ``fairseq-generate`` under ``--task text_completion``).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils


@dataclass(frozen=True)
class LineAccount:
    """How the lines of a split were used."""

    lines: int  # lines in the binarised split
    kept: int  # examples
    too_short: int  # k tokens or fewer (no continuation)
    too_long: int  # more tokens (EOS included) than the model's positions

    def __str__(self) -> str:
        return (f"{self.lines} lines: {self.kept} prefix -> continuation examples, {self.too_short} dropped with no "
                f"token after the prefix, {self.too_long} dropped as longer than the model's positions")  # fmt: skip


class TextCompletionDataset(FairseqDataset):
    """Prefix -> continuation examples of the lines of ``lines`` (a dataset of 1-D token tensors ending in EOS).

    Args:
        lines: the binarised lines.
        prefix_length: k, prefix tokens per example.
        dictionary: the LM's dictionary (EOS, padding).
        max_tokens: longest line kept, EOS included (the model's positions); None: no limit.
        shuffle: shuffle the order of batches' examples in ``ordered_indices`` (training).
        seed: the shuffle's seed.
    """

    def __init__(self, lines, prefix_length: int, dictionary, max_tokens: Optional[int] = None, shuffle: bool = False,
                 seed: int = 1):  # fmt: skip
        if prefix_length < 1:
            raise ValueError(f"the prefix length must be >= 1, got {prefix_length}")
        self.lines = lines
        self.k = int(prefix_length)
        self.dictionary = dictionary
        self.shuffle = shuffle
        self.seed = seed
        sizes = np.asarray(lines.sizes, dtype=np.int64)  # tokens per line, EOS included
        short = sizes - 1 <= self.k
        long = ~short & (sizes > max_tokens) if max_tokens is not None else np.zeros_like(short)
        self.line_index = np.nonzero(~short & ~long)[0]  # kept lines
        self.sizes = sizes[self.line_index]  # input length of each example: EOS + prefix + continuation - 1
        self.account = LineAccount(len(sizes), len(self.line_index), int(short.sum()), int(long.sum()))
        self.epoch = 1

    def __getitem__(self, index):
        tokens = self.lines[int(self.line_index[index])]
        return {"id": index, "prefix": tokens[: self.k], "continuation": tokens[self.k :]}

    def __len__(self):
        return len(self.line_index)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        if self.shuffle:
            with data_utils.numpy_seed(self.seed, self.epoch):
                order = np.random.permutation(len(self))
            return order[np.argsort(self.sizes[order], kind="mergesort")]
        return np.argsort(self.sizes, kind="mergesort")

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def supports_prefetch(self):
        return False

    def line_of(self, index: int) -> int:
        """The line (0-based, in the binarised split) of example ``index``."""
        return int(self.line_index[index])

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        eos, pad = self.dictionary.eos(), self.dictionary.pad()
        inputs, targets = [], []
        for s in samples:
            prefix, cont = s["prefix"], s["continuation"]
            inputs.append(torch.cat([prefix.new_tensor([eos]), prefix, cont[:-1]]))  # EOS, prefix, continuation
            targets.append(torch.cat([prefix.new_full((self.k,), pad), cont]))  # pad under the prefix
        src = data_utils.collate_tokens(inputs, pad, left_pad=False)  # B x T
        target = data_utils.collate_tokens(targets, pad, left_pad=False)  # B x T
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "nsentences": len(samples),
            "ntokens": sum(len(s["continuation"]) for s in samples),
            "net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(x) for x in inputs])},
            "target": target,
            "prefix_tokens": torch.stack([s["prefix"] for s in samples]).long(),  # B x k
        }
