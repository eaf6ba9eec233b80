"""FlowSeq decoding (argmax / sample / NPD / IWD; Ma et al., FlowSeq, EMNLP 2019, section 3.6) and
fairseq-generate with it.

The first part runs FlowSeqGenerator on a hand-made fake model with the FlowSeq API (a "reverse the
source" decoder, deterministic length log-probs, a shifted-identity prior and a Gaussian posterior), and
compares it with slow per-candidate loops written from the paper's formulas; it also checks the noise
scale (the sampling temperature) and that IWD's K posterior samples are random draws.  The second part
runs the same checks on an untrained real ``flowseq_tiny`` in-process, and (marked slow) trains one and
decodes it with each mode through fairseq-generate.
"""
import functools
import math
import os
import tempfile
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary

from fairseq_ext.generators.flowseq_generator import (
    FlowSeqGenerationConfig,
    FlowSeqGenerator,
    importance_weighted_log_likelihood,
    load_teacher,
    strip_eos_padding,
    validate_generation_config,
)
from fairseq_ext.testing import cli, tiny

NUM_WORDS = 8  # w0 .. w7
SPECIAL_TOKEN = 7  # w7: the token the latent z can switch on (so that samples differ)


def make_dictionary(num_words=NUM_WORDS):
    d = Dictionary()
    for i in range(num_words):
        d.add_symbol(f"w{i}")
    return d


DICT = make_dictionary()
PAD, EOS, BOS = DICT.pad(), DICT.eos(), DICT.bos()
V = len(DICT)


def word(i):
    return DICT.index(f"w{i}")


def gaussian_log_density(x, mean, std, mask):
    """sum over the real positions and features of log N(x; mean, std^2): N x T x F, N x T -> N."""
    lp = -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    return (lp * mask.unsqueeze(-1)).sum(dim=(1, 2))


class FakePrior(torch.nn.Module):
    """z = eps + SHIFT (a unit-Jacobian flow), p(z|x) = N(z; SHIFT, I); records every eps it receives."""

    SHIFT = 0.25

    def __init__(self):
        super().__init__()
        self.received_eps = []

    def sample(self, eps, mask, src, src_mask):
        self.received_eps.append(eps.clone())
        z = (eps + self.SHIFT) * mask.unsqueeze(-1)
        return z, self.log_prob(z, mask, src, src_mask)

    def log_prob(self, z, mask, src, src_mask):
        return gaussian_log_density(z, self.SHIFT, 1.0, mask)


class FakeFlowSeq(torch.nn.Module):
    """The FlowSeq model API with fixed, hand-readable distributions.

    * length classes [4, 8, 12, 6] (6 is not a multiple of length_unit = 4: -inf); the preferred length
      is (source words + 1) rounded up to 4, the others fall off by 1 per 4 positions away (ties: shorter).
    * decode: position t < m (m source words) prefers the source word m-1-t (logit 5), positions >= m
      prefer EOS (logit 5); w7's logit is 6 z_0; a candidate at least 4 positions longer than the words
      and EOS need ends with the word w(4 + T/4) (+6 at its last position: a candidate's output depends
      on its length, as a real decoder's does); pad gets ``pad_logit`` at position 1;
      padded positions (beyond tgt_mask) are garbage that strongly prefers w0.
    * posterior: q(z|y,x) = N(0.5 (y mod 3 - 1), 0.5^2) per feature; records its samples.
    """

    length_unit = 4
    latent_dim = 2
    CLASSES = [4, 8, 12, 6]

    def __init__(self, pad_logit=0.0):
        super().__init__()
        self.prior = FakePrior()
        self.pad_logit = pad_logit
        self.posterior_samples = []
        self.posterior_means, self.posterior_masks = [], []
        self.decode_rows = []  # candidates per decoder pass
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, src_tokens, src_lengths):
        return F.one_hot(src_tokens, V).float(), src_tokens.ne(PAD)  # B x S x V, B x S

    def source_words(self, src, src_mask):
        tokens = src.argmax(-1)
        return (src_mask & tokens.ne(EOS)).sum(1)  # B

    def length_log_probs(self, src, src_mask):
        m = self.source_words(src, src_mask)
        lengths = torch.tensor(self.CLASSES).unsqueeze(0).expand(m.size(0), -1)  # B x C
        preferred = ((m + 1 + 3) // 4 * 4).unsqueeze(1)
        logits = -(lengths - preferred).abs().float() / 4 - 0.01 * lengths.float()
        logits = logits.masked_fill(lengths % self.length_unit != 0, -math.inf)
        return logits.log_softmax(dim=1), lengths

    def expand_source(self, src, src_mask, n):
        return src.repeat_interleave(n, dim=0), src_mask.repeat_interleave(n, dim=0)

    def decode(self, z, tgt_mask, src, src_mask):
        n, t, _ = z.shape
        self.decode_rows.append(n)
        m = self.source_words(src, src_mask)  # N
        src_words = src.argmax(-1)  # N x S
        logits = torch.zeros(n, t, V)
        pos = torch.arange(t)
        start = (~src_mask).long().cumprod(1).sum(1)  # N: left padding (fairseq's default for sources)
        for_t = (start.unsqueeze(1) + m.unsqueeze(1) - 1 - pos.unsqueeze(0)).clamp(min=0)  # N x T: word read at t
        wanted = src_words.gather(1, for_t.clamp(max=src_words.size(1) - 1))
        wanted = torch.where(pos.unsqueeze(0) < m.unsqueeze(1), wanted, torch.full_like(wanted, EOS))
        logits.scatter_(2, wanted.unsqueeze(-1), 5.0)
        logits[..., word(SPECIAL_TOKEN)] += 6 * z[..., 0]
        length = tgt_mask.sum(1)  # N
        too_long = length >= m + 1 + 4  # a whole length unit more than the words and EOS need
        last_token = word(4) + length // 4  # N: w5 .. w7 for lengths 4 .. 12
        logits[torch.arange(n), (length - 1).clamp(max=t - 1), last_token] += 6.0 * too_long
        logits[:, 1, PAD] += self.pad_logit
        garbage = torch.full((V,), -20.0)
        garbage[word(0)] = 20.0
        logits = torch.where(tgt_mask.unsqueeze(-1), logits, garbage)
        return logits.log_softmax(-1)

    def posterior_mean(self, tgt_tokens):
        return (0.5 * ((tgt_tokens % 3).float() - 1)).unsqueeze(-1).expand(-1, -1, self.latent_dim)

    def posterior(self, tgt_tokens, tgt_mask, src, src_mask, n_samples, random=True):
        mean = self.posterior_mean(tgt_tokens).repeat_interleave(n_samples, 0)
        mask = tgt_mask.repeat_interleave(n_samples, 0)
        z = (mean + (0.5 * torch.randn_like(mean) if random else 0)) * mask.unsqueeze(-1)
        log_q = gaussian_log_density(z, mean, 0.5, mask)
        self.posterior_samples.append(z.clone())
        self.posterior_means.append(mean.clone())
        self.posterior_masks.append(mask.clone())
        return z, log_q


class FakeTeacherEncoder(torch.nn.Module):
    def forward(self, src_tokens, src_lengths=None):
        return {"src": src_tokens}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {"src": encoder_out["src"].index_select(0, new_order)}


class FakeTeacherDecoder(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.calls = 0
        self.rows = []  # candidates per teacher-forced pass

    def forward(self, prev_output_tokens, encoder_out=None):
        self.calls += 1
        self.rows.append(prev_output_tokens.size(0))
        assert encoder_out["src"].size(0) == prev_output_tokens.size(0)
        return self.table[prev_output_tokens], None


class FakeTeacher(torch.nn.Module):
    """A bigram "autoregressive" teacher: log P(y_t | y_{t-1}) from a fixed table that likes (single) w7s."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(V, V)
        table[:, word(SPECIAL_TOKEN)] = 2.0
        table[word(SPECIAL_TOKEN), word(SPECIAL_TOKEN)] = -2.0  # but not twice in a row
        table[:, EOS] = 1.0
        table[EOS, word(1)] = 3.0  # the first token (after the EOS fairseq puts first) likes w1
        self.encoder, self.decoder = FakeTeacherEncoder(), FakeTeacherDecoder(table)

    def get_normalized_probs(self, net_output, log_probs=True):
        return net_output[0].log_softmax(-1)

    def sequence_log_prob(self, tokens):
        """Slow reference: sum_t log P(y_t | y_{t-1}), y_0 = EOS, over a 1-D hypothesis ending in EOS."""
        prev = [EOS] + tokens.tolist()[:-1]
        lp = self.decoder.table.log_softmax(-1)
        return sum(lp[p, y].item() for p, y in zip(prev, tokens.tolist()))


def cfg(**kw):
    return FlowSeqGenerationConfig(**{f"flowseq_{k}": v for k, v in kw.items()})


def batch(*sentences):
    """Sentences of word ids -> a fairseq sample (left-padded source with EOS, as LanguagePairDataset)."""
    rows = [torch.tensor([word(w) for w in s] + [EOS]) for s in sentences]
    width = max(len(r) for r in rows)
    src = torch.full((len(rows), width), PAD)
    for i, r in enumerate(rows):
        src[i, width - len(r):] = r
    return {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(r) for r in rows])}}


# -- slow references, one candidate at a time ---------------------------------------------------------


def reference_candidate(model, sentence, length, eps, banned=(PAD, BOS)):
    """One candidate decoded on its own: eps (length x F) -> z -> per-position argmax -> hypothesis.

    Returns (hypothesis tokens ending with one EOS, FlowSeq's log P(y|z,x) over the model positions,
    the model-position tokens).
    """
    sample = batch(sentence)["net_input"]
    src, src_mask = model.encode(sample["src_tokens"], sample["src_lengths"])
    mask = torch.ones(1, length, dtype=torch.bool)
    z, _ = model.prior.sample(eps[:length].unsqueeze(0), mask, src, src_mask)
    lp = model.decode(z, mask, src, src_mask)[0]  # T x V
    allowed = lp.clone()
    allowed[:, list(banned)] = -math.inf
    tokens = allowed.argmax(-1)
    total = lp.gather(1, tokens.unsqueeze(1)).sum().item()
    kept = tokens.tolist()
    while kept and kept[-1] == EOS:
        kept.pop()
    return kept + [EOS], total, tokens


def length_table(model, sentence):
    sample = batch(sentence)["net_input"]
    src, src_mask = model.encode(sample["src_tokens"], sample["src_lengths"])
    lp, lengths = model.length_log_probs(src, src_mask)
    order = lp[0].argsort(descending=True)
    return [(int(lengths[0, i]), lp[0, i].item()) for i in order if torch.isfinite(lp[0, i])]


def reference_iwd(model, sentence, model_tokens, length, len_lp, posterior_z):
    """Paper sec. 3.6: log (1/K) sum_k P(y|z_k,x) p(z_k|x) / q(z_k|y,x), + log P(len|x), / len."""
    sample = batch(sentence)["net_input"]
    src, src_mask = model.encode(sample["src_tokens"], sample["src_lengths"])
    mask = torch.ones(1, length, dtype=torch.bool)
    y = model_tokens.unsqueeze(0)
    terms = []
    for z in posterior_z:  # each length x F
        z = z.unsqueeze(0)
        log_p_y = model.decode(z, mask, src, src_mask)[0].gather(1, y.t()).sum().item()
        log_p_z = model.prior.log_prob(z, mask, src, src_mask).item()
        log_q = gaussian_log_density(z, model.posterior_mean(y), 0.5, mask).item()
        terms.append(math.exp(log_p_y + log_p_z - log_q))
    return (math.log(sum(terms) / len(terms)) + len_lp) / length


def check_hypothesis_format(hypos):
    for sentence in hypos:
        assert sentence, "every sentence gets a hypothesis"
        for h in sentence:
            toks = h["tokens"].tolist()
            assert toks[-1] == EOS and (len(toks) == 1 or toks[-2] != EOS), toks
            assert PAD not in toks and BOS not in toks
            assert h["positional_scores"].shape == h["tokens"].shape
            assert h["alignment"] is not None and h["alignment"].numel() == 0 and h["attention"] is None
        scores = [h["score"].item() for h in sentence]
        assert len({tuple(h["tokens"].tolist()) for h in sentence}) == len(sentence)  # no duplicates


SENTENCES = [[1, 2, 3], [4, 5, 6, 0, 1, 2, 3], [6], [2, 2, 0, 5, 1]]


# -- argmax --------------------------------------------------------------------------------------------


def test_argmax_takes_the_top_length_and_each_positions_argmax():
    model = FakeFlowSeq()
    gen = FlowSeqGenerator([model], DICT, cfg())
    hypos = gen.generate([model], batch(*SENTENCES))
    check_hypothesis_format(hypos)
    assert model.prior.received_eps[0].abs().sum() == 0  # temperature 0: the prior's mode
    for sentence, out in zip(SENTENCES, hypos):
        assert len(out) == 1
        length = length_table(model, sentence)[0][0]
        tokens, total, _ = reference_candidate(model, sentence, length, torch.zeros(12, 2))
        assert out[0]["tokens"].tolist() == tokens
        assert out[0]["positional_scores"].sum().item() == pytest.approx(total, abs=1e-5)
        assert out[0]["score"].item() == pytest.approx(total / len(tokens), abs=1e-5)
    # hand-checked: "w1 w2 w3" reversed; length 4 holds exactly the 3 words and EOS
    assert hypos[0][0]["tokens"].tolist() == [word(3), word(2), word(1), EOS]
    # 7 words -> length 8: 7 words + EOS, no trailing run beyond the first EOS
    assert hypos[1][0]["tokens"].tolist() == [word(i) for i in [3, 2, 1, 0, 6, 5, 4]] + [EOS]
    # one word -> length 4 = w6, EOS, EOS, EOS: the EOS carries the whole run's log-prob
    assert hypos[2][0]["tokens"].tolist() == [word(6), EOS]


def test_pad_is_never_emitted_even_when_the_model_prefers_it():
    model = FakeFlowSeq(pad_logit=50.0)  # pad wins position 1 by far
    gen = FlowSeqGenerator([model], DICT, cfg())
    hypos = gen.generate([model], batch(*SENTENCES))
    check_hypothesis_format(hypos)
    assert hypos[0][0]["tokens"].tolist() == [word(3), word(2), word(1), EOS]  # the runner-up at position 1


def test_a_sentence_decodes_the_same_alone_and_in_a_batch_of_other_lengths():
    model = FakeFlowSeq()
    gen = FlowSeqGenerator([model], DICT, cfg())
    together = gen.generate([model], batch(*SENTENCES))  # padded to 12 positions (garbage beyond each length)
    for i, sentence in enumerate(SENTENCES):
        alone = gen.generate([model], batch(sentence))[0][0]
        assert together[i][0]["tokens"].tolist() == alone["tokens"].tolist()
        assert torch.allclose(together[i][0]["positional_scores"], alone["positional_scores"], atol=1e-6)


def test_model_is_left_in_its_training_mode():
    model = FakeFlowSeq()
    model.train()
    FlowSeqGenerator([model], DICT, cfg()).generate([model], batch([1, 2]))
    assert model.training


# -- candidates of several lengths and samples ---------------------------------------------------------


def candidate_references(model, sentences, l, r, eps):
    """Per sentence, every candidate decoded alone: (tokens, FlowSeq score per token, model tokens, length,
    length log-prob, candidate index)."""
    out = []
    for b, sentence in enumerate(sentences):
        cands = []
        for j, (length, len_lp) in enumerate(length_table(model, sentence)[:l]):
            for s in range(r):
                c = (b * l + j) * r + s
                tokens, total, model_tokens = reference_candidate(model, sentence, length, eps[c])
                cands.append((tuple(tokens), total / len(tokens), model_tokens, length, len_lp, c))
        out.append(cands)
    return out


def best_per_hypothesis(cands, score):
    """{tokens: the best score(candidate) among the candidates that decode to these tokens}."""
    best = {}
    for cand in cands:
        value = score(cand)
        best[cand[0]] = max(best.get(cand[0], -math.inf), value)
    return best


def test_sample_mode_scores_each_candidate_as_if_it_were_alone():
    torch.manual_seed(0)
    model = FakeFlowSeq()
    gen = FlowSeqGenerator([model], DICT, cfg(decoding="sample", length_candidates=3, samples=4, temperature=1.0))
    hypos = gen.generate([model], batch(*SENTENCES))
    check_hypothesis_format(hypos)
    eps = model.prior.received_eps[0]  # (B*l*r) x 12 x F, as the generator drew it
    assert eps.shape == (len(SENTENCES) * 3 * 4, 12, 2)
    for out, cands in zip(hypos, candidate_references(model, SENTENCES, 3, 4, eps)):
        ref = best_per_hypothesis(cands, lambda cand: cand[1])
        assert {tuple(h["tokens"].tolist()) for h in out} == set(ref)
        for h in out:
            assert h["score"].item() == pytest.approx(ref[tuple(h["tokens"].tolist())], abs=1e-5)
        scores = [h["score"].item() for h in out]
        assert scores == sorted(scores, reverse=True)
        assert len(out) > 1  # lengths and samples gave distinct candidates


def test_length_candidates_beyond_the_valid_classes_are_skipped():
    model = FakeFlowSeq()
    gen = FlowSeqGenerator([model], DICT, cfg(decoding="sample", length_candidates=4, samples=1))  # 4th is -inf
    hypos = gen.generate([model], batch([6]))
    check_hypothesis_format(hypos)
    # lengths 4, 8 and 12 (the longer ones end with a spurious w6 / w7); the invalid class (length 6, no
    # multiple of length_unit: the prior could not squeeze it) is decoded at the best length and dropped
    assert sorted(h["tokens"].size(0) for h in hypos[0]) == [2, 9, 13]
    assert model.prior.received_eps[0].size(1) == 12


# -- IWD -----------------------------------------------------------------------------------------------


def test_iwd_score_equals_the_papers_formula_per_candidate():
    torch.manual_seed(1)
    model = FakeFlowSeq()
    l, r, k = 3, 2, 3
    gen = FlowSeqGenerator([model], DICT, cfg(decoding="iwd", length_candidates=l, samples=r, temperature=0.8,
                                              iwd_samples=k))  # fmt: skip
    hypos = gen.generate([model], batch(*SENTENCES))
    check_hypothesis_format(hypos)
    eps = model.prior.received_eps[0]
    assert eps[::r].abs().sum() == 0 and eps[1::r].abs().sum() > 0  # include_zero: sample 0 of each length
    assert len(model.posterior_samples) == k
    for b, (out, cands) in enumerate(zip(hypos, candidate_references(model, SENTENCES, l, r, eps))):

        def iwd(cand):
            _, _, model_tokens, length, len_lp, c = cand
            zs = [s[c, :length] for s in model.posterior_samples]  # the K posterior samples the generator drew
            return reference_iwd(model, SENTENCES[b], model_tokens, length, len_lp, zs)

        expected = best_per_hypothesis(cands, iwd)
        assert {tuple(h["tokens"].tolist()) for h in out} == set(expected)
        for h in out:
            assert h["score"].item() == pytest.approx(expected[tuple(h["tokens"].tolist())], abs=1e-4)
        assert out[0]["tokens"].tolist() == list(max(expected, key=expected.get))


def assert_centred_normal(x, scale, alpha=1e-4):
    """x (any shape) holds iid N(0, scale^2) draws: two-sided chi-square test of sum (x / scale)^2 ~ chi2(n)
    and z-test of the mean.  alpha = 1e-4: the seeds are fixed, so this only bounds how unlucky a seed may
    be; a wrong scale (1 instead of 0.3, T^2, sqrt T) or the mean instead of draws gives p far below it."""
    from scipy import stats

    x = x.double().flatten() / scale
    n = x.numel()
    assert n >= 500, n
    ss = x.pow(2).sum().item()
    p_scale = 2 * min(stats.chi2.cdf(ss, n), stats.chi2.sf(ss, n))
    p_mean = 2 * stats.norm.sf(abs(x.mean().item()) * math.sqrt(n))
    assert p_scale > alpha and p_mean > alpha, (n, ss / n, x.mean().item(), p_scale, p_mean)


@pytest.mark.parametrize("mode", ["sample", "iwd"])
@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_prior_noise_has_the_temperature_as_its_standard_deviation(mode, temperature):
    """Ma et al., FlowSeq, section 4.2 (after Kingma and Dhariwal, 2018): a reduced-temperature sample draws
    the prior's base noise eps ~ N(0, T^2 I); padded positions and IWD's first sample per length are 0."""
    torch.manual_seed(4)
    model = FakeFlowSeq()
    l, r = 3, 24
    gen = FlowSeqGenerator([model], DICT, cfg(decoding=mode, length_candidates=l, samples=r,
                                              temperature=temperature, iwd_samples=1))  # fmt: skip
    gen.generate([model], batch(*SENTENCES))
    eps = model.prior.received_eps[0]  # N x T x F
    lengths = torch.tensor([[length for length, _ in length_table(model, s)[:l]] for s in SENTENCES])  # B x l
    real = torch.arange(eps.size(1))[None, :] < lengths.flatten().repeat_interleave(r)[:, None]  # N x T
    assert eps[~real].abs().sum() == 0
    drawn = torch.ones(eps.size(0), dtype=torch.bool)
    if mode == "iwd":  # the first sample of every length is the prior's mode
        drawn[::r] = False
        assert eps[~drawn].abs().sum() == 0
    assert_centred_normal(eps[drawn[:, None] & real], temperature)
    # every drawn candidate has its own noise: no two samples of a length share it
    per_length = eps.view(-1, r, *eps.shape[1:])[:, 1:] if mode == "iwd" else eps.view(-1, r, *eps.shape[1:])
    first_position = per_length[:, :, 0, :]  # (B*l) x r' x F: position 0 is real in every candidate
    gaps = (first_position[:, :, None] - first_position[:, None, :]).abs().sum(-1)  # (B*l) x r' x r'
    assert (gaps + torch.eye(gaps.size(1)) > 0).all()


@pytest.mark.parametrize("mode", ["sample", "iwd"])
def test_temperature_zero_decodes_the_priors_mode_like_argmax(mode):
    model = FakeFlowSeq()
    gen = FlowSeqGenerator([model], DICT, cfg(decoding=mode, length_candidates=2, samples=1, temperature=0.0))
    hypos = gen.generate([model], batch(*SENTENCES))
    assert model.prior.received_eps[0].abs().sum() == 0
    argmax = FlowSeqGenerator([model], DICT, cfg()).generate([model], batch(*SENTENCES))
    for out, best in zip(hypos, argmax):  # the top length's candidate is argmax decoding's hypothesis
        assert best[0]["tokens"].tolist() in [h["tokens"].tolist() for h in out]


def test_iwd_draws_k_distinct_posterior_samples_per_candidate():
    """Ma et al., FlowSeq, section 3.6: z_i^(k) ~ q(z | y_i, x) for k = 1..K are K random draws (not the
    posterior mean K times): pairwise distinct, and distributed as q."""
    torch.manual_seed(5)
    model = FakeFlowSeq()
    k = 4
    gen = FlowSeqGenerator([model], DICT, cfg(decoding="iwd", length_candidates=3, samples=4, temperature=0.5,
                                              iwd_samples=k))  # fmt: skip
    gen.generate([model], batch(*SENTENCES))
    assert len(model.posterior_samples) == k
    z = torch.stack(model.posterior_samples)  # K x N x T x F
    mean = torch.stack(model.posterior_means)
    real = model.posterior_masks[0].bool()  # N x T: the candidates' positions
    assert all(torch.equal(m.bool(), real) for m in model.posterior_masks)
    for a in range(k):
        for b in range(a + 1, k):
            assert ((z[a] - z[b]).abs()[real] > 0).all(), (a, b)
    # the fake posterior is N(mean, 0.5^2) per entry
    assert_centred_normal((z - mean)[:, real], 0.5)


def test_importance_weight_is_a_log_mean_exp():
    log_p_y = torch.tensor([[-1.0, -2.0], [-3.0, -3.0]])
    log_p_z = torch.tensor([[-0.5, 0.0], [1.0, 1.0]])
    log_q = torch.tensor([[0.2, -0.1], [0.0, 0.0]])
    got = importance_weighted_log_likelihood(log_p_y, log_p_z, log_q)
    want0 = math.log((math.exp(-1.0 - 0.5 - 0.2) + math.exp(-2.0 + 0.1)) / 2)
    assert got.tolist() == pytest.approx([want0, -2.0])


# -- NPD -----------------------------------------------------------------------------------------------


def test_npd_keeps_the_candidate_the_teacher_scores_highest():
    torch.manual_seed(2)
    model, teacher = FakeFlowSeq(), FakeTeacher()
    l, r = 2, 5
    gen = FlowSeqGenerator([model], DICT, cfg(decoding="npd", length_candidates=l, samples=r, temperature=1.0),
                           teacher=teacher)  # fmt: skip
    hypos = gen.generate([model], batch(*SENTENCES))
    check_hypothesis_format(hypos)
    # memory: neither the decoder nor the teacher ever holds the log-probs of all B x l x r candidates at once;
    # they go in chunks of at most B candidates, each candidate exactly once
    bsz = len(SENTENCES)
    assert sum(teacher.decoder.rows) == sum(model.decode_rows) == bsz * l * r
    assert max(teacher.decoder.rows) <= bsz and max(model.decode_rows) <= bsz
    refs = candidate_references(model, SENTENCES, l, r, model.prior.received_eps[0])
    flowseq_would_differ = False
    for out, cands in zip(hypos, refs):
        ref = best_per_hypothesis(cands, lambda cand: cand[1])  # FlowSeq's own scores
        teacher_scores = {t: teacher.sequence_log_prob(torch.tensor(t)) for t in ref}
        assert {tuple(h["tokens"].tolist()) for h in out} == set(ref)
        for h in out:
            key = tuple(h["tokens"].tolist())
            assert h["positional_scores"].sum().item() == pytest.approx(teacher_scores[key], abs=1e-5)
            assert h["score"].item() == pytest.approx(teacher_scores[key] / len(key), abs=1e-5)
        best = max(teacher_scores, key=teacher_scores.get)
        assert tuple(out[0]["tokens"].tolist()) == best
        flowseq_would_differ |= best != max(ref, key=ref.get)
    assert flowseq_would_differ  # the teacher, not FlowSeq's own score, made the choice


# -- pieces and validation -----------------------------------------------------------------------------


def test_strip_eos_padding_by_hand():
    a, e, x = word(1), EOS, PAD
    tokens = torch.tensor([[a, e, a, e, e, x], [a, a, a, a, a, a], [e, e, e, e, x, x]])
    lp = torch.tensor([[-1.0, -2, -3, -4, -5, 0], [-1.0] * 6, [-1.0, -1, -1, -1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 1, 0, 0]]).bool()
    hyp, scores, lengths = strip_eos_padding(tokens, lp, mask, EOS, PAD)
    assert lengths.tolist() == [4, 7, 1]
    assert hyp[0, :4].tolist() == [a, e, a, e] and hyp[0, 4:].eq(PAD).all()  # an inner EOS is kept
    assert scores[0, :4].tolist() == [-1.0, -2.0, -3.0, -9.0]  # the EOS carries -4 + -5
    assert hyp[1].tolist() == [a] * 6 + [e] and scores[1, 6].item() == 0.0  # no EOS position left: log 1
    assert hyp[2, 0].item() == e and scores[2, 0].item() == -4.0 and hyp[2, 1:].eq(PAD).all()


@pytest.mark.parametrize(
    "options, flag",
    [
        (dict(samples=3), "--flowseq-samples"),
        (dict(length_candidates=2), "--flowseq-length-candidates"),
        (dict(temperature=0.5), "--flowseq-temperature"),
        (dict(decoding="sample", samples=5), "--flowseq-temperature"),
        (dict(decoding="iwd", length_candidates=3, samples=2), "--flowseq-temperature"),
        (dict(decoding="iwd", length_candidates=3, iwd_samples=0), "--flowseq-iwd-samples"),
        (dict(decoding="npd", length_candidates=3), "--flowseq-teacher-path"),
        (dict(decoding="npd", temperature=0.3, teacher_path="t.pt"), "--flowseq-length-candidates"),
        (dict(decoding="iwd", length_candidates=2, teacher_path="t.pt"), "--flowseq-teacher-path"),
        (dict(decoding="sample"), "--flowseq-decoding argmax"),
        (dict(decoding="sample", length_candidates=0), "--flowseq-length-candidates"),
        (dict(decoding="sample", temperature=-1.0), "--flowseq-temperature"),
    ],
)  # fmt: skip
def test_pointless_or_impossible_options_are_refused_by_name(options, flag):
    with pytest.raises(ValueError, match=flag):
        validate_generation_config(cfg(**options))


@pytest.mark.parametrize(
    "valid,invalid_neighbour",
    [
        (dict(), dict(temperature=0.5)),
        (dict(decoding="sample", temperature=0.5), dict(decoding="sample", temperature=-0.5)),
        (dict(decoding="sample", length_candidates=3), dict(decoding="sample", length_candidates=0)),
        (dict(decoding="iwd", length_candidates=3, samples=5, temperature=0.3, iwd_samples=1),
         dict(decoding="iwd", length_candidates=3, samples=5, temperature=0.3, iwd_samples=0)),
        (dict(decoding="npd", length_candidates=3, samples=5, temperature=0.3, teacher_path="t.pt"),
         dict(decoding="npd", length_candidates=3, samples=5, temperature=0.3)),
    ],
)  # fmt: skip
def test_valid_options_pass_and_their_invalid_neighbours_do_not(valid, invalid_neighbour):
    """Each accepted configuration differs in one field from a refused one: the validator draws the line
    between them, not merely accepts everything."""
    assert validate_generation_config(cfg(**valid)) is None
    with pytest.raises(ValueError, match="--flowseq-"):
        validate_generation_config(cfg(**invalid_neighbour))


def test_a_teacher_given_elsewhere_and_a_bare_namespace_are_accepted():
    assert validate_generation_config(cfg(decoding="npd", length_candidates=2), teacher_given=True) is None
    with pytest.raises(ValueError, match="--flowseq-teacher-path"):
        validate_generation_config(cfg(decoding="npd", length_candidates=2), teacher_given=False)
    assert validate_generation_config(Namespace(flowseq_decoding="argmax", flowseq_temperature=0.0)) is None


def test_missing_teacher_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--flowseq-teacher-path"):
        load_teacher(str(tmp_path / "nope.pt"), DICT)
    with pytest.raises(FileNotFoundError, match="--flowseq-teacher-path"):
        model = FakeFlowSeq()
        FlowSeqGenerator([model], DICT, cfg(decoding="npd", length_candidates=2, teacher_path=str(tmp_path / "x.pt")))


# -- the real (untrained) flowseq_tiny in-process -------------------------------------------------------


@functools.lru_cache(maxsize=None)
def dictionary_dir(num_symbols):
    """One data directory (only the dictionaries: nothing else is read) per vocabulary size."""

    data_dir = tempfile.mkdtemp(prefix="flowseq_generator_test_")
    tiny.write_dictionary(data_dir, num_symbols)
    return data_dir


def build_real_flowseq(num_symbols=10, seed=0, flags=()):
    """An untrained flowseq_tiny and its task, parsed as fairseq-train parses the flags (the task's
    ``--flowseq-*`` decoding flags among them)."""
    from fairseq import options, tasks

    torch.manual_seed(seed)
    data_dir = dictionary_dir(num_symbols)
    argv = [data_dir, "--user-dir", cli.USER_DIR, "--cpu", "--task", "translation_flowseq", "-s", "src", "-t", "tgt",
            "--arch", "flowseq_tiny", "--criterion", "flowseq_loss", *flags]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    model.eval()
    return task, model, data_dir


REAL_PAIRS = [([1, 2, 3], [3, 2, 1]), ([4, 5, 6, 7, 8, 1, 2], [2, 1, 8, 7, 6, 5, 4]), ([2, 3], [3, 2])]


def real_batch(task, pairs):

    return tiny.translation_batch(task, pairs, given_order=True)


def test_real_model_sentences_decode_the_same_alone_and_in_a_batch():
    task, model, _ = build_real_flowseq()
    for options in [dict(), dict(decoding="sample", length_candidates=3)]:  # deterministic: eps = 0
        gen = FlowSeqGenerator([model], task.target_dictionary, cfg(**options))
        together = gen.generate([model], real_batch(task, REAL_PAIRS))
        check_hypothesis_format(together)
        for i, pair in enumerate(REAL_PAIRS):
            alone = gen.generate([model], real_batch(task, [pair]))[0]
            assert [h["tokens"].tolist() for h in together[i]] == [h["tokens"].tolist() for h in alone]
            for a, b in zip(together[i], alone):
                assert torch.allclose(a["positional_scores"], b["positional_scores"], atol=1e-4)


def perturb_prior_(model, seed):
    """Moves the prior off its (near-identity) init so that decoding depends on every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prior.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def hypotheses(out):
    return [[(h["tokens"].tolist(), h["positional_scores"].tolist()) for h in sentence] for sentence in out]


@pytest.mark.parametrize("options", [dict(), dict(decoding="iwd", length_candidates=2, samples=2, temperature=0.5)])
def test_real_model_decoding_with_cached_inverses_equals_decoding_without(options):
    from fairseq_ext.modules.flows import InvertibleMultiHeadLinear, inverse_cache

    task, model, _ = build_real_flowseq()
    perturb_prior_(model, 0)
    gen = FlowSeqGenerator([model], task.target_dictionary, cfg(**options))
    sample = real_batch(task, REAL_PAIRS)
    linears = [m for m in model.prior.modules() if isinstance(m, InvertibleMultiHeadLinear)]

    def run(cache):
        torch.manual_seed(5)
        with inverse_cache(cache):
            return hypotheses(gen.generate([model], sample))

    uncached = run(False)
    assert run(True) == uncached
    caches = [m._cache for m in linears]
    assert all(c is not None for c in caches)
    model.train()  # a training phase in between (e.g. --eval-bleu during training) ...
    model.eval()
    assert run(True) == uncached  # ... keeps the inverses: the next batch reuses them
    assert all(m._cache is c for m, c in zip(linears, caches))
    # a weight change (an optimiser step writes through .data) is seen at once
    with torch.no_grad():
        for m in linears:
            m.weight.data.mul_(1.3)
    changed = run(True)
    assert changed == run(False) and all(m._cache is not c for m, c in zip(linears, caches))


def test_real_model_npd_teacher_scores_match_fairseqs_sequence_scorer():
    from fairseq.data import data_utils
    from fairseq.sequence_scorer import SequenceScorer


    task, model, _ = build_real_flowseq()
    _, teacher, _ = tiny.build("transformer", ["--criterion", "cross_entropy"], num_symbols=10)
    teacher.eval()
    assert teacher.decoder.dictionary.symbols == task.target_dictionary.symbols
    torch.manual_seed(3)
    gen = FlowSeqGenerator([model], task.target_dictionary, cfg(decoding="npd", length_candidates=2, samples=3,
                                                               temperature=0.5), teacher=teacher)  # fmt: skip
    sample = real_batch(task, REAL_PAIRS)
    hypos = gen.generate([model], sample)
    check_hypothesis_format(hypos)
    scorer = SequenceScorer(task.target_dictionary)
    d = task.target_dictionary
    for i, sentence in enumerate(hypos):
        targets = [h["tokens"] for h in sentence]
        n = len(targets)
        src = sample["net_input"]["src_tokens"][i : i + 1].expand(n, -1)
        scored = scorer.generate([teacher], {
            "net_input": {"src_tokens": src, "src_lengths": sample["net_input"]["src_lengths"][i : i + 1].expand(n),
                          "prev_output_tokens": data_utils.collate_tokens(targets, d.pad(), d.eos(),
                                                                          move_eos_to_beginning=True)},
            "target": data_utils.collate_tokens(targets, d.pad(), d.eos()),
        })  # fmt: skip
        for h, ref in zip(sentence, scored):
            assert torch.allclose(h["positional_scores"], ref[0]["positional_scores"], atol=1e-4)
        totals = [h["positional_scores"].sum().item() for h in sentence]
        assert totals == sorted(totals, reverse=True)  # ranked by the teacher's summed log-likelihood


@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_real_model_the_task_flag_sets_the_prior_noise_scale(temperature):
    """--flowseq-temperature, through the task's generator, is the standard deviation of the noise the real
    prior inverts (the latent before the flow)."""
    flags = ["--flowseq-decoding", "sample", "--flowseq-length-candidates", "2", "--flowseq-samples", "8",
             "--flowseq-temperature", str(temperature)]  # fmt: skip
    task, model, _ = build_real_flowseq(flags=flags)
    received = []
    original = model.prior.sample

    def recording(eps, mask, src, src_mask):
        received.append((eps.clone(), mask.bool().clone()))
        return original(eps, mask, src, src_mask)

    model.prior.sample = recording
    torch.manual_seed(6)
    hypos = task.build_generator([model], None).generate([model], real_batch(task, REAL_PAIRS))
    check_hypothesis_format(hypos)
    (eps, mask), = received
    assert eps.shape[0] == len(REAL_PAIRS) * 2 * 8 and eps.shape[2] == model.latent_dim
    assert eps[~mask].abs().sum() == 0
    assert_centred_normal(eps[mask], temperature)
    # temperature 0 (argmax decoding): eps = 0 exactly
    received.clear()
    task0, _, _ = build_real_flowseq()
    task0.build_generator([model], None).generate([model], real_batch(task, REAL_PAIRS))
    assert received[0][0].abs().sum() == 0


def test_real_model_iwd_scores_are_the_papers_estimate_from_k_random_posterior_draws():
    """Ma et al., FlowSeq, section 3.6 on the real flowseq_tiny: the K posterior draws per candidate are random
    (distinct, standardised residuals N(0, 1)), and each hypothesis's score is
    [log (1/K) sum_k P(y|z_k,x) p(z_k|x) / q(z_k|y,x) + log P(len|x)] / len, recomputed here from the draws."""
    task, model, _ = build_real_flowseq()
    tiny.perturb_flowseq_posterior(model)
    draws = []
    original = model.posterior

    def recording(tokens, mask, src, src_mask, n_samples=1, random=True):
        z, log_q = original(tokens, mask, src, src_mask, n_samples, random)
        draws.append((tokens.clone(), mask.bool().clone(), src, src_mask, z.clone()))
        return z, log_q

    model.posterior = recording
    l, r, k = 2, 3, 4
    torch.manual_seed(7)
    gen = FlowSeqGenerator([model], task.target_dictionary, cfg(decoding="iwd", length_candidates=l, samples=r,
                                                               temperature=0.5, iwd_samples=k))  # fmt: skip
    sample = real_batch(task, REAL_PAIRS)
    hypos = gen.generate([model], sample)
    check_hypothesis_format(hypos)
    assert len(draws) == k
    tokens, mask, src, src_mask, _ = draws[0]  # N x T: every candidate, EOS-padded to its length
    n_cand = len(REAL_PAIRS) * l * r
    assert tokens.size(0) == n_cand and all(torch.equal(d[0], tokens) for d in draws)
    with torch.no_grad():
        mu, logvar = model.posterior_params(tokens, mask.float(), src, src_mask)  # N x T x F
        std = torch.exp(0.5 * logvar)
        zs = torch.stack([d[4] for d in draws])  # K x N x T x F
        for a in range(k):
            for b in range(a + 1, k):
                assert ((zs[a] - zs[b]).abs()[mask] > 0).all(), (a, b)
        assert_centred_normal(((zs - mu) / std)[:, mask], 1.0)
        log_w = []
        for z in zs:
            log_p_y = (model.decode(z, mask.float(), src, src_mask).gather(-1, tokens[..., None]).squeeze(-1)
                       * mask).sum(-1)  # fmt: skip
            log_p_z = model.prior.log_prob(z, mask.float(), src, src_mask)
            log_q = (torch.distributions.Normal(mu, std).log_prob(z).sum(-1) * mask).sum(-1)
            log_w.append(log_p_y + log_p_z - log_q)
        iw = torch.logsumexp(torch.stack(log_w, 1), 1) - math.log(k)  # N
        enc = model.encode(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
        len_lp, len_values = model.length_log_probs(*enc)  # B x C
    lengths = mask.sum(1)  # N
    sentence = torch.arange(n_cand) // (l * r)
    cand_len_lp = len_lp[sentence].gather(1, (len_values[sentence] == lengths[:, None]).float().argmax(1)[:, None])
    expected = (iw + cand_len_lp.squeeze(1)) / lengths  # N
    for b, out in enumerate(hypos):
        mine = expected[b * l * r:(b + 1) * l * r]
        assert out[0]["score"].item() == pytest.approx(mine.max().item(), abs=1e-4)
        for h in out:
            assert (mine - h["score"]).abs().min() < 1e-4


def test_decoding_under_the_translation_task_names_the_flowseq_task():
    """fairseq-generate without --task translation_flowseq builds fairseq's SequenceGenerator (or, with
    --score-reference, its SequenceScorer), which calls the model as an autoregressive decoder."""
    from fairseq import options
    from fairseq.sequence_generator import SequenceGenerator
    from fairseq.sequence_scorer import SequenceScorer


    data_dir = dictionary_dir(10)
    task, model, _ = tiny.build("flowseq_tiny", ["--criterion", "flowseq_loss"], num_symbols=10, data_dir=data_dir)
    assert type(task).__name__ == "TranslationTask"
    model.eval()
    args = options.parse_args_and_arch(options.get_generation_parser(), [data_dir, "--user-dir", cli.USER_DIR,
                                                                         "--path", "unused.pt", "--beam", "2"])
    generator = task.build_generator([model], args)
    assert isinstance(generator, SequenceGenerator)
    sample = real_batch(task, REAL_PAIRS)
    with pytest.raises(ValueError, match="--task translation_flowseq"):
        generator.generate([model], sample)
    with pytest.raises(ValueError, match="--task translation_flowseq"):
        SequenceScorer(task.target_dictionary).generate([model], sample)


# -- the real model through fairseq-generate -----------------------------------------------------------

TINY_FLOWSEQ = ["--task", "translation_flowseq", "--arch", "flowseq_tiny"]


@pytest.fixture(scope="module")
def flowseq_checkpoint(reverse_data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("flowseq_ckpt"))
    cli.train(reverse_data_bin, save, [*TINY_FLOWSEQ, "--criterion", "flowseq_loss", "--max-update", "3",
                                       "--max-tokens", "500"])  # fmt: skip
    return os.path.join(save, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def teacher_checkpoint(reverse_data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("teacher_ckpt"))
    cli.train(reverse_data_bin, save, ["--task", "translation", *cli.TINY_TRANSFORMER, "--criterion",
                                       "cross_entropy", "--max-update", "3", "--max-tokens", "500"])  # fmt: skip
    return os.path.join(save, "checkpoint_last.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["--flowseq-decoding", "argmax"],
        ["--flowseq-decoding", "sample", "--flowseq-length-candidates", "2", "--flowseq-samples", "2",
         "--flowseq-temperature", "0.5"],
        ["--flowseq-decoding", "npd", "--flowseq-length-candidates", "2", "--flowseq-samples", "2",
         "--flowseq-temperature", "0.5"],
        ["--flowseq-decoding", "iwd", "--flowseq-length-candidates", "2", "--flowseq-samples", "2",
         "--flowseq-temperature", "0.5", "--flowseq-iwd-samples", "2"],
    ],
    ids=["argmax", "sample", "npd", "iwd"],
)  # fmt: skip
def test_fairseq_generate_decodes_every_sentence(reverse_data_bin, flowseq_checkpoint, teacher_checkpoint, flags):
    if "npd" in flags:
        flags = flags + ["--flowseq-teacher-path", teacher_checkpoint]
    out = cli.generate(reverse_data_bin, flowseq_checkpoint, ["--task", "translation_flowseq", *flags, "--nbest", "2"])
    # cli.generate already checked one hypothesis per test sentence; each has a finite score
    scores = [float(line.split("\t")[1]) for line in out.splitlines() if line.startswith("H-")]
    assert scores and all(math.isfinite(s) for s in scores)


@pytest.mark.slow
def test_fairseq_generate_without_the_flowseq_task_says_which_task_to_use(reverse_data_bin, flowseq_checkpoint):
    args = [reverse_data_bin, "--path", flowseq_checkpoint, "--cpu", "--gen-subset", "test", "--batch-size", "8",
            "--required-batch-size-multiple", "1", "--num-workers", "0"]  # fmt: skip
    for extra in ([], ["--score-reference"]):  # fairseq's SequenceGenerator, then its SequenceScorer
        out = cli.run_cli("fairseq-generate", args + extra, check=False)
        assert "--task translation_flowseq" in out and "TypeError" not in out, out[-3000:]
        assert not any(line.startswith("H-") for line in out.splitlines())


@pytest.mark.slow
def test_bad_teacher_checkpoints_fail_before_decoding(reverse_data_bin, flowseq_checkpoint, teacher_checkpoint):
    # in-process: a teacher on other dictionaries (either side), and a non-autoregressive one (a missing file:
    # test_missing_teacher_checkpoint_is_named)
    src_dict, tgt_dict = (Dictionary.load(os.path.join(reverse_data_bin, f"dict.{s}.txt")) for s in ("src", "tgt"))
    other = make_dictionary(30)  # a 30-word vocabulary instead of the data's 20
    assert load_teacher(teacher_checkpoint, tgt_dict, src_dict) is not None
    with pytest.raises(ValueError, match="--flowseq-teacher-path .* target dictionary differs"):
        load_teacher(teacher_checkpoint, other, src_dict)
    with pytest.raises(ValueError, match="--flowseq-teacher-path .* source dictionary differs"):
        load_teacher(teacher_checkpoint, tgt_dict, other)
    with pytest.raises(ValueError, match="--flowseq-teacher-path .* not an autoregressive"):
        load_teacher(flowseq_checkpoint, tgt_dict, src_dict)
    # and through fairseq-generate: the generator is built, and refuses the teacher, before any decoding
    args = [reverse_data_bin, "--path", flowseq_checkpoint, "--cpu", "--gen-subset", "test", "--batch-size", "8",
            "--required-batch-size-multiple", "1", "--task", "translation_flowseq", "--flowseq-decoding", "npd",
            "--flowseq-length-candidates", "2", "--flowseq-samples", "2", "--flowseq-temperature", "0.5",
            "--flowseq-teacher-path", flowseq_checkpoint]  # fmt: skip
    out = cli.run_cli("fairseq-generate", args, check=False)
    assert "--flowseq-teacher-path" in out and "not an autoregressive" in out, out[-3000:]
    assert not any(line.startswith("H-") for line in out.splitlines())
