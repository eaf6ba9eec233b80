"""The synthetic sequence distributions of Goyal's thesis (CMU 2021), section 6.2.3, with exact likelihoods.

* ``palindrome``: sequences of length T over |V| symbols; a Bernoulli(p = 0.8) draw picks the set of
  palindromes or the set of non-palindromes, then a sequence is drawn uniformly from that set, so
  p(y) = p / |P| for a palindrome and (1 - p) / (|V|^T - |P|) otherwise, |P| = |V|^ceil(T/2).
* ``hmm_low`` / ``hmm_high``: a hidden Markov model with 4 hidden states emitting 5 symbols.  The thesis
  gives neither parameter set, only "low" and "high entropy marginals"; here the initial, transition and
  emission distributions are seeded Dirichlet draws with concentration 0.25 (peaked rows: low entropy) or
  0.5 (flatter rows: high entropy), chosen so that the entropies land near Table 6.1's "True" column
  (about 5 and 7 nats per sequence with the default seed).  p(y) by the forward algorithm.

The thesis uses T = 5 and |V| = 5 (5^5 = 3125 sequences, enumerable).  ``true_nll`` of a data set is the
mean of -log p(y) (nats per sequence, Table 6.1's "True" column) and ``entropy`` its expectation, by
enumeration.  Symbols are written as ``s0 .. s{|V|-1}``, one sequence per line, for
``fairseq-preprocess --only-source`` and ``--task language_modeling --sample-break-mode eos``.

CLI: ``python -m fairseq_ext.data.energy_toys --generator palindrome --out DIR`` writes DIR/{train,valid,
test}.txt and DIR/true_nll.json.
"""
import argparse
import json
import math
import os
from typing import Dict, List, Optional

import torch
from torch import Tensor

GENERATORS = ("palindrome", "hmm_low", "hmm_high")
HMM_CONCENTRATION = {"hmm_low": 0.25, "hmm_high": 0.5}


def all_sequences(vocab_size: int, length: int) -> Tensor:
    """V^T in lexicographic order: |V|^T x T."""
    r = torch.arange(vocab_size**length).unsqueeze(1)
    return torch.div(r, vocab_size ** torch.arange(length - 1, -1, -1), rounding_mode="floor") % vocab_size


class ToyDistribution:
    vocab_size: int
    length: int

    def log_prob(self, seqs: Tensor) -> Tensor:  # N x T -> N (float64)
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> Tensor:  # -> n x T
        raise NotImplementedError

    def entropy(self) -> float:
        """Expected -log p(y), nats, by enumerating V^T."""
        lp = self.log_prob(all_sequences(self.vocab_size, self.length))
        return float(-(lp.exp() * lp).sum())

    def true_nll(self, seqs: Tensor) -> float:
        return float(-self.log_prob(seqs).mean())


def is_palindrome(seqs: Tensor) -> Tensor:
    return (seqs == seqs.flip(1)).all(dim=1)


class Palindromes(ToyDistribution):
    def __init__(self, vocab_size: int = 5, length: int = 5, p: float = 0.8):
        if not 0.0 < p < 1.0:
            raise ValueError(f"palindrome probability must be in (0, 1), got {p}")
        self.vocab_size, self.length, self.p = vocab_size, length, p
        self.num_palindromes = vocab_size ** ((length + 1) // 2)
        self.num_others = vocab_size**length - self.num_palindromes

    def log_prob(self, seqs: Tensor) -> Tensor:
        pal = is_palindrome(seqs)
        return torch.where(pal, torch.tensor(math.log(self.p / self.num_palindromes), dtype=torch.float64),
                           torch.tensor(math.log((1 - self.p) / self.num_others), dtype=torch.float64))  # fmt: skip

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        pal = torch.rand(n, generator=generator) < self.p  # n
        half = (self.length + 1) // 2
        out = torch.randint(self.vocab_size, (n, self.length), generator=generator)  # n x T
        front = out[:, :half]
        mirrored = torch.cat([front, front[:, : self.length - half].flip(1)], dim=1)  # palindromes
        out = torch.where(pal.unsqueeze(1), mirrored, out)
        bad = ~pal & is_palindrome(out)  # uniform over non-palindromes: redraw the palindromic ones
        while bool(bad.any()):
            out[bad] = torch.randint(self.vocab_size, (int(bad.sum()), self.length), generator=generator)
            bad = ~pal & is_palindrome(out)
        return out


class HMM(ToyDistribution):
    def __init__(self, initial: Tensor, transition: Tensor, emission: Tensor, length: int = 5):
        self.initial = initial.double()  # S
        self.transition = transition.double()  # S x S, rows: from
        self.emission = emission.double()  # S x V
        self.vocab_size, self.length = emission.size(1), length

    @classmethod
    def random(cls, concentration: float, seed: int, states: int = 4, vocab_size: int = 5, length: int = 5):
        g = torch.Generator().manual_seed(seed)

        def dirichlet(rows: int, cols: int) -> Tensor:  # via normalised Gamma draws (seeded)
            gam = torch._standard_gamma(torch.full((rows, cols), concentration, dtype=torch.float64), generator=g)
            gam = gam.clamp_min(1e-300)
            return gam / gam.sum(dim=1, keepdim=True)

        return cls(dirichlet(1, states)[0], dirichlet(states, states), dirichlet(states, vocab_size), length)

    def log_prob(self, seqs: Tensor) -> Tensor:
        """Forward algorithm: alpha_t(s) = p(y_1..y_t, z_t = s)."""
        alpha = self.initial.unsqueeze(0) * self.emission[:, seqs[:, 0]].t()  # N x S
        for t in range(1, seqs.size(1)):
            alpha = (alpha @ self.transition) * self.emission[:, seqs[:, t]].t()  # N x S
        return alpha.sum(dim=1).log()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.multinomial(self.initial.expand(n, -1), 1, generator=generator)[:, 0]  # n
        out = []
        for t in range(self.length):
            if t:
                z = torch.multinomial(self.transition[z], 1, generator=generator)[:, 0]
            out.append(torch.multinomial(self.emission[z], 1, generator=generator)[:, 0])
        return torch.stack(out, dim=1)


def make(name: str, seed: int = 1, length: int = 5) -> ToyDistribution:
    """The generators of section 6.2.3 by name (|V| = 5; 4 hidden states for the HMMs)."""
    if name == "palindrome":
        return Palindromes(vocab_size=5, length=length, p=0.8)
    if name in HMM_CONCENTRATION:
        return HMM.random(HMM_CONCENTRATION[name], seed=seed, length=length)
    raise ValueError(f"unknown generator {name!r}; choose from {', '.join(GENERATORS)}")


def line(seq: List[int]) -> str:
    return " ".join(f"s{i}" for i in seq)


def write_splits(out_dir: str, dist: ToyDistribution, sizes: Dict[str, int], seed: int) -> Dict[str, float]:
    """Writes out_dir/{split}.txt; returns (and writes to true_nll.json) each split's true NLL and the entropy."""
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    report = {"entropy": dist.entropy()}
    for split, n in sizes.items():
        seqs = dist.sample(n, g)
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            f.writelines(line(s) + "\n" for s in seqs.tolist())
        report[split] = dist.true_nll(seqs)
    with open(os.path.join(out_dir, "true_nll.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", choices=GENERATORS, required=True, help="the data distribution (section 6.2.3)")
    parser.add_argument("--out", required=True, help="output directory for {train,valid,test}.txt and true_nll.json")
    parser.add_argument("--train-size", type=int, default=1000, help="training sequences (the thesis: 1k or 10k)")
    parser.add_argument("--valid-size", type=int, default=200, help="validation sequences")
    parser.add_argument("--test-size", type=int, default=1000, help="test sequences")
    parser.add_argument("--length", type=int, default=5, help="sequence length T (the thesis: 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the HMM parameters and of the samples")
    args = parser.parse_args(argv)
    dist = make(args.generator, seed=args.seed, length=args.length)
    sizes = {"train": args.train_size, "valid": args.valid_size, "test": args.test_size}
    report = write_splits(args.out, dist, sizes, seed=args.seed + 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
