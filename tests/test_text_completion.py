"""Task ``text_completion`` (Welleck and Cho, AAAI 2021, section 5.1) and the sequence-level criteria on it."""
import os
import re

import numpy as np
import pytest
import torch
from fairseq import options, tasks
from fairseq.data import Dictionary

from fairseq_ext.data.text_completion import TextCompletionDataset
from fairseq_ext.testing import cli

K = 6  # prefix length of the tests: the synthetic lines have 6 to 20 tokens, so some are dropped
TINY_LM = ["--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--tokens-per-sample", "64"]  # fmt: skip
TASK = ["--task", "text_completion", "--completion-prefix-length", str(K)]


class Lines:
    def __init__(self, rows):
        self.rows = [torch.tensor(r, dtype=torch.long) for r in rows]
        self.sizes = np.array([len(r) for r in rows])

    def __getitem__(self, i):
        return self.rows[i]

    def __len__(self):
        return len(self.rows)


def test_dataset_makes_prefix_continuation_pairs_and_accounts_for_every_line():
    d = Dictionary()
    for w in "abcdefgh":
        d.add_symbol(w)
    eos, pad = d.eos(), d.pad()
    a, b, c, e = (d.index(x) for x in "abce")
    rows = [[a, b, c, eos], [a, b, eos], [a, b, c, e, a, b, eos], [a, eos], [eos]]
    ds = TextCompletionDataset(Lines(rows), 2, d, max_tokens=6)
    assert (ds.account.lines, ds.account.kept, ds.account.too_short, ds.account.too_long) == (5, 1, 3, 1)
    assert "5 lines" in str(ds.account) and ds.line_of(0) == 0
    s = ds.collater([ds[0]])
    assert s["net_input"]["src_tokens"].tolist() == [[eos, a, b, c]]  # EOS, prefix, continuation[:-1]
    assert s["target"].tolist() == [[pad, pad, c, eos]]  # the loss covers the continuation only
    assert s["prefix_tokens"].tolist() == [[a, b]] and s["ntokens"] == 2


def setup(data_bin, *flags):
    argv = [data_bin, "--user-dir", cli.USER_DIR, "--cpu", *TASK, *TINY_LM, "--dropout", "0", *flags]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    return task, task.build_model(args), task.build_criterion(args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--completion-prefix-length", "0"], "--completion-prefix-length"),
        (["--completion-max-len-ratio", "0"], "--completion-max-len-ratio"),
        (["--sample-break-mode", "complete"], "--sample-break-mode complete does not apply"),
        (["--add-bos-token"], "--add-bos-token"),
    ],
)
def test_impossible_options_are_refused(lm_data_bin, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        setup(lm_data_bin, "--criterion", "cross_entropy", *flags)


def test_validation_loss_covers_the_continuation_only(lm_data_bin):
    task, model, criterion = setup(lm_data_bin, "--criterion", "cross_entropy")
    task.load_dataset("valid")
    ds = task.dataset("valid")
    assert ds.account.too_short > 0 and ds.account.kept + ds.account.too_short == ds.account.lines
    sample = ds.collater([ds[i] for i in range(4)])
    model.eval()
    loss, size, _ = criterion(model, sample)
    lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)  # B x T x V
    target = sample["target"]
    keep = target.ne(task.dictionary.pad())
    expected = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum()
    assert size == sample["ntokens"] == int(keep.sum())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "flags",
    [
        ["--criterion", "mgs", "--mgs-task-loss", "edit", "--mgs-num-candidates", "2"],
        ["--criterion", "mrt", "--mrt-task-loss", "edit", "--mrt-num-candidates", "2"],
        ["--criterion", "policy_gradient", "--pg-task-loss", "edit", "--pg-num-samples", "2"],
    ],
)
def test_sequence_level_criteria_continue_the_prefix(lm_data_bin, flags):
    task, model, criterion = setup(lm_data_bin, *flags)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(4)])
    # the training decodes: greedy continuations of the prefix, at most 1.3 x the longest continuation
    rows = criterion.decoder.decode(model, sample)
    longest = int(sample["target"].ne(task.dictionary.pad()).sum(-1).max())
    for row in rows:
        assert all(len(h.tokens) <= int(np.ceil(1.3 * longest)) for h in row)
    model.train()
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- end to end ---------------------------------------------------------------------------------------------
def kept_lines(log: str, split: str) -> int:
    m = re.search(rf"text_completion {split}: (\d+) lines: (\d+) prefix -> continuation examples, (\d+) dropped .*?, (\d+) dropped", log)
    assert m, log[-3000:]
    lines, kept, short, long = map(int, m.groups())
    assert kept + short + long == lines
    return kept


@pytest.mark.slow
def test_end_to_end_mle_then_each_criterion_then_generate(lm_data_bin, tmp_path):
    common = TASK + TINY_LM + ["--dropout", "0", "--max-tokens", "400", "--ddp-backend", "legacy_ddp"]
    mle_dir = str(tmp_path / "mle")
    log = cli.train(lm_data_bin, mle_dir, common + ["--criterion", "cross_entropy", "--max-epoch", "3", "--lr", "0.01"])
    kept_lines(log, "valid")
    mle = os.path.join(mle_dir, "checkpoint_last.pt")
    restore = ["--restore-file", mle, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
               "--reset-lr-scheduler", "--max-update", "2", "--lr", "0.0005"]  # fmt: skip
    runs = {
        "mgs": ["--criterion", "mgs", "--mgs-task-loss", "edit", "--mgs-num-candidates", "2", "--mgs-alpha", "1"],
        "mrt": ["--criterion", "mrt", "--mrt-task-loss", "edit", "--mrt-candidates", "sample", "--mrt-mle-weight", "0.1"],
        "pg": ["--criterion", "policy_gradient", "--pg-task-loss", "edit", "--pg-mle-weight", "0.1"],
    }
    for name, flags in runs.items():
        save = str(tmp_path / name)
        out = cli.train(lm_data_bin, save, common + flags + restore)
        assert re.search(r"Loaded checkpoint", out) and "| train_inner |" in out, out[-3000:]
        gen = cli.run_cli("fairseq-generate", [
            lm_data_bin, "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu", *TASK, "--gen-subset", "test",
            "--batch-size", "7", "--required-batch-size-multiple", "1", "--num-workers", "0", "--beam", "1",
        ])  # fmt: skip
        hyps = cli.hypotheses(gen)
        assert len(hyps) == kept_lines(gen, "test") and len(cli.references(gen)) == len(hyps), name
    # --prefix-size would take padding for a prefix: refused
    with pytest.raises(cli.CliError, match="drop --prefix-size"):
        cli.run_cli("fairseq-generate", [lm_data_bin, "--path", mle, "--cpu", *TASK, "--gen-subset", "test",
                                         "--prefix-size", "2", "--num-workers", "0"])  # fmt: skip
