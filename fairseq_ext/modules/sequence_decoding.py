"""Decoding a training batch with fairseq's own generator, for sequence-level training criteria.

MGS (Welleck and Cho, AAAI 2021, Algorithm 1) decodes every batch with the current parameters and
with each candidate; minimum risk training and policy gradient decode n-best lists or samples.  All of
them need the same thing: run fairseq's ``SequenceGenerator`` (greedy = beam 1, beam search, or
sampling) on a training sample without gradient and with dropout off, and get back, per sentence, the
decoded tokens and whether the decoder ended them with EOS.  :class:`BatchDecoder` does that.

* The generator runs the encoder once per call (one call per candidate parameter vector) and reorders
  its output for the beam; nothing is re-encoded per hypothesis.
* The maximum output length is ``ceil(max_len_ratio * longest target in the batch)`` (Welleck and Cho,
  section 5.1 and Appendix A.4: 1.3 times the longest target), capped by the decoder's positions.
* fairseq's generator forces EOS when it reaches the maximum length; such a hypothesis is reported as
  *not terminated*, and its tokens are those decoded before the forced EOS ("scored as decoded").
* Every module's train/eval mode is restored afterwards (dropout stays off during decoding only).
* Sampling draws from a torch RNG forked and seeded with ``seed`` when one is given, so that decoding
  the same batch with different parameters can use common random numbers, and the global RNG that
  fairseq seeds per update is left untouched.
* Text completion (Welleck and Cho, section 5.1): a decoder-only language model continues the prefix
  that a sample carries as ``prefix_tokens`` (B x k, task ``text_completion``).  The generator is forced
  through the prefix; the returned tokens, the maximum length (1.3 x the longest continuation) and the
  termination flag concern the continuation only.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch


@dataclass(frozen=True)
class Hypothesis:
    tokens: List[int]  # decoded token ids, without the EOS
    terminated: bool  # the decoder emitted EOS before the maximum length
    score: float  # the generator's score (length-normalised log-probability under beam search)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode (dropout off) and restores each one's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def seeded_rng(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Forks torch's RNG (CPU and, on CUDA, the device's) and seeds it with ``seed``; no-op for None."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def target_lengths(target: torch.Tensor, pad: int) -> torch.Tensor:
    """B lengths of right- or left-padded targets (EOS included)."""
    return target.ne(pad).sum(-1)


def strip_reference(tokens: torch.Tensor, pad: int, eos: int) -> List[int]:
    """Reference token ids of one target row without padding and EOS."""
    return [t for t in tokens.tolist() if t != pad and t != eos]


class BatchDecoder:
    """Decodes training samples of an encoder-decoder model with fairseq's SequenceGenerator.

    Args:
        target_dictionary: the task's target dictionary.
        beam: beam size (1 = greedy, the default of MGS).
        nbest: hypotheses returned per sentence (<= beam; sampling returns ``beam`` samples).
        sampling: sample instead of searching (``sampling_topk`` / ``sampling_topp`` restrict it).
        temperature: softmax temperature of the generator.
        max_len_ratio: maximum output length as a multiple of the longest target of the batch.
    """

    def __init__(self, target_dictionary, beam: int = 1, nbest: int = 1, sampling: bool = False,
                 sampling_topk: int = -1, sampling_topp: float = -1.0, temperature: float = 1.0,
                 max_len_ratio: float = 1.3):  # fmt: skip
        if beam < 1:
            raise ValueError(f"beam size must be >= 1, got {beam}")
        if not 1 <= nbest <= beam:
            raise ValueError(f"nbest must be in [1, beam = {beam}], got {nbest}")
        if not max_len_ratio > 0:
            raise ValueError(f"the maximum length ratio must be > 0, got {max_len_ratio}")
        if not temperature > 0:
            raise ValueError(f"the temperature must be > 0, got {temperature}")
        self.dictionary = target_dictionary
        self.beam, self.nbest = beam, nbest
        self.sampling, self.sampling_topk, self.sampling_topp = sampling, sampling_topk, sampling_topp
        self.temperature = temperature
        self.max_len_ratio = max_len_ratio

    def max_length(self, sample, model) -> int:
        """ceil(ratio x longest target), at least 1, at most the decoder's positions - 1 (- the prefix).

        With ``prefix_tokens`` (text completion) the targets are the continuations (the prefix positions
        are padding), so this is the continuation's maximum length.
        """
        longest = int(target_lengths(sample["target"], self.dictionary.pad()).max())
        limit = model.max_decoder_positions() - 1 - prefix_length(sample)
        return max(1, min(int(math.ceil(self.max_len_ratio * longest)), limit))

    def build_generator(self, model, max_len: int):
        from fairseq import search
        from fairseq.sequence_generator import SequenceGenerator

        strategy = (
            search.Sampling(self.dictionary, self.sampling_topk, self.sampling_topp) if self.sampling else None
        )
        return SequenceGenerator(
            [model], self.dictionary, beam_size=self.beam, max_len_a=0, max_len_b=max_len, min_len=1,
            temperature=self.temperature, search_strategy=strategy,
        )  # fmt: skip

    @torch.no_grad()
    def decode(self, model, sample, seed: Optional[int] = None) -> List[List[Hypothesis]]:
        """B lists of ``nbest`` hypotheses, in the sample's order.

        Args:
            model: the (unwrapped) encoder-decoder model, decoded with its current parameters.
            sample: a fairseq translation sample (``net_input`` with ``src_tokens``, ``src_lengths``;
                ``target`` for the maximum length), or a text-completion sample (with ``prefix_tokens``).
            seed: seeds a forked RNG for sampling (None: the global RNG as it is).
        """
        max_len = self.max_length(sample, model)
        prefix = sample.get("prefix_tokens")  # B x k (text completion) or None
        k = prefix_length(sample)
        device = sample["net_input"]["src_tokens"].device
        with eval_mode(model), seeded_rng(seed if self.sampling else None, device):
            generator = self.build_generator(model, k + max_len)  # its constructor sets eval mode too
            outputs = generator.generate([model], {"net_input": sample["net_input"]}, prefix_tokens=prefix)
        eos = self.dictionary.eos()
        batch = []
        for hypos in outputs:
            row = []
            for hypo in hypos[: self.nbest]:
                tokens = hypo["tokens"].tolist()[k:]  # ends with EOS, natural or forced at max_len
                # a natural EOS comes at step s < max_len (s + 1 tokens); a forced one at step max_len
                terminated = len(tokens) <= max_len and len(tokens) > 0 and tokens[-1] == eos
                if tokens and tokens[-1] == eos:
                    tokens = tokens[:-1]
                row.append(Hypothesis(tokens, terminated, float(hypo["score"])))
            batch.append(row)
        return batch

    def decode_best(self, model, sample, seed: Optional[int] = None):
        """(B token lists, B termination flags) of the best hypothesis per sentence."""
        best = [row[0] for row in self.decode(model, sample, seed)]
        return [h.tokens for h in best], [h.terminated for h in best]


def prefix_length(sample) -> int:
    """k, the length of the sample's ``prefix_tokens`` (text completion), or 0."""
    prefix = sample.get("prefix_tokens")
    return 0 if prefix is None else int(prefix.size(1))


def prefixes(sample) -> Optional[List[List[int]]]:
    """B prefix token lists of a text-completion sample, or None for other samples."""
    prefix = sample.get("prefix_tokens")
    return None if prefix is None else prefix.tolist()


def references(sample, dictionary) -> List[List[int]]:
    """B reference token lists (no padding, no EOS) of a sample's targets."""
    pad, eos = dictionary.pad(), dictionary.eos()
    return [strip_reference(row, pad, eos) for row in sample["target"]]
