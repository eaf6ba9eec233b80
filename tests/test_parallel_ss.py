"""parallel_ss (Algorithm 2) and sequential_ss (Algorithm 1) against teacher forcing, a slow loop
written from the paper, greedy decoding, and invariances (Theorem 2.1 and the options that shape
the drawn tokens: tests/test_ss_options.py)."""
import copy

import pytest
import scipy.stats
import torch
from fairseq.sequence_generator import SequenceGenerator

from fairseq_ext.modules.decoder_driver import DecoderDriver, UnsupportedModelError
from fairseq_ext.modules.scheduled_sampling import (
    draw_tokens,
    parallel_scheduled_sampling,
    replaceable_positions,
)
from fairseq_ext.testing import tiny

LS = ["--label-smoothing", "0.1"]
PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0]), ([4, 5], [5, 4, 5, 4, 1]), ([1, 1, 2], [2]), ([5, 0, 3, 2, 1], [1, 2])]


def build(arch, criterion, *flags, num_symbols=6, seed=1):
    torch.manual_seed(seed)
    return tiny.build(arch, ["--criterion", criterion, *LS, *flags], num_symbols=num_symbols)


def batch_for(task, arch, pairs=PAIRS):
    if arch.endswith("_lm"):
        return tiny.lm_batch(task, [s + t for s, t in pairs])
    return tiny.translation_batch(task, pairs)


def loss_and_grads(criterion, model, sample, reduce=True):
    model.zero_grad()
    loss, _, log = criterion(model, sample, reduce=reduce)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, log


def assert_same_grads(g1, g2, atol=0.0):
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=atol, msg=name)


# -- neutral setting: p = 0 is teacher forcing ------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm", "fconv", "transformer_lm"])
@pytest.mark.parametrize("criterion", ["parallel_ss", "sequential_ss"])
def test_p0_is_exactly_label_smoothed_cross_entropy(arch, criterion):
    task, model, ss = build(arch, criterion, "--ss-prob", "0")
    _, _, ce = build(arch, "label_smoothed_cross_entropy")
    sample = batch_for(task, arch)
    model.train()
    loss_ss, grads_ss, log = loss_and_grads(ss, model, sample)
    loss_ce, grads_ce, _ = loss_and_grads(ce, model, sample)
    assert torch.equal(loss_ss, loss_ce)
    assert_same_grads(grads_ss, grads_ce)
    assert log["ss_prob_sum"] == 0.0 and log["ss_replaced"] == 0


@pytest.mark.parametrize("arch", ["transformer", "lstm", "fconv", "transformer_lm"])
@pytest.mark.parametrize("criterion", ["parallel_ss", "sequential_ss"])
def test_sampling_machinery_at_p0_reproduces_teacher_forcing(arch, criterion):
    """The multi-pass path (encoder reuse, direct decoder calls) and the step-by-step path
    (incremental decoding) with p = 0 give the teacher-forced loss and gradients."""
    task, model, ss = build(arch, criterion, "--ss-num-passes" if criterion == "parallel_ss" else "--ss-prob", "2" if criterion == "parallel_ss" else "0.5")
    _, _, ce = build(arch, "label_smoothed_cross_entropy")
    sample = batch_for(task, arch)
    model.train()
    loss_ce, grads_ce, _ = loss_and_grads(ce, model, sample)
    model.zero_grad()
    net_output, tokens, from_model = ss.conditioned_forward(ss.driver(model), sample, 0.0)
    loss, _ = ss.compute_loss(model, net_output, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(tokens, ss.driver(model).decoder_inputs(sample)) and not from_model.any()
    torch.testing.assert_close(loss.detach(), loss_ce, rtol=1e-6, atol=1e-5)
    assert_same_grads(grads, grads_ce, atol=1e-5)


def test_warmup_updates_are_teacher_forced_and_the_schedule_follows_the_update_count():
    task, model, ss = build("transformer", "parallel_ss", "--ss-prob", "0.5", "--ss-warmup-updates", "3")
    sample = batch_for(task, "transformer")
    model.train()
    for update, prob in [(0, 0.0), (2, 0.0), (3, 0.5), (100, 0.5)]:
        ss.set_num_updates(update)
        assert ss(model, sample)[2]["ss_prob_sum"] == prob
    model.eval()  # validation is teacher-forced
    assert ss(model, sample)[2]["ss_prob_sum"] == 0.0


# -- Algorithm 2 against a slow loop written from the paper --------------------------------------------
def reference_algorithm_2(gold, pad, prob, num_passes, full_log_probs, generator):
    """Algorithm 2 for each example and timestep in Python loops (argmax conditioning).

    Input position t holds the paper's y~_t (t = 1..T-1; position 0 is BOS); the decoder output at
    t - 1 predicts it.  Coins are drawn B x T per pass, as the vectorised code draws them.
    """
    bsz, tgt_len = gold.shape
    prev = gold.clone()  # y~_0 = y
    for k in range(1, num_passes + 1):
        coins = torch.rand(bsz, tgt_len, generator=generator) < prob
        lprobs = full_log_probs(prev)  # B x T x V, conditioned on y~_{k-1}
        new = prev.clone()
        for b in range(bsz):
            for t in range(1, tgt_len):
                if gold[b, t] == pad:
                    continue
                if t < k:
                    new[b, t] = prev[b, t]  # copy
                elif coins[b, t]:
                    scores = lprobs[b, t - 1].clone()
                    scores[pad] = float("-inf")
                    new[b, t] = scores.argmax()  # y^_{k,t}
                else:
                    new[b, t] = gold[b, t]
        prev = new
    return prev


@pytest.mark.parametrize("prob, num_passes", [(0.5, 1), (0.5, 3), (1.0, 2), (0.3, 5)])
def test_vectorised_passes_equal_the_paper_loop(prob, num_passes):
    task, model, ss = build("transformer", "parallel_ss", "--ss-conditioning", "argmax")
    model.eval()
    sample = batch_for(task, "transformer")
    driver = ss.driver(model)
    gold, pad = driver.decoder_inputs(sample), task.tgt_dict.pad()
    enc = driver.encode(sample)

    def full(tokens):
        return driver.log_probs(driver.forward(sample, tokens, enc))

    def selected(tokens, outputs):
        return driver.selected_scores(sample, tokens, outputs, enc)

    with torch.no_grad():
        expected = reference_algorithm_2(gold, pad, prob, num_passes, full, torch.Generator().manual_seed(7))
        got, from_model = parallel_scheduled_sampling(
            gold, replaceable_positions(gold, pad), prob, num_passes, selected, ss.draw,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
    assert torch.equal(got, expected)
    assert not from_model[:, 0].any() and not from_model[gold.eq(pad)].any()


def test_copy_rule_freezes_position_t_after_pass_t():
    """With p = 1 and a predictor that proposes token 10 + k on pass k, position t ends with
    10 + min(t, K); with p = 0.5, no pass changes a position t < k."""
    gold = torch.tensor([[2, 5, 6, 7, 8, 9, 1], [2, 5, 6, 7, 1, 1, 1]])
    pad, num_passes = 1, 4
    replaceable = replaceable_positions(gold, pad)
    seen = []

    def predict(tokens, outputs):
        seen.append(tokens.clone())
        lprobs = torch.full((int(outputs.sum()), 20), -1e9)
        lprobs[:, 10 + len(seen)] = 0.0
        return lprobs

    draw = lambda lp: draw_tokens(lp, "argmax")  # noqa: E731
    tokens, from_model = parallel_scheduled_sampling(gold, replaceable, 1.0, num_passes, predict, draw)
    expected = gold.clone()
    for t in range(1, gold.size(1)):
        expected[:, t] = torch.where(replaceable[:, t], 10 + min(t, num_passes), gold[:, t])
    assert torch.equal(tokens, expected)
    assert torch.equal(from_model, replaceable)

    seen.clear()
    torch.manual_seed(3)
    wide = gold.repeat(50, 1)
    final, _ = parallel_scheduled_sampling(wide, replaceable_positions(wide, pad), 0.5, num_passes, predict, draw)
    outputs_of_pass = seen[1:] + [final]  # the input of pass k + 1 is the output of pass k
    for k in range(2, num_passes + 1):
        assert torch.equal(outputs_of_pass[k - 1][:, :k], outputs_of_pass[k - 2][:, :k])
    assert not torch.equal(outputs_of_pass[-1], outputs_of_pass[-2])  # later positions do change


# -- Theorem 2.1 ----------------------------------------------------------------------------------
# Tested through the registered criterions on a hand-built autoregressive model whose ancestral law
# is spread over many outcomes: tests/test_ss_options.py (test_theorem_2_1_...), with the options
# that shape the drawn tokens (--ss-prob, --ss-temperature, --ss-conditioning, the padding ban).


# -- sequential_ss ----------------------------------------------------------------------------------
def greedy_decode(task, model, sample, max_len):
    generator = SequenceGenerator([model], task.tgt_dict, beam_size=1, min_len=0, max_len_b=max_len)
    return [hyps[0]["tokens"] for hyps in generator.forward(sample)]


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_sequential_p1_argmax_conditions_on_exactly_the_greedy_decode(arch):
    task, model, ss = build(arch, "sequential_ss", "--ss-conditioning", "argmax", "--ss-prob", "1", seed=5)
    pairs = [([0, 1, 2, 3], [3, 2, 1, 0, 4, 5, 2, 1]), ([4, 5], [5, 4, 5, 4, 1, 2, 3, 3]), ([1, 2, 3], [2, 2, 2, 2, 2])]
    sample = tiny.translation_batch(task, pairs)
    model.eval()
    with torch.no_grad():
        _, tokens, _ = ss.conditioned_forward(ss.driver(model), sample, 1.0)
        greedy = greedy_decode(task, model, sample, max_len=20)
    compared = 0
    for row, hyp, gold in zip(tokens, greedy, sample["net_input"]["prev_output_tokens"]):
        n = min(len(hyp), int(gold.ne(task.tgt_dict.pad()).sum()) - 1)
        assert torch.equal(row[1 : 1 + n], hyp[:n])
        compared += n
    assert compared >= 8


def test_parallel_with_k_ge_t_equals_sequential_under_argmax():
    _, _, par = build("transformer", "parallel_ss", "--ss-conditioning", "argmax", "--ss-num-passes", "9")
    task, model, seq = build("transformer", "sequential_ss", "--ss-conditioning", "argmax")
    sample = tiny.translation_batch(task, [([0, 1, 2, 3], [3, 2, 1, 0, 4, 5, 2, 1]), ([4, 5], [5, 4, 1])])
    model.eval()
    with torch.no_grad():
        out_p, tok_p, _ = par.conditioned_forward(par.driver(model), sample, 1.0)
        out_s, tok_s, _ = seq.conditioned_forward(seq.driver(model), sample, 1.0)
    assert torch.equal(tok_p, tok_s)
    mask = sample["target"].ne(task.tgt_dict.pad())
    torch.testing.assert_close(out_p[0][mask], out_s[0][mask], rtol=1e-5, atol=1e-5)


def test_sequential_loss_has_gradient_through_every_step():
    task, model, seq = build("lstm", "sequential_ss", "--ss-prob", "0.5")
    sample = batch_for(task, "lstm")
    model.train()
    seq.set_num_updates(0)
    _, grads, log = loss_and_grads(seq, model, sample)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["decoder.embed_tokens.weight"].abs().sum() > 0 and log["ss_from_model"] > 0


# -- invariances ------------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["parallel_ss", "sequential_ss"])
def test_padding_batch_order_and_reduction_invariance(criterion):
    flags = ["--ss-conditioning", "argmax", "--ss-prob", "1"] + (["--ss-num-passes", "2"] if criterion == "parallel_ss" else [])
    task, model, ss = build("transformer", criterion, *flags)
    model.train()  # dropout is 0; scheduled sampling is active in training mode only
    log = tiny.assert_batching_invariance(ss, model, task, PAIRS)
    assert log["ss_from_model"] == log["ss_positions"] > 0


def test_metrics_report_probability_and_replaced_fraction():
    from fairseq.logging import metrics

    from fairseq_ext.criterions.parallel_ss import ParallelScheduledSamplingCriterion

    logs = [
        {"loss": 2.0, "nll_loss": 2.0, "ntokens": 4, "sample_size": 4, "ss_prob_sum": 0.5, "ss_prob_count": 1,
         "ss_positions": 10, "ss_replaced": 2, "ss_from_model": 5},
        {"loss": 2.0, "nll_loss": 2.0, "ntokens": 4, "sample_size": 4, "ss_prob_sum": 0.5, "ss_prob_count": 1,
         "ss_positions": 30, "ss_replaced": 6, "ss_from_model": 15},
    ]  # fmt: skip
    with metrics.aggregate(new_root=True) as agg:
        ParallelScheduledSamplingCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["ss_prob"] == 0.5 and values["ss_replaced"] == 0.2 and values["ss_from_model"] == 0.5
    assert ParallelScheduledSamplingCriterion.logging_outputs_can_be_summed()


# -- clear errors -----------------------------------------------------------------------------------
def test_a_non_autoregressive_model_is_refused_with_a_clear_error():
    task, model, _ = tiny.build("cmlm_transformer", ["--criterion", "nat_loss"])
    with pytest.raises(UnsupportedModelError, match="non-autoregressive"):
        DecoderDriver(model, "parallel_ss")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ss-num-passes", "0"], "--ss-num-passes"),
        (["--ss-conditioning", "argmax", "--ss-temperature", "0.5"], "--ss-temperature"),
        (["--ss-temperature", "0"], "--ss-temperature"),
        (["--ss-schedule", "sigmoid"], "--ss-ramp-updates"),
        (["--ss-prob", "-0.1"], "--ss-prob"),
    ],
)
def test_impossible_flag_combinations_fail_when_the_criterion_is_built(flags, message):
    with pytest.raises(ValueError, match=message):
        build("transformer", "parallel_ss", *flags)


def test_mismatched_targets_are_refused():
    task, model, ss = build("transformer", "parallel_ss")
    sample = batch_for(task, "transformer")
    sample = copy.deepcopy(sample)
    sample["target"] = sample["target"].roll(1, dims=1)
    model.train()
    with pytest.raises(ValueError, match="shifted by one"):
        ss(model, sample)


def test_sampling_draws_follow_the_tempered_distribution_and_never_draw_banned_tokens():
    """Chi-square goodness of fit of 40,000 draws per row against softmax(logits / T) with the
    banned token removed (accepted at p > 1e-3); the same statistic rejects the other temperature
    (p < 1e-6), so an ignored temperature cannot pass."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 3.0], [0.0, 0.0, 5.0, 0.0, -3.0]])
    n = 40000

    def law(temperature):
        expected = torch.softmax(logits / temperature, -1)
        expected[:, 1] = 0.0
        return (expected / expected.sum(-1, keepdim=True)).double()

    def p_value(counts, probs):
        exp = probs * n
        return scipy.stats.chisquare(counts[exp > 0].numpy(), exp[exp > 0].numpy() / exp.sum().item() * n).pvalue

    for temperature, other in ((1.0, 0.7), (0.7, 1.0)):
        draws = draw_tokens(logits.log_softmax(-1).repeat_interleave(n, 0), "sample", temperature, banned=(1,))
        for row in range(2):
            counts = torch.bincount(draws[row * n : (row + 1) * n], minlength=5).double()
            assert counts[1] == 0
            assert p_value(counts, law(temperature)[row]) > 1e-3
            assert p_value(counts, law(other)[row]) < 1e-6
    assert draw_tokens(logits, "argmax", banned=(4,)).tolist() == [0, 2]
