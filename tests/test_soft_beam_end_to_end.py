"""soft_beam_loss through the command line, as a user runs it: a cross-entropy warm start, training with
an annealed alpha (resumed exactly), two gloo workers, and generation from the result."""
import os
import re

import pytest

from fairseq_ext.testing import cli
from test_resume_and_distributed import bitwise_equal, logged, max_abs_diff, model_weights, train_distributed

pytestmark = pytest.mark.slow  # every test here runs fairseq-train or fairseq-generate

COMMON = cli.TINY_TRANSFORMER + [
    "--task", "translation", "--dropout", "0", "--max-tokens", "500", "--update-epoch-batch-itr", "True",
]  # fmt: skip
SOFT_BEAM = [
    "--criterion", "soft_beam_loss", "--soft-beam-size", "2", "--soft-beam-extra-steps", "2",
    "--soft-beam-alpha", "1", "--soft-beam-alpha-schedule", "exponential", "--soft-beam-alpha-growth", "2",
    "--soft-beam-alpha-period-updates", "4",
]  # fmt: skip
WARM_START = ["--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]


@pytest.fixture(scope="module")
def ce_checkpoint(reverse_data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("sb_ce"))
    cli.train(reverse_data_bin, save, COMMON + ["--criterion", "label_smoothed_cross_entropy", "--max-epoch", "3"])
    return os.path.join(save, "checkpoint_last.pt")


def warm_started(data_bin, save, ce_checkpoint, max_update, extra=()):
    return cli.train(data_bin, save, COMMON + SOFT_BEAM + ["--restore-file", ce_checkpoint, *WARM_START,
                                                          "--max-update", str(max_update), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def straight_and_resumed(reverse_data_bin, ce_checkpoint, tmp_path_factory):
    straight, resumed = str(tmp_path_factory.mktemp("sb_straight")), str(tmp_path_factory.mktemp("sb_resumed"))
    straight_log = warm_started(reverse_data_bin, straight, ce_checkpoint, 8)
    first = warm_started(reverse_data_bin, resumed, ce_checkpoint, 5)
    # the second run finds checkpoint_last.pt in its save dir and resumes from it (not from --restore-file)
    second = cli.train(reverse_data_bin, resumed, COMMON + SOFT_BEAM + ["--max-update", "8"])
    return straight, straight_log, resumed, first, second


def test_warm_start_from_cross_entropy_then_annealed_alpha_resumes_exactly(straight_and_resumed):
    straight, straight_log, resumed, first, second = straight_and_resumed
    assert re.search(r"Loaded checkpoint .*sb_ce.*checkpoint_last\.pt", straight_log), straight_log[-3000:]
    assert "soft_hamming" in straight_log and "map_errors" in straight_log
    alphas = logged(first, "sb_alpha") + logged(second, "sb_alpha")
    assert alphas == logged(straight_log, "sb_alpha")
    # update u runs with the count before it: alpha = 2 ** ((u - 1) / 4)
    for u, alpha in alphas:
        assert alpha == pytest.approx(2 ** ((u - 1) / 4), abs=1e-4), (u, alpha)
    assert logged(first, "loss") + logged(second, "loss") == logged(straight_log, "loss")
    (a, n_a), (b, n_b) = model_weights(straight), model_weights(resumed)
    assert n_a == n_b == 8 and bitwise_equal(a, b), max_abs_diff(a, b)


def test_generate_from_the_trained_model_gives_every_sentence_a_hypothesis(reverse_data_bin, straight_and_resumed):
    straight = straight_and_resumed[0]
    out = cli.generate(reverse_data_bin, os.path.join(straight, "checkpoint_last.pt"), ["--beam", "2"])
    cli.check_all_hypotheses(out, cli.count_lines(reverse_data_bin, "test"))


def test_two_gloo_workers_equal_one_worker_with_update_freq_2(reverse_data_bin, ce_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("sb_dp")
    single_dir, double_dir = str(work / "single"), str(work / "double")
    flags = COMMON + SOFT_BEAM + ["--restore-file", ce_checkpoint, *WARM_START, "--max-update", "3"]
    single = cli.run_cli("fairseq-train", cli.train_args(reverse_data_bin, single_dir, flags + ["--update-freq", "2"]))
    double = train_distributed(reverse_data_bin, double_dir, flags, work)
    assert "training on 2 devices" in double, double[-3000:]
    assert logged(double, "loss") == logged(single, "loss") and len(logged(double, "loss")) == 3
    (w1, n1), (w2, n2) = model_weights(single_dir), model_weights(double_dir)
    assert n1 == n2 == 3
    diff = max_abs_diff(w1, w2)
    print(f"soft_beam_loss, 2 workers vs --update-freq 2: max |dW| = {diff!r}")
    assert diff < 1e-6
