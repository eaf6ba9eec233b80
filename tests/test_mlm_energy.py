"""Energies of a conditional masked LM (Goyal's thesis, CMU 2021, sections 6.2.1 E_raw and 6.2.4 E_local):
the batched, chunked, cached computation over many sentences and chains of different lengths equals a
slow loop that masks one position of one sequence at a time, and the decoder work is what it claims."""
import math

import pytest
import torch

from fairseq_ext.modules.mlm_energy import (
    CMLMMaskedLM,
    PassCounter,
    energy_terms,
    layout_tokens,
    masked_conditionals,
    naive_epoch_cost,
    positions_per_epoch_cost,
    sequence_energies,
    single_masked_copies,
    target_positions,
)
from fairseq_ext.testing import tiny

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SOURCES = [[4, 5, 6, 7, 8, EOS], [9, 4, EOS]]  # two sentences of different lengths
BODIES = [[4, 5, 6, 7, 8], [9, 9, 4, 0, 0], [5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]  # chains (0 = unused)
LENGTHS = [5, 3, 2, 1]
CONTEXTS = [0, 1, 0, 1]


@pytest.fixture(scope="module")
def cmlm():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        task, model, _ = tiny.build("cmlm_transformer", ["--criterion", "nat_loss"], num_symbols=8)
    model.eval()
    return model


def encode(model, sources):
    src = torch.full((len(sources), max(map(len, sources))), PAD)
    for i, s in enumerate(sources):
        src[i, src.size(1) - len(s) :] = torch.tensor(s)  # fairseq pads sources on the left
    return model.encoder(src, src_lengths=torch.tensor([len(s) for s in sources]))


def batch():
    lengths = torch.tensor(LENGTHS)
    return layout_tokens(torch.tensor(BODIES), lengths, BOS, EOS, PAD), lengths, torch.tensor(CONTEXTS)


def slow_energy(model, source, body):
    """E_local, E_raw and the masked logits of one sequence, one decoder pass per masked position, the
    sentence encoded alone and nothing padded (sections 6.2.1 and 6.2.4 as written)."""
    enc = encode(model, [source])
    tokens = torch.tensor([[BOS] + body + [EOS]])
    e_local = e_raw = 0.0
    logits_at = []
    for t in range(1, len(body) + 1):
        masked = tokens.clone()
        masked[0, t] = UNK  # cmlm_transformer's mask symbol
        logits = model.decoder(normalize=False, prev_output_tokens=masked, encoder_out=enc)[0, t]
        e_local -= float(torch.log_softmax(logits.double(), -1)[tokens[0, t]])
        e_raw -= float(logits[tokens[0, t]])
        logits_at.append(logits)
    return e_local, e_raw, torch.stack(logits_at)


@torch.no_grad()
@pytest.mark.parametrize("max_tokens", [None, 7, 20])
def test_batched_energies_equal_the_one_position_at_a_time_loop(cmlm, max_tokens):
    tokens, lengths, contexts = batch()
    counter = PassCounter()
    mlm = CMLMMaskedLM(cmlm, encode(cmlm, SOURCES), max_tokens_per_pass=max_tokens, counter=counter)
    cache = masked_conditionals(mlm, tokens, contexts, lengths)
    e_local, e_raw = sequence_energies(mlm, tokens, contexts, lengths)
    for c, (body, n, ctx) in enumerate(zip(BODIES, LENGTHS, CONTEXTS)):
        want_local, want_raw, want_logits = slow_energy(cmlm, SOURCES[ctx], body[:n])
        assert float(cache.energy_local[c]) == pytest.approx(want_local, abs=1e-4)
        assert float(cache.energy_raw[c]) == pytest.approx(want_raw, abs=1e-4)
        assert float(e_local[c]) == pytest.approx(want_local, abs=1e-4)
        assert float(e_raw[c]) == pytest.approx(want_raw, abs=1e-4)
        torch.testing.assert_close(cache.logits[c, 1 : n + 1], want_logits, rtol=1e-4, atol=1e-4)
        assert not bool(cache.logits[c, [0, n + 1]].any())  # BOS and EOS: no pass, no term
        assert float(cache.local[c, n + 1 :].abs().sum()) == 0
    total = sum(LENGTHS)
    assert counter.rows == 2 * total  # T single-masked rows per chain, for each of the two calls
    if max_tokens is None:
        assert counter.calls == 2
    else:
        # every call decodes at most max_tokens // 7 rows (7 = the padded length BOS + 5 + EOS)
        per_call = max(1, max_tokens // 7)
        assert counter.calls == 2 * math.ceil(total / per_call)


@torch.no_grad()
def test_a_known_single_site_pass_is_reused_not_decoded(cmlm):
    """After a single-site change at i, the pass with i masked is the current state's (y_\\i = y'_\\i)."""
    tokens, lengths, contexts = batch()
    mlm = CMLMMaskedLM(cmlm, encode(cmlm, SOURCES))
    cache = masked_conditionals(mlm, tokens, contexts, lengths)
    pos = torch.tensor([2, 1, 2, 1])
    proposed = tokens.clone()
    proposed[torch.arange(4), pos] = torch.tensor([9, 8, 4, 5])
    mlm.counter = PassCounter()
    reused = masked_conditionals(mlm, proposed, contexts, lengths, known=(pos, cache.logits[torch.arange(4), pos]))
    assert mlm.counter.rows == sum(LENGTHS) - 4
    full = masked_conditionals(mlm, proposed, contexts, lengths)
    torch.testing.assert_close(reused.logits, full.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reused.energy_local, full.energy_local, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reused.energy_raw, full.energy_raw, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_energies_do_not_depend_on_batch_order_or_padding(cmlm):
    tokens, lengths, contexts = batch()
    mlm = CMLMMaskedLM(cmlm, encode(cmlm, SOURCES))
    e_local, e_raw = sequence_energies(mlm, tokens, contexts, lengths)
    perm = torch.tensor([3, 1, 0, 2])
    pl, pr = sequence_energies(mlm, tokens[perm], contexts[perm], lengths[perm])
    torch.testing.assert_close(pl, e_local[perm], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pr, e_raw[perm], rtol=1e-5, atol=1e-4)
    padded = torch.cat([tokens, torch.full((4, 3), PAD)], dim=1)  # extra padding columns
    ql, qr = sequence_energies(mlm, padded, contexts, lengths)
    torch.testing.assert_close(ql, e_local, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(qr, e_raw, rtol=1e-5, atol=1e-4)


def test_energy_terms_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    local, raw = energy_terms(logits, torch.tensor([2, 0]))
    torch.testing.assert_close(local, torch.tensor([math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3, math.log(3)]))
    torch.testing.assert_close(raw, torch.tensor([-3.0, 0.0]))


def test_layout_and_single_masked_copies():
    tokens = layout_tokens(torch.tensor([[4, 5, 6], [7, 0, 0]]), torch.tensor([3, 1]), BOS, EOS, PAD)
    assert tokens.tolist() == [[BOS, 4, 5, 6, EOS], [BOS, 7, EOS, PAD, PAD]]
    copies, rows, cols = single_masked_copies(tokens, target_positions(torch.tensor([3, 1]), 5), UNK)
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [1, 2, 3, 1]  # BOS and EOS never masked
    assert copies[0].tolist() == [BOS, UNK, 5, 6, EOS] and copies[3].tolist() == [BOS, UNK, EOS, PAD, PAD]


def test_cost_formulas():
    assert positions_per_epoch_cost(20) == (380, 20)
    assert naive_epoch_cost(20) == 820
