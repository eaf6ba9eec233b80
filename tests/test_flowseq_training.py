"""fairseq-train / fairseq-generate with --task translation_flowseq --arch flowseq_tiny --criterion
flowseq_loss on the tiny reverse task: the schedule, a resume, non-finite skipping, bad flags,
2 data-parallel workers, and decoding."""
import os
import re

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.criterions.flowseq_loss import kl_weight
from fairseq_ext.testing import cli

pytestmark = pytest.mark.slow  # every test here runs fairseq-train or fairseq-generate

INIT, HOLD, WARMUP, NAN_AT = 2, 1, 3, 6  # NAN_AT: the update count (0-based) whose loss is made NaN
FLOWSEQ = [
    "--task", "translation_flowseq", "--arch", "flowseq_tiny", "--criterion", "flowseq_loss",
    "--label-smoothing", "0.1", "--max-tokens", "500", "--update-epoch-batch-itr", "True",
    "--flowseq-init-updates", str(INIT), "--flowseq-kl-hold-updates", str(HOLD),
    "--flowseq-kl-warmup-updates", str(WARMUP),
]  # fmt: skip
INIT_LINE = "flowseq: data-dependent init of the prior"


def train_inner(log):
    """num_updates -> {key: value string} for every train_inner line (log interval 1)."""
    out = {}
    for line in log.splitlines():
        if "| train_inner |" in line:
            fields = dict(re.findall(r"(\w+)=([^,\s]+)", line.split("| train_inner |", 1)[1]))
            out[int(fields["num_updates"])] = fields
    return out


def checkpoint(path):
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    return state["model"], state["optimizer_history"][-1]["num_updates"]


@pytest.fixture(scope="module")
def straight_and_resumed(reverse_data_bin, tmp_path_factory):
    """8 updates straight through (with --eval-bleu), and 5 + 3 with a resume inside epoch 2."""
    flags = FLOWSEQ + ["--flowseq-inject-nonfinite", str(NAN_AT)]
    straight_dir = str(tmp_path_factory.mktemp("fs_straight"))
    resumed_dir = str(tmp_path_factory.mktemp("fs_resumed"))
    straight = cli.train(reverse_data_bin, straight_dir, flags + ["--max-update", "8", "--eval-bleu",
                                                                  "--eval-bleu-print-samples"])  # fmt: skip
    first = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "5"])
    second = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "8"])
    return straight_dir, straight, resumed_dir, first, second


def test_training_logs_the_elbo_terms_and_follows_the_schedule(straight_and_resumed):
    _, straight, _, _, _ = straight_and_resumed
    lines = train_inner(straight)
    assert sorted(lines) == list(range(1, 9)), straight[-3000:]
    for u, fields in lines.items():
        for key in ("loss", "recon", "kl", "length_loss", "nll_loss", "nonfinite_skipped"):
            assert key in fields, (u, fields)
        if u - 1 == NAN_AT:
            continue
        # update u runs with the count the trainer had before it: u - 1
        assert float(fields["kl_weight"]) == pytest.approx(kl_weight(u - 1, INIT, HOLD, WARMUP), abs=1e-5), u
        if u - 1 < INIT:
            assert float(fields["kl"]) == 0.0  # pre-training: no KL term at all
    assert straight.count(INIT_LINE) == 1
    # the validation ELBO, and decoding through TranslationTask's --eval-bleu machinery (an 8-update
    # model emits only EOS, so fairseq logs no BLEU: its n-gram totals are 0)
    assert re.search(r"\| valid \|.* loss [\d.]+ \| recon [\d.]+ \| kl [\d.]+", straight), straight[-3000:]
    assert "example hypothesis" in straight and "example reference" in straight


def test_a_non_finite_step_is_skipped_not_fatal(straight_and_resumed):
    _, straight, _, _, _ = straight_and_resumed
    lines = train_inner(straight)
    skipped = {u for u, fields in lines.items() if fields["nonfinite_skipped"] == "1"}
    assert skipped == {NAN_AT + 1}
    assert "skipping this batch" in straight and "optimizer step skipped" in straight
    assert float(lines[NAN_AT + 2]["loss"]) > 0  # training goes on


def test_resume_continues_the_schedule_without_a_second_prior_init(straight_and_resumed):
    straight_dir, straight, resumed_dir, first, second = straight_and_resumed
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch 2 @ 5 updates\)", second), second[-3000:]
    assert first.count(INIT_LINE) == 1 and second.count(INIT_LINE) == 0
    resumed = {**train_inner(first), **train_inner(second)}
    expected = train_inner(straight)
    assert sorted(resumed) == sorted(expected)
    for u in expected:
        for key in ("loss", "kl_weight", "kl", "nonfinite_skipped"):
            assert resumed[u].get(key) == expected[u].get(key), (u, key)
    (a, n_a), (b, n_b) = checkpoint(os.path.join(straight_dir, "checkpoint_last.pt")), checkpoint(
        os.path.join(resumed_dir, "checkpoint_last.pt")
    )
    assert n_a == n_b == 8
    assert a["prior_initialized_flag"].item() == 1
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_with_the_trained_model(straight_and_resumed, reverse_data_bin):
    straight_dir = straight_and_resumed[0]
    out = cli.generate(reverse_data_bin, os.path.join(straight_dir, "checkpoint_last.pt"), ["--task", "translation_flowseq"])
    assert len(cli.hypotheses(out)) == 20


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--flowseq-length-range", "1"], "--flowseq-length-range"),
        (["--flowseq-prior-steps", "1,a"], "--flowseq-prior-steps"),
        (["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1"], "--arch"),
    ],
    ids=["length-range", "prior-steps", "arch"],
)
def test_bad_flags_fail_before_training_and_write_nothing(reverse_data_bin, tmp_path, flags, match):
    save = tmp_path / "never"
    with pytest.raises(cli.CliError, match=match) as err:
        cli.train(reverse_data_bin, str(save), FLOWSEQ + flags + ["--max-update", "2"])
    assert "num_updates=1" not in str(err.value)
    assert not save.exists() or not any(p.name.endswith(".pt") for p in save.iterdir())


# -- 2 gloo workers ----------------------------------------------------------------------------------
def train_two_workers(data_bin, save_dir, flags, workdir, timeout=600):
    """fairseq-train on 2 gloo workers; both ranks' logs, with the model's INFO lines (the prior checksum)."""
    return cli.train_distributed(data_bin, save_dir, flags, workdir, 2, timeout, info_loggers=("fairseq_ext.models.flowseq",))


def test_two_workers_initialise_the_prior_identically(reverse_data_bin, tmp_path):
    flags = FLOWSEQ[:] + ["--max-update", "4"]
    logs = train_two_workers(reverse_data_bin, str(tmp_path / "dp"), flags, tmp_path)
    assert "training on 2 devices" in logs[0], logs[0][-3000:]
    checksums = [re.findall(r"prior parameter checksum ([-\d.e+]+)", log) for log in logs]
    assert len(checksums[0]) == 1 and checksums[0] == checksums[1], checksums
    assert sorted(train_inner(logs[0])) == [1, 2, 3, 4]
