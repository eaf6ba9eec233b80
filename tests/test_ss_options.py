"""Each option of the scheduled-sampling criterions, checked through the registered criterion on a
hand-built autoregressive model whose exact distributions are known: parallel_ss and sequential_ss
(Duckworth et al., Parallel Scheduled Sampling, Algorithms 1 and 2, Theorem 2.1) and
differentiable_ss (Goyal, Dyer, Berg-Kirkpatrick, Differentiable Scheduled Sampling for Credit
Assignment, sections 3.1-3.2).

The toy model is a position-dependent Markov chain over four symbols, far from one-hot
(p(next | previous) is 0.55 for one successor and 0.15 for each other), with the padding token as
its single most likely output: a criterion that fed padding would show it at once.  Its embedding
table is the identity, so the vectors fed to the decoder are the weights over the vocabulary: the
relaxations of differentiable_ss can be read off them.  Criterions are built by fairseq's
``task.build_criterion`` from command-line flags and run by their own ``forward``; the decoder
records the inputs of its last call (the loss pass, or the last step of a step-by-step decoder):
the conditioning tokens, or soft inputs, that the criterion chose.

Statistical tests use fixed seeds and many rows drawn in one batched call.  A sample is accepted
when its p-value exceeds 1e-3 and a wrong hypothesis must give a p-value below 1e-6: with the
sample sizes here a correct implementation gives p-values far above 1e-3 for most seeds (a 1-in-1000
chance of a false alarm if the seed were changed), and the wrong hypotheses (K < T, an ignored
temperature, a missing or mis-scaled Gumbel noise) give p-values many orders of magnitude below 1e-6.
"""
import itertools

import pytest
import scipy.stats
import torch
from fairseq import options, tasks
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder

from fairseq_ext.testing import tiny
from fairseq_ext.testing.cli import USER_DIR

NUM_SYMBOLS = 4  # fairseq's dictionary: bos 0, pad 1, eos 2, unk 3, then the symbols w0..w3 = 4..7
PAD, EOS = 1, 2
SYMBOLS = list(range(4, 4 + NUM_SYMBOLS))
VOCAB = 4 + NUM_SYMBOLS
MAX_POSITIONS = 8
FIRST = [0.4, 0.3, 0.2, 0.1]  # p(z_1 | BOS) over w0..w3
PREFERRED, OTHER = 0.55, 0.15  # p(z_t | z_{t-1}): one preferred successor, depending on t and z_{t-1}
PAD_LOGIT = 2.0  # padding beats every symbol (log 0.55 = -0.6): it must be banned, not merely unlikely
UNUSED_LOGIT = -50.0  # bos, eos, unk: probability ~1e-22, never drawn in these sample sizes
ACCEPT, REJECT = 1e-3, 1e-6  # see the module docstring
GOLD = [1, 3, 0]  # target symbols: the decoder inputs are [EOS, w1, w3, w0], T = 3 replaceable positions


def toy_logits() -> torch.Tensor:
    """MAX_POSITIONS x V x V: logits of the token after input position i, given the input there.

    After BOS at position 0: FIRST.  After symbol w_j at position i: w_{(j + 1 + i) mod 4} with
    probability PREFERRED, each other symbol OTHER, so the law of a token depends strongly on the
    token before it (what distinguishes an ancestral sample from tokens drawn given stale inputs).
    """
    logits = torch.full((MAX_POSITIONS, VOCAB, VOCAB), UNUSED_LOGIT)
    logits[:, :, PAD] = PAD_LOGIT
    logits[:, :, SYMBOLS] = torch.tensor([0.25] * NUM_SYMBOLS).log()  # inputs never seen: uniform
    logits[0, EOS, SYMBOLS] = torch.tensor(FIRST).log()
    for i in range(MAX_POSITIONS):
        for j, prev in enumerate(SYMBOLS):
            probs = torch.full((NUM_SYMBOLS,), OTHER)
            probs[(j + 1 + i) % NUM_SYMBOLS] = PREFERRED
            logits[i, prev, SYMBOLS] = probs.log()
    return logits


class ToyEncoder(FairseqEncoder):
    def forward(self, src_tokens, src_lengths=None, **kwargs):
        return {"encoder_out": [src_tokens]}  # unused by the decoder; present, so criterions reuse it


class MarkovToyDecoder(FairseqIncrementalDecoder):
    """Output i has logits ``x_i @ logits[i]``, x_i the embedding of input i (a one-hot row of the
    identity table, or a relaxation's weights).  The logits themselves are the "features": the
    output layer is the identity, so a criterion may project a subset of positions."""

    def __init__(self, dictionary):
        super().__init__(dictionary)
        self.embed_tokens = torch.nn.Embedding(VOCAB, VOCAB, padding_idx=dictionary.pad())
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(VOCAB))
        self.logits = torch.nn.Parameter(toy_logits())
        self.last_tokens = self.last_inputs = None

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        x = self.embed_tokens(prev_output_tokens)  # B x t x V
        return torch.einsum("btv,tvw->btw", x, self.logits[: x.size(1)]), {"attn": [None], "inner_states": None, "x": x}

    def output_layer(self, features, **kwargs):
        return features

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        # incremental_state is ignored: every step recomputes the whole (short) prefix
        features, extra = self.extract_features(prev_output_tokens, encoder_out)
        self.last_tokens, self.last_inputs = prev_output_tokens.detach().clone(), extra["x"].detach().clone()
        return self.output_layer(features), extra

    def max_positions(self):
        return MAX_POSITIONS


def toy_model(task):
    model = FairseqEncoderDecoderModel(ToyEncoder(task.source_dictionary), MarkovToyDecoder(task.target_dictionary))
    return model.train()  # the criterions mix in model tokens only in training mode


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy_dictionaries")
    tiny.write_dictionary(str(path), NUM_SYMBOLS)
    return str(path)


def build(data_dir, criterion, *flags):
    """(task, criterion) from a fairseq-train command line: the registered criterion and its config."""
    argv = [data_dir, "--user-dir", USER_DIR, "--cpu", "--arch", "transformer", "--task", "translation",
            "-s", "src", "-t", "tgt", "--criterion", criterion, "--label-smoothing", "0.1", *flags]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    return task, task.build_criterion(args)


def gold_batch(task, rows):
    """``rows`` copies of one sentence pair whose decoder inputs are [EOS, *GOLD]."""
    one = tiny.translation_batch(task, [([0, 1], GOLD)])
    assert one["net_input"]["prev_output_tokens"][0].tolist() == [EOS] + [SYMBOLS[g] for g in GOLD]

    def rep(x):
        return x.repeat(rows, *[1] * (x.dim() - 1))

    return {"id": torch.arange(rows), "nsentences": rows, "ntokens": one["ntokens"] * rows,
            "net_input": {k: rep(v) for k, v in one["net_input"].items()}, "target": rep(one["target"])}  # fmt: skip


def run(task, criterion, rows, seed):
    """Runs the criterion's forward on ``rows`` copies of the gold sentence; returns the decoder
    inputs of the last decoder call (B x 4 tokens, B x 4 x V vectors) and the logging output."""
    model = toy_model(task)
    torch.manual_seed(seed)
    loss, _, log = criterion(model, gold_batch(task, rows))
    assert torch.isfinite(loss)
    return model.decoder.last_tokens, model.decoder.last_inputs, log


# -- exact distributions of the toy ---------------------------------------------------------------------
def conditional(position: int, prev: int, temperature: float = 1.0) -> torch.Tensor:
    """V probabilities of the token fed at ``position`` given the token at ``position - 1``: the
    tempered softmax of the toy's logits with padding removed, as the criterions draw."""
    logits = toy_logits()[position - 1, prev].double() / temperature
    logits[PAD] = float("-inf")
    return torch.softmax(logits, -1)


def one_hot(token: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), VOCAB).double()


def exact_joint(kernel) -> torch.Tensor:
    """Probabilities of every z in SYMBOLS^T (row-major in :func:`cell_index`'s order) for a Markov
    kernel ``kernel(t, z_{t-1}) -> V probabilities of z_t`` started from z_0 = EOS."""
    joint = []
    for z in itertools.product(SYMBOLS, repeat=len(GOLD)):
        prob, prev = 1.0, EOS
        for t, token in enumerate(z, start=1):
            prob *= float(kernel(t, prev)[token])
            prev = token
        joint.append(prob)
    return torch.tensor(joint, dtype=torch.float64)


def cell_index(tokens: torch.Tensor) -> torch.Tensor:
    """B x T symbol tokens -> B cell numbers of SYMBOLS^T (z_1 most significant)."""
    digits = tokens - SYMBOLS[0]
    weights = NUM_SYMBOLS ** torch.arange(tokens.size(1) - 1, -1, -1)
    return (digits * weights).sum(-1)


def pooled(observed: torch.Tensor, expected: torch.Tensor, rare: torch.Tensor):
    """Observed and expected counts with the ``rare`` cells merged into the least expected other cell."""
    into = int(torch.argmin(expected[~rare]))
    merged = []
    for counts in (observed, expected):
        kept = counts[~rare].clone()
        kept[into] += counts[rare].sum()
        merged.append(kept)
    return merged


def joint_p_value(tokens: torch.Tensor, joint: torch.Tensor, pool: bool = False) -> float:
    """Chi-square goodness of fit of the B x T conditioning tokens against ``joint``.  Every cell
    must expect at least 5 draws (the chi-square approximation); ``pool`` merges the rarer cells
    into one instead (for mixtures whose rare cells are not the point)."""
    assert all(t in SYMBOLS for t in tokens.unique().tolist()), "a token outside the toy's symbols was fed"
    observed = torch.bincount(cell_index(tokens), minlength=joint.numel()).double()
    expected = joint / joint.sum() * tokens.size(0)
    rare = expected < 5
    if pool and rare.any():
        observed, expected = pooled(observed, expected, rare)
    assert expected.min() >= 5, f"too few draws for a chi-square test: {expected.min():.2f} expected in a cell"
    return scipy.stats.chisquare(observed.numpy(), expected.numpy()).pvalue


def ancestral(temperature):
    return exact_joint(lambda t, prev: conditional(t, prev, temperature))


# -- Theorem 2.1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [None, 0.7])
def test_theorem_2_1_p1_and_k_ge_t_feeds_an_ancestral_sample(data_dir, temperature):
    """Duckworth et al., Parallel Scheduled Sampling, Theorem 2.1: with p = 1 and K >= T passes, the
    final conditioning tokens are an ancestral sample.  The JOINT law of the T = 3 fed tokens (64
    outcomes, at least ~20 draws expected in each) is compared with the exact ancestral law; with
    K < T the same statistic rejects it (the later tokens condition on tokens that a later pass
    replaced).  Sequential scheduled sampling (Algorithm 1) with p = 1 is ancestral sampling too."""
    rows = 30000
    tau = 1.0 if temperature is None else temperature
    exact = ancestral(tau)
    flags = ["--ss-prob", "1"] + ([] if temperature is None else ["--ss-temperature", str(temperature)])
    p_values = {}
    for passes in (1, 2, 3, 4):
        task, criterion = build(data_dir, "parallel_ss", *flags, "--ss-num-passes", str(passes))
        tokens, _, log = run(task, criterion, rows, seed=11 + passes)
        assert log["ss_from_model"] == log["ss_positions"] == 3 * rows
        p_values[passes] = joint_p_value(tokens[:, 1:], exact)
        if passes == 3 and temperature is not None:  # the temperature is applied: tau = 1 is rejected
            assert joint_p_value(tokens[:, 1:], ancestral(1.0)) < REJECT
    task, criterion = build(data_dir, "sequential_ss", *flags)
    tokens, _, _ = run(task, criterion, rows, seed=17)
    p_values["sequential"] = joint_p_value(tokens[:, 1:], exact)
    print(p_values)
    assert p_values[3] > ACCEPT and p_values[4] > ACCEPT and p_values["sequential"] > ACCEPT  # K = T, K > T
    assert p_values[1] < REJECT and p_values[2] < REJECT  # K < T


# -- --ss-prob, --ss-temperature, --ss-conditioning, the padding ban -----------------------------------------
@pytest.mark.parametrize("criterion_name", ["parallel_ss", "sequential_ss"])
@pytest.mark.parametrize("prob, temperature", [(1.0, 0.5), (0.3, None)])
def test_mixing_probability_and_temperature_give_the_exact_law_of_the_fed_tokens(
    data_dir, criterion_name, prob, temperature
):
    """Each fed token is the gold one with probability 1 - p, else a draw from softmax(logits / tau)
    with padding removed.  One pass of parallel_ss draws every position given the gold prefix; the
    sequential criterion draws it given the token just fed (a Markov chain over the fed tokens).
    The joint law of the fed tokens is tested against that exact law, and the same statistic
    rejects the law with the temperature ignored (tau = 1 instead of 0.5) or with p mistaken."""
    rows = 20000
    gold = [EOS] + [SYMBOLS[g] for g in GOLD]
    tau = 1.0 if temperature is None else temperature

    def law(p, tau):
        def kernel(t, prev):
            given = gold[t - 1] if criterion_name == "parallel_ss" else prev
            return (1 - p) * one_hot(gold[t]) + p * conditional(t, given, tau)

        return exact_joint(kernel)

    flags = ["--ss-prob", str(prob)] + ([] if temperature is None else ["--ss-temperature", str(temperature)])
    task, criterion = build(data_dir, criterion_name, *flags)
    tokens, _, log = run(task, criterion, rows, seed=5)
    fed = tokens[:, 1:]
    assert not fed.eq(PAD).any()  # padding, the model's most likely token, is never fed
    assert joint_p_value(fed, law(prob, tau), pool=True) > ACCEPT
    # the coins: Binomial(3 * rows, p) positions take the model's token (exactly all when p = 1)
    assert scipy.stats.binomtest(log["ss_from_model"], log["ss_positions"], prob).pvalue > ACCEPT
    if temperature is not None:
        assert joint_p_value(fed, law(prob, 1.0), pool=True) < REJECT
    else:
        assert joint_p_value(fed, law(prob + 0.05, tau), pool=True) < REJECT


@pytest.mark.parametrize("criterion_name, passes", [("parallel_ss", 1), ("parallel_ss", 3), ("sequential_ss", None)])
def test_argmax_conditioning_feeds_the_greedy_tokens_and_never_padding(data_dir, criterion_name, passes):
    """--ss-conditioning argmax with p = 1: one pass feeds at each position the argmax given the gold
    prefix; K >= T passes and the sequential criterion feed the greedy decode.  Padding is the
    toy's argmax everywhere, so the argmax must be taken over the other tokens."""
    flags = ["--ss-prob", "1", "--ss-conditioning", "argmax"]
    flags += [] if passes is None else ["--ss-num-passes", str(passes)]
    task, criterion = build(data_dir, criterion_name, *flags)
    tokens, _, log = run(task, criterion, 50, seed=0)
    gold = [EOS] + [SYMBOLS[g] for g in GOLD]
    expected = [EOS]
    for t in range(1, len(gold)):
        given = gold[t - 1] if passes == 1 else expected[t - 1]
        expected.append(int(conditional(t, given).argmax()))
    assert expected != gold  # the toy's greedy tokens differ from the gold ones
    assert tokens.tolist() == [expected] * 50
    assert log["ss_replaced"] > 0


# -- differentiable_ss: the relaxations fed through the criterion ------------------------------------------
DSS = ["--ss-prob", "1", "--ss-schedule", "constant"]  # every replaceable input relaxed


def dss_flags(decoding, *flags):
    passes = ["--dss-num-passes", "4"] if decoding == "parallel" else []  # K >= T - 1: exact, as sequential
    return [*DSS, "--dss-decoding", decoding, *passes, *flags]


def scores_of_fed_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """B x 3 x V scores whose relaxation fed positions 1..3: the toy's logits after the input fed
    at the previous position (exact for the sequential decoder and for K >= T - 1 parallel passes)."""
    logits = toy_logits()
    return torch.stack([inputs[:, t - 1] @ logits[t - 1] for t in range(1, inputs.size(1))], dim=1)


def banned_softmax(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.index_fill(-1, torch.tensor([PAD]), float("-inf")), -1)


@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
@pytest.mark.parametrize("prob", [1.0, 0.3])
def test_dss_greedy_feeds_the_soft_argmax_with_alpha(data_dir, decoding, prob):
    """--dss-mode greedy: where the coin (probability --ss-prob) picks the model, the input is
    sum_y e(y) softmax(alpha s)_y (Goyal, Dyer, Berg-Kirkpatrick, Differentiable Scheduled Sampling
    for Credit Assignment, section 3.1), with padding at weight 0 and no noise; elsewhere it is the
    gold token's embedding.  The number of relaxed inputs is Binomial(3 * rows, p): accepted at p
    and rejected at p + 0.05 (12 standard deviations away at 6000 positions)."""
    rows = 2000
    flags = dss_flags(decoding, "--dss-mode", "greedy", "--dss-alpha", "2.5")
    task, criterion = build(data_dir, "differentiable_ss", *flags, "--ss-prob", str(prob))
    _, inputs, log = run(task, criterion, rows, seed=0)
    fed = inputs[:, 1:]  # B x 3 x V
    gold = torch.nn.functional.one_hot(torch.tensor([SYMBOLS[g] for g in GOLD]), VOCAB).float().expand_as(fed)
    relaxed = (fed != gold).any(-1)  # B x 3
    soft = banned_softmax(2.5 * scores_of_fed_inputs(inputs))  # B x 3 x V
    torch.testing.assert_close(fed, torch.where(relaxed.unsqueeze(-1), soft, gold), rtol=1e-5, atol=1e-6)
    assert log["ss_from_model"] == int(relaxed.sum()) and log["ss_positions"] == 3 * rows
    if prob == 1.0:
        assert relaxed.all() and torch.equal(inputs, inputs[:1].expand_as(inputs))  # no noise: identical rows
    else:
        assert scipy.stats.binomtest(int(relaxed.sum()), 3 * rows, prob).pvalue > ACCEPT
        assert scipy.stats.binomtest(int(relaxed.sum()), 3 * rows, prob + 0.05).pvalue < REJECT


@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
def test_dss_sample_adds_standard_gumbel_noise_to_the_scores(data_dir, decoding):
    """--dss-mode sample: the input is softmax(alpha (s + G)) with G_y standard Gumbel, independent
    per position and word (Goyal, Dyer, Berg-Kirkpatrick, section 3.2).  From the fed weights w, the noise
    differences G_a - G_b = log(w_a / w_b) / alpha - (s_a - s_b) follow the standard logistic law
    (the difference of two independent standard Gumbels): a Kolmogorov-Smirnov test accepts it and
    rejects the logistic of scale 1 / alpha (noise added after scaling by alpha) and of scale 2."""
    alpha, rows = 2.0, 5000
    task, criterion = build(data_dir, "differentiable_ss", *dss_flags(decoding, "--dss-mode", "sample", "--dss-alpha", str(alpha)))
    _, inputs, _ = run(task, criterion, rows, seed=3)
    weights, scores = inputs[:, 1:].double(), scores_of_fed_inputs(inputs).double()  # B x 3 x V
    assert torch.all(weights[..., PAD] == 0)
    a, b = SYMBOLS[1], SYMBOLS[0]
    noise_gap = (weights[..., a].log() - weights[..., b].log()) / alpha - (scores[..., a] - scores[..., b])  # B x 3
    gaps = noise_gap.flatten().numpy()
    assert scipy.stats.kstest(gaps, "logistic").pvalue > ACCEPT
    assert scipy.stats.kstest(gaps, "logistic", args=(0, 1 / alpha)).pvalue < REJECT
    assert scipy.stats.kstest(gaps, "logistic", args=(0, 2.0)).pvalue < REJECT
    # independent across positions: the gaps at positions 1 and 2 are uncorrelated (|r| < 5 / sqrt(n))
    assert abs(scipy.stats.pearsonr(noise_gap[:, 0].numpy(), noise_gap[:, 1].numpy())[0]) < 5 / rows**0.5


def pairs_law(probs: torch.Tensor):
    """Plackett-Luce law of the unordered top 2 of s + G, G standard Gumbel, p = softmax(s): the top
    two are drawn without replacement from p.  Returns {(a, b): probability} over symbol pairs."""
    return {
        (a, b): float(probs[a] * probs[b] / (1 - probs[a]) + probs[b] * probs[a] / (1 - probs[b]))
        for a, b in itertools.combinations(SYMBOLS, 2)
    }


@pytest.mark.parametrize("decoding", ["sequential", "parallel"])
def test_dss_top_k_keeps_the_k_best_candidates(data_dir, decoding):
    """--dss-top-k 2 restricts each relaxation to the 2 best words: of the scores s in greedy mode
    (the weights are then softmax(alpha s) renormalised over them), of the perturbed scores s + G in
    sample mode, whose unordered top 2 follows the Plackett-Luce law (draws without replacement from
    softmax(s)), and whose heavier weight is the Gumbel-max sample, distributed as softmax(s)."""
    task, criterion = build(data_dir, "differentiable_ss", *dss_flags(decoding, "--dss-mode", "greedy", "--dss-top-k", "2"))
    _, inputs, _ = run(task, criterion, 4, seed=0)
    weights, scores = inputs[:, 1:], scores_of_fed_inputs(inputs)
    best = banned_softmax(scores).topk(2, dim=-1).indices  # B x 3 x 2
    expected = torch.zeros_like(weights).scatter(-1, best, banned_softmax(scores).gather(-1, best))
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)

    rows = 6000
    task, criterion = build(data_dir, "differentiable_ss", *dss_flags(decoding, "--dss-mode", "sample", "--dss-top-k", "2"))
    _, inputs, _ = run(task, criterion, rows, seed=9)
    assert torch.all((inputs[:, 1:] > 0).sum(-1) == 2)  # exactly two candidates everywhere
    first = inputs[:, 1]  # B x V: position 1, relaxed from the scores given BOS (p = FIRST)
    probs = conditional(1, EOS)
    law = pairs_law(probs)
    support = (first > 0).nonzero()[:, 1].view(rows, 2).tolist()
    observed = [sum(1 for pair in support if tuple(pair) == cell) for cell in law]
    expected = torch.tensor(list(law.values())) * rows
    assert scipy.stats.chisquare(observed, expected.numpy() / expected.sum().item() * rows).pvalue > ACCEPT
    heavier = torch.bincount(first.argmax(-1), minlength=VOCAB)[SYMBOLS].double()
    assert scipy.stats.chisquare(heavier.numpy(), probs[SYMBOLS].numpy() * rows).pvalue > ACCEPT
