"""FlowSeq model, ELBO criterion and task: unit tests on a tiny model (flowseq_tiny: width 16,
latent 8, a 3-scale prior with one step per scale, so length_unit 4)."""
import functools
import math
import tempfile

import pytest
import torch
from fairseq import options, tasks
from torch import nn

from fairseq_ext.criterions.flowseq_loss import in_pretraining, kl_weight, masked_label_smoothed_nll
from fairseq_ext.models import flowseq as flowseq_module
from fairseq_ext.models.flowseq import (
    length_classes,
    length_target_class,
    pad_to_length_unit,
    parse_prior_steps,
)
from fairseq_ext.testing import tiny
from fairseq_ext.testing.cli import USER_DIR

PAIRS = [([1, 2, 3], [3, 2, 1]), ([4, 5, 6, 7, 8, 1, 2], [2, 1, 8, 7, 6, 5, 4]), ([2, 3], [3, 2, 4, 5, 6])]


@functools.lru_cache(maxsize=None)
def dictionary_dir(num_symbols):
    """One data directory (only the dictionaries: nothing is read from disk but them) per vocabulary size."""
    data_dir = tempfile.mkdtemp(prefix="flowseq_test_")
    tiny.write_dictionary(data_dir, num_symbols)
    return data_dir


def build(flags=(), arch="flowseq_tiny", num_symbols=10, seed=0):
    """(task, model, criterion) for --task translation_flowseq, parsed as fairseq-train parses it."""
    torch.manual_seed(seed)
    argv = [dictionary_dir(num_symbols), "--user-dir", USER_DIR, "--cpu", "--task", "translation_flowseq", "-s", "src",
            "-t", "tgt", "--arch", arch, "--criterion", "flowseq_loss", *flags]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    criterion = task.build_criterion(args)
    return task, model, criterion


def batch(task, pairs=PAIRS):
    return tiny.translation_batch(task, pairs, given_order=True)


def encoded(model, sample):
    src, src_mask = model.encode(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
    tokens, mask = model.target_positions(sample["target"])
    return src, src_mask, tokens, mask


class StandardNormalPrior(nn.Module):
    """A stand-in prior p(z|x) = N(0, I), for which KL(q || p) has a closed form."""

    length_unit = 4

    def log_prob(self, z, mask, src=None, src_mask=None):
        return (torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) * mask.float()).sum(-1)


class FakeOptimizer:
    """The three FairseqOptimizer calls a task makes, around torch's AdamW (with weight decay, which
    would move any parameter that has a gradient, even a zero one)."""

    def __init__(self, params):
        self.opt = torch.optim.AdamW(list(params), lr=0.01, weight_decay=0.1)

    def backward(self, loss):
        loss.backward()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def step(self):
        self.opt.step()


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- helpers ---------------------------------------------------------------------------------------
def test_pad_to_length_unit_appends_eos_up_to_the_next_multiple():
    pad, eos = 1, 2
    tokens = torch.tensor([[5, 6, 2, 1, 1, 1], [5, 6, 7, 8, 2, 1], [5, 6, 7, 2, 1, 1]])  # lengths 3, 5, 4
    out, mask = pad_to_length_unit(tokens, pad, eos, unit=4)
    assert out.tolist() == [[5, 6, 2, 2, 1, 1, 1, 1], [5, 6, 7, 8, 2, 2, 2, 2], [5, 6, 7, 2, 1, 1, 1, 1]]
    assert mask.sum(1).tolist() == [4, 8, 4]
    assert mask.tolist()[0] == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="right-padded"):
        pad_to_length_unit(torch.tensor([[1, 5, 2]]), pad, eos, unit=4)


def test_length_classes_mask_non_multiples_short_and_too_long_lengths():
    lengths, valid = length_classes(torch.tensor([3, 10]), length_range=5, unit=4, max_length=12)
    assert lengths[0].tolist() == list(range(-2, 9)) and lengths[1].tolist() == list(range(5, 16))
    assert lengths[0][valid[0]].tolist() == [4, 8]  # not 0 (< 1), not -2..8 non-multiples
    assert lengths[1][valid[1]].tolist() == [8, 12]  # 16 would exceed max_length and the range
    # in range: the class itself; out of range: the nearest valid class
    target = length_target_class(torch.tensor([8, 40]), lengths, valid)
    assert lengths[0, target[0]] == 8 and lengths[1, target[1]] == 12


def test_model_length_log_probs_are_masked_and_normalised():
    task, model, _ = build()
    model.eval()
    src, src_mask, _, _ = encoded(model, batch(task))
    log_probs, lengths = model.length_log_probs(src, src_mask)  # B x C
    assert log_probs.shape == (3, 2 * 8 + 1)
    expected_valid = (lengths % model.length_unit == 0) & (lengths >= 1)
    assert torch.equal(torch.isfinite(log_probs), expected_valid)
    assert torch.allclose(torch.logsumexp(log_probs, -1), torch.zeros(3), atol=1e-5)
    src_lengths = src_mask.sum(1).long()
    assert torch.equal(lengths - src_lengths[:, None], torch.arange(-8, 9).expand(3, -1))


def test_length_label_smoothing_ignores_the_masked_classes():
    valid = torch.tensor([[True, False, True, True, False]])
    log_probs = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25, 0.0]]))
    target = torch.tensor([0])
    loss0, nll = masked_label_smoothed_nll(log_probs, target, valid, 0.0)
    assert loss0.item() == pytest.approx(math.log(2)) and nll.item() == pytest.approx(math.log(2))
    loss, _ = masked_label_smoothed_nll(log_probs, target, valid, 0.3)
    smooth = (math.log(2) + 2 * math.log(4)) / 3  # uniform over the 3 valid classes only
    assert loss.item() == pytest.approx(0.7 * math.log(2) + 0.3 * smooth)


def test_prior_steps_parser_names_the_flag():
    assert parse_prior_steps("48,48,16") == [48, 48, 16]
    for bad in ("48,x", "", "4,0", "-1"):
        with pytest.raises(ValueError, match="--flowseq-prior-steps"):
            parse_prior_steps(bad)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--flowseq-length-range", "0"], "--flowseq-length-range"),
        (["--flowseq-length-range", "2"], "--flowseq-length-range"),  # < length_unit - 1 = 3
        (["--flowseq-prior-steps", "1,,1"], "--flowseq-prior-steps"),
        (["--flowseq-posterior-token-dropout", "1.0"], "--flowseq-posterior-token-dropout"),
        (["--flowseq-latent-dim", "7"], "--flowseq-latent-dim"),
        (["--flowseq-posterior-samples", "0"], "--flowseq-posterior-samples"),
        (["--flowseq-kl-warmup-updates", "-1"], "--flowseq-kl-warmup-updates"),
        (["--flowseq-inject-nonfinite", "a"], "--flowseq-inject-nonfinite"),
        (["--label-smoothing", "1.0"], r"--label-smoothing 1.0 is outside \[0, 1\)"),
        (["--label-smoothing", "-0.1"], r"--label-smoothing -0.1 is outside \[0, 1\)"),
        (["--flowseq-length-label-smoothing", "1.5"], r"--flowseq-length-label-smoothing 1.5 is outside"),
    ],
)
def test_impossible_flags_are_refused_at_build_time(flags, match):
    with pytest.raises(ValueError, match=match):
        build(flags)


def test_non_flowseq_arch_and_criterion_are_refused():
    with pytest.raises(ValueError, match="--arch"):
        build(arch="transformer")
    with pytest.raises(ValueError, match="--criterion flowseq_loss"):
        build(["--criterion", "cross_entropy"])
    # the criterion itself, given another model (e.g. under another task)
    task, _, criterion = build()
    _, transformer, _ = tiny.build("transformer", ["--criterion", "cross_entropy"], num_symbols=10)
    with pytest.raises(ValueError, match="--arch"):
        criterion(transformer, batch(task))


# -- posterior ---------------------------------------------------------------------------------------
def test_posterior_starts_as_a_standard_normal():
    task, model, _ = build()
    model.train()
    src, src_mask, tokens, mask = encoded(model, batch(task))
    mu, logvar = model.posterior_params(tokens, mask, src, src_mask)
    assert mu.abs().max().item() == 0.0 and logvar.abs().max().item() == 0.0
    feats = model.latent_dim
    z, log_q = model.posterior(tokens, mask, src, src_mask, n_samples=2, random=False)
    assert z.abs().max().item() == 0.0
    expected = (-0.5 * math.log(2 * math.pi) * feats * mask.sum(1)).repeat_interleave(2)
    assert torch.allclose(log_q, expected)
    z, log_q = model.posterior(tokens, mask, src, src_mask, n_samples=3, random=True)
    m = mask.repeat_interleave(3, 0)
    reference = (torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) * m).sum(-1)
    assert torch.allclose(log_q, reference, atol=1e-4)
    assert z[~m.bool()].abs().max().item() == 0.0  # padded positions are zero


def test_posterior_samples_are_sentence_major_and_log_q_is_their_gaussian_density():
    task, model, _ = build()
    tiny.perturb_flowseq_posterior(model)
    model.eval()
    src, src_mask, tokens, mask = encoded(model, batch(task))
    mu, logvar = model.posterior_params(tokens, mask, src, src_mask)  # B x T x F
    n = 5
    z, log_q = model.posterior(tokens, mask, src, src_mask, n_samples=n, random=True)
    normal = torch.distributions.Normal(mu.repeat_interleave(n, 0), torch.exp(0.5 * logvar).repeat_interleave(n, 0))
    m = mask.repeat_interleave(n, 0)
    assert torch.allclose(log_q, (normal.log_prob(z).sum(-1) * m).sum(-1), atol=1e-4)
    z_mean, _ = model.posterior(tokens, mask, src, src_mask, n_samples=n, random=False)
    for b in range(3):
        for j in range(n):
            assert torch.equal(z_mean[b * n + j], mu[b])
    src_n, src_mask_n = model.expand_source(src, src_mask, n)
    assert torch.equal(src_n[n:2 * n], src[1:2].expand(n, -1, -1)) and torch.equal(src_mask_n[2 * n], src_mask[2])


# -- the KL term -------------------------------------------------------------------------------------
def test_kl_term_matches_the_closed_form_by_monte_carlo():
    """With a N(0, I) prior, the mean over k samples of log q - log p tends to the closed-form KL."""
    task, model, criterion = build(["--flowseq-posterior-samples", "3000", "--flowseq-init-updates", "0"])
    tiny.perturb_flowseq_posterior(model)
    model.prior = StandardNormalPrior()
    model.prior_initialized_flag.fill_(1)
    model.eval()
    sample = batch(task)
    torch.manual_seed(11)
    k = 3000
    with torch.no_grad():
        out = model(**sample["net_input"], target=sample["target"], n_samples=k)
        kl = criterion.compute_terms(out, k)["kl"]  # B
        src, src_mask, tokens, mask = encoded(model, sample)
        mu, logvar = model.posterior_params(tokens, mask, src, src_mask)
    closed = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1) * mask).sum(-1)  # B
    assert closed.min() > 1.0  # a non-trivial posterior
    assert torch.allclose(kl, closed, rtol=0.03, atol=0.05), (kl, closed)


def test_kl_term_with_the_flow_prior_equals_an_independent_monte_carlo_average():
    task, model, criterion = build(["--flowseq-posterior-samples", "64", "--flowseq-init-updates", "0"])
    tiny.perturb_flowseq_posterior(model)
    model.eval()
    sample = batch(task)
    src, src_mask, tokens, mask = encoded(model, sample)
    with torch.no_grad():
        z0, _ = model.posterior(tokens, mask, src, src_mask, 1)
        model.initialize_prior(z0, mask, src, src_mask)
        torch.manual_seed(5)
        out = model(**sample["net_input"], target=sample["target"], n_samples=64)
        kl = criterion.compute_terms(out, 64)["kl"]
        torch.manual_seed(5)  # the same draws, scored with torch.distributions and the prior directly
        mu, logvar = model.posterior_params(tokens, mask, src, src_mask)
        z, _ = model.posterior(tokens, mask, src, src_mask, 64)
        m = mask.repeat_interleave(64, 0)
        q = torch.distributions.Normal(mu.repeat_interleave(64, 0), torch.exp(0.5 * logvar).repeat_interleave(64, 0))
        log_q = (q.log_prob(z).sum(-1) * m).sum(-1)
        src_k, src_mask_k = model.expand_source(src, src_mask, 64)
        log_p = model.prior.log_prob(z, m, src_k, src_mask_k)
    assert torch.allclose(kl, (log_q - log_p).view(3, 64).mean(1), rtol=1e-4, atol=1e-3)


# -- the loss ----------------------------------------------------------------------------------------
def fixed_noise(x):
    """Batch-invariant 'noise': a function of (position, feature) only."""
    t = torch.arange(x.size(1), dtype=x.dtype)[:, None]
    f = torch.arange(x.size(2), dtype=x.dtype)[None, :]
    return torch.sin(1.3 * t + 0.7 * f + 0.1).expand_as(x).contiguous()


@pytest.mark.parametrize("phase", ["pretraining", "elbo"])
def test_loss_of_a_sentence_alone_equals_its_loss_in_a_padded_batch(monkeypatch, phase):
    monkeypatch.setattr(flowseq_module, "standard_normal_like", fixed_noise)
    flags = ["--flowseq-init-updates", "5" if phase == "pretraining" else "0", "--flowseq-kl-warmup-updates", "0"]
    task, model, criterion = build(flags)
    tiny.perturb_flowseq_posterior(model)
    model.train()  # the tiny model has no dropout
    criterion.set_num_updates(0)
    full = batch(task)
    losses, sample_size, log = criterion(model, full, reduce=False)  # B (the ELBO phase inits the prior here)
    assert model.prior_initialized == (phase == "elbo")
    total, total_size, _ = criterion(model, full)
    assert total.item() == pytest.approx(losses.sum().item(), rel=1e-5)
    assert total_size == sample_size == 4 + 8 + 8  # targets of 3, 7, 5 words + EOS, EOS-padded to multiples of 4
    if phase == "elbo":
        assert log["kl"] != 0.0
    for i, pair in enumerate(PAIRS):
        alone, _, _ = criterion(model, batch(task, [pair]), reduce=False)
        assert alone.item() == pytest.approx(losses[i].item(), rel=1e-4, abs=1e-4), (phase, i)


@pytest.mark.parametrize("positions", ["attn", "attn_z_keys", "add"])
def test_forward_shapes_with_several_posterior_samples(positions):
    task, model, _ = build(["--flowseq-decoder-positions", positions])
    model.eval()
    sample = batch(task)
    out = model(**sample["net_input"], target=sample["target"], n_samples=3, random=True, with_prior=False)
    tgt_len = out["positions"].size(1)
    assert tgt_len % model.length_unit == 0 and tgt_len == 8
    assert out["recon"]["lprobs"].shape == (9, tgt_len, len(task.target_dictionary))
    assert torch.allclose(out["recon"]["lprobs"].exp().sum(-1), torch.ones(9, tgt_len), atol=1e-5)
    assert out["kl"]["log_q"].shape == (9,) and out["kl"]["log_p"] is None
    assert torch.equal(out["recon"]["target"][3:6], out["recon"]["target"][4:5].expand(3, -1))


# -- the schedule ------------------------------------------------------------------------------------
def test_kl_weight_schedule():
    # 3 pre-training updates, 2 held at 0, then 4 of linear warm-up
    assert [kl_weight(u, 3, 2, 4) for u in range(11)] == [0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert kl_weight(3, 3, 0, 0) == 1.0 and kl_weight(2, 3, 0, 0) == 0.0
    assert kl_weight(0, 0, 0, 10000) == 1 / 10000  # the reference's min(1, (step + 1) / 10000)
    assert in_pretraining(2, 3) and not in_pretraining(3, 3)


def test_schedule_pretraining_freezes_the_prior_then_initialises_it_exactly_once():
    task, model, criterion = build(["--flowseq-init-updates", "2", "--flowseq-kl-warmup-updates", "2"])
    calls = []
    original_init = model.prior.init_from_data

    def counting_init(*args, **kwargs):
        calls.append(1)
        return original_init(*args, **kwargs)

    model.prior.init_from_data = counting_init
    optimizer = FakeOptimizer(model.parameters())
    sample = batch(task)
    prior_before, posterior_before = clone_state(model.prior), clone_state(model.posterior_net)
    weights = []
    for update in range(5):
        criterion.set_num_updates(update)
        _, _, log = task.train_step(sample, model, criterion, optimizer, update)
        if update < 2:
            assert all(p.grad is None for p in model.prior.parameters())
            # what legacy_ddp's all-reduce leaves: zero gradients (weight decay would act on them)
            for p in model.prior.parameters():
                p.grad = torch.zeros_like(p)
        task.optimizer_step(optimizer, model, update)
        optimizer.zero_grad()
        weights.append(log["kl_weight_sum"])
        if update < 2:
            assert log["kl"] == 0.0 and not model.prior_initialized and not calls
            assert same_state(model.prior.state_dict(), prior_before)
        else:
            assert model.prior_initialized and len(calls) == 1
    assert weights == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert not same_state(model.posterior_net.state_dict(), posterior_before)
    assert not same_state(model.prior.state_dict(), prior_before)
    # a model loaded from this one's state keeps the init: it never re-initialises
    _, reloaded, criterion2 = build(["--flowseq-init-updates", "2"], seed=1)
    reloaded.load_state_dict(model.state_dict())
    assert reloaded.prior_initialized
    reloaded.prior.init_from_data = lambda *a, **k: pytest.fail("re-initialised a loaded prior")
    criterion2.set_num_updates(7)
    reloaded.train()
    criterion2(reloaded, sample)


def test_a_non_finite_batch_is_skipped_and_counted():
    task, model, criterion = build(["--flowseq-init-updates", "0", "--flowseq-inject-nonfinite", "1"])
    optimizer = FakeOptimizer(model.parameters())
    sample = batch(task)
    criterion.set_num_updates(0)
    _, size, log = task.train_step(sample, model, criterion, optimizer, 0)
    assert log["nonfinite_skipped"] == 0 and size > 0
    task.optimizer_step(optimizer, model, 0)
    optimizer.zero_grad()
    before = clone_state(model)
    criterion.set_num_updates(1)
    loss, size, log = task.train_step(sample, model, criterion, optimizer, 1)
    assert not torch.isfinite(loss) and log["nonfinite_skipped"] == 1 and size == 0 and log["loss"] == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    task.optimizer_step(optimizer, model, 1)  # no step at all: Adam's momentum would move the weights
    assert same_state(model.state_dict(), before)


def test_additive_positions_and_tied_output_embeddings():
    task, model, criterion = build(["--flowseq-decoder-positions", "add", "--share-decoder-input-output-embed"])
    assert model.decoder.output_projection.weight is model.posterior_net.embed_tokens.weight
    assert not hasattr(model.decoder, "pos_attn")
    criterion.set_num_updates(0)
    model.train()
    loss, _, _ = criterion(model, batch(task))
    loss.backward()
    assert torch.isfinite(loss) and model.posterior_net.embed_tokens.weight.grad is not None


def test_a_checkpoint_of_the_earlier_prior_layout_is_refused_with_a_clear_message():
    _, model, _ = build()
    state = model.state_dict()
    # the earlier layout's keys (one coupling per step under prior.levels, prior.prior_couplings)
    old = {k: v for k, v in state.items() if not k.startswith("prior.")}
    old["prior.levels.0.0.actnorm.log_scale"] = torch.zeros(8)
    old["prior.prior_couplings.0.net.out_proj.bias"] = torch.zeros(8)
    with pytest.raises(ValueError, match="earlier prior layout"):
        model.load_state_dict(old)
    # its saved configuration (48,48,16 couplings per scale) is refused before a huge prior is built
    with pytest.raises(ValueError, match="earlier prior layout"):
        build(["--flowseq-prior-steps", "48,48,16"])
    model.load_state_dict(state)  # the current layout loads


def test_prior_parameter_count_at_the_papers_base_size_matches_the_reference():
    from fairseq_ext.modules.flow_prior import prior_parameter_count

    _, model, _ = build(["--flowseq-prior-steps", "4,4,2"], arch="flowseq_base")
    count = sum(p.numel() for p in model.prior.parameters())
    assert count == prior_parameter_count(256, 256, 512, 8, (4, 4, 2))
    # the reference's 51,710,336 less its weight-norm gains (one per coupling output)
    assert 51_710_336 - 50_000 < count < 51_710_336


def test_named_architectures_set_the_papers_sizes():
    from argparse import Namespace

    iwslt, base, large = Namespace(), Namespace(), Namespace()
    flowseq_module.flowseq_iwslt_de_en(iwslt)
    flowseq_module.flowseq_base(base)
    flowseq_module.flowseq_large(large)
    assert (iwslt.encoder_layers, iwslt.flowseq_posterior_layers, iwslt.decoder_layers) == (5, 3, 3)
    assert iwslt.encoder_attention_heads == iwslt.decoder_attention_heads == 4
    assert (base.encoder_layers, base.flowseq_posterior_layers, base.decoder_layers) == (6, 4, 4)
    assert (base.flowseq_latent_dim, base.flowseq_prior_hidden) == (256, 512)  # the paper's base 256 / 512
    assert (large.flowseq_latent_dim, large.flowseq_prior_hidden, large.encoder_layers) == (512, 1024, 6)
    # the reference implementation's 4, 4, 2 composite steps: the paper's 48, 48, 16 couplings
    assert flowseq_module.FlowSeqConfig().flowseq_prior_steps == "4,4,2"
    # a flag given on the command line wins over the architecture's default
    given = Namespace(encoder_layers=2)
    flowseq_module.flowseq_base(given)
    assert given.encoder_layers == 2


def test_sentence_avg_normalises_per_sentence():
    task, model, criterion = build(["--sentence-avg"])
    criterion.set_num_updates(0)
    _, sample_size, log = criterion(model, batch(task))
    assert sample_size == 3 and log["npositions"] == 20 and log["ntokens"] == 18


# -- the length target -------------------------------------------------------------------------------
def test_length_target_is_the_eos_padded_length_exactly():
    """Ma et al., FlowSeq, sections 3.4-3.5: the target is padded with EOS to a multiple of the length unit
    (4 for three scales), and the length predictor's class is that padded length minus the source length."""
    task, model, _ = build()
    model.eval()
    # (source words, target words): targets of 1 .. 11 words, i.e. 2 .. 12 tokens with their EOS
    pairs = [(list(range(max(1, n - 2))), [(i * 3) % 10 for i in range(n)]) for n in range(1, 12)]
    padded = [4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]  # ceil((n + 1) / 4) * 4, written out by hand
    sample = batch(task, pairs)
    with torch.no_grad():
        out = model(**sample["net_input"], target=sample["target"], random=False, with_prior=False)
    src_len = sample["net_input"]["src_lengths"]  # source words + EOS
    assert src_len.tolist() == [max(1, n - 2) + 1 for n in range(1, 12)]
    assert out["positions"].sum(1).long().tolist() == padded
    target = out["length"]["target"]  # B class indices, class c = target length S + (c - R)
    R = model.length_range
    assert target.tolist() == [p - s + R for p, s in zip(padded, src_len.tolist())]
    _, lengths = model.length_log_probs(*model.encode(sample["net_input"]["src_tokens"], src_len))
    assert lengths.gather(1, target[:, None]).squeeze(1).tolist() == padded
    assert out["length"]["valid"].gather(1, target[:, None]).all()


# -- non-causality -------------------------------------------------------------------------------------
def causal_dependence(fn, x, first_to_last: bool):
    """Gradient norm of a random projection of output position 0 (or the last) with respect to the input at
    the last position (or 0), relative to its own position's: 0 for a causal (or anti-causal) layer."""
    x = x.clone().requires_grad_(True)
    out = fn(x)  # 1 x T x ...
    w = torch.randn(out.shape[2:], generator=torch.Generator().manual_seed(0))
    src_pos, dst_pos = (x.size(1) - 1, 0) if first_to_last else (0, x.size(1) - 1)
    (grad,) = torch.autograd.grad((out[0, dst_pos] * w).sum(), x)
    return (grad[0, src_pos].norm() / grad[0, dst_pos].norm()).item()


@pytest.mark.parametrize(
    "flags",
    [["--flowseq-decoder-positions", "add"],  # only the Transformer layers mix positions
     ["--decoder-layers", "0"],  # only the positional attention mixes them
     []],
    ids=["layers", "positional-attention", "both"],
)  # fmt: skip
def test_decoder_is_not_causal(flags):
    """Ma et al., FlowSeq, section 3.3: P(y_t | z, x) sees every z_t' (no causal mask)."""
    task, model, _ = build(flags)
    model.eval()
    src, src_mask, _, mask = encoded(model, batch(task, [([1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1])]))
    z = torch.randn(1, mask.size(1), model.latent_dim, generator=torch.Generator().manual_seed(1))

    def decode(z_):
        return model.decode(z_, mask, src, src_mask)

    assert mask.sum() == 8
    assert causal_dependence(decode, z, first_to_last=True) > 1e-3
    assert causal_dependence(decode, z, first_to_last=False) > 1e-3


def test_posterior_is_not_causal():
    """q(z_t | y, x) depends on every target token (eq. 9; the posterior's layers have no causal mask):
    changing the LAST token moves mu and sigma at position 0, changing the first moves the last."""
    task, model, _ = build()
    tiny.perturb_flowseq_posterior(model)
    model.eval()
    sample = batch(task, [([1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1])])
    src, src_mask, tokens, mask = encoded(model, sample)
    assert tokens.size(1) == 8 and mask.all()
    with torch.no_grad():
        mu, logvar = model.posterior_params(tokens, mask, src, src_mask)
        for changed, watched in ((7, 0), (0, 7)):
            other = tokens.clone()
            other[0, changed] = 5 if tokens[0, changed] != 5 else 6
            mu2, logvar2 = model.posterior_params(other, mask, src, src_mask)
            assert (mu2[0, watched] - mu[0, watched]).abs().max() > 1e-4, (changed, watched)
            assert (logvar2[0, watched] - logvar[0, watched]).abs().max() > 1e-4, (changed, watched)


# -- the loss: its terms and the KL weight -------------------------------------------------------------
INIT, HOLD, WARMUP = 2, 1, 4
# w_KL by update count: pre-training (no KL) for INIT updates, held at 0 for HOLD, then WARMUP linear
# steps ending at exactly 1 on the last one (update INIT + HOLD + WARMUP - 1 = 6) and 1 for ever after
KL_WEIGHTS = {2: 0.0, 3: 0.25, 4: 0.5, 5: 0.75, 6: 1.0, 7: 1.0, 10**6: 1.0}


def independent_terms(model, sample, noise, label_smoothing, length_smoothing):
    """Per sentence (recon, log q - log p, length loss) of Ma et al., FlowSeq, eq. 8 and section 3.5, computed
    from the model's components with torch.distributions and fairseq's label-smoothing formula written out;
    z = mu + sigma * noise (noise = 0: the posterior mean of the pre-training phase)."""
    src, src_mask, tokens, mask = encoded(model, sample)  # B x S x D, B x S, B x T, B x T
    mu, logvar = model.posterior_params(tokens, mask, src, src_mask)  # B x T x F
    std = torch.exp(0.5 * logvar)
    z = (mu + std * noise) * mask[..., None]
    log_q = (torch.distributions.Normal(mu, std).log_prob(z).sum(-1) * mask).sum(-1)  # B
    log_p = model.prior.log_prob(z, mask, src, src_mask)  # B
    lprobs = model.decode(z, mask, src, src_mask)  # B x T x V
    nll = -lprobs.gather(-1, tokens[..., None]).squeeze(-1)  # B x T
    eps_i = label_smoothing / (lprobs.size(-1) - 1)
    recon = (((1 - label_smoothing - eps_i) * nll - eps_i * lprobs.sum(-1)) * mask).sum(-1)  # B
    length_lp, lengths = model.length_log_probs(src, src_mask)  # B x C
    target = (lengths == mask.sum(1, keepdim=True)).float().argmax(1)  # the class of the padded length
    valid = torch.isfinite(length_lp)
    smooth = -(length_lp.masked_fill(~valid, 0).sum(1) / valid.sum(1))
    length = (1 - length_smoothing) * -length_lp.gather(1, target[:, None]).squeeze(1) + length_smoothing * smooth
    return recon, log_q - log_p, length


def test_loss_is_recon_plus_weighted_kl_plus_length_and_the_weight_reaches_one(monkeypatch):
    monkeypatch.setattr(flowseq_module, "standard_normal_like", fixed_noise)
    ls, length_ls, length_weight = 0.1, 0.2, 0.7
    task, model, criterion = build(["--flowseq-init-updates", str(INIT), "--flowseq-kl-hold-updates", str(HOLD),
                                    "--flowseq-kl-warmup-updates", str(WARMUP), "--label-smoothing", str(ls),
                                    "--flowseq-length-label-smoothing", str(length_ls),
                                    "--flowseq-length-loss-weight", str(length_weight)])  # fmt: skip
    tiny.perturb_flowseq_posterior(model)
    model.train()  # flowseq_tiny has no dropout: train mode is deterministic
    sample = batch(task)

    def check(update, weight, noise):
        if update is not None:
            criterion.set_num_updates(update)
        losses, _, log = criterion(model, sample, reduce=False)
        with torch.no_grad():
            recon, kl, length = independent_terms(model, sample, noise, ls, length_ls)
        expected = recon + weight * kl + length_weight * length
        assert torch.allclose(losses.detach(), expected, rtol=1e-4, atol=1e-4), (update, losses, expected)
        assert log["kl_weight_sum"] == weight
        assert log["recon"] == pytest.approx(recon.sum().item(), rel=1e-4)
        assert log["length_loss"] == pytest.approx(length.sum().item(), rel=1e-4)
        return kl

    zero = torch.zeros(3, encoded(model, sample)[3].size(1), model.latent_dim)
    check(0, 0.0, zero)  # pre-training: the posterior mean, no KL term
    assert not model.prior_initialized
    noise = fixed_noise(zero)
    for update, weight in KL_WEIGHTS.items():  # the first ELBO update initialises the prior, then the terms hold
        kl = check(update, weight, noise)
        assert model.prior_initialized
    assert kl.abs().min() > 1.0  # a KL term large enough for a wrong weight to show
    model.eval()
    check(None, 1.0, noise)  # validation: the ELBO itself
