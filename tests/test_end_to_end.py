"""fairseq-train --user-dir with each criterion, then fairseq-generate / fairseq-eval-lm, as a user runs them."""
import os
import re
import subprocess
import sys

import pytest

from fairseq_ext.testing import cli

# every test here runs fairseq's command-line tools
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def translation_data(reverse_data_bin):
    """The session's reverse task (conftest.py): 200 training pairs, 4 updates per epoch at
    --max-tokens 500, so 2 epochs cover the 2 warm-up and 3 ramp updates below; 20 test sentences
    (not a multiple of 8, so a dropped batch tail would show)."""
    return reverse_data_bin


@pytest.fixture(scope="module")
def lm_data(lm_data_bin):
    return lm_data_bin


def logged(log, key):
    """Values of ``key`` on each train_inner line, in update order."""
    lines = [line for line in log.splitlines() if "| train_inner |" in line]
    return [float(m.group(1)) for line in lines for m in [re.search(rf"\b{key}=([\d.]+)", line)] if m]


@pytest.mark.parametrize(
    "arch_flags, criterion_flags",
    [
        (cli.TINY_TRANSFORMER, ["--criterion", "parallel_ss", "--ss-num-passes", "2", "--ss-prob", "0.5",
                                "--ss-warmup-updates", "2", "--ss-schedule", "exponential", "--ss-ramp-updates", "3"]),
        (["--arch", "lstm", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-hidden-size", "16",
          "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16"],
         ["--criterion", "sequential_ss", "--ss-prob", "0.5", "--ss-conditioning", "argmax"]),
        (["--arch", "fconv", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--decoder-out-embed-dim", "16",
          "--encoder-layers", "[(16, 3)] * 2", "--decoder-layers", "[(16, 3)] * 2"],
         ["--criterion", "parallel_ss", "--ss-prob", "0.25", "--ss-temperature", "0.8"]),
        (cli.TINY_TRANSFORMER, ["--criterion", "differentiable_ss", "--dss-decoding", "parallel", "--dss-num-passes",
                                "2", "--dss-mode", "sample", "--dss-alpha", "1", "--dss-alpha-schedule", "exponential",
                                "--dss-alpha-growth", "1.5", "--dss-alpha-period-updates", "4",
                                "--ss-inverse-sigmoid-k", "3", "--ss-warmup-updates", "2"]),
        (["--arch", "lstm", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-hidden-size", "16",
          "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16"],
         ["--criterion", "differentiable_ss", "--ss-prob", "0.5", "--ss-schedule", "constant", "--dss-alpha", "5"]),
    ],
    ids=["parallel_ss-transformer", "sequential_ss-lstm", "parallel_ss-fconv", "differentiable_ss-parallel-transformer",
         "differentiable_ss-sequential-lstm"],
)  # fmt: skip
def test_train_then_generate(translation_data, tmp_path, arch_flags, criterion_flags):
    save = str(tmp_path / "ckpt")
    log = cli.train(translation_data, save, [*arch_flags, *criterion_flags, "--label-smoothing", "0.1",
                                             "--max-epoch", "2", "--max-tokens", "500"])  # fmt: skip
    probs = logged(log, "ss_prob")
    assert probs and max(probs) > 0, log[-3000:]
    assert all(0.0 <= v <= 1.0 for v in logged(log, "ss_replaced"))
    if "--ss-warmup-updates" in criterion_flags:
        assert probs[:2] == [0.0, 0.0] and probs[-1] > 0  # warm-up, then the schedule rises
        if "parallel_ss" in criterion_flags:
            assert probs[-1] == 0.5  # the ramp reaches p
    if "differentiable_ss" in criterion_flags:
        alphas = logged(log, "dss_alpha")
        assert alphas and (alphas[-1] > alphas[0] if "exponential" in criterion_flags else set(alphas) == {5.0})
    out = cli.generate(translation_data, os.path.join(save, "checkpoint_last.pt"), ["--beam", "2"])
    assert len(cli.hypotheses(out)) == cli.count_lines(translation_data, "test") == 20  # every test sentence


def test_language_model_trains_with_parallel_ss_and_evaluates(lm_data, tmp_path):
    save = str(tmp_path / "lm")
    log = cli.train(lm_data, save, [
        "--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "1",
        "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
        "--sample-break-mode", "eos", "--tokens-per-sample", "32", "--criterion", "parallel_ss",
        "--ss-prob", "1.0", "--ss-num-passes", "3", "--max-epoch", "2", "--max-tokens", "400",
    ])  # fmt: skip
    assert logged(log, "ss_prob") and logged(log, "ss_from_model")[-1] > 0.5
    out = cli.run_cli("fairseq-eval-lm", [lm_data, "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu",
                                          "--sample-break-mode", "eos", "--max-tokens", "400",
                                          "--required-batch-size-multiple", "1"])  # fmt: skip
    assert re.search(r"Perplexity: [\d.]+", out), out[-2000:]


def test_bad_flag_combination_fails_before_training_and_writes_nothing(translation_data, tmp_path):
    save = tmp_path / "never"
    with pytest.raises(cli.CliError, match=r"--ss-ramp-updates"):
        cli.train(translation_data, str(save), [*cli.TINY_TRANSFORMER, "--criterion", "parallel_ss",
                                                "--ss-schedule", "linear", "--max-epoch", "1"])  # fmt: skip
    assert not save.exists() or not any(save.iterdir())


def test_model_it_cannot_drive_fails_before_the_first_update(translation_data, tmp_path):
    save = tmp_path / "nat"
    with pytest.raises(cli.CliError, match="non-autoregressive") as err:
        cli.train(translation_data, str(save), [
            "--task", "translation_lev", "--noise", "random_mask", "--arch", "cmlm_transformer",
            "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
            "--criterion", "parallel_ss", "--max-epoch", "1",
        ])  # fmt: skip
    assert "num_updates=1" not in str(err.value)
    assert not any(p.name.endswith(".pt") for p in save.glob("*"))


def test_user_dir_as_a_relative_path_and_from_the_installed_package(translation_data, tmp_path):
    printed = subprocess.run([sys.executable, "-m", "fairseq_ext"], capture_output=True, text=True, check=True,
                             timeout=cli.HANG_TIMEOUT)  # fmt: skip
    assert printed.stdout.strip() == cli.USER_DIR
    repo_root = os.path.dirname(cli.USER_DIR)
    out = cli.run_cli("fairseq-train", [translation_data, "--user-dir", "fairseq_ext", "--save-dir", str(tmp_path / "rel"),
                                        "--cpu", *cli.TINY_TRANSFORMER, "--criterion", "sequential_ss", "--optimizer", "adam",
                                        "--lr", "0.001", "--max-tokens", "500", "--max-update", "2", "--no-progress-bar"],
                      cwd=repo_root)  # fmt: skip
    assert "num_updates 2" in out or "num_updates=2" in out
