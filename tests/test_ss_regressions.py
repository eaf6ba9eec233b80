"""Regression tests of the scheduled-sampling criterions (parallel_ss, sequential_ss, differentiable_ss):
adaptive-softmax decoders, forced target prefixes (--ignore-prefix-size), left-padded targets, relaxations
at huge alpha, criterion names in error messages, and the label smoothing range."""
import argparse
import tempfile

import pytest
import torch
from fairseq import options, tasks
from fairseq.data import LanguagePairDataset

from fairseq_ext.modules.decoder_driver import (
    DecoderDriver,
    TargetsNotShiftedError,
    UnsupportedModelError,
    check_teacher_forcing_shift,
)
from fairseq_ext.modules.relaxations import peaked_softmax, relaxed_embeddings
from fairseq_ext.modules.scheduled_sampling import replaceable_positions
from fairseq_ext.testing import tiny
from fairseq_ext.testing.cli import USER_DIR

PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0]), ([4, 5], [5, 4, 5, 4, 1]), ([1, 1, 2], [2]), ([5, 0, 3, 2, 1], [1, 2])]
DSS = ["--ss-schedule", "constant"]  # differentiable_ss: p = --ss-prob from the first update

# (criterion, flags) for every way the criterions choose decoder inputs
MODES = {
    "parallel_ss": ("parallel_ss", ["--ss-num-passes", "2"]),
    "sequential_ss": ("sequential_ss", []),
    "dss_sequential": ("differentiable_ss", DSS),
    "dss_parallel": ("differentiable_ss", [*DSS, "--dss-decoding", "parallel", "--dss-num-passes", "2"]),
}
HARD = {"parallel_ss", "sequential_ss"}


def build(arch, mode, *flags, seed=1, extra=()):
    criterion, mode_flags = MODES[mode]
    conditioning = ["--ss-conditioning", "argmax"] if mode in HARD else []
    torch.manual_seed(seed)
    return tiny.build(arch, ["--criterion", criterion, *mode_flags, *conditioning, *flags], extra=list(extra))


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def all_finite(grads):
    return all(torch.isfinite(g).all() for g in grads.values())


# -- adaptive softmax decoders (transformer_lm --adaptive-softmax-cutoff) ------------------------------
# ids 0-3 are fairseq's specials and w0..w5 are ids 4-9: a head of ids 0-6 and one tail cluster of 7-9
ADAPTIVE = ["--adaptive-softmax-cutoff", "7"]
# fairseq's adaptive_loss, the reference below, passes ignore_index=pad to every cluster's shifted
# targets, so it drops the tail word whose index within its cluster equals pad (1): w4 (id 8) here.
# The sentences use the head and the tail but never w4.
ADAPTIVE_SENTENCES = [[0, 1, 2, 3, 5], [5, 3], [1, 1, 2, 5, 0, 3], [3, 5, 5, 0]]


def lm_sample(task):
    return tiny.lm_batch(task, ADAPTIVE_SENTENCES)


def test_adaptive_softmax_log_probs_equal_fairseq_and_have_a_backward_pass():
    from fairseq_ext.modules.decoder_driver import adaptive_softmax_log_probs

    torch.manual_seed(0)
    task, model, _ = tiny.build("transformer_lm", ["--criterion", "cross_entropy"], extra=ADAPTIVE)
    model.eval()
    adaptive = model.decoder.adaptive_softmax
    features = torch.randn(3, 4, adaptive.input_dim, requires_grad=True)  # B x T x D
    ours = adaptive_softmax_log_probs(adaptive, features)  # B x T x V
    with torch.no_grad():
        reference = adaptive.get_log_prob(features, target=None)  # fairseq's, forward only
    assert ours.shape == (3, 4, len(task.source_dictionary))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.exp().sum(-1), torch.ones(3, 4))  # a distribution per position
    ours.logsumexp(-1).sum().backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


@pytest.mark.parametrize("project_subset", [True, False])
def test_selected_scores_equal_the_full_adaptive_softmax_at_the_selected_positions(project_subset):
    """Parallel scheduled sampling scores only the decoder outputs it samples from; under an adaptive
    softmax those scores must be the full pass's log-probabilities at those outputs."""
    torch.manual_seed(0)
    task, model, _ = tiny.build("transformer_lm", ["--criterion", "parallel_ss"], extra=ADAPTIVE)
    model.eval()
    sample = lm_sample(task)
    driver = DecoderDriver(model, "parallel_ss")
    driver.can_project_subset = project_subset  # both the subset projection and the full-pass path
    tokens = sample["net_input"]["src_tokens"]  # B x T
    select = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    select &= tokens.ne(task.source_dictionary.pad())
    with torch.no_grad():
        features, _ = model(**sample["net_input"])  # B x T x D (the adaptive softmax's input)
        full = model.decoder.adaptive_softmax.get_log_prob(features, target=None)  # B x T x V
        selected = driver.selected_scores(sample, tokens, select)  # N x V
    torch.testing.assert_close(selected, full[select], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_criterions_train_an_adaptive_softmax_decoder(mode):
    """Teacher-forced (p = 0), every criterion's loss and gradients equal fairseq's adaptive_loss
    (plain cross-entropy through the adaptive softmax; no label smoothing, no dropout); with p = 1
    the loss and gradients are finite."""
    flags = ["--label-smoothing", "0", "--ss-prob", "1"]
    task, model, criterion = build("transformer_lm", mode, *flags, extra=ADAPTIVE)
    _, _, adaptive_loss = tiny.build(
        "transformer_lm", ["--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"], extra=ADAPTIVE
    )
    sample = lm_sample(task)
    model.train()
    reference = adaptive_loss(model, sample)[0].sum()  # adaptive_loss returns a 1-element tensor
    reference.backward()
    reference_grads = grads_of(model)
    model.zero_grad()
    net_output, _, _ = criterion.conditioned_forward(criterion.driver(model), sample, 0.0)
    loss, _ = criterion.compute_loss(model, net_output, sample)
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-5, atol=1e-4)
    grads = grads_of(model)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad()
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert torch.isfinite(loss) and all_finite(grads_of(model)) and log["ss_from_model"] > 0


# -- --ignore-prefix-size: the forced prefix is always fed gold -----------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_forced_target_prefix_is_always_fed_gold(mode):
    """With p = 1 every input the model may supply comes from it, except BOS and the first N target
    tokens (e.g. a target-language tag), which inference forces and the loss ignores."""
    prefix = 2
    task, model, criterion = build("transformer", mode, "--ss-prob", "1", "--ignore-prefix-size", str(prefix))
    sample = tiny.translation_batch(task, PAIRS)
    gold = sample["net_input"]["prev_output_tokens"]  # B x T, right-padded
    model.train()
    _, tokens, from_model = criterion.conditioned_forward(criterion.driver(model), sample, 1.0)
    assert torch.equal(tokens[:, : prefix + 1], gold[:, : prefix + 1])  # BOS and the prefix
    assert not from_model[:, : prefix + 1].any()
    expected = gold.ne(task.target_dictionary.pad())
    expected[:, : prefix + 1] = False
    assert torch.equal(from_model, expected)  # every other token came from the model
    log = criterion(model, sample)[2]
    assert log["ss_positions"] == int(expected.sum())


# -- --left-pad-target True ----------------------------------------------------------------------------
def padded_batch(task, pairs, left_pad_target):
    src = [tiny.ids(task.src_dict, s) for s, _ in pairs]
    tgt = [tiny.ids(task.tgt_dict, t) for _, t in pairs]
    dataset = LanguagePairDataset(
        src, [len(x) for x in src], task.src_dict, tgt, [len(x) for x in tgt], task.tgt_dict,
        left_pad_source=True, left_pad_target=left_pad_target,
    )  # fmt: skip
    return dataset.collater([dataset[i] for i in range(len(pairs))])


def test_replaceable_positions_protect_bos_and_prefix_wherever_the_padding_is():
    pad, bos = 1, 2
    gold = torch.tensor([[pad, pad, bos, 7, 8, 9], [bos, 7, 8, 9, 5, 6], [bos, 7, 8, pad, pad, pad]])
    assert replaceable_positions(gold, pad).tolist() == [
        [False, False, False, True, True, True],
        [False, True, True, True, True, True],
        [False, True, True, False, False, False],
    ]
    assert replaceable_positions(gold, pad, 1).tolist() == [
        [False, False, False, False, True, True],
        [False, False, True, True, True, True],
        [False, False, True, False, False, False],
    ]


@pytest.mark.parametrize("mode", list(MODES))
def test_left_padded_targets_give_the_right_padded_result(mode):
    """A transformer's output does not depend on the side of the padding (positions and attention
    masks come from it), so with p = 1 and deterministic choices (argmax; greedy relaxation) a
    left-padded batch must give the right-padded batch's loss and gradients, with BOS fed gold and no
    padding ever replaced."""
    task, model, criterion = build("transformer", mode, "--ss-prob", "1", "--label-smoothing", "0.1",
                                   extra=["--left-pad-target"])  # fmt: skip
    pad = task.target_dictionary.pad()
    model.train()
    results = []
    for left in (False, True):
        sample = padded_batch(task, PAIRS, left_pad_target=left)
        gold = sample["net_input"]["prev_output_tokens"]
        model.zero_grad()
        loss, _, log = criterion(model, sample)
        loss.backward()
        _, tokens, from_model = criterion.conditioned_forward(criterion.driver(model), sample, 1.0)
        tokens_per_row = [row[row.ne(pad)].tolist() for row in tokens]
        assert torch.equal(tokens.eq(pad), gold.eq(pad))  # padding stays where it is
        assert all(row[0] == task.target_dictionary.eos() for row in tokens_per_row)  # fairseq's BOS
        assert torch.equal(from_model, replaceable_positions(gold, pad))
        results.append((loss.detach(), grads_of(model), tokens_per_row, log["ss_positions"]))
    (right_loss, right_grads, right_tokens, right_n), (left_loss, left_grads, left_tokens, left_n) = results
    assert left_tokens == right_tokens and left_n == right_n
    torch.testing.assert_close(left_loss, right_loss, rtol=1e-5, atol=1e-4)
    assert all_finite(left_grads)
    for name in right_grads:
        torch.testing.assert_close(left_grads[name], right_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_parallel_copy_rule_counts_timesteps_from_bos_in_left_padded_rows():
    """Algorithm 2's copy rule: the token at timestep t is final after pass t.  A draw that answers
    the pass number shows which pass set each token; a left-padded row must match a right-padded one."""
    num_passes = 3
    task, model, criterion = build("transformer", "parallel_ss", "--ss-prob", "1", "--ss-num-passes", str(num_passes),
                                   extra=["--left-pad-target"])  # fmt: skip
    d = task.target_dictionary
    pass_token = [None] + [d.index(tiny.symbol(k)) for k in range(1, num_passes + 1)]  # token drawn on pass k
    model.train()
    for left in (False, True):
        sample = padded_batch(task, PAIRS, left_pad_target=left)
        gold = sample["net_input"]["prev_output_tokens"]
        calls = []

        def draw(lprobs):
            calls.append(None)
            return torch.full((lprobs.size(0),), pass_token[len(calls)], dtype=torch.long)

        criterion.draw = draw
        _, tokens, _ = criterion.conditioned_forward(criterion.driver(model), sample, 1.0)
        timestep = gold.ne(d.pad()).long().cumsum(1) - 1
        for b, t in replaceable_positions(gold, d.pad()).nonzero().tolist():
            assert tokens[b, t] == pass_token[min(int(timestep[b, t]), num_passes)], (left, b, t)


# -- relaxations at any finite alpha -------------------------------------------------------------------
HUGE_ALPHAS = [1e30, torch.finfo(torch.float32).max / 10]


@pytest.mark.parametrize("alpha", HUGE_ALPHAS)
def test_relaxations_stay_finite_at_huge_alpha_even_at_ties(alpha):
    """float32 scores with exact ties (where d softmax(alpha s)/ds is of order alpha) and of huge
    magnitude, banned padding, and Gumbel noise; every value and gradient is finite, and the weights are
    the limit ones: the one-hot of the argmax, split evenly at a tie."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 10, generator=generator)
    scores[:3, 4] = scores[:3, 7] = scores[:3].max(-1).values + 1.0  # rows 0-2: a tie at the top
    scores[3] *= 1e25  # alpha * scores alone would overflow float32 at any alpha above ~1e13
    scores = scores.requires_grad_()
    embedding = torch.randn(10, 4, generator=generator, requires_grad=True)
    upstream = torch.randn(6, 4, generator=generator) * 30.0
    noise = -torch.log(-torch.log(torch.rand(6, 10, generator=generator).clamp(1e-10, 1 - 1e-10)))
    candidates = scores.detach().topk(3, dim=-1).indices  # N x 3, ties included
    cases = {
        "greedy": dict(),
        "sample": dict(noise=noise),
        "candidates": dict(candidates=candidates),
    }
    for name, kwargs in cases.items():
        scores.grad = embedding.grad = None
        given = scores.gather(-1, candidates) if name == "candidates" else scores
        vectors, _ = relaxed_embeddings(given, alpha, embedding, banned=(1,), **kwargs)
        (vectors * upstream).sum().backward()
        assert torch.isfinite(vectors).all(), name
        assert torch.isfinite(scores.grad).all() and torch.isfinite(embedding.grad).all(), name
    weights = peaked_softmax(scores.detach(), alpha, banned=(1,))
    expected = torch.nn.functional.one_hot(scores.detach().argmax(-1), 10).float()
    expected[:3] = 0.0
    expected[:3, 4] = expected[:3, 7] = 0.5
    assert torch.equal(weights, expected)


# -- criterion names in error messages -----------------------------------------------------------------
@pytest.mark.parametrize("given", ["soft_beam_loss", "--criterion soft_beam_loss", "--criterion=soft_beam_loss"])
def test_error_messages_name_the_criterion_flag_once(given):
    with pytest.raises(UnsupportedModelError) as refused:
        DecoderDriver(torch.nn.Linear(2, 2), given)  # not a fairseq model
    assert "--criterion soft_beam_loss needs" in str(refused.value)
    assert str(refused.value).count("--criterion") == 1
    inputs, target = torch.tensor([[2, 5, 6]]), torch.tensor([[5, 7, 2]])  # target[1] != inputs[2]
    with pytest.raises(TargetsNotShiftedError) as refused:
        check_teacher_forcing_shift(inputs, target, pad=1, criterion_name=given)
    assert str(refused.value).startswith("--criterion soft_beam_loss: ")
    assert str(refused.value).count("--criterion") == 1


def test_a_decoding_flag_is_named_as_itself():
    with pytest.raises(UnsupportedModelError) as refused:
        DecoderDriver(torch.nn.Linear(2, 2), "--soft-beam-decoding")
    assert str(refused.value).startswith("--soft-beam-decoding needs") and "--criterion" not in str(refused.value)


# -- label smoothing range, refused when the criterion is built ------------------------------------------
def build_criterion_only(criterion_flags):
    """fairseq's criterion builder on a parsed fairseq-train command line (no model is needed)."""
    data_dir = tempfile.mkdtemp(prefix="fairseq_ext_ls_")
    tiny.write_dictionary(data_dir, 6)
    argv = [data_dir, "--user-dir", USER_DIR, "--cpu", "--arch", "transformer", "--task", "translation",
            "-s", "src", "-t", "tgt", *criterion_flags]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    assert isinstance(args, argparse.Namespace)
    return tasks.setup_task(args).build_criterion(args)


CRITERIONS = [["parallel_ss"], ["sequential_ss"], ["differentiable_ss"], ["self_normalized_cross_entropy"]]


@pytest.mark.parametrize("criterion", CRITERIONS)
@pytest.mark.parametrize("epsilon", ["1.0", "1.5", "-0.1", "nan"])
def test_label_smoothing_outside_0_1_is_refused_when_the_criterion_is_built(criterion, epsilon):
    with pytest.raises(ValueError, match="--label-smoothing"):
        build_criterion_only(["--criterion", *criterion, "--label-smoothing", epsilon])


@pytest.mark.parametrize("criterion", CRITERIONS)
@pytest.mark.parametrize("epsilon", ["0", "0.1", "0.99"])
def test_label_smoothing_inside_0_1_is_accepted(criterion, epsilon):
    built = build_criterion_only(["--criterion", *criterion, "--label-smoothing", epsilon])
    assert built.eps == float(epsilon)


@pytest.mark.parametrize("criterion", CRITERIONS[:3])
def test_a_forced_prefix_with_left_padded_targets_is_refused_when_the_criterion_is_built(criterion):
    """fairseq's loss drops the first target columns, which are not a left-padded row's prefix."""
    with pytest.raises(ValueError, match="--left-pad-target"):
        build_criterion_only(["--criterion", *criterion, "--ignore-prefix-size", "1", "--left-pad-target"])
    build_criterion_only(["--criterion", *criterion, "--ignore-prefix-size", "1"])
    build_criterion_only(["--criterion", *criterion, "--left-pad-target"])
