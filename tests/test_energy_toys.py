"""The synthetic distributions of Goyal's thesis (CMU 2021), section 6.2.3: exact probabilities (normalised,
by hand, HMM forward algorithm = sum over hidden paths) agree with Monte Carlo samples; the CLI's files."""
import itertools
import json
import math
import os

import pytest
import torch

from fairseq_ext.data import energy_toys as toys

N = 20000


@pytest.mark.parametrize("name", toys.GENERATORS)
def test_probabilities_sum_to_one(name):
    lp = toys.make(name).log_prob(toys.all_sequences(5, 5))
    assert lp.shape == (3125,)
    assert abs(float(lp.exp().sum()) - 1.0) < 1e-9


def test_palindrome_probabilities_by_hand():
    d = toys.make("palindrome")
    lp = d.log_prob(torch.tensor([[1, 2, 3, 2, 1], [1, 2, 3, 4, 1]]))
    assert torch.allclose(lp.exp(), torch.tensor([0.8 / 125, 0.2 / 3000], dtype=torch.float64))


def test_hmm_forward_equals_sum_over_hidden_paths():
    d = toys.make("hmm_low", seed=4)
    seqs = torch.tensor([[0, 1, 2, 3, 4], [2, 2, 2, 0, 1]])
    for seq, lp in zip(seqs.tolist(), d.log_prob(seqs).tolist()):
        total = 0.0
        for path in itertools.product(range(4), repeat=5):
            p = float(d.initial[path[0]] * d.emission[path[0], seq[0]])
            for t in range(1, 5):
                p *= float(d.transition[path[t - 1], path[t]] * d.emission[path[t], seq[t]])
            total += p
        assert abs(math.log(total) - lp) < 1e-9


def test_low_and_high_entropy():
    assert toys.make("hmm_low").entropy() < toys.make("hmm_high").entropy() < math.log(3125)


@pytest.mark.parametrize("name", toys.GENERATORS)
def test_true_nll_matches_monte_carlo(name):
    d = toys.make(name)
    seqs = d.sample(N, torch.Generator().manual_seed(11))
    nll = -d.log_prob(seqs)
    stderr = float(nll.std()) / math.sqrt(N)
    assert abs(float(nll.mean()) - d.entropy()) < 4 * stderr + 1e-9
    # the pair marginal of (y_1, y_2): exact by enumeration vs empirical frequencies
    every = toys.all_sequences(5, 5)
    p = d.log_prob(every).exp()
    exact = torch.zeros(5, 5, dtype=torch.float64).index_put_((every[:, 0], every[:, 1]), p, accumulate=True)
    counts = torch.zeros(5, 5, dtype=torch.float64).index_put_(
        (seqs[:, 0], seqs[:, 1]), torch.ones(N, dtype=torch.float64), accumulate=True
    )
    assert float((counts / N - exact).abs().max()) < 4 * math.sqrt(0.25 / N)


def test_palindrome_share_is_p():
    seqs = toys.make("palindrome").sample(N, torch.Generator().manual_seed(2))
    share = float(toys.is_palindrome(seqs).double().mean())
    assert abs(share - 0.8) < 4 * math.sqrt(0.16 / N)


def test_cli_writes_splits_and_true_nll(tmp_path):
    toys.main(["--generator", "hmm_high", "--out", str(tmp_path), "--train-size", "30", "--valid-size", "7",
               "--test-size", "9", "--seed", "3"])  # fmt: skip
    lines = {s: open(os.path.join(tmp_path, f"{s}.txt")).read().splitlines() for s in ("train", "valid", "test")}
    assert [len(v) for v in lines.values()] == [30, 7, 9]
    assert all(len(line.split()) == 5 and set(line.split()) <= {f"s{i}" for i in range(5)} for line in lines["train"])
    report = json.load(open(os.path.join(tmp_path, "true_nll.json")))
    d = toys.make("hmm_high", seed=3)
    seqs = torch.tensor([[int(w[1:]) for w in line.split()] for line in lines["valid"]])
    assert abs(report["valid"] - d.true_nll(seqs)) < 1e-9
    assert abs(report["entropy"] - d.entropy()) < 1e-9
    with pytest.raises(ValueError, match="unknown generator"):
        toys.make("hmm")
