"""Criterion ``policy_gradient`` (REINFORCE with a running-average baseline; Welleck and Cho, AAAI 2021, eq. 5)."""
import os
import re

import pytest
import torch

from fairseq_ext.criterions.policy_gradient import RunningBaseline
from fairseq_ext.modules.sequence_risk import candidate_log_probs, hypotheses_to_candidates, normalize_costs
from fairseq_ext.testing import cli, tiny, trained

PAIRS = [([0, 1, 2], [2, 1, 0]), ([3, 4], [4, 3]), ([5, 1, 2, 3], [3, 2, 1, 5]), ([6, 6, 1], [1, 6, 6])]


def build(*flags, num_symbols=8):
    torch.manual_seed(0)
    return tiny.build("transformer", ["--criterion", "policy_gradient", *flags], num_symbols=num_symbols)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pg-num-samples", "0"], "--pg-num-samples"),
        (["--pg-baseline-decay", "1.5"], "--pg-baseline-decay"),
        (["--pg-mle-weight", "-0.1"], "--pg-mle-weight"),
        (["--pg-max-len-ratio", "-1"], "--pg-max-len-ratio"),
        (["--pg-temperature", "0"], "--pg-temperature"),
        (["--pg-sampling-topp", "0"], "--pg-sampling-topp"),
        (["--pg-task-loss", "meteor"], "--pg-task-loss 'meteor'"),
        (["--pg-task-loss", "lm"], "--pg-lm-scorer-path"),
        (["--pg-lm-scorer-path", "x.pt"], "--pg-lm-scorer-path is only read"),
        (["--label-smoothing", "-0.1"], "--label-smoothing"),
    ],
)
def test_impossible_options_are_refused(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(*flags)


def test_running_baseline():
    b = RunningBaseline(0.9)
    assert b.value is None
    assert b.update(-2.0) == -2.0  # the first batch sets it
    assert b.update(-1.0) == pytest.approx(0.9 * -2.0 + 0.1 * -1.0)
    b.half()  # fairseq casts the criterion under --fp16: the value stays exact
    assert b.value == pytest.approx(-1.9, abs=1e-15)
    fresh = RunningBaseline(0.9)
    fresh.load_state_dict(b.state_dict())
    assert fresh.value == b.value
    assert not any(p.requires_grad for p in b.parameters())  # never reaches the optimizer


def test_gradient_is_the_reinforce_estimate_with_the_baseline():
    """grad loss = -(1/K) sum_k (r_k - b) grad log p(Y_k) per sentence (eq. 5 with a baseline), mle weight 0."""
    task, model, criterion = build("--pg-task-loss", "edit", "--pg-num-samples", "3", "--pg-baseline-decay", "0.5")
    sample = tiny.translation_batch(task, PAIRS)
    criterion.baseline.update(-0.25)  # a previous batch
    model.train()
    criterion.set_num_updates(5)
    loss, sample_size, log = criterion(model, sample)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert sample_size == len(PAIRS)
    # redo by hand with the same samples (the same seeded stream)
    criterion.set_num_updates(5)
    criterion._position = (None, -1)
    from fairseq_ext.criterions.sequence_level_base import DECODE_STREAM
    from fairseq_ext.modules.parameter_search import stream_seed

    rows = criterion.decoder.decode(model, sample, seed=stream_seed(criterion.seed, 5, 0, DECODE_STREAM))
    cands = hypotheses_to_candidates(rows, unique=False)
    mask = cands.mask()
    rewards = -normalize_costs(criterion.candidate_costs(cands, sample), mask, "max")
    baseline = 0.5 * -0.25 + 0.5 * float(rewards[mask].mean())
    assert log["pg_baseline"] == pytest.approx(baseline)
    log_p, _ = candidate_log_probs(model, sample, cands, task.tgt_dict)
    expected = [torch.zeros_like(p) for p in params]
    for b in range(cands.batch_size):
        K = int(mask[b].sum())
        for k in range(K):
            g = torch.autograd.grad(log_p[b, k], params, retain_graph=True, allow_unused=True)
            for e, gi in zip(expected, g):
                if gi is not None:
                    e.sub_(float(rewards[b, k] - baseline) / K * gi)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got if got is not None else torch.zeros_like(want), want, rtol=1e-4, atol=1e-6)


def test_language_models_need_text_completion():
    from fairseq_ext.modules.decoder_driver import UnsupportedModelError

    task, model, criterion = tiny.build("transformer_lm", ["--criterion", "policy_gradient", "--pg-task-loss", "edit"], 8)
    model.train()
    with pytest.raises(UnsupportedModelError, match="--task text_completion"):
        criterion(model, tiny.lm_batch(task, [[0, 1, 2], [3, 4]]))


# -- through fairseq-train -------------------------------------------------------------------------------------
COMMON = cli.TINY_TRANSFORMER + ["--task", "translation", "--dropout", "0", "--criterion", "policy_gradient",
                                 "--ddp-backend", "legacy_ddp"]  # fmt: skip


logged = cli.train_inner_values


def checkpoint(path):
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(os.path.join(path, "checkpoint_last.pt"))


@pytest.mark.slow
def test_resumed_training_continues_the_baseline_exactly(reverse_data_bin, tmp_path):
    flags = COMMON + ["--pg-task-loss", "edit", "--pg-num-samples", "2", "--pg-baseline-decay", "0.8",
                      "--max-tokens", "500", "--update-epoch-batch-itr", "True"]  # fmt: skip
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = cli.train(reverse_data_bin, straight_dir, flags + ["--max-update", "6"])
    first = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "3"])
    second = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "6"])
    for key in ("loss", "pg_baseline", "pg_reward"):
        assert logged(first, key) + logged(second, key) == logged(straight, key), key
    assert [u for u, _ in logged(straight, "loss")] == list(range(1, 7))
    a, b = checkpoint(straight_dir), checkpoint(resumed_dir)
    assert torch.equal(a["criterion"]["baseline.state"], b["criterion"]["baseline.state"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_end_to_end_from_an_mle_checkpoint(reverse_checkpoints, tmp_path):
    mle = reverse_checkpoints["plain"]
    save_dir = str(tmp_path / "pg")
    flags = COMMON + ["--pg-task-loss", "bleu", "--pg-mle-weight", "0.1", "--max-tokens", "500", "--max-update", "3"]
    log = trained.fine_tune(mle, save_dir, flags)
    assert "baseline starts afresh" in log
    baselines = logged(log, "pg_baseline")
    assert [u for u, _ in baselines] == [1, 2, 3] and all(-1.0 <= v <= 0.0 for _, v in baselines)
    out = cli.generate(mle.data_bin, os.path.join(save_dir, "checkpoint_last.pt"))  # every sentence decoded
    assert len(cli.hypotheses(out)) == cli.count_lines(mle.data_bin, "test")


@pytest.mark.slow
def test_two_workers_equal_one_worker_on_the_same_global_batch(reverse_data_bin, tmp_path):
    # Samples come from one stream per (seed, update, micro-batch) drawn over the whole batch, so 2 workers'
    # shards draw other (equally distributed) samples than 1 worker's batch. --pg-sampling-topk 1 makes every
    # sample the greedy decode: what is left to compare is the plumbing, i.e. the baseline's mean over every
    # worker's samples (all-reduced) and the gradient's normalisation by the global number of sentences.
    # --curriculum keeps the batch order; 8 sentences per update either way; --max-len-ratio 10 lets no
    # decode be cut at the shard's (shorter) longest target instead of the batch's.
    flags = COMMON + ["--pg-task-loss", "edit", "--pg-num-samples", "2", "--pg-sampling-topk", "1",
                      "--pg-baseline-decay", "0.5", "--pg-mle-weight", "0.3", "--pg-max-len-ratio", "10"] + [
        "--max-tokens", "100000", "--curriculum", "100", "--required-batch-size-multiple", "1",
        "--optimizer", "sgd", "--lr", "0.5", "--max-update", "3", "--no-epoch-checkpoints",
    ]  # fmt: skip
    single, double, single_dir, double_dir = cli.one_and_two_workers(reverse_data_bin, tmp_path, flags)
    keys = ("loss", "pg_reward", "pg_baseline", "pg_cost_best", "pg_nonterm", "bsz")
    cli.assert_same_logged(single, double, keys, updates=[1, 2, 3])
    assert [v for _, v in logged(single, "bsz")] == [8.0, 8.0, 8.0]
    rewards = [v for _, v in logged(single, "pg_reward")]
    assert len({round(v, 4) for v in rewards}) > 1 or rewards[0] != 0.0  # the rewards are not all trivial
    a, b = checkpoint(single_dir), checkpoint(double_dir)
    assert torch.equal(a["criterion"]["baseline.state"], b["criterion"]["baseline.state"])  # all-reduced mean
    diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"])
    print(f"policy_gradient, 2 workers vs 1 worker on the same global batch: max |dW| = {diff!r}")
    assert diff < 1e-5
