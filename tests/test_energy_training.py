"""Training bidirectional masked LMs as E_raw energy models (Goyal's thesis, CMU 2021, sections 6.2.1-6.2.3):
the model never sees the token it scores, log Z and the true conditionals from batched passes equal slow
per-sequence loops, every objective's gradient matches finite differences in float64, the KL projection
vanishes exactly when the model's true conditionals are the teacher's, and the refusals name their flags."""
import itertools
import math
import os
import tempfile

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.data import Dictionary
from torch.func import functional_call

import fairseq_ext
from fairseq_ext.modules import energy_training as et
from fairseq_ext.modules.mlm_energy import energy_terms, single_masked_copies

SYMBOLS = "abc"


def build(criterion: str, extra=(), arch_flags=("--embed-dim", "4", "--hidden-size", "4", "--combine-dim", "4"),
          seed: int = 1):  # fmt: skip
    d = tempfile.mkdtemp(prefix="energy_")
    with open(os.path.join(d, "dict.txt"), "w") as f:
        f.writelines(f"{c} {100 - i}\n" for i, c in enumerate(SYMBOLS))
    argv = [d, "--user-dir", os.path.dirname(fairseq_ext.__file__), "--cpu", "--task", "language_modeling",
            "--tokens-per-sample", "16", "--arch", "energy_mlm_tiny", *arch_flags, "--criterion", criterion, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = task.build_model(args)
    return task, model, task.build_criterion(args)


def sample_of(task, rows):
    d = task.dictionary
    width = max(map(len, rows)) + 1
    tgt = torch.full((len(rows), width), d.pad())
    for r, s in enumerate(rows):
        tgt[r, : len(s) + 1] = torch.tensor([d.index(c) for c in s] + [d.eos()])
    return {"target": tgt, "ntokens": int(tgt.ne(d.pad()).sum()), "net_input": {"src_tokens": tgt}}


def energy_of(model, ids, seq):
    """E_raw of one sequence of symbol indices, one model call, python sum."""
    logits = model(ids[torch.tensor([seq])])[0][0]  # T x |dict|
    return -sum(float(logits[t, ids[s]]) for t, s in enumerate(seq))


@pytest.fixture(scope="module")
def mle():
    task, model, crit = build("energy_likelihood", ["--energy-batch-rows", "5"])
    model.eval()
    return task, model, crit


# -- the model ---------------------------------------------------------------------------------------
def test_position_never_sees_its_own_token_but_sees_both_sides(mle):
    task, model, crit = mle
    ids = crit.symbol_ids
    y = ids[torch.tensor([[0, 1, 2, 1]])]
    base = model(y)[0]  # 1 x T x |dict|
    for t in range(4):
        for v in range(3):
            changed = y.clone()
            changed[0, t] = ids[v]
            out = model(changed)[0]
            assert torch.allclose(out[0, t], base[0, t], atol=0)  # y_t is not seen at t
            if v != int((y[0, t] == ids).nonzero()):
                others = [u for u in range(4) if u != t]
                assert all(not torch.allclose(out[0, u], base[0, u]) for u in others)  # but at every other position


def test_one_pass_energy_equals_single_masked_copies(mle):
    """The shared masked-LM path (one copy per position with it masked) gives the same E_raw terms."""
    task, model, crit = mle
    ids = crit.symbol_ids
    y = ids[torch.tensor([[2, 0, 1, 1, 0]])]
    copies, rows, cols = single_masked_copies(y, torch.ones_like(y, dtype=torch.bool), task.dictionary.unk())
    logits = model(copies)[0][torch.arange(cols.numel()), cols]  # 5 x |dict|: position t of the copy masked at t
    _, raw = energy_terms(logits, y[0])
    one_pass = et.raw_energy(crit.logits_fn(model)(torch.tensor([[2, 0, 1, 1, 0]])), torch.tensor([[2, 0, 1, 1, 0]]))
    assert torch.allclose(raw.sum(), one_pass[0], atol=1e-5)


def test_padding_does_not_change_a_row(mle):
    task, model, crit = mle
    ids, pad = crit.symbol_ids, task.dictionary.pad()
    short = ids[torch.tensor([[1, 2]])]
    batch = torch.tensor([[int(ids[1]), int(ids[2]), pad, pad], [int(ids[0]), int(ids[0]), int(ids[1]), int(ids[2])]])
    assert torch.allclose(model(batch)[0][0, :2], model(short)[0][0], atol=1e-6)


def test_real_symbols_exclude_specials_and_fillers():
    d = Dictionary()
    for c in "xyz":
        d.add_symbol(c)
    d.pad_to_multiple_(8)
    assert any(d[i].startswith("madeupword") for i in range(len(d)))
    assert [d[i] for i in et.real_symbols(d)] == ["x", "y", "z"]


# -- log Z and the conditionals -----------------------------------------------------------------------
def test_log_partition_equals_brute_force_sum(mle):
    task, model, crit = mle
    fn = crit.logits_fn(model)
    with torch.no_grad():
        for length in (1, 2, 3):
            log_z = et.log_partition(fn, 3, length, batch_rows=5, limit=100)
            brute = math.log(sum(math.exp(-energy_of(model, crit.symbol_ids, list(s)))
                                 for s in itertools.product(range(3), repeat=length)))  # fmt: skip
            assert abs(float(log_z) - brute) < 1e-5
            nll = et.exact_nll(fn, et.enumerate_sequences(3, length, 0, 3**length), log_z, batch_rows=7)
            assert abs(float(torch.logsumexp(-nll, 0))) < 1e-5  # p sums to one over V^T


def test_exact_conditionals_equal_renormalised_energies(mle):
    task, model, crit = mle
    seqs = torch.tensor([[0, 1, 2], [2, 2, 0]])
    with torch.no_grad():
        cond = et.exact_conditionals(crit.logits_fn(model), seqs, 3, batch_rows=4)  # 2 x 3 x 3
    for n, seq in enumerate(seqs.tolist()):
        for i in range(3):
            energies = []
            for v in range(3):
                changed = list(seq)
                changed[i] = v
                energies.append(energy_of(model, crit.symbol_ids, changed))
            z = sum(math.exp(-e) for e in energies)
            for v in range(3):
                assert abs(math.exp(float(cond[n, i, v])) - math.exp(-energies[v]) / z) < 1e-6


def test_criteria_losses_match_their_definitions(mle):
    """Each criterion's loss is its objective summed over a batch of two lengths; validation logs all three."""
    task, model, _ = mle
    sample = sample_of(task, ["abc", "cca", "ab"])
    groups = (torch.tensor([[0, 1, 2], [2, 2, 0]]), torch.tensor([[0, 1]]))
    fn = build("energy_mlm")[2].logits_fn(model)
    with torch.no_grad():
        want = {
            "energy_likelihood": sum(float(et.exact_nll(fn, s, et.log_partition(fn, 3, s.size(1), 9, 100), 9).sum())
                                     for s in groups),  # fmt: skip
            "energy_pseudolikelihood": sum(float(et.pseudo_nll(et.exact_conditionals(fn, s, 3, 9), s).sum())
                                           for s in groups),  # fmt: skip
            "energy_mlm": sum(float(-torch.log_softmax(fn(s), -1).gather(-1, s.unsqueeze(-1)).sum()) for s in groups),
        }
        for name, value in want.items():
            loss, size, log = build(name)[2](model, sample)
            assert size == 3 and abs(float(loss) - value) < 1e-4
            assert abs(log["exact_nll"] - want["energy_likelihood"]) < 1e-4 and log["exact_nll_count"] == 3
            assert abs(log["pseudo_nll"] - want["energy_pseudolikelihood"]) < 1e-4
            assert abs(log["mlm_nll"] - want["energy_mlm"]) < 1e-4


def test_exact_nll_metric_skipped_beyond_the_limit(mle):
    task, model, _ = mle
    _, _, crit = build("energy_mlm", ["--energy-max-enumeration", "26"])
    with torch.no_grad():
        _, _, log = crit(model, sample_of(task, ["abc", "ab"]))
    assert log["exact_nll_count"] == 1  # length 2 (9 sequences) enumerated, length 3 (27) skipped


# -- gradients: finite differences in float64 ------------------------------------------------------------
def gradcheck_objective(name: str, teacher_logits=None):
    task, model, crit = build(name if name != "energy_kl_projection" else "energy_pseudolikelihood",
                              arch_flags=("--embed-dim", "2", "--hidden-size", "2", "--combine-dim", "2"))  # fmt: skip
    model.double()
    ids = crit.symbol_ids
    seqs = torch.tensor([[0, 2], [1, 1]])
    names = ["decoder.fc_out.weight", "decoder.embed_tokens.weight", "decoder.left_lstm.weight_hh_l0"]
    params = [dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(*ps):
        fn = lambda s: functional_call(model, dict(zip(names, ps)), (ids[s],))[0][..., ids]  # noqa: E731
        if name == "energy_kl_projection":
            cond = et.exact_conditionals(fn, seqs, 3, batch_rows=5)
            return (et.kl_projection(teacher_logits, cond) + 0.5 * et.pseudo_nll(cond, seqs)).sum()
        return crit.objective(model, fn, seqs, 2).sum()

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["energy_likelihood", "energy_pseudolikelihood", "energy_mlm"])
def test_gradients_match_finite_differences(name):
    gradcheck_objective(name)


def test_kl_projection_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    gradcheck_objective("energy_kl_projection", torch.randn(2, 2, 3, generator=gen, dtype=torch.float64))


# -- the KL projection ----------------------------------------------------------------------------------
def kl_criterion(monkeypatch, teacher, extra=()):
    monkeypatch.setattr(checkpoint_utils, "load_model_ensemble", lambda paths, task=None: ([teacher], None))
    return build("energy_kl_projection", ["--energy-teacher-path", "teacher.pt", *extra])


def test_kl_projection_is_zero_when_conditionals_agree(monkeypatch):
    _, teacher, _ = build("energy_mlm", seed=5)
    with torch.no_grad():
        teacher.decoder.fc_out.weight.zero_()  # context-free logits: the free conditionals ARE the true ones
    task, _, crit = kl_criterion(monkeypatch, teacher)
    sample = sample_of(task, ["abc", "cab"])
    loss, _, _ = crit(teacher, sample)  # the model is the teacher itself
    assert abs(float(loss)) < 1e-6
    _, other, _ = build("energy_mlm", seed=6)
    assert float(crit(other, sample)[0]) > 1e-3  # another model's true conditionals differ
    seqs = torch.tensor([[0, 1, 2]])
    cond = et.exact_conditionals(crit.logits_fn(other), seqs, 3, 9)
    assert float(et.kl_projection(cond, cond).abs().max()) < 1e-6


def test_kl_projection_adds_weighted_pseudolikelihood(monkeypatch):
    _, teacher, _ = build("energy_mlm", seed=5)
    task, _, crit = kl_criterion(monkeypatch, teacher, ["--energy-pll-weight", "0.5"])
    _, _, crit0 = kl_criterion(monkeypatch, teacher)
    _, _, pll = build("energy_pseudolikelihood")
    _, model, _ = build("energy_mlm", seed=7)
    sample = sample_of(task, ["abc", "cab"])
    with torch.no_grad():
        got = float(crit(model, sample)[0])
        want = float(crit0(model, sample)[0]) + 0.5 * float(pll(model, sample)[0])
    assert abs(got - want) < 1e-4
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not list(crit.parameters())  # the teacher is neither trained nor saved with the criterion


# -- refusals ------------------------------------------------------------------------------------------
def test_likelihood_refuses_beyond_the_enumeration_limit(mle):
    task, model, _ = mle
    _, _, crit = build("energy_likelihood", ["--energy-max-enumeration", "26"])
    with pytest.raises(ValueError, match=r"3\^3 = 27.*--energy-max-enumeration 26"):
        crit(model, sample_of(task, ["abc"]))


def test_refuses_tokens_outside_the_real_symbols(mle):
    task, model, crit = mle
    sample = sample_of(task, ["abc"])
    sample["target"][0, 1] = task.dictionary.unk()
    with pytest.raises(ValueError, match="not real symbols"):
        crit(model, sample)


def test_kl_projection_refusals(monkeypatch):
    with pytest.raises(ValueError, match="--energy-teacher-path"):
        build("energy_kl_projection")
    _, teacher, _ = build("energy_mlm")
    teacher.decoder.fc_out = torch.nn.Linear(4, 3)  # another dictionary's output layer
    with pytest.raises(ValueError, match="same dictionary"):
        kl_criterion(monkeypatch, teacher)
