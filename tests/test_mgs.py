"""Criterion ``mgs`` (MLE-guided parameter search, Welleck and Cho, AAAI 2021, Algorithm 1).

In-process tests drive the criterion on a tiny transformer; the slow ones run fairseq-train and
fairseq-generate through ``--user-dir`` (resume, 2 gloo workers, end to end from an MLE checkpoint).
"""
import math
import os
import re

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.logging import metrics

from fairseq_ext.criterions.mgs import COMPONENT_STREAM
from fairseq_ext.modules.decoder_driver import UnsupportedModelError
from fairseq_ext.modules.parameter_search import (
    CandidateSampler,
    assign_components,
    clip_global_norm_,
    noise_scales,
    stream_seed,
)
from fairseq_ext.testing import cli, tiny, trained

PAIRS = [([0, 1, 2], [2, 1, 0]), ([3, 4], [4, 3]), ([5, 1, 2, 3], [3, 2, 1, 5]), ([6, 6, 1], [1, 6, 6])]


def build(*flags, num_symbols=8):
    torch.manual_seed(0)
    return tiny.build("transformer", ["--criterion", "mgs", *flags], num_symbols=num_symbols)


def train_call(criterion, model, sample, update=3):
    """One training call at update ``update``, its backward; (loss, sample size, log, parameters before)."""
    model.train()
    model.zero_grad()
    criterion.set_num_updates(update)
    before = [p.detach().clone() for p in model.parameters()]
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    return loss, sample_size, log, before


def clipped_mle_gradient(criterion, model, sample, clip=1.0):
    """The per-token label-smoothed CE gradient, clipped: computed here the way fairseq's criterion would."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = criterion.compute_loss(model, model(**sample["net_input"]), sample, reduce=True)
    grads = [g.detach().clone() for g in torch.autograd.grad(loss, params)]
    for g in grads:
        g.div_(float(sample["ntokens"]))
    clip_global_norm_(grads, clip)
    return grads


# -- options are refused before training, naming the flag ------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mgs-num-candidates", "0"], "--mgs-num-candidates"),
        (["--mgs-noise", "-0.1"], "--mgs-noise"),
        (["--mgs-mix-prob", "1.5"], "--mgs-mix-prob"),
        (["--mgs-mix-prob", "-0.5"], "--mgs-mix-prob"),
        (["--mgs-alpha", "-1"], "--mgs-alpha"),
        (["--mgs-zero-only", "--mgs-mle-only"], "exclude each other"),
        (["--mgs-zero-only", "--mgs-mix-prob", "0.2"], "contradicts --mgs-mix-prob"),
        (["--mgs-mle-clip-norm", "-1"], "--mgs-mle-clip-norm"),
        (["--mgs-beam", "0"], "--mgs-beam"),
        (["--mgs-max-len-ratio", "0"], "--mgs-max-len-ratio"),
        (["--mgs-sampling-topk", "5"], "only apply with --mgs-sampling"),
        (["--mgs-task-loss", "meteor"], "--mgs-task-loss 'meteor' is not a registered task loss"),
        (["--mgs-task-loss", "lm"], "--mgs-lm-scorer-path"),
        (["--mgs-lm-scorer-path", "x.pt"], "only read by --mgs-task-loss lm"),
        (["--label-smoothing", "1.0"], "--label-smoothing"),
    ],
)
def test_impossible_options_are_refused(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(*flags)


def test_lm_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mgs-lm-scorer-path"):
        build("--mgs-task-loss", "lm", "--mgs-lm-scorer-path", str(tmp_path / "none.pt"))


def test_lm_task_loss_scores_with_the_frozen_checkpoint(tmp_path):
    from test_task_losses import save_tiny_checkpoint  # noqa: E402  (tests/ is on sys.path under pytest)

    from fairseq_ext.modules.task_losses import CheckpointKindError

    lm_path, _, _ = save_tiny_checkpoint(str(tmp_path), "transformer_lm", 8)
    task, model, criterion = build("--mgs-task-loss", "lm", "--mgs-lm-scorer-path", lm_path)
    assert not any(True for _ in criterion.parameters())  # the scorer is not trained, saved or all-reduced
    _, _, log, before = train_call(criterion, model, tiny.translation_batch(task, PAIRS))
    assert log["mgs_cost"] > 0 and all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    translation_path, _, _ = save_tiny_checkpoint(str(tmp_path), "transformer", 8)
    with pytest.raises(CheckpointKindError, match="--mgs-lm-scorer-path"):
        build("--mgs-task-loss", "lm", "--mgs-lm-scorer-path", translation_path)


def test_language_models_are_refused():
    task, model, criterion = tiny.build("transformer_lm", ["--criterion", "mgs"], num_symbols=8)
    sample = tiny.lm_batch(task, [[0, 1, 2], [3, 4]])
    model.train()
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        criterion(model, sample)


# -- one training call ---------------------------------------------------------------------------------------
def test_parameters_are_restored_bit_for_bit_and_the_gradient_is_the_direction():
    task, model, criterion = build("--mgs-task-loss", "edit", "--mgs-noise", "0.5")
    sample = tiny.translation_batch(task, PAIRS)
    loss, sample_size, log, before = train_call(criterion, model, sample)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert sample_size == 1  # the trainer divides the summed gradient by it: the direction arrives as it is
    assert float(loss) == float(log["loss"])  # the surrogate's value is the MLE loss
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.norm()) for g in grads) > 0
    expected_keys = {"mgs_cost", "mgs_best_cost", "mgs_weight_std", "mgs_mle_weight", "mgs_mle_won", "mgs_nonterm",
                     "mgs_repetition", "mgs_length", "mgs_grad_norm"}  # fmt: skip
    assert expected_keys <= set(log)
    assert log["mgs_best_cost"] <= 4 * 2.0 and 0.0 <= log["mgs_mle_weight"] <= 1.0


def test_mle_component_without_noise_gives_exactly_the_clipped_mle_gradient():
    task, model, criterion = build("--mgs-mle-only", "--mgs-noise", "0", "--mgs-task-loss", "edit")
    sample = tiny.translation_batch(task, PAIRS)
    _, _, log, _ = train_call(criterion, model, sample)
    expected = clipped_mle_gradient(criterion, model, sample)
    params = [p for p in model.parameters() if p.requires_grad]
    # fairseq steps theta - lr * grad: grad = -Delta_MGS = -(-clip(g)) = clip(g)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, expected))
    assert log["mgs_mle_weight"] == pytest.approx(1.0) and log["mgs_weight_std"] == pytest.approx(0.0)


def test_single_candidate_update_equals_that_candidate():
    noise, update = 0.3, 7
    task, model, criterion = build("--mgs-num-candidates", "1", "--mgs-noise", str(noise), "--mgs-task-loss", "edit")
    sample = tiny.translation_batch(task, PAIRS)
    train_call(criterion, model, sample, update=update)
    step = [-g for g in clipped_mle_gradient(criterion, model, sample)]
    from_mle = assign_components(1, 0.5, "sample", stream_seed(criterion.seed, update, 0, COMPONENT_STREAM))
    sampler = CandidateSampler(step, noise_scales(step, noise, "tensor"), from_mle, (criterion.seed, update, 0))
    params = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        assert torch.equal(-p.grad, sampler.tensor(0, i)), i


def test_ablations_pick_one_component():
    task, model, criterion = build("--mgs-zero-only", "--mgs-task-loss", "edit")
    _, _, log, _ = train_call(criterion, model, tiny.translation_batch(task, PAIRS))
    assert log["mgs_mle_weight"] == 0.0 and log["mgs_mle_won"] == 0.0
    task, model, criterion = build("--mgs-mle-only", "--mgs-task-loss", "edit")
    _, _, log, _ = train_call(criterion, model, tiny.translation_batch(task, PAIRS))
    assert log["mgs_mle_weight"] == pytest.approx(1.0) and log["mgs_mle_won"] == 1.0


def test_random_streams_follow_the_update_count_and_micro_batch():
    task, model, criterion = build("--mgs-task-loss", "edit", "--mgs-num-candidates", "2")
    sample = tiny.translation_batch(task, PAIRS)
    grads = {}
    for name, update in (("a", 4), ("b", 4), ("c", 5)):
        fresh_task, fresh_model, fresh_criterion = build("--mgs-task-loss", "edit", "--mgs-num-candidates", "2")
        train_call(fresh_criterion, fresh_model, sample, update=update)
        grads[name] = [p.grad.clone() for p in fresh_model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["a"], grads["b"]))  # same update: same candidates
    assert not all(torch.equal(a, c) for a, c in zip(grads["a"], grads["c"]))  # next update: new candidates
    criterion.set_num_updates(9)
    assert [criterion.next_position() for _ in range(3)] == [(9, 0), (9, 1), (9, 2)]  # --update-freq micro-batches
    criterion.set_num_updates(10)
    assert criterion.next_position() == (10, 0)


def test_validation_is_the_plain_mle_loss():
    task, model, criterion = build("--label-smoothing", "0.1")
    sample = tiny.translation_batch(task, PAIRS)
    model.eval()
    loss, sample_size, log = criterion(model, sample)
    reference = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    ref_loss, ref_size, _ = reference(model, sample)
    assert torch.equal(loss, ref_loss) and sample_size == ref_size == sample["ntokens"]
    assert not any(k.startswith("mgs_") for k in log)


def test_logged_metrics_are_pooled_and_averaged():
    task, model, criterion = build("--mgs-task-loss", "edit")
    sample = tiny.translation_batch(task, PAIRS)
    _, _, log, _ = train_call(criterion, model, sample)
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([log, log])  # two workers with the same shard
    values = agg.get_smoothed_values()
    assert values["mgs_cost"] == pytest.approx(log["mgs_cost"] / len(PAIRS), abs=1e-4)
    assert values["mgs_weight_std"] == pytest.approx(log["mgs_weight_std"], abs=1e-4)  # a per-update value
    assert values["loss"] == pytest.approx(float(log["loss"]) / log["sample_size"] / math.log(2), abs=1e-3)


# -- through fairseq-train -------------------------------------------------------------------------------------
COMMON = cli.TINY_TRANSFORMER + ["--task", "translation", "--dropout", "0", "--criterion", "mgs"]
MGS_FAST = ["--mgs-task-loss", "edit", "--mgs-num-candidates", "2"]


logged = cli.train_inner_values


def weights(path):
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(os.path.join(path, "checkpoint_last.pt"))
    return state["model"]


@pytest.mark.slow
def test_resumed_training_draws_the_same_candidates(reverse_data_bin, tmp_path):
    flags = COMMON + MGS_FAST + ["--max-tokens", "500", "--update-epoch-batch-itr", "True"]
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = cli.train(reverse_data_bin, straight_dir, flags + ["--max-update", "6"])
    first = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "3"])
    second = cli.train(reverse_data_bin, resumed_dir, flags + ["--max-update", "6"])
    for key in ("loss", "mgs_cost", "mgs_best_cost", "mgs_mle_weight"):
        assert logged(first, key) + logged(second, key) == logged(straight, key), key
    assert [u for u, _ in logged(straight, "loss")] == list(range(1, 7))
    a, b = weights(straight_dir), weights(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_workers_equal_one_worker_on_the_same_global_batch(reverse_data_bin, tmp_path):
    # --curriculum keeps the length-sorted batch order (no shuffling); 8 sentences per update either way:
    # one worker's batch k holds sentences 8k..8k+7, the two workers' shards hold 8k..8k+3 and 8k+4..8k+7
    # alpha 5: weights that move with every pooled cost (a large alpha puts all weight on one candidate)
    flags = COMMON + ["--mgs-task-loss", "edit", "--mgs-num-candidates", "4", "--mgs-alpha", "5"] + [
        "--max-tokens", "100000", "--curriculum", "100", "--required-batch-size-multiple", "1",
        "--optimizer", "sgd", "--lr", "0.5", "--max-update", "3", "--no-epoch-checkpoints",
    ]  # fmt: skip
    single, double, single_dir, double_dir = cli.one_and_two_workers(reverse_data_bin, tmp_path, flags)
    keys = ("mgs_cost", "mgs_best_cost", "mgs_mle_weight", "mgs_weight_std", "bsz")
    cli.assert_same_logged(single, double, keys, updates=[1, 2, 3])
    assert [v for _, v in logged(single, "bsz")] == [8.0, 8.0, 8.0]
    a, b = weights(single_dir), weights(double_dir)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"mgs, 2 workers vs 1 worker on the same global batch: max |dW| = {diff!r}")
    assert diff < 1e-5


@pytest.mark.slow
def test_end_to_end_from_an_mle_checkpoint(reverse_checkpoints, tmp_path):
    mle = reverse_checkpoints["plain"]
    save_dir = str(tmp_path / "mgs")
    flags = COMMON + ["--mgs-task-loss", "bleu", "--max-tokens", "500", "--max-update", "3", "--clip-norm", "1.0"]
    log = trained.fine_tune(mle, save_dir, flags)
    costs = logged(log, "mgs_cost")
    assert [u for u, _ in costs] == [1, 2, 3] and all(0.0 <= c <= 1.0 for _, c in costs)
    assert all(0.0 <= w <= 1.0 for _, w in logged(log, "mgs_mle_weight"))
    assert re.search(r"\| valid \|.*loss", log)  # validation: the MLE loss
    out = cli.generate(mle.data_bin, os.path.join(save_dir, "checkpoint_last.pt"))  # every sentence decoded
    assert len(cli.hypotheses(out)) == cli.count_lines(mle.data_bin, "test")
