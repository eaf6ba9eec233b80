"""The Metropolis-Hastings sampler over a masked LM's energy (Goyal's thesis "Characterizing and Overcoming
the Limitations of Neural Autoregressive Models", CMU 2021, chapter 6): on enumerable toys its samples
follow exp(-E / T_target) / Z (chi-square against the enumeration), degenerate Gibbs does not on the
thesis's inconsistent conditionals (section 6.2.1), an exact-conditional proposal accepts every move,
and the pure pieces (nucleus, inverse-CDF draws, counter-based random numbers, schedules, option
checks) by hand.
"""
import itertools
import math

import pytest
import torch
from scipy import stats

from fairseq_ext.modules.metropolis_hastings import (
    MetropolisHastingsSampler,
    SamplerSettings,
    block_size_at,
    check_settings,
    counter_uniform,
    proposal_log_probs,
    sample_tokens,
    target_temperature_at,
    visiting_order,
)
from fairseq_ext.modules.mlm_energy import CMLMMaskedLM, layout_tokens, sequence_energies
from fairseq_ext.testing import tiny

BOS, PAD, EOS, UNK = 0, 1, 2, 3  # fairseq's reserved symbols (the CMLM's mask is unk)
T = 3  # toy target length
CHAINS = 3000  # independent chains: their final states are independent draws
P_MATCH = 1e-3  # chi-square p-value above which the samples are taken to follow the target


def banned_mask(vocab):
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[[BOS, PAD, EOS, UNK]] = True
    return banned


# -- the toys -------------------------------------------------------------------------------------------
def tiny_cmlm(seed=0, scale=0.6):
    """A 1+1-layer cmlm_transformer over 3 real symbols (w0 w1 w2 = ids 4 5 6), random weights scaled up so
    that its conditionals depend on the context; returns (masked LM over one encoded source, vocab)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the parameters the loop below leaves (biases) are fairseq's seeded init
        task, model, _ = tiny.build("cmlm_transformer", ["--criterion", "nat_loss"], num_symbols=3)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        enc = model.encoder(torch.tensor([[4, 5, 6, EOS]]), src_lengths=torch.tensor([4]))
    return CMLMMaskedLM(model, enc), len(task.tgt_dict)


class TableMLM:
    """A stand-in masked LM: ``fn(tokens R x L, position R) -> R x V`` logits at a masked position."""

    mask_idx = UNK

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, tokens, contexts, positions):
        return torch.stack([self.fn(tokens, positions[:, k]) for k in range(positions.size(1))], dim=1)


def context_free_mlm(vocab=7, seed=0):
    """Logits at position t depend on t only: the masked conditionals are the exact conditionals of both
    E_raw and E_local (the positions are independent under either energy)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(T + 2, vocab, generator=g, dtype=torch.float64) * 1.5
    return TableMLM(lambda tokens, pos: table[pos])


def inconsistent_mlm():
    """Section 6.2.1's length-2 example over V = {a, b} (ids 4, 5): p(y1 | y2) = [[.99, .01], [.01, .99]]
    (rows: y2), p(y2 | y1) = [.5, .5]; no joint distribution has both."""
    neg = -1e4  # the reserved symbols: (finitely) impossible
    p1 = torch.tensor([[0.99, 0.01], [0.01, 0.99]], dtype=torch.float64).log()
    p2 = torch.tensor([0.5, 0.5], dtype=torch.float64).log()

    def fn(tokens, pos):
        out = torch.full((tokens.size(0), 6), neg, dtype=torch.float64)
        y2 = (tokens[:, 2] - 4).clamp(0, 1)
        at1 = pos == 1
        out[:, 4:] = torch.where(at1.unsqueeze(1), p1[y2], p2.expand(tokens.size(0), -1))
        return out

    return TableMLM(fn)


# -- helpers ----------------------------------------------------------------------------------------------
def all_states(symbols, length):
    return torch.tensor(list(itertools.product(symbols, repeat=length)))  # S x T


def enumerate_energies(mlm, symbols, length):
    """(states S x T, E_local S, E_raw S) of every sequence, one masked pass at a time (slow, by the book)."""
    states = all_states(symbols, length)
    el, er = [], []
    for y in states:
        tokens = layout_tokens(y.unsqueeze(0), torch.tensor([length]), BOS, EOS, PAD)  # 1 x L
        e_local = e_raw = 0.0
        for t in range(1, length + 1):
            masked = tokens.clone()
            masked[0, t] = UNK
            logits = mlm(masked, torch.zeros(1, dtype=torch.long), torch.tensor([[t]]))[0, 0].double()
            e_local -= float(torch.log_softmax(logits, -1)[tokens[0, t]])
            e_raw -= float(logits[tokens[0, t]])
        el.append(e_local)
        er.append(e_raw)
    return states, torch.tensor(el, dtype=torch.float64), torch.tensor(er, dtype=torch.float64)


def run_chains(mlm, settings, start, n_chains=CHAINS, vocab=7):
    """Final states (n x T) of n independent chains started at ``start`` (T, or n x T: one state per chain),
    and the per-epoch statistics."""
    length = start.size(-1)
    body = start.expand(n_chains, -1)
    lengths = torch.full((n_chains,), length)
    tokens = layout_tokens(body, lengths, BOS, EOS, PAD)
    ids = torch.stack([torch.zeros(n_chains, dtype=torch.long), torch.zeros(n_chains, dtype=torch.long),
                       torch.arange(n_chains)], dim=1)  # fmt: skip
    sampler = MetropolisHastingsSampler(mlm, settings, banned_mask(vocab))
    with torch.no_grad():
        chains = sampler.start(tokens, lengths, torch.zeros(n_chains, dtype=torch.long), ids)
        epoch_stats = [sampler.run_epoch(chains, e) for e in range(1, settings.total_epochs + 1)]
    return chains.tokens[:, 1 : length + 1], epoch_stats


def chi_square_p(samples, states, probs):
    """p-value of the samples' counts against probs over states (cells expecting < 5 pooled)."""
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    counts = torch.zeros(len(states), dtype=torch.float64)
    for s in samples.tolist():
        counts[index[tuple(s)]] += 1
    assert float(counts[probs == 0].sum()) == 0, "a state outside the target's support was sampled"
    expected = probs * samples.size(0)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)]) if bool(small.any()) else counts
    exp = torch.cat([expected[~small], expected[small].sum().view(1)]) if bool(small.any()) else expected
    keep = exp > 0
    return float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def target(energies, temperature=1.0, support=None):
    logits = -energies / temperature
    if support is not None:
        logits = logits.masked_fill(~support, -math.inf)
    return torch.softmax(logits, dim=0)


def nucleus_class(mlm, states, start, top_p, temperature):
    """States reachable from ``start`` by single-site moves whose forward and reverse proposals both lie in
    the nucleus (the support of the MH chain with a truncated proposal)."""
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    seen, todo = {index[tuple(start.tolist())]}, [start]
    while todo:
        y = todo.pop()
        tokens = layout_tokens(y.unsqueeze(0), torch.tensor([T]), BOS, EOS, PAD)
        for t in range(1, T + 1):
            masked = tokens.clone()
            masked[0, t] = UNK
            logits = mlm(masked, torch.zeros(1, dtype=torch.long), torch.tensor([[t]]))[0, 0]
            logq = proposal_log_probs(logits, temperature, top_p, banned_mask(logits.numel()))
            if not math.isfinite(float(logq[y[t - 1]])):
                continue
            for w in torch.isfinite(logq).nonzero().flatten().tolist():
                y2 = y.clone()
                y2[t - 1] = w
                k = index[tuple(y2.tolist())]
                if k not in seen:
                    seen.add(k)
                    todo.append(y2)
    support = torch.zeros(len(states), dtype=torch.bool)
    support[list(seen)] = True
    return support


@pytest.fixture(scope="module")
def toy():
    mlm, vocab = tiny_cmlm()
    with torch.no_grad():
        states, e_local, e_raw = enumerate_energies(mlm, [4, 5, 6], T)
    return mlm, vocab, states, {"local": e_local, "raw": e_raw}


START = torch.tensor([4, 4, 4])


def draws(states, probs, n=CHAINS, seed=0):
    """n independent exact draws from probs over states (n x T): chains started in the stationary
    distribution must stay in it, whatever the number of epochs (invariance, i.e. a correct acceptance)."""
    g = torch.Generator().manual_seed(seed)
    return states[torch.multinomial(probs.float(), n, replacement=True, generator=g)]


# -- the stationary distribution ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "energy, options",
    [
        ("local", {}),
        ("raw", {}),
        ("local", {"block_size": 2}),
        ("raw", {"block_size": 3, "block_anneal": True}),
        ("raw", {"proposal_temperature": 2.0}),
        ("local", {"proposal_temperature": 0.7, "order": "left_to_right"}),
        ("local", {"target_temperature": 0.5}),
        ("raw", {"target_temperature": 0.5, "block_size": 2}),
    ],
)
def test_mh_samples_follow_the_energy_model(toy, energy, options):
    """Started in exp(-E / T_target) / Z, the chains stay there after a few epochs of real moves."""
    mlm, vocab, states, energies = toy
    settings = SamplerSettings(sampler="mh", energy=energy, burn_in_epochs=4, sample_epochs=0, seed=3, **options)
    probs = target(energies[energy], settings.target_temperature)
    samples, epoch_stats = run_chains(mlm, settings, draws(states, probs), vocab=vocab)
    assert chi_square_p(samples, states, probs) > P_MATCH
    rates = [s["acceptance_rate"] for s in epoch_stats]
    assert all(0 < r < 1 for r in rates)  # a real MH chain: some moves are rejected
    assert all(s["novel_rate"] > 0.05 for s in epoch_stats)  # ... and many states change


@pytest.mark.parametrize("energy", ["local", "raw"])
def test_mh_chains_converge_to_the_energy_model_from_one_state(toy, energy):
    mlm, vocab, states, energies = toy
    settings = SamplerSettings(sampler="mh", energy=energy, burn_in_epochs=40, sample_epochs=0, seed=3)
    samples, _ = run_chains(mlm, settings, START, vocab=vocab)
    assert chi_square_p(samples, states, target(energies[energy])) > P_MATCH


@pytest.mark.parametrize("energy, top_p", [("local", 0.8), ("raw", 0.6)])
def test_nucleus_proposals_keep_the_ratio_exact(toy, energy, top_p):
    """A truncated proposal leaves some reverse moves impossible (rejected); on the states it connects the
    chain still follows exp(-E) / Z."""
    mlm, vocab, states, energies = toy
    settings = SamplerSettings(sampler="mh", energy=energy, top_p=top_p, burn_in_epochs=4, sample_epochs=0, seed=5)
    support = nucleus_class(mlm, states, START, top_p, 1.0)
    assert 1 < int(support.sum())
    probs = target(energies[energy], support=support)
    samples, epoch_stats = run_chains(mlm, settings, draws(states, probs), vocab=vocab)
    assert chi_square_p(samples, states, probs) > P_MATCH
    assert all(s["novel_rate"] > 0.02 for s in epoch_stats)


def test_the_test_can_fail_a_wrong_sampler(toy):
    """Power: the samples are rejected against another energy, and an MH chain that (wrongly) forgets the
    proposal ratio, i.e. degenerate Gibbs, drifts away from exp(-E) / Z."""
    mlm, vocab, states, energies = toy
    probs = target(energies["local"])
    settings = SamplerSettings(sampler="mh", energy="local", burn_in_epochs=4, sample_epochs=0, seed=3)
    samples, _ = run_chains(mlm, settings, draws(states, probs), vocab=vocab)
    assert chi_square_p(samples, states, target(energies["raw"])) < 1e-6
    assert chi_square_p(samples, states, target(energies["local"], 0.5)) < 1e-6
    gibbs = SamplerSettings(sampler="gibbs", burn_in_epochs=4, sample_epochs=0, seed=3)
    gibbs_samples, _ = run_chains(mlm, gibbs, draws(states, probs), vocab=vocab)
    assert chi_square_p(gibbs_samples, states, probs) < 1e-6


def test_degenerate_gibbs_misses_the_energy_of_inconsistent_conditionals():
    """Section 6.2.1's inconsistent conditionals: MH with E_local follows exp(-E_local) (aa, bb: .495 each),
    degenerate Gibbs (section 6.6) does not (y2 is redrawn uniformly whatever y1 is)."""
    mlm = inconsistent_mlm()
    states, e_local, _ = enumerate_energies(mlm, [4, 5], 2)
    probs = target(e_local)
    torch.testing.assert_close(probs, torch.tensor([0.495, 0.005, 0.005, 0.495], dtype=torch.float64))
    start = draws(states, probs)
    mh = SamplerSettings(sampler="mh", energy="local", burn_in_epochs=6, sample_epochs=0, seed=1)
    gibbs = SamplerSettings(sampler="gibbs", burn_in_epochs=6, sample_epochs=0, seed=1)
    mh_samples, _ = run_chains(mlm, mh, start, vocab=6)
    gibbs_samples, gibbs_stats = run_chains(mlm, gibbs, start, vocab=6)
    assert chi_square_p(mh_samples, states, probs) > P_MATCH
    assert chi_square_p(gibbs_samples, states, probs) < 1e-6
    assert all(s["acceptance_rate"] == 1.0 for s in gibbs_stats)


@pytest.mark.parametrize("energy", ["local", "raw"])
def test_exact_conditional_proposals_are_always_accepted(energy):
    """When the masked conditionals are the exact conditionals of exp(-E), MH is Gibbs: a = 1 always."""
    mlm = context_free_mlm()
    settings = SamplerSettings(sampler="mh", energy=energy, burn_in_epochs=3, sample_epochs=2, seed=2)
    _, epoch_stats = run_chains(mlm, settings, START, n_chains=200)
    assert [s["acceptance_rate"] for s in epoch_stats] == [1.0] * 5
    assert all(s["novel_rate"] > 0.2 for s in epoch_stats)


def test_forced_acceptance_and_annealed_temperature_in_the_statistics(toy):
    mlm, vocab, _, _ = toy
    settings = SamplerSettings(sampler="mh", energy="raw", burn_in_epochs=2, sample_epochs=3, forced_accept_epochs=2,
                               target_temperature=1.0, target_temperature_step=0.3, target_temperature_floor=0.2,
                               block_size=3, block_anneal=True, seed=4)  # fmt: skip
    _, epoch_stats = run_chains(mlm, settings, START, n_chains=100, vocab=vocab)
    assert [s["acceptance_rate"] for s in epoch_stats[:2]] == [1.0, 1.0]
    assert min(s["acceptance_rate"] for s in epoch_stats[2:]) < 1.0
    assert [s["target_temperature"] for s in epoch_stats] == pytest.approx([1.0, 0.7, 0.4, 0.2, 0.2])
    assert [s["block_size"] for s in epoch_stats] == [3, 3, 2, 2, 1]


# -- the pure pieces -----------------------------------------------------------------------------------------
def test_nucleus_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    banned = torch.tensor([False, False, False, False])
    q = proposal_log_probs(logits, 1.0, 0.8, banned).exp()
    torch.testing.assert_close(q, torch.tensor([0.625, 0.375, 0.0, 0.0]))  # {0.5, 0.3} reaches 0.8
    q = proposal_log_probs(logits, 1.0, 0.81, banned).exp()
    torch.testing.assert_close(q, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    q = proposal_log_probs(logits, 1.0, 0.1, banned).exp()
    torch.testing.assert_close(q, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # the mode always stays
    q = proposal_log_probs(logits, 2.0, 1.0, torch.tensor([True, False, False, False])).exp()
    expect = torch.tensor([0.0, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(q, expect / expect.sum())  # banned first, then the temperature


def test_inverse_cdf_draws_follow_the_distribution():
    logq = torch.tensor([0.2, 0.0, 0.5, 0.3]).log()
    u = counter_uniform(7, torch.arange(20000))
    draws = sample_tokens(logq.expand(20000, -1), u)
    assert not bool((draws == 1).any())  # probability 0: never
    freq = torch.bincount(draws, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64), atol=0.015, rtol=0)


def test_counter_uniforms_are_a_pure_function_of_their_keys():
    a = counter_uniform(1, torch.arange(1000), 3, 4)
    b = counter_uniform(1, torch.arange(1000).flip(0), 3, 4).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, counter_uniform(2, torch.arange(1000), 3, 4))
    assert not torch.equal(a, counter_uniform(1, torch.arange(1000), 4, 3))
    u = counter_uniform(1, torch.arange(100000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3


def test_visiting_order_is_a_permutation_of_each_chains_positions():
    lengths = torch.tensor([3, 5, 1])
    ids = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 1]])
    order = visiting_order(lengths, 7, "random", 1, ids, epoch=1)
    for c, n in enumerate(lengths.tolist()):
        assert sorted(order[c, :n].tolist()) == list(range(1, n + 1))
    assert visiting_order(lengths, 7, "left_to_right", 1, ids, 1)[1, :5].tolist() == [1, 2, 3, 4, 5]
    epochs = {tuple(visiting_order(lengths, 7, "random", 1, ids, e)[1, :5].tolist()) for e in range(1, 9)}
    assert len(epochs) > 1  # a fresh permutation per epoch


def test_schedules():
    assert [block_size_at(e, 4, 7, True) for e in range(1, 8)] == [4, 4, 3, 3, 2, 2, 1]
    assert [block_size_at(e, 4, 7, False) for e in range(1, 8)] == [4] * 7
    assert block_size_at(1, 4, 1, True) == 4
    assert [target_temperature_at(e, 1.0, 0.25, 0.3) for e in range(1, 6)] == [1.0, 0.75, 0.5, 0.3, 0.3]
    assert target_temperature_at(9, 0.8, 0.0, 0.05) == 0.8


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"proposal_temperature": 0.0}, "--mh-proposal-temperature"),
        ({"proposal_temperature": -1.0}, "--mh-proposal-temperature"),
        ({"proposal_temperature": float("inf")}, "--mh-proposal-temperature"),
        ({"top_p": 0.0}, "--mh-top-p"),
        ({"top_p": 1.5}, "--mh-top-p"),
        ({"target_temperature": 0.0}, "--mh-target-temperature"),
        ({"target_temperature": -0.5}, "--mh-target-temperature"),
        ({"target_temperature_floor": 0.0}, "--mh-target-temperature-floor"),
        ({"target_temperature_floor": -0.1, "target_temperature_step": 0.1}, "--mh-target-temperature-floor"),
        ({"target_temperature_floor": 2.0, "target_temperature_step": 0.1}, "--mh-target-temperature-floor"),
        ({"target_temperature_step": -0.1}, "--mh-target-temperature-step"),
        ({"block_size": 0}, "--mh-block-size"),
        ({"sampler": "metropolis"}, "--mh-sampler"),
        ({"energy": "norm"}, "--mh-energy"),
        ({"order": "right_to_left"}, "--mh-order"),
        ({"burn_in_epochs": -1}, "--mh-burn-in-epochs"),
        ({"forced_accept_epochs": -1}, "--mh-forced-accept-epochs"),
    ],
)
def test_refused_options_name_their_flag(options, flag):
    with pytest.raises(ValueError, match=flag):
        check_settings(SamplerSettings(**options))


def test_a_block_longer_than_the_target_is_refused_at_decode_time():
    mlm = context_free_mlm()
    sampler = MetropolisHastingsSampler(mlm, SamplerSettings(block_size=4), banned_mask(7))
    tokens = layout_tokens(torch.tensor([[4, 5, 6]]), torch.tensor([3]), BOS, EOS, PAD)
    with pytest.raises(ValueError, match=r"--mh-block-size 4 is larger than the target length 3 of sentence 9"):
        sampler.start(tokens, torch.tensor([3]), torch.zeros(1, dtype=torch.long), torch.tensor([[9, 0, 0]]))


def test_energies_of_the_toy_are_its_networks():
    """The enumeration's energies are the batched ones (the toy's target is the network's energy)."""
    mlm, _ = tiny_cmlm()
    states = all_states([4, 5, 6], T)
    tokens = layout_tokens(states, torch.full((27,), T), BOS, EOS, PAD)
    with torch.no_grad():
        el, er = sequence_energies(mlm, tokens, torch.zeros(27, dtype=torch.long), torch.full((27,), T))
        _, el2, er2 = enumerate_energies(mlm, [4, 5, 6], T)
    torch.testing.assert_close(el.double(), el2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(er.double(), er2, rtol=1e-5, atol=1e-4)
