"""Tiny models built through fairseq's own option parsing, and hand-made batches for them.

``build`` parses a fairseq-train command line (so every default and check is fairseq's), sets up the
task and returns (task, model, criterion); all dropouts are 0 unless the flags say otherwise.
"""
import os
import tempfile
from typing import List, Sequence, Tuple

import torch
from fairseq import options, tasks
from fairseq.data import Dictionary, LanguagePairDataset, data_utils

from fairseq_ext.testing.cli import USER_DIR
from fairseq_ext.testing.synthetic import symbol

TINY_ARCH_FLAGS = {
    "transformer": [
        "--encoder-layers", "1", "--decoder-layers", "2", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    ],
    "lstm": [
        "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-hidden-size", "16", "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16",
    ],
    "fconv": [
        "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--decoder-out-embed-dim", "16",
        "--encoder-layers", "[(16, 3)] * 2", "--decoder-layers", "[(16, 3)] * 2",
    ],
    "transformer_lm": [
        "--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
        "--decoder-attention-heads", "2",
    ],
    "cmlm_transformer": [
        "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    ],
}  # fmt: skip

ZERO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]


def write_dictionary(data_dir: str, num_symbols: int, names: Sequence[str] = ("dict.src.txt", "dict.tgt.txt")):
    os.makedirs(data_dir, exist_ok=True)
    for name in names:
        with open(os.path.join(data_dir, name), "w") as f:
            for i in range(num_symbols):
                f.write(f"{symbol(i)} {1000 - i}\n")


def build(arch: str, criterion_flags: Sequence[str], num_symbols: int = 6, data_dir: str = None, extra: Sequence[str] = ()):
    """(task, model, criterion) for a tiny ``arch``; translation src->tgt, or language_modeling for *_lm."""
    data_dir = data_dir or tempfile.mkdtemp(prefix="fairseq_ext_tiny_")
    lm = arch.endswith("_lm")
    write_dictionary(data_dir, num_symbols, ("dict.txt",) if lm else ("dict.src.txt", "dict.tgt.txt"))
    if lm:
        task_flags = ["--task", "language_modeling", "--tokens-per-sample", "64"]
    elif arch.startswith("cmlm"):
        task_flags = ["--task", "translation_lev", "-s", "src", "-t", "tgt", "--noise", "random_mask"]
    else:
        task_flags = ["--task", "translation", "-s", "src", "-t", "tgt"]
    argv = [data_dir, "--user-dir", USER_DIR, "--cpu", "--arch", arch, *task_flags, *TINY_ARCH_FLAGS.get(arch, [])]
    argv += ZERO_DROPOUT if arch != "lstm" and arch != "fconv" else ["--dropout", "0"]
    argv += [*criterion_flags, *extra]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    criterion = task.build_criterion(args)
    return task, model, criterion


def ids(dictionary: Dictionary, symbols: Sequence[int]) -> torch.Tensor:
    """Token ids of synthetic symbols w{i} followed by EOS."""
    return torch.tensor([dictionary.index(symbol(i)) for i in symbols] + [dictionary.eos()], dtype=torch.long)


def translation_batch(task, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], given_order: bool = False):
    """A fairseq translation mini-batch for (source symbols, target symbols) pairs.

    fairseq's collater sorts examples by decreasing source length (LSTM encoders rely on it);
    ``given_order`` puts them back in the order given (for batch-order tests on other encoders).
    """
    src = [ids(task.src_dict, s) for s, _ in pairs]
    tgt = [ids(task.tgt_dict, t) for _, t in pairs]
    dataset = LanguagePairDataset(
        src, [len(x) for x in src], task.src_dict, tgt, [len(x) for x in tgt], task.tgt_dict, left_pad_source=True
    )
    sample = dataset.collater([dataset[i] for i in range(len(pairs))])
    return restore_order(sample) if given_order else sample


def restore_order(sample):
    """fairseq's collater sorts by source length; put the examples back in their given order."""
    order = torch.argsort(sample["id"])

    def pick(x):
        if torch.is_tensor(x) and x.dim() > 0 and x.size(0) == order.numel():
            return x.index_select(0, order)
        if isinstance(x, dict):
            return {k: pick(v) for k, v in x.items()}
        return x

    return pick(sample)


def lm_batch(task, sequences: Sequence[Sequence[int]]):
    """A language-modelling mini-batch: inputs [EOS, w...] and targets [w..., EOS], right-padded."""
    d = task.source_dictionary
    seqs: List[torch.Tensor] = [ids(d, s) for s in sequences]
    inputs = [torch.cat([torch.tensor([d.eos()]), s[:-1]]) for s in seqs]
    src = data_utils.collate_tokens(inputs, d.pad(), left_pad=False)
    tgt = data_utils.collate_tokens(seqs, d.pad(), left_pad=False)
    return {
        "id": torch.arange(len(seqs)),
        "nsentences": len(seqs),
        "ntokens": sum(len(s) for s in seqs),
        "net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(s) for s in seqs])},
        "target": tgt,
    }


def assert_batching_invariance(criterion, model, task, pairs, rtol=1e-5, atol=1e-4):
    """A deterministic criterion's loss of a batch equals the sum over its sentences alone (padding),
    does not depend on the batch order, and equals the sum of its ``reduce=False`` losses.
    Returns the logging output of the full batch."""
    full, _, log = criterion(model, translation_batch(task, pairs, given_order=True))
    singles = [criterion(model, translation_batch(task, [p]))[0] for p in pairs]
    torch.testing.assert_close(full, sum(singles), rtol=rtol, atol=atol)
    permuted = criterion(model, translation_batch(task, pairs[::-1], given_order=True))[0]
    torch.testing.assert_close(full, permuted, rtol=rtol, atol=atol)
    unreduced, _, _ = criterion(model, translation_batch(task, pairs), reduce=False)
    assert unreduced.dim() >= 1 and unreduced.numel() > 1
    torch.testing.assert_close(unreduced.sum(), full, rtol=rtol, atol=atol)
    return log


def perturb_flowseq_posterior(model, seed: int = 3):
    """Moves a FlowSeq model's q(z|y,x) off its zero-initialised N(0, I) start (mu and log sigma^2 then
    vary with y and t)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head, std in ((model.posterior_net.mu, 0.3), (model.posterior_net.logvar, 0.2)):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * std)
