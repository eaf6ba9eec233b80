"""Resumed and data-parallel training reproduce uninterrupted single-process training exactly.

Every run here passes ``--update-epoch-batch-itr True``.  Without it fairseq builds the epoch batch
iterator once, ordering examples of equal length with the seed ``seed + epoch`` of the epoch the
*process* started in, and reuses those batches for every later epoch; a run resumed in epoch 2 thus
gets batches with other sentences in them than the uninterrupted run (same sizes, measured: the
weights then differ by ~2e-2 after 6 more updates).  With the flag, every epoch's batches are built
from ``seed + epoch`` in both runs.  fairseq seeds every update with ``seed + num_updates``, so the
sampled conditioning tokens match as well.
"""
import os
import re

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.modules.schedules import MixingSchedule
from fairseq_ext.testing import cli

# every test here runs fairseq-train, most of them several times or on 2 gloo workers
pytestmark = pytest.mark.slow

COMMON = cli.TINY_TRANSFORMER + [
    "--task", "translation", "--dropout", "0", "--max-tokens", "500", "--update-epoch-batch-itr", "True",
]  # fmt: skip

SCHEDULE_FLAGS = [
    "--criterion", "parallel_ss", "--ss-schedule", "linear", "--ss-ramp-updates", "8",
    "--ss-warmup-updates", "2", "--ss-prob", "0.5",
]  # fmt: skip
SCHEDULE = MixingSchedule(name="linear", max_prob=0.5, warmup_updates=2, ramp_updates=8)

# Deterministic conditioning: with p = 1 every coin picks the model and argmax draws no random numbers.
DETERMINISTIC_SS = ["--ss-conditioning", "argmax", "--ss-prob", "1.0", "--ss-num-passes", "2"]


def logged(log, key):
    """(num_updates, value of `key`) for every train_inner line (log interval 1)."""
    out = []
    for line in log.splitlines():
        if "| train_inner |" not in line:
            continue
        fields = dict(re.findall(r"(\w+)=([^,\s]+)", line.split("| train_inner |", 1)[1]))
        out.append((int(fields["num_updates"]), float(fields[key])))
    return out


def model_weights(path):
    """(model state, num_updates) of a checkpoint file or of a save dir's checkpoint_last.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint_last.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    return state["model"], state["optimizer_history"][-1]["num_updates"]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- a. resuming continues the schedule and the training exactly ---------------------------------
@pytest.fixture(scope="module")
def straight_and_resumed(reverse_data_bin, tmp_path_factory):
    """12 updates straight through, and 6 + 6 with a resume in the middle of epoch 2 (4 updates/epoch)."""
    flags = COMMON + SCHEDULE_FLAGS
    straight_dir = str(tmp_path_factory.mktemp("straight"))
    resumed_dir = str(tmp_path_factory.mktemp("resumed"))
    straight = cli.train(reverse_data_bin, straight_dir, flags + ["--max-update", "12"])
    first = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "6"])
    second = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "12"])
    return straight_dir, straight, resumed_dir, first, second


def test_resume_continues_the_schedule(straight_and_resumed):
    _, straight, _, first, second = straight_and_resumed
    # the resume point lies inside an epoch: the trainer restores its metrics there too
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch 2 @ 6 updates\)", second)
    resumed_probs = logged(first, "ss_prob") + logged(second, "ss_prob")
    assert [u for u, _ in resumed_probs] == list(range(1, 13))
    assert [u for u, _ in logged(straight, "ss_prob")] == list(range(1, 13))
    for u, p in resumed_probs:
        # update u runs with the count the trainer had before it: u - 1 (logs round to 4 decimals)
        assert p == pytest.approx(SCHEDULE(u - 1), abs=6e-5), (u, p)
    assert resumed_probs == logged(straight, "ss_prob")
    assert SCHEDULE(1) == 0.0 and SCHEDULE(11) == 0.5  # the run covers warm-up, ramp and plateau


def test_resumed_training_is_bitwise_identical(straight_and_resumed):
    straight_dir, straight, resumed_dir, first, second = straight_and_resumed
    assert logged(first, "loss") + logged(second, "loss") == logged(straight, "loss")
    straight_weights, n_straight = model_weights(straight_dir)
    resumed_weights, n_resumed = model_weights(resumed_dir)
    assert n_straight == n_resumed == 12
    assert bitwise_equal(straight_weights, resumed_weights), max_abs_diff(straight_weights, resumed_weights)


# -- b. 2 gloo workers on CPU == 1 worker with --update-freq 2 -------------------------------------
def train_args(data_bin, save_dir, flags):
    return cli.train_args(data_bin, save_dir, flags)


def train_distributed(data_bin, save_dir, flags, workdir, world_size=2, timeout=cli.HANG_TIMEOUT):
    """fairseq-train on ``world_size`` gloo workers (fairseq_ext.testing.cli.train_distributed): rank 0's log."""
    return cli.train_distributed(data_bin, save_dir, flags, workdir, world_size, timeout)[0]


@pytest.fixture(scope="module")
def data_parallel_runs(reverse_data_bin, tmp_path_factory):
    """Deterministic parallel_ss (4 batches = 2 updates per epoch) trained three ways:

    * single: 1 process, --update-freq 2, 3 epochs straight (checkpoint2.pt, checkpoint3.pt kept);
    * double: 2 gloo workers, 2 epochs;
    * resumed: the 2 workers resumed from double's checkpoint_last.pt for epoch 3.
    """
    flags = COMMON + ["--criterion", "parallel_ss", *DETERMINISTIC_SS]
    work = tmp_path_factory.mktemp("dp")
    single_dir, double_dir = str(work / "single"), str(work / "double")
    single_flags = flags + ["--update-freq", "2", "--max-epoch", "3"]
    single = cli.run_cli("fairseq-train", train_args(reverse_data_bin, single_dir, single_flags))
    double = train_distributed(reverse_data_bin, double_dir, flags + ["--max-epoch", "2"], work)
    double_weights = model_weights(double_dir)
    resumed = train_distributed(reverse_data_bin, double_dir, flags + ["--max-epoch", "3"], work)
    return dict(
        single=single,
        single_epoch2=model_weights(os.path.join(single_dir, "checkpoint2.pt")),
        single_epoch3=model_weights(os.path.join(single_dir, "checkpoint3.pt")),
        double=double,
        double_weights=double_weights,
        resumed=resumed,
        resumed_weights=model_weights(double_dir),
    )


def test_two_workers_equal_one_worker_with_update_freq_2(data_parallel_runs):
    runs = data_parallel_runs
    single, double = runs["single"], runs["double"]
    assert "training on 2 devices" in double, double[-3000:]
    # the same updates: 2 per epoch, each over the words of two batches
    assert [u for u, _ in logged(double, "loss")] == [1, 2, 3, 4]
    assert logged(double, "wpb") == logged(single, "wpb")[:4]
    assert logged(double, "loss") == logged(single, "loss")[:4]
    assert all(p == 1.0 for _, p in logged(double, "ss_prob"))
    (single_weights, n_single), (double_weights, n_double) = runs["single_epoch2"], runs["double_weights"]
    assert n_single == n_double == 4
    diff = max_abs_diff(single_weights, double_weights)
    print(f"2 workers vs 1 worker --update-freq 2: max |dW| = {diff!r}")
    assert diff == 0.0  # measured: bitwise identical (gloo's 2-term sum equals gradient accumulation)


def test_two_worker_resume_matches_uninterrupted_training(data_parallel_runs):
    runs = data_parallel_runs
    resumed = runs["resumed"]
    # rank 0 read the checkpoint and broadcast it to rank 1 (through torch.load: the allowlist again)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch 3 @ 4 updates\)", resumed), resumed[-3000:]
    assert [u for u, _ in logged(resumed, "loss")] == [5, 6]
    assert logged(runs["double"], "loss") + logged(resumed, "loss") == logged(runs["single"], "loss")
    (single_weights, n_single), (resumed_weights, n_resumed) = runs["single_epoch3"], runs["resumed_weights"]
    assert n_single == n_resumed == 6
    assert bitwise_equal(single_weights, resumed_weights), max_abs_diff(single_weights, resumed_weights)


def test_sequential_ss_trains_with_two_workers(reverse_data_bin, tmp_path):
    flags = COMMON + ["--criterion", "sequential_ss", "--ss-prob", "0.5", "--max-epoch", "1", "--no-epoch-checkpoints"]
    log = train_distributed(reverse_data_bin, str(tmp_path / "seq"), flags, tmp_path)
    assert "training on 2 devices" in log
    losses = logged(log, "loss")
    assert [u for u, _ in losses] == [1, 2]
    assert all(0.0 < loss < 100.0 for _, loss in losses)
    assert [p for _, p in logged(log, "ss_prob")] == [0.5, 0.5]
    assert all(f > 0.0 for _, f in logged(log, "ss_from_model"))  # the model's tokens were fed
    _, n = model_weights(str(tmp_path / "seq"))
    assert n == 2


# -- c. differentiable_ss: annealed alpha and sampled relaxations resume exactly; 2 workers ------------
DSS_FLAGS = [
    "--criterion", "differentiable_ss", "--dss-mode", "sample", "--ss-inverse-sigmoid-k", "2",
    "--dss-alpha", "1", "--dss-alpha-schedule", "exponential", "--dss-alpha-growth", "2",
    "--dss-alpha-period-updates", "3", "--dss-decoding", "parallel", "--dss-num-passes", "2",
]  # fmt: skip


def test_differentiable_ss_resumes_exactly(reverse_data_bin, tmp_path):
    flags = COMMON + DSS_FLAGS
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = cli.train(reverse_data_bin, straight_dir, flags + ["--max-update", "6"])
    first = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "3"])
    second = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "6"])
    alphas = logged(first, "dss_alpha") + logged(second, "dss_alpha")
    assert alphas == logged(straight, "dss_alpha")
    assert [a for _, a in alphas] == [pytest.approx(2 ** ((u - 1) / 3), abs=1e-4) for u in range(1, 7)]
    assert logged(first, "loss") + logged(second, "loss") == logged(straight, "loss")
    assert bitwise_equal(model_weights(straight_dir)[0], model_weights(resumed_dir)[0])


def test_differentiable_ss_two_workers_equal_one_worker_with_update_freq_2(reverse_data_bin, tmp_path):
    # deterministic: p = 1 (every coin picks the model) and greedy relaxations draw no random numbers
    flags = COMMON + ["--criterion", "differentiable_ss", "--ss-prob", "1", "--ss-schedule", "constant",
                      "--dss-alpha", "2", "--dss-decoding", "parallel", "--dss-num-passes", "2",
                      "--max-epoch", "1"]  # fmt: skip
    single_dir, double_dir = str(tmp_path / "single"), str(tmp_path / "double")
    single = cli.run_cli("fairseq-train", train_args(reverse_data_bin, single_dir, flags + ["--update-freq", "2"]))
    double = train_distributed(reverse_data_bin, double_dir, flags, tmp_path)
    assert "training on 2 devices" in double
    assert logged(double, "loss") == logged(single, "loss") and len(logged(double, "loss")) == 2
    (single_weights, _), (double_weights, _) = model_weights(single_dir), model_weights(double_dir)
    diff = max_abs_diff(single_weights, double_weights)
    print(f"differentiable_ss, 2 workers vs 1 worker --update-freq 2: max |dW| = {diff!r}")
    assert diff == 0.0


def test_sequential_differentiable_ss_trains_with_two_workers(reverse_data_bin, tmp_path):
    flags = COMMON + ["--criterion", "differentiable_ss", "--ss-prob", "0.5", "--ss-schedule", "constant",
                      "--max-epoch", "1", "--no-epoch-checkpoints"]  # fmt: skip
    log = train_distributed(reverse_data_bin, str(tmp_path / "seq"), flags, tmp_path)
    assert "training on 2 devices" in log
    assert all(0.0 < loss < 100.0 for _, loss in logged(log, "loss"))
    assert all(f > 0.0 for _, f in logged(log, "ss_from_model"))
