"""differentiable_ss against teacher forcing, hard scheduled sampling, its own sequential mode,
finite differences (float64 gradcheck), and invariances; the relaxations and the alpha schedule."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_ext.modules.decoder_driver import UnsupportedModelError
from fairseq_ext.modules.differentiable_scheduled_sampling import (
    parallel_differentiable_ss,
    sequential_differentiable_ss,
)
from fairseq_ext.modules.relaxations import gumbel_noise, peaked_softmax
from fairseq_ext.modules.scheduled_sampling import draw_tokens, replaceable_positions, sequential_scheduled_sampling
from fairseq_ext.modules.schedules import AlphaSchedule
from fairseq_ext.testing import tiny

LS = ["--label-smoothing", "0.1"]
PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0]), ([4, 5], [5, 4, 5, 4, 1]), ([1, 1, 2], [2]), ([5, 0, 3, 2, 1], [1, 2])]
ALWAYS = ["--ss-prob", "1", "--ss-schedule", "constant"]  # the paper's 'always' setting: every input relaxed


def build(arch, criterion, *flags, num_symbols=6, seed=1):
    torch.manual_seed(seed)
    task, model, criterion = tiny.build(arch, ["--criterion", criterion, *LS, *flags], num_symbols=num_symbols)
    sharpen(model)
    return task, model, criterion


def sharpen(model):
    """fairseq initialises LSTM weights in [-0.1, 0.1], which leaves a fresh LSTM's predictions nearly
    independent of its inputs, so every relaxation would look alike: scale them up (x8)."""
    if type(model.decoder).__name__ != "LSTMDecoder":
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoder.") or name.startswith("encoder.embed_tokens"):
                param.mul_(8.0)


def batch_for(task, arch, pairs=PAIRS):
    if arch.endswith("_lm"):
        return tiny.lm_batch(task, [s + t for s, t in pairs])
    return tiny.translation_batch(task, pairs)


def loss_and_grads(criterion, model, sample, seed=None, reduce=True):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad()
    loss, _, log = criterion(model, sample, reduce=reduce)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, log


def assert_same_grads(g1, g2, atol=0.0, rtol=0.0):
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=rtol, atol=atol, msg=name)


def assert_grads_differ(g1, g2):
    assert any(not torch.allclose(g1[n], g2[n], atol=1e-6) for n in g1)


# -- neutral settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm", "transformer_lm"])
@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
def test_gold_probability_1_is_exactly_label_smoothed_cross_entropy(arch, decoding):
    task, model, dss = build(arch, "differentiable_ss", "--ss-prob", "0", "--dss-decoding", decoding)
    _, _, ce = build(arch, "label_smoothed_cross_entropy")
    sample = batch_for(task, arch)
    model.train()
    loss_dss, grads_dss, log = loss_and_grads(dss, model, sample)
    loss_ce, grads_ce, _ = loss_and_grads(ce, model, sample)
    assert torch.equal(loss_dss, loss_ce)
    assert_same_grads(grads_dss, grads_ce)
    assert log["ss_from_model"] == 0


@pytest.mark.parametrize("arch", ["transformer", "lstm", "fconv", "transformer_lm"])
@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
def test_relaxation_machinery_with_only_gold_inputs_reproduces_teacher_forcing(arch, decoding):
    """The embedding-input paths (incremental steps, or passes with encoder reuse) fed only gold
    embeddings give the teacher-forced loss and gradients."""
    task, model, dss = build(arch, "differentiable_ss", "--dss-decoding", decoding)
    _, _, ce = build(arch, "label_smoothed_cross_entropy")
    sample = batch_for(task, arch)
    model.train()
    loss_ce, grads_ce, _ = loss_and_grads(ce, model, sample)
    model.zero_grad()
    net_output, hard, from_model = dss.conditioned_forward(dss.driver(model), sample, 1e-30)  # no coin lands
    loss, _ = dss.compute_loss(model, net_output, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert not from_model.any() and torch.equal(hard, dss.driver(model).decoder_inputs(sample))
    exact = decoding == "parallel"
    torch.testing.assert_close(loss.detach(), loss_ce, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-5)
    assert_same_grads(grads, grads_ce, atol=0 if exact else 1e-5)


def test_warmup_is_teacher_forced_and_both_schedules_follow_the_update_count():
    task, model, dss = build(
        "transformer", "differentiable_ss", "--ss-warmup-updates", "3", "--ss-inverse-sigmoid-k", "2",
        "--dss-alpha", "2", "--dss-alpha-schedule", "exponential", "--dss-alpha-growth", "3",
        "--dss-alpha-period-updates", "2", "--dss-alpha-max", "10",
    )
    sample = batch_for(task, "transformer")
    model.train()
    dss.set_num_updates(2)
    _, _, log = dss(model, sample)
    assert log["ss_prob_sum"] == 0.0 and log["ss_from_model"] == 0 and log["dss_alpha_sum"] == 2.0
    dss.set_num_updates(3 + 20)
    _, _, log = dss(model, sample)
    assert log["ss_prob_sum"] == pytest.approx(1 - 2 / (2 + math.exp(10)))  # default p_max 1, k = 2
    assert log["dss_alpha_sum"] == 10.0  # 2 * 3**10, capped
    dss.set_num_updates(3 + 1)
    assert dss.current_alpha() == pytest.approx(2 * 3**0.5)
    model.eval()  # validation: teacher-forced, and alpha is not logged (it does not apply)
    _, _, log = dss(model, sample)
    assert log["ss_prob_sum"] == 0.0 and "dss_alpha_sum" not in log


def test_default_gold_mixing_is_the_inverse_sigmoid_of_the_paper():
    _, _, dss = build("lstm", "differentiable_ss")
    k = 1000.0
    for u in (0, 1000, 6908, 20000):
        dss.set_num_updates(u)
        assert dss.current_prob() == pytest.approx(1 - k / (k + math.exp(u / k)))


# -- large alpha: hard scheduled sampling ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm"])
@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
def test_large_alpha_gives_the_forward_values_of_sequential_ss_with_argmax(arch, decoding):
    passes = ["--dss-num-passes", "6"] if decoding == "parallel" else []
    task, model, dss = build(arch, "differentiable_ss", *ALWAYS, "--dss-alpha", "1e6", "--dss-decoding", decoding, *passes)
    _, _, hard = build(arch, "sequential_ss", "--ss-prob", "1", "--ss-conditioning", "argmax")
    sample = batch_for(task, arch)
    model.train()
    loss_dss, _, log_dss = dss(model, sample)
    loss_hard, _, log_hard = hard(model, sample)
    torch.testing.assert_close(loss_dss, loss_hard, rtol=1e-6, atol=1e-5)
    assert log_dss["ss_replaced"] == log_hard["ss_replaced"] > 0  # the same inputs differ from gold
    _, _, soft = build(arch, "differentiable_ss", *ALWAYS, "--dss-alpha", "1", "--dss-decoding", decoding, *passes)
    assert (soft(model, sample)[0] - loss_hard).abs() > 1e-4  # the test can fail: alpha = 1 is not hard


# -- credit assignment ----------------------------------------------------------------------------------
def step_outputs_and_last_loss(model, task, arch, method):
    """Runs one method step by step on a tiny model, keeping every step's output; returns the list
    of step outputs and the loss of the last step."""
    from fairseq_ext.modules.decoder_driver import DecoderDriver

    driver = DecoderDriver(model, "test")
    sample = batch_for(task, arch, PAIRS[:1])
    gold = driver.decoder_inputs(sample)
    encoder_out = driver.encode(sample)
    state, outs = {}, []
    use_model = replaceable_positions(gold, task.target_dictionary.pad())
    if method == "differentiable_ss":

        def step(prefix, vectors):
            outs.append(driver.step_from_embeddings(prefix, vectors, encoder_out, state))
            return outs[-1]

        def relax(scores, where):
            weights = peaked_softmax(scores, 2.0)
            return weights @ driver.input_embedding_matrix(), weights.argmax(-1)

        sequential_differentiable_ss(gold, driver.embed(gold), use_model, step, relax)
    else:

        def step(prefix):
            outs.append(driver.step(prefix, encoder_out, state))
            return outs[-1]

        sequential_scheduled_sampling(
            gold, use_model, 1.0, step, lambda o: torch.log_softmax(o, -1), lambda s: draw_tokens(s, "argmax")
        )
    target = sample["target"][0, -1]
    return outs, -torch.log_softmax(outs[-1][0], -1)[target]


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_a_later_loss_reaches_earlier_scores_under_dss_and_not_under_hard_scheduled_sampling(arch):
    task, model, _ = build(arch, "label_smoothed_cross_entropy")
    model.train()
    outs, loss = step_outputs_and_last_loss(model, task, arch, "differentiable_ss")
    grads = torch.autograd.grad(loss, outs[:-1], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # every earlier step's scores get credit
    outs, loss = step_outputs_and_last_loss(model, task, arch, "sequential_ss")
    grads = torch.autograd.grad(loss, outs[:-1], allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)  # the argmax cuts them off


# -- finite differences -------------------------------------------------------------------------------
# The smallest tables that exercise the relaxations (V = 6 with padding banned, D = 3, T = 3, two
# sentences, one padded): 36 inputs.  One full Jacobian check per relaxation (greedy, sample, top-k);
# the other cases use gradcheck's fast mode, which compares a random projection v^T J u of the
# analytical and numerical Jacobians: a wrong gradient passes it only with probability ~0.
TINY_LSTM = ["--decoder-attention", "0", "--encoder-embed-dim", "3", "--encoder-hidden-size", "3",
             "--decoder-embed-dim", "3", "--decoder-hidden-size", "3", "--decoder-out-embed-dim", "3"]  # fmt: skip


@pytest.mark.parametrize(
    "mode, decoding, top_k, fast_mode",
    [
        ("greedy", "sequential", None, False),
        ("sample", "sequential", None, False),
        ("greedy", "parallel", None, True),
        ("sample", "parallel", None, True),
        ("sample", "parallel", 3, False),
        ("greedy", "sequential", 3, True),
    ],
)
def test_gradcheck_float64(mode, decoding, top_k, fast_mode):
    """The whole criterion's loss against finite differences in the decoder's embedding table (which
    enters the gold and the soft inputs) and its output projection.  An LSTM without attention:
    fairseq's attention layers (transformer and LSTM) compute their softmax in float32."""
    flags = [*ALWAYS, "--ss-prob", "0.7", "--dss-mode", mode, "--dss-alpha", "1.5", "--dss-decoding", decoding]
    flags += [] if top_k is None else ["--dss-top-k", str(top_k)]
    task, model, dss = build("lstm", "differentiable_ss", *flags, *TINY_LSTM, num_symbols=2)
    model.double().train()
    sample = batch_for(task, "lstm", [([0, 1], [1, 0]), ([1], [0])])
    names = ["decoder.embed_tokens.weight", "decoder.fc_out.weight"]
    params = dict(model.named_parameters())
    assert params[names[0]].shape == (6, 3) and sample["target"].shape == (2, 3)

    def loss_of(embed, fc_out):
        torch.manual_seed(3)  # the same coins and Gumbel noise at every evaluation
        with torch.nn.utils.stateless._reparametrize_module(model, {names[0]: embed, names[1]: fc_out}):
            net_output, _, from_model = dss.conditioned_forward(dss.driver(model), sample, 0.7)
        assert from_model.any()
        # the label-smoothed loss in float64 (fairseq's get_normalized_probs computes in float32)
        lprobs = torch.log_softmax(net_output[0], dim=-1).view(-1, net_output[0].size(-1))
        loss, _ = label_smoothed_nll_loss(lprobs, sample["target"].view(-1), 0.1, ignore_index=dss.padding_idx)
        return loss

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


# -- parallel mode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_parallel_mode_with_k_ge_t_equals_the_sequential_mode(arch, mode):
    flags = [*ALWAYS, "--ss-prob", "0.8", "--dss-mode", mode, "--dss-alpha", "2"]
    task, model, sequential = build(arch, "differentiable_ss", *flags)
    sample = batch_for(task, arch)
    tgt_len = sample["target"].size(1)
    _, _, parallel = build(arch, "differentiable_ss", *flags, "--dss-decoding", "parallel", "--dss-num-passes", str(tgt_len))
    _, _, one_pass = build(arch, "differentiable_ss", *flags, "--dss-decoding", "parallel")
    model.train()
    loss_s, grads_s, log_s = loss_and_grads(sequential, model, sample, seed=5)
    loss_p, grads_p, log_p = loss_and_grads(parallel, model, sample, seed=5)
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads_p, grads_s, rtol=1e-4, atol=1e-5)
    assert log_p["ss_from_model"] == log_s["ss_from_model"] > 0
    loss_1, grads_1, _ = loss_and_grads(one_pass, model, sample, seed=5)
    assert not torch.allclose(loss_1, loss_s, atol=1e-4)  # one pass is an approximation
    assert_grads_differ(grads_1, grads_s)


def test_pass_k_is_exact_up_to_position_k():
    """The Jacobi view: with toy linear scores, the inputs after pass k agree with the sequential
    recurrence at positions <= k, and K = T - 1 passes agree everywhere."""
    torch.manual_seed(0)
    bsz, tgt_len, vocab, dim = 2, 6, 5, 3
    table, mixer = torch.randn(vocab, dim), torch.randn(dim, vocab)
    gold = torch.randint(0, vocab, (bsz, tgt_len))
    gold_vectors = table[gold]
    use_model = torch.rand(bsz, tgt_len) < 0.8
    use_model[:, 0] = False

    def outputs_of(vectors):  # a causal toy decoder: output i = f(cumulative mean of inputs <= i)
        steps = torch.arange(1, vectors.size(1) + 1).view(1, -1, 1)
        return torch.tanh(vectors.cumsum(1) / steps) @ mixer

    def relax(scores, where):
        weights = peaked_softmax(scores, 3.0)
        return weights @ table, weights.argmax(-1)

    _, sequential_vectors, _ = sequential_differentiable_ss(
        gold, gold_vectors, use_model, lambda tokens, vectors: outputs_of(vectors)[:, -1], relax
    )
    for passes in range(1, tgt_len):
        vectors, _ = parallel_differentiable_ss(
            gold, gold_vectors, use_model, passes, lambda v, select: outputs_of(v)[select], relax
        )
        torch.testing.assert_close(vectors[:, : passes + 1], sequential_vectors[:, : passes + 1])
    torch.testing.assert_close(vectors, sequential_vectors)
    # the test can fail: with every input relaxed, one pass relaxes position 2 from an output that saw
    # the gold input 1 instead of the relaxed one
    use_model[:, 1:] = True
    _, sequential_vectors, _ = sequential_differentiable_ss(
        gold, gold_vectors, use_model, lambda tokens, vectors: outputs_of(vectors)[:, -1], relax
    )
    one_pass, _ = parallel_differentiable_ss(gold, gold_vectors, use_model, 1, lambda v, s: outputs_of(v)[s], relax)
    assert not torch.allclose(one_pass[:, 2], sequential_vectors[:, 2], atol=1e-4)


# -- incremental vs full ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_incremental_steps_equal_full_prefix_recomputation(arch):
    task, model, dss = build(arch, "differentiable_ss", *ALWAYS, "--dss-alpha", "2")
    sample = batch_for(task, arch)
    model.train()
    loss_inc, grads_inc, _ = loss_and_grads(dss, model, sample, seed=2)
    dss.driver(model).incremental_has_gradient = False  # the driver then re-runs the whole prefix each step
    loss_full, grads_full, _ = loss_and_grads(dss, model, sample, seed=2)
    torch.testing.assert_close(loss_inc, loss_full, rtol=1e-6, atol=1e-5)
    assert_same_grads(grads_inc, grads_full, rtol=1e-5, atol=1e-5)


# -- invariances ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
def test_padding_batch_order_and_reduction_invariance(decoding):
    task, model, dss = build("transformer", "differentiable_ss", *ALWAYS, "--dss-alpha", "3", "--dss-decoding", decoding)
    model.train()
    log = tiny.assert_batching_invariance(dss, model, task, PAIRS)
    assert log["ss_from_model"] == log["ss_positions"] > 0


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dss-num-passes", "2"], "--dss-num-passes only applies to --dss-decoding parallel"),
        (["--dss-decoding", "parallel", "--dss-num-passes", "0"], "--dss-num-passes must be >= 1"),
        (["--dss-alpha", "0"], "--dss-alpha must be a finite number > 0"),
        (["--dss-alpha-growth", "2"], "--dss-alpha-growth only applies to --dss-alpha-schedule exponential"),
        (["--dss-alpha-max", "20"], "--dss-alpha-max only applies to --dss-alpha-schedule exponential"),
        (["--dss-alpha-schedule", "exponential", "--dss-alpha-growth", "2"], "set both"),
        (["--ss-schedule", "linear"], "--ss-schedule linear rises over --ss-ramp-updates"),
        (["--ss-schedule", "constant", "--ss-inverse-sigmoid-k", "5"], "--ss-inverse-sigmoid-k only applies"),
        (["--ss-prob", "1.5"], "--ss-prob must be a probability"),
    ],
)  # fmt: skip
def test_impossible_flag_combinations_fail_when_the_criterion_is_built(flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build("lstm", "differentiable_ss", *flags)


def test_a_decoder_without_an_embedding_table_is_refused_with_a_clear_error():
    task, model, dss = tiny.build(
        "transformer_lm", ["--criterion", "differentiable_ss", *ALWAYS],
        extra=["--adaptive-input", "--adaptive-input-cutoff", "3", "--tie-adaptive-weights",
               "--adaptive-softmax-cutoff", "3"],
    )  # fmt: skip
    model.train()
    with pytest.raises(UnsupportedModelError, match="plain embedding table"):
        dss(model, batch_for(task, "transformer_lm"))


def test_metrics_report_alpha():
    from fairseq.logging import metrics

    from fairseq_ext.criterions.differentiable_ss import DifferentiableScheduledSamplingCriterion

    logs = [{"loss": 1.0, "nll_loss": 1.0, "ntokens": 4, "nsentences": 1, "sample_size": 4, "dss_alpha_sum": 5.0,
             "dss_alpha_count": 1, "ss_prob_sum": 0.5, "ss_prob_count": 1, "ss_positions": 4, "ss_replaced": 1,
             "ss_from_model": 2}] * 2  # fmt: skip
    with metrics.aggregate() as agg:
        DifferentiableScheduledSamplingCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["dss_alpha"] == 5.0 and values["ss_from_model"] == 0.5 and values["ss_replaced"] == 0.25


# -- the relaxations and the alpha schedule -------------------------------------------------------------
def test_peaked_softmax_is_shift_invariant_tends_to_argmax_and_bans_padding():
    torch.manual_seed(0)
    scores = torch.randn(50, 7)
    torch.testing.assert_close(peaked_softmax(scores, 3.0), peaked_softmax(scores + 11.0, 3.0))
    torch.testing.assert_close(peaked_softmax(scores, 1.0), torch.softmax(scores, -1))
    hard = torch.nn.functional.one_hot(scores.argmax(-1), 7).float()
    assert (peaked_softmax(scores, 1e4) - hard).abs().max() < 1e-6
    assert torch.isfinite(peaked_softmax(scores, 1e300)).all()
    weights = peaked_softmax(scores, 2.0, banned=(1,))
    assert torch.all(weights[:, 1] == 0) and torch.allclose(weights.sum(-1), torch.ones(50))


def test_soft_gumbel_sample_at_large_alpha_draws_from_the_softmax():
    """Chi-square goodness of fit: argmax of softmax(alpha (s + G)) ~ softmax(s) (Gumbel-max)."""
    generator = torch.Generator().manual_seed(1234)
    scores = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    n = 20000
    noise = gumbel_noise((n, 5), scores, generator=generator)
    weights = peaked_softmax(scores.expand(n, 5), 1e4, noise)
    assert (weights.max(-1).values > 0.999).float().mean() > 0.99  # nearly one-hot
    observed = np.bincount(weights.argmax(-1).numpy(), minlength=5)
    expected = torch.softmax(scores[0].double(), -1).numpy() * n
    assert scipy.stats.chisquare(observed, expected).pvalue > 0.01
    wrong = torch.softmax(scores[0].double() * 1.2, -1).numpy() * n  # a nearby distribution is rejected
    assert scipy.stats.chisquare(observed, wrong).pvalue < 1e-6


def test_alpha_schedule_values():
    assert AlphaSchedule("fixed", 4.0)(10**6) == 4.0
    annealed = AlphaSchedule("exponential", 1.0, growth=2.0, period_updates=10, start_updates=5)
    assert [annealed(u) for u in (0, 5, 15, 25)] == [1.0, 1.0, 2.0, 4.0]
    assert annealed(20) == pytest.approx(2**1.5)
    assert math.isfinite(annealed(10**9))
    assert AlphaSchedule("exponential", 1.0, growth=2.0, period_updates=1, alpha_max=50.0)(100) == 50.0


# -- --dss-top-k ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm"])
@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_top_k_over_the_whole_vocabulary_equals_the_full_relaxation(arch, decoding, mode):
    """K = V keeps every candidate (the gathered-projection path in parallel transformer mode)."""
    flags = [*ALWAYS, "--ss-prob", "0.8", "--dss-mode", mode, "--dss-alpha", "2", "--dss-decoding", decoding]
    task, model, full = build(arch, "differentiable_ss", *flags)
    vocab = len(task.target_dictionary)
    _, _, top_all = build(arch, "differentiable_ss", *flags, "--dss-top-k", str(vocab))
    _, _, top_2 = build(arch, "differentiable_ss", *flags, "--dss-top-k", "2")
    sample = batch_for(task, arch)
    model.train()
    loss_f, grads_f, log_f = loss_and_grads(full, model, sample, seed=4)
    loss_a, grads_a, log_a = loss_and_grads(top_all, model, sample, seed=4)
    torch.testing.assert_close(loss_a, loss_f, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads_a, grads_f, rtol=1e-4, atol=1e-5)
    assert log_a["ss_replaced"] == log_f["ss_replaced"]
    loss_2, _, _ = loss_and_grads(top_2, model, sample, seed=4)
    assert (loss_2 - loss_f).abs() > 1e-4  # two candidates are an approximation at alpha = 2


def test_top_k_at_large_alpha_equals_hard_scheduled_sampling():
    task, model, dss = build("transformer", "differentiable_ss", *ALWAYS, "--dss-alpha", "1e6",
                             "--dss-decoding", "parallel", "--dss-num-passes", "6", "--dss-top-k", "3")  # fmt: skip
    _, _, hard = build("transformer", "sequential_ss", "--ss-prob", "1", "--ss-conditioning", "argmax")
    sample = batch_for(task, "transformer")
    model.train()
    torch.testing.assert_close(dss(model, sample)[0], hard(model, sample)[0], rtol=1e-6, atol=1e-5)


# -- the seq2seq tagger (the paper's NER model) --------------------------------------------------------
def tagger(*flags, criterion="differentiable_ss"):
    from fairseq_ext.testing import synthetic_tagging

    task, model, crit = synthetic_tagging.build_tagger(
        flags=["--dropout", "0"], criterion=["--criterion", criterion, *LS, *flags]
    )
    with torch.no_grad():  # peaked predictions that depend on the inputs (see sharpen)
        for name, param in model.named_parameters():
            if name.startswith("decoder."):
                param.mul_(4.0)
    return task, model, crit


def tagger_batch(task):
    from fairseq_ext.testing import synthetic_tagging

    words, tags = synthetic_tagging.TINY_WORDS, synthetic_tagging.NER_TAGS
    sentences = [
        ([words[i % 8] for i in range(start, start + n)], [tags[(3 * i) % 5] for i in range(start, start + n)])
        for start, n in ((0, 5), (3, 3), (1, 7), (5, 4))
    ]
    return synthetic_tagging.tagging_batch(task, sentences)


def test_tagger_gold_probability_1_is_cross_entropy_and_k_ge_t_equals_sequential():
    task, model, dss0 = tagger("--ss-prob", "0")
    _, _, ce = tagger(criterion="label_smoothed_cross_entropy")
    sample = tagger_batch(task)
    model.train()
    loss_0, grads_0, _ = loss_and_grads(dss0, model, sample)
    loss_ce, grads_ce, _ = loss_and_grads(ce, model, sample)
    assert torch.equal(loss_0, loss_ce)
    assert_same_grads(grads_0, grads_ce)
    flags = [*ALWAYS, "--ss-prob", "0.8", "--dss-mode", "sample", "--dss-alpha", "2"]
    _, _, sequential = tagger(*flags)
    _, _, parallel = tagger(*flags, "--dss-decoding", "parallel", "--dss-num-passes", str(sample["target"].size(1)))
    loss_s, grads_s, log = loss_and_grads(sequential, model, sample, seed=7)
    loss_p, grads_p, _ = loss_and_grads(parallel, model, sample, seed=7)
    assert log["ss_from_model"] > 0 and not torch.allclose(loss_s, loss_ce, atol=1e-3)
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads_p, grads_s, rtol=1e-4, atol=1e-5)


def test_tagger_large_alpha_is_hard_scheduled_sampling():
    task, model, dss = tagger(*ALWAYS, "--dss-alpha", "1e6")
    _, _, hard = tagger("--ss-prob", "1", "--ss-conditioning", "argmax", criterion="sequential_ss")
    sample = tagger_batch(task)
    model.train()
    loss_dss, _, log_dss = dss(model, sample)
    loss_hard, _, log_hard = hard(model, sample)
    torch.testing.assert_close(loss_dss, loss_hard, rtol=1e-6, atol=1e-5)
    assert log_dss["ss_replaced"] == log_hard["ss_replaced"]
