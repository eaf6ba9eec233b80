"""The ``lm`` task loss through fairseq-train: ``--criterion mgs --mgs-task-loss lm`` on ``--task text_completion``
(Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence Modeling", AAAI 2021,
section 5.1, MGS-LM: c_LM(Y_hat) = -log p_score(Y_hat), p_score the MLE model MGS starts from).

A tiny language model is trained with ``--task language_modeling``; MGS then fine-tunes that very checkpoint with
it as the frozen scorer, so the cost logged at update 1 is the scorer's NLL of its own greedy continuations,
which the test recomputes by hand (a full forward per step, no incremental state, no fairseq generator).
The refusals of a missing or wrong scorer are tested in-process in test_mgs.py and test_task_losses.py; here
only that fairseq-train stops before training and names the flag.
"""
import math
import os
import re

import pytest
import torch

from fairseq_ext.testing import cli

K = 6  # prefix tokens: the synthetic lines have 6 to 20 tokens
TINY_LM = ["--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--tokens-per-sample", "64"]  # fmt: skip
TEXT_COMPLETION = ["--task", "text_completion", "--completion-prefix-length", str(K)]
MAX_LEN_RATIO = 1.3  # --mgs-max-len-ratio's default (the paper's)


logged = cli.train_inner_values


def examples(lm_data_bin, dictionary):
    """(prefix, continuation with its EOS) of every training line kept by text_completion, from the raw text."""
    raw = os.path.join(os.path.dirname(lm_data_bin), "raw", "train.txt")
    out = []
    with open(raw) as f:
        for line in f:
            tokens = dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).tolist()
            if len(tokens) - 1 > K:  # more than k tokens before the EOS (all lines fit the 64 positions)
                out.append((tokens[:K], tokens[K:]))
    return out


@torch.no_grad()
def greedy_then_nll(model, dictionary, prefix, max_len):
    """The greedy continuation of ``prefix`` (at most ``max_len`` tokens before a natural EOS; fairseq's generator
    never picks padding) and its NLL under ``model``, EOS included when emitted: (nll, terminated, length)."""
    eos, pad = dictionary.eos(), dictionary.pad()
    tokens = [eos] + list(prefix)
    terminated = False
    for _ in range(max_len):
        lprobs = model.get_normalized_probs(model(torch.tensor([tokens])), log_probs=True)[0, -1]  # V
        lprobs[pad] = -math.inf
        token = int(lprobs.argmax())
        if token == eos:
            terminated = True
            break
        tokens.append(token)
    continuation = tokens[1 + len(prefix) :]
    targets = continuation + ([eos] if terminated else [])
    inputs = torch.tensor([[eos] + list(prefix) + continuation])  # 1 x L
    lprobs = model.get_normalized_probs(model(inputs), log_probs=True)[0]  # L x V
    first = len(prefix)  # position that predicts the first continuation token
    nll = -sum(float(lprobs[first + i, t]) for i, t in enumerate(targets))
    return nll, terminated, len(continuation)


@pytest.mark.slow
def test_mgs_lm_cost_through_fairseq_train_is_the_frozen_models_nll(lm_data_bin, tmp_path):
    from fairseq import checkpoint_utils

    lm_dir, ft_dir = str(tmp_path / "lm"), str(tmp_path / "mgs_lm")
    cli.train(lm_data_bin, lm_dir, ["--task", "language_modeling", "--sample-break-mode", "eos", *TINY_LM,
                                     "--criterion", "cross_entropy", "--dropout", "0", "--max-tokens", "400",
                                     "--max-epoch", "3", "--lr", "0.01"])  # fmt: skip
    scorer = os.path.join(lm_dir, "checkpoint_last.pt")
    # one batch holds every example, so update 1 decodes all of them with the scorer's own weights
    flags = TEXT_COMPLETION + TINY_LM + [
        "--dropout", "0", "--criterion", "mgs", "--mgs-task-loss", "lm", "--mgs-lm-scorer-path", scorer,
        "--mgs-num-candidates", "2", "--mgs-alpha", "1", "--max-tokens", "100000", "--batch-size", "1000",
        "--max-update", "2", "--ddp-backend", "legacy_ddp", "--restore-file", scorer, "--reset-optimizer",
        "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler", "--lr", "0.0005",
    ]  # fmt: skip
    log = cli.train(lm_data_bin, ft_dir, flags)
    assert re.search(r"Loaded checkpoint .*lm/checkpoint_last\.pt", log), log[-3000:]
    costs = logged(log, "mgs_cost")
    assert [u for u, _ in costs] == [1, 2] and all(math.isfinite(c) and c > 0 for _, c in costs), costs

    models, _ = checkpoint_utils.load_model_ensemble([scorer])
    model = models[0].eval()
    d = model.decoder.dictionary
    pairs = examples(lm_data_bin, d)
    m = re.search(r"text_completion train: \d+ lines: (\d+) prefix", log)
    assert m and int(m.group(1)) == len(pairs), log[-3000:]
    max_len = math.ceil(MAX_LEN_RATIO * max(len(c) for _, c in pairs))  # 1.3 x the batch's longest continuation
    by_hand = [greedy_then_nll(model, d, prefix, max_len) for prefix, _ in pairs]
    expected = sum(nll for nll, _, _ in by_hand) / len(pairs)  # the pooled cost: the mean over sentences
    print(f"mgs_cost at update 1: logged {costs[0][1]}, by hand {expected:.6f} over {len(pairs)} continuations")
    assert costs[0][1] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    nonterm = sum(1 for _, done, _ in by_hand if not done) / len(pairs)
    length = sum(n for _, _, n in by_hand) / len(pairs)
    assert logged(log, "mgs_nonterm")[0][1] == pytest.approx(nonterm, abs=1e-3)
    assert logged(log, "mgs_length")[0][1] == pytest.approx(length, abs=1e-3)
    # the fine-tuned model decodes every test prefix
    gen = cli.run_cli("fairseq-generate", [
        lm_data_bin, "--path", os.path.join(ft_dir, "checkpoint_last.pt"), "--cpu", *TEXT_COMPLETION,
        "--gen-subset", "test", "--batch-size", "7", "--required-batch-size-multiple", "1", "--num-workers", "0",
        "--beam", "1",
    ])  # fmt: skip
    kept = re.search(r"text_completion test: \d+ lines: (\d+) prefix", gen)
    assert kept and len(cli.hypotheses(gen)) == int(kept.group(1)) > 0


@pytest.mark.slow
def test_fairseq_train_stops_on_a_missing_scorer_naming_the_flag(lm_data_bin, tmp_path):
    missing = str(tmp_path / "no_such_lm.pt")
    flags = TEXT_COMPLETION + TINY_LM + ["--criterion", "mgs", "--mgs-task-loss", "lm", "--mgs-lm-scorer-path", missing,
                                         "--max-update", "1"]  # fmt: skip
    with pytest.raises(cli.CliError) as error:
        cli.train(lm_data_bin, str(tmp_path / "never"), flags)
    assert f"--mgs-lm-scorer-path {missing}: no such file" in str(error.value)
    assert "| train_inner |" not in str(error.value)
    flags = [f for f in flags if f not in ("--mgs-lm-scorer-path", missing)]
    with pytest.raises(cli.CliError, match="pass --mgs-lm-scorer-path CHECKPOINT"):
        cli.train(lm_data_bin, str(tmp_path / "never2"), flags)
