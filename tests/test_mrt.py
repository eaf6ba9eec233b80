"""Criterion ``mrt`` (minimum risk training; Welleck and Cho, AAAI 2021, equations 6 and 7).

In-process tests drive the criterion on a tiny transformer; the slow ones run fairseq-train and
fairseq-generate through ``--user-dir`` (end to end from an MLE checkpoint, 2 gloo workers).
"""
import itertools
import os
import re

import editdistance
import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from fairseq_ext.modules.sequence_risk import Candidates, candidate_distribution, hypotheses_to_candidates
from fairseq_ext.modules.sequence_decoding import Hypothesis
from fairseq_ext.testing import cli, tiny, trained

PAIRS = [([0, 1, 2], [2, 1, 0]), ([3, 4], [4, 3]), ([5, 1, 2, 3], [3, 2, 1, 5]), ([6, 6, 1], [1, 6, 6])]


def build(*flags, num_symbols=8):
    torch.manual_seed(0)
    return tiny.build("transformer", ["--criterion", "mrt", *flags], num_symbols=num_symbols)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mrt-num-candidates", "0"], "--mrt-num-candidates"),
        (["--mrt-num-candidates", "1"], "--mrt-include-reference"),
        (["--mrt-alpha", "0"], "--mrt-alpha"),
        (["--mrt-distribution", "classic", "--mrt-alpha", "0.5"], "--mrt-alpha only applies"),
        (["--mrt-mle-weight", "-1"], "--mrt-mle-weight"),
        (["--mrt-max-len-ratio", "0"], "--mrt-max-len-ratio"),
        (["--mrt-temperature", "0"], "--mrt-temperature"),
        (["--mrt-sampling-topk", "3"], "--mrt-sampling-topk"),
        (["--mrt-candidates", "sample", "--mrt-sampling-topp", "2"], "--mrt-sampling-topp"),
        (["--mrt-task-loss", "meteor"], "--mrt-task-loss 'meteor'"),
        (["--mrt-task-loss", "lm"], "--mrt-lm-scorer-path"),
        (["--mrt-lm-scorer-path", "x.pt"], "--mrt-lm-scorer-path is only read"),
        (["--label-smoothing", "1.0"], "--label-smoothing"),
    ],
)
def test_impossible_options_are_refused(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(*flags)


def test_language_models_need_text_completion():
    from fairseq_ext.modules.decoder_driver import UnsupportedModelError

    task, model, criterion = tiny.build("transformer_lm", ["--criterion", "mrt", "--mrt-task-loss", "edit"], 8)
    model.train()
    with pytest.raises(UnsupportedModelError, match="--task text_completion"):
        criterion(model, tiny.lm_batch(task, [[0, 1, 2], [3, 4]]))


# -- equation 7 on an enumerable toy ----------------------------------------------------------------------
def sequence_log_prob(model, task, source, candidate, terminated):
    """log p(candidate | source) by plain teacher forcing of one sentence; symbols w{i} (float64 model)."""
    d = task.tgt_dict
    sample = tiny.translation_batch(task, [(source, [])])
    ids = [d.index(f"w{i}") for i in candidate]
    return log_prob_of_ids(model, d, sample["net_input"]["src_tokens"], ids, terminated)


def log_prob_of_ids(model, d, src_tokens, tokens, terminated):
    """log p(tokens [+ EOS] | src_tokens (1 x S)) by teacher forcing, summed over the scored tokens."""
    target = list(tokens) + ([d.eos()] if terminated else [])
    prev = torch.tensor([[d.eos()] + target[:-1]]) if target else torch.tensor([[d.eos()]])
    out = model(src_tokens, torch.tensor([src_tokens.size(1)]), prev)
    lprobs = model.get_normalized_probs(out, log_probs=True)[0]  # T x V
    return sum(lprobs[t, y] for t, y in enumerate(target))


@pytest.fixture
def float64_log_softmax(monkeypatch):
    """fairseq's (log_)softmax compute in float32 whatever the input; keep float64 for the gradient checks."""
    from fairseq import utils

    monkeypatch.setattr(utils, "log_softmax", lambda x, dim, onnx_trace=False: torch.log_softmax(x, dim=dim))
    monkeypatch.setattr(utils, "softmax", lambda x, dim, onnx_trace=False: torch.softmax(x, dim=dim))


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_risk_gradient_is_equation_7(alpha, float64_log_softmax):
    """grad C_MRT = alpha [E_q[c grad log p] - E_q[c] E_q[grad log p]] (eq. 7), every candidate enumerated."""
    task, model, criterion = build("--mrt-task-loss", "edit", "--mrt-alpha", str(alpha))
    model = model.double().train()
    source, reference = [0, 1, 2], [2, 1]
    # S: every sequence of symbols {1, 2} of length <= 2, terminated, plus two cut ones (no EOS)
    seqs = [list(s) for n in range(3) for s in itertools.product([1, 2], repeat=n)]
    cands = [(s, True) for s in seqs] + [([2, 2], False), ([1], False)]
    sample = tiny.translation_batch(task, [(source, reference)])
    d = task.tgt_dict
    ids = lambda xs: [d.index(f"w{i}") for i in xs]  # noqa: E731
    candidates = Candidates([[ids(s) for s, _ in cands]], [[t for _, t in cands]])
    params = [p for p in model.parameters() if p.requires_grad]

    loss, log = criterion.risk_loss(model, sample, candidates)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    # by hand, in float64: costs, log p and grad log p of each candidate on its own
    eos = d.eos()
    costs = torch.tensor(
        [editdistance.eval(ids(s) + ([eos] if t else []), ids(reference) + [eos]) / (len(reference) + 1) for s, t in cands],
        dtype=torch.float64,
    )
    log_ps, score_grads = [], []
    for s, t in cands:
        lp = sequence_log_prob(model, task, source, s, t)
        log_ps.append(float(lp.detach()))
        score_grads.append(torch.autograd.grad(lp, params, allow_unused=True))
    q = torch.softmax(alpha * torch.tensor(log_ps, dtype=torch.float64), 0)
    expected_cost = float((q * costs).sum())
    assert float(loss) == pytest.approx(expected_cost, rel=1e-10)
    checked = 0
    for i, g in enumerate(grads):
        parts = [sg[i] if sg[i] is not None else torch.zeros_like(params[i]) for sg in score_grads]
        e_cg = sum(float(q[k] * costs[k]) * parts[k] for k in range(len(cands)))
        e_g = sum(float(q[k]) * parts[k] for k in range(len(cands)))
        eq7 = alpha * (e_cg - expected_cost * e_g)
        got = g if g is not None else torch.zeros_like(params[i])
        torch.testing.assert_close(got, eq7, rtol=1e-9, atol=1e-12)
        checked += int(eq7.abs().max() > 0)
    assert checked > 5  # the gradient reaches the encoder and decoder weights


def test_classic_distribution_is_softmax_of_exp_mean_log_prob():
    log_p = torch.tensor([[-1.0, -4.0, -9.0]], dtype=torch.float64)
    lengths = torch.tensor([[2.0, 4.0, 3.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = torch.softmax(torch.exp(log_p / lengths), -1)
    torch.testing.assert_close(candidate_distribution(log_p, lengths, mask, 1.0, "classic"), expected)
    renorm = candidate_distribution(log_p, lengths, mask, 1.0, "renormalized")
    torch.testing.assert_close(renorm, torch.exp(log_p) / torch.exp(log_p).sum())
    assert float(renorm.max()) > 0.9 and float(expected.max()) < 0.5  # classic stays near uniform


def test_duplicates_are_removed_and_the_reference_added_once():
    rows = [[Hypothesis([1, 2], True, 0.0), Hypothesis([1, 2], True, -1.0), Hypothesis([1, 2], False, -2.0)],
            [Hypothesis([3], True, 0.0)]]  # fmt: skip
    c = hypotheses_to_candidates(rows, unique=True, reference=[[1, 2], [4]])
    assert c.tokens == [[[1, 2], [1, 2]], [[3], [4]]] and c.terminated == [[True, False], [True, True]]
    assert c.mask().tolist() == [[True, True], [True, True]]


def test_scoring_reuses_one_encoder_pass_and_matches_teacher_forcing(float64_log_softmax):
    task, model, criterion = build("--mrt-task-loss", "edit")
    model = model.double().train()
    sample = tiny.translation_batch(task, PAIRS)
    calls = []
    hook = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    rows = criterion.decoder.decode(model, sample)
    calls.clear()
    candidates = hypotheses_to_candidates(rows, unique=True)
    from fairseq_ext.modules.sequence_risk import candidate_log_probs

    log_p, lengths = candidate_log_probs(model, sample, candidates, task.tgt_dict)
    hook.remove()
    assert len(calls) == 1  # one encoder pass for all B x K candidates
    pad = task.src_dict.pad()
    for b, row in enumerate(candidates.tokens):
        src = sample["net_input"]["src_tokens"][b]
        src = src[src.ne(pad)].unsqueeze(0)  # 1 x S, without the left padding
        for k, toks in enumerate(row):
            lp = log_prob_of_ids(model, task.tgt_dict, src, toks, candidates.terminated[b][k])
            assert float(log_p[b, k]) == pytest.approx(float(lp), abs=1e-9)


def test_training_call_and_validation():
    task, model, criterion = build("--mrt-task-loss", "edit", "--mrt-mle-weight", "0.5", "--mrt-include-reference")
    sample = tiny.translation_batch(task, PAIRS)
    model.train()
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    assert sample_size == len(PAIRS)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert float(loss) == pytest.approx(log["mrt_risk"] + 0.5 * float(log["loss"]), rel=1e-5)
    assert log["mrt_cost_best"] == 0.0  # the reference is a candidate
    model.eval()
    v_loss, v_size, _ = criterion(model, sample)
    ref_loss, ref_size, _ = LabelSmoothedCrossEntropyCriterion(task, False, 0.0)(model, sample)
    assert torch.equal(v_loss, ref_loss) and v_size == ref_size


def test_risk_over_given_candidates_is_a_sum_over_sentences():
    task, model, criterion = build("--mrt-task-loss", "edit", "--mrt-mle-weight", "0.3")
    model.train()
    sample = tiny.translation_batch(task, PAIRS, given_order=True)
    model.eval()
    candidates = hypotheses_to_candidates(criterion.decoder.decode(model, sample), unique=True)
    model.train()
    full, log = criterion.risk_loss(model, sample, candidates)
    singles = [
        criterion.risk_loss(model, tiny.translation_batch(task, [p]),
                            Candidates([candidates.tokens[b]], [candidates.terminated[b]]))  # fmt: skip
        for b, p in enumerate(PAIRS)
    ]
    assert float(full) == pytest.approx(sum(float(x) for x, _ in singles), rel=1e-5)
    assert log["mrt_risk"] == pytest.approx(sum(l["mrt_risk"] for _, l in singles), rel=1e-5)


# -- through fairseq-train -------------------------------------------------------------------------------------
COMMON = cli.TINY_TRANSFORMER + ["--task", "translation", "--dropout", "0", "--criterion", "mrt"]


logged = cli.train_inner_values


@pytest.mark.slow
def test_end_to_end_from_an_mle_checkpoint(reverse_checkpoints, tmp_path):
    mle = reverse_checkpoints["plain"]
    save_dir = str(tmp_path / "mrt")
    flags = COMMON + ["--mrt-task-loss", "bleu", "--mrt-candidates", "sample", "--mrt-mle-weight", "0.1",
                      "--max-tokens", "500", "--max-update", "3", "--ddp-backend", "legacy_ddp"]  # fmt: skip
    log = trained.fine_tune(mle, save_dir, flags)
    risks = logged(log, "mrt_risk")
    assert [u for u, _ in risks] == [1, 2, 3] and all(0.0 <= r <= 1.0 for _, r in risks)
    assert re.search(r"\| valid \|.*loss", log)
    out = cli.generate(mle.data_bin, os.path.join(save_dir, "checkpoint_last.pt"))  # every sentence decoded
    assert len(cli.hypotheses(out)) == cli.count_lines(mle.data_bin, "test")


@pytest.mark.slow
def test_two_workers_equal_one_worker_on_the_same_global_batch(reverse_data_bin, tmp_path):
    # beam candidates (deterministic); --curriculum keeps the batch order; 8 sentences per update either way
    flags = COMMON + ["--mrt-task-loss", "edit", "--mrt-num-candidates", "3", "--mrt-mle-weight", "0.2"] + [
        "--max-tokens", "100000", "--curriculum", "100", "--required-batch-size-multiple", "1",
        "--optimizer", "sgd", "--lr", "0.5", "--max-update", "3", "--no-epoch-checkpoints", "--ddp-backend", "legacy_ddp",
    ]  # fmt: skip
    single, double, single_dir, double_dir = cli.one_and_two_workers(reverse_data_bin, tmp_path, flags)
    keys = ("mrt_risk", "mrt_cost_best", "bsz")
    cli.assert_same_logged(single, double, keys, updates=[1, 2, 3])
    from fairseq import checkpoint_utils

    a, b = (checkpoint_utils.load_checkpoint_to_cpu(os.path.join(d, "checkpoint_last.pt"))["model"]
            for d in (single_dir, double_dir))  # fmt: skip
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"mrt, 2 workers vs 1 worker on the same global batch: max |dW| = {diff!r}")
    assert diff < 1e-5
