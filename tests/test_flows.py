"""FlowSeq's flow layers and multi-scale prior (Ma et al., FlowSeq, section 3.4): the usual flow invariants
(inverse(forward(z)) = z, forward + inverse log-det = 0, log-det = slogdet of the brute-force
Jacobian, padding untouched and invisible, no NaN/inf), actnorm's init over real positions, the
couplings' zero-init start, the multi-head linear's never-stale inverse, and Eq. (6) for the prior."""
import math

import pytest
import torch

from fairseq_ext.modules.flow_prior import MultiScalePrior
from fairseq_ext.modules.flows import (
    SPLITS,
    ActNorm,
    AffineCoupling,
    FlowStep,
    InvertibleMultiHeadLinear,
    merge,
    split,
    squeeze,
    standard_normal_log_prob,
    step_layout,
    unsqueeze,
)

C, H, HIDDEN, HEADS = 4, 6, 8, 2  # latent width, source width, coupling width, heads
DT = torch.float64

LAYERS = (
    ["actnorm", "linear_contiguous", "linear_strided"]
    + [f"coupling_{s}_{'up' if up else 'down'}" for s in SPLITS for up in (True, False)]
    + ["flow_step_0", "flow_step_1", "flow_step_2", "prior"]
)


def perturb_(module, generator):
    """Move every parameter off its init so that no layer is (near) the identity."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("out_proj.bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            elif name.endswith("log_scale") or name.endswith("actnorm.bias") or (name == "bias" and p.dim() == 1):
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            elif name.endswith("linear.weight") or (name == "weight" and p.dim() == 3):
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def build(name, seed=0, perturb=True):
    torch.manual_seed(seed)
    if name == "actnorm":
        layer = ActNorm(C)
    elif name.startswith("linear_"):
        layer = InvertibleMultiHeadLinear(C, HEADS, name[len("linear_"):])
    elif name.startswith("coupling_"):
        split_type, direction = name[len("coupling_"):].rsplit("_", 1)
        layer = AffineCoupling(C, H, HIDDEN, HEADS, split_type, 0.0, up=direction == "up")
    elif name.startswith("flow_step_"):
        head_layout, split_type, up = step_layout(int(name[len("flow_step_"):]))
        layer = FlowStep(C, H, HIDDEN, HEADS, split_type, up, head_layout)
    else:
        layer = MultiScalePrior(C, H, HIDDEN, HEADS, steps_per_level=(2, 1, 1))
    layer = layer.to(DT).eval()
    return perturb_(layer, torch.Generator().manual_seed(seed + 1)) if perturb else layer


def inputs(lengths, length, src_lengths=None, seed=0, scale=1.0):
    """z B x T x C, float mask B x T, src B x S x H, bool src_mask B x S (right padding)."""
    g = torch.Generator().manual_seed(seed)
    src_lengths = src_lengths or [3 + i % 3 for i in range(len(lengths))]
    z = scale * torch.randn(len(lengths), length, C, generator=g, dtype=DT)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).to(DT)
    src = torch.randn(len(lengths), max(src_lengths), H, generator=g, dtype=DT)
    src_mask = torch.arange(max(src_lengths))[None, :] < torch.tensor(src_lengths)[:, None]
    return z, mask, src, src_mask


# lengths are multiples of 4 (the prior's length unit); one full row, two padded ones
LENGTHS, T = [8, 4, 4], 8


# ------------------------------------------------------------------------------------------------
# the flow invariants, for every layer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_inverse_undoes_forward_and_logdets_cancel_with_padding(name):
    layer = build(name)
    z, mask, src, src_mask = inputs(LENGTHS, T)
    eps, ld = layer.forward(z, mask, src, src_mask)
    back, ld_inv = layer.inverse(eps, mask, src, src_mask)
    torch.testing.assert_close(back, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(3, dtype=DT), atol=1e-9, rtol=0)
    assert ld.shape == (3,) and ld.abs().min() > 1e-3  # perturbed: a real volume change
    # the other direction, from noise
    noise = torch.randn_like(z)
    sample, ld_inv = layer.inverse(noise, mask, src, src_mask)
    again, ld = layer.forward(sample, mask, src, src_mask)
    torch.testing.assert_close(again, noise, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(3, dtype=DT), atol=1e-9, rtol=0)


def brute_force_logdet(fn, z, mask):
    """slogdet of d out / d z over the real entries of a B = 1 input (flattened)."""
    real = mask[0].bool()

    def on_real(x):
        full = z.clone()
        full[0, real] = x.view(-1, z.size(-1))
        return fn(full)[0][0, real].reshape(-1)

    jac = torch.autograd.functional.jacobian(on_real, z[0, real].reshape(-1))
    return torch.linalg.slogdet(jac).logabsdet


@pytest.fixture
def float64_attention_softmax(monkeypatch):
    """fairseq's attention computes its softmax in float32 (``fairseq.utils.softmax``).  Through a
    composite flow that float32 backward puts ~1e-9 errors into the brute-force Jacobian's columns
    (each single coupling stays exactly triangular), so the float64 comparison uses a float64 softmax."""
    import fairseq.utils

    monkeypatch.setattr(fairseq.utils, "softmax", lambda x, dim, onnx_trace=False: torch.softmax(x, dim=dim))


@pytest.mark.parametrize("name", LAYERS)
def test_forward_logdet_is_the_slogdet_of_the_brute_force_jacobian(name, float64_attention_softmax):
    layer = build(name, seed=1)
    z, mask, src, src_mask = inputs([4], 8, seed=1)  # B = 1, 4 real steps of C = 4: a 16 x 16 Jacobian
    expected = brute_force_logdet(lambda x: layer.forward(x, mask, src, src_mask), z, mask)
    _, ld = layer.forward(z, mask, src, src_mask)
    torch.testing.assert_close(ld[0], expected, atol=1e-9, rtol=0)
    eps = layer.forward(z, mask, src, src_mask)[0]
    expected_inv = brute_force_logdet(lambda x: layer.inverse(x, mask, src, src_mask), eps, mask)
    torch.testing.assert_close(layer.inverse(eps, mask, src, src_mask)[1][0], expected_inv, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_padding_is_untouched_and_invisible(name):
    layer = build(name, seed=2)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=2)
    pad = ~mask.bool()
    src = src.masked_fill(~src_mask.unsqueeze(-1), 1e4)  # padded source entries must not matter either
    for direction in (layer.forward, layer.inverse):
        out, ld = direction(z, mask, src, src_mask)
        assert torch.equal(out[pad], z[pad])  # exactly what came in
        noisy = z.clone()
        noisy[pad] = 1e30 * torch.randn_like(noisy[pad])  # huge padding, even inf * 0 would be NaN
        noisy_src = src.masked_fill(~src_mask.unsqueeze(-1), -3e4)
        out2, ld2 = direction(noisy, mask, noisy_src, src_mask)
        assert torch.equal(out2[~pad], out[~pad])
        assert torch.equal(out2[pad], noisy[pad])
        assert torch.equal(ld2, ld)


@pytest.mark.parametrize("name", LAYERS)
def test_a_sentence_alone_equals_the_same_sentence_in_a_padded_batch(name):
    layer = build(name, seed=3)
    z, mask, src, src_mask = inputs([8, 4], 8, src_lengths=[5, 3], seed=3)
    alone = (z[1:, :4], mask[1:, :4], src[1:, :3], src_mask[1:, :3])
    for direction in ("forward", "inverse"):
        out, ld = getattr(layer, direction)(z, mask, src, src_mask)
        out1, ld1 = getattr(layer, direction)(*alone)
        torch.testing.assert_close(out1, out[1:, :4], atol=1e-10, rtol=0)
        torch.testing.assert_close(ld1, ld[1:], atol=1e-10, rtol=0)
    if name == "prior":
        torch.testing.assert_close(layer.log_prob(*alone), layer.log_prob(z, mask, src, src_mask)[1:], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_no_nan_or_inf_with_inputs_of_scale_10(name):
    layer = build(name, seed=4)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=4, scale=10.0)
    src = 10 * src
    for direction in (layer.forward, layer.inverse, layer.init_from_data):
        out, ld = direction(z, mask, src, src_mask)
        assert out.shape == z.shape and ld.shape == (3,)
        assert torch.isfinite(out).all() and torch.isfinite(ld).all()


# ------------------------------------------------------------------------------------------------
# actnorm
# ------------------------------------------------------------------------------------------------


def test_actnorm_init_normalises_real_positions_only():
    z, mask, _, _ = inputs(LENGTHS, T, seed=5)
    z = 3.0 + 2.5 * z
    z[~mask.bool()] = 1e30  # padding must not enter the statistics
    layer = ActNorm(C).to(DT)
    eps, ld = layer.init_from_data(z, mask, None, None)
    real = eps[mask.bool()]  # N x C
    torch.testing.assert_close(real.mean(0), torch.zeros(C, dtype=DT), atol=1e-9, rtol=0)
    torch.testing.assert_close(real.var(0, unbiased=False), torch.ones(C, dtype=DT), atol=1e-5, rtol=0)
    assert torch.equal(eps[~mask.bool()], z[~mask.bool()])
    # the same statistics as an init on the real positions alone, with no padding at all
    alone = ActNorm(C).to(DT)
    alone.init_from_data(z[mask.bool()].unsqueeze(0), torch.ones(1, int(mask.sum())), None, None)
    torch.testing.assert_close(layer.log_scale, alone.log_scale)
    torch.testing.assert_close(layer.bias, alone.bias)
    torch.testing.assert_close(ld, layer.log_scale.sum() * mask.sum(1))


def test_actnorm_is_the_identity_before_init():
    z, mask, _, _ = inputs(LENGTHS, T)
    eps, ld = ActNorm(C).to(DT)(z, mask)
    assert torch.equal(eps, z) and torch.equal(ld, torch.zeros(3, dtype=DT))


# ------------------------------------------------------------------------------------------------
# invertible multi-head linear
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,groups", [("contiguous", [[0, 1, 2], [3, 4, 5]]), ("strided", [[0, 2, 4], [1, 3, 5]])])
def test_linear_heads_mix_only_their_channel_group(layout, groups):
    layer = perturb_(InvertibleMultiHeadLinear(6, 2, layout).to(DT), torch.Generator().manual_seed(0))
    mask = torch.ones(1, 1)
    for group in groups:
        for channel in group:
            z = torch.zeros(1, 1, 6, dtype=DT)
            z[0, 0, channel] = 1.0
            out = layer(z, mask)[0][0, 0]
            touched = set(torch.nonzero(out.abs() > 1e-12).flatten().tolist())
            assert touched and touched <= set(group)


def test_linear_starts_orthogonal_with_zero_logdet():
    layer = InvertibleMultiHeadLinear(8, 2, "strided").to(DT)
    w = layer.weight
    torch.testing.assert_close(w @ w.transpose(1, 2), torch.eye(4, dtype=DT).expand(2, 4, 4), atol=1e-6, rtol=0)
    z, mask, _, _ = inputs(LENGTHS, T)
    assert layer(z.new_zeros(3, T, 8), mask)[1].abs().max() < 1e-5  # float32 init: orthogonal to ~1e-7


def test_linear_inverse_stays_correct_when_the_weight_changes_in_eval_mode():
    layer = perturb_(InvertibleMultiHeadLinear(C, HEADS, "contiguous").to(DT), torch.Generator().manual_seed(0))
    layer.eval()
    z, mask, _, _ = inputs(LENGTHS, T)

    def inverts():
        with torch.no_grad():
            back = layer.inverse(layer(z, mask)[0], mask)[0]
        return (back - z).abs().max().item() < 1e-9

    with torch.no_grad():
        assert inverts()
        cached = layer.inverse_weight()
        assert layer.inverse_weight() is cached  # eval + no grad: cached, not recomputed
        layer.weight.add_(0.2)  # e.g. an optimiser step taken while the model stays in eval mode
        assert inverts()
        # loading a checkpoint
        other = perturb_(InvertibleMultiHeadLinear(C, HEADS, "contiguous").to(DT), torch.Generator().manual_seed(9))
        layer.load_state_dict(other.state_dict())
        assert inverts()
        # a write through .data bypasses the version counter; switching mode (eval() again) clears the cache
        layer.weight.data.mul_(1.5)
        layer.eval()
        assert inverts()
    # a gradient through the inverse in eval mode uses the live weight
    grad = torch.autograd.grad(layer.inverse(z, mask)[0].sum(), layer.weight)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # training mode: always the live weight
    layer.train()
    with torch.no_grad():
        layer.weight.mul_(0.7)
        assert inverts()


# ------------------------------------------------------------------------------------------------
# affine coupling
# ------------------------------------------------------------------------------------------------


def conditioning_part(split_type, up, x, mask):
    """The entries z_a that a coupling must pass through unchanged (the other entries are z_b)."""
    real = mask.bool()
    if split_type == "time_interleaved":
        steps = torch.arange(x.size(1))[None, :].expand_as(real)
        keep = real & ((steps % 2 == 0) == up)  # right padding: index parity = real-position parity
        return x[keep]
    half = C // 2
    first, second = (x[..., :half], x[..., half:]) if split_type == "channel_halves" else (x[..., 0::2], x[..., 1::2])
    return (first if up else second)[real]


@pytest.mark.parametrize("split_type", SPLITS)
@pytest.mark.parametrize("up", [True, False])
def test_coupling_passes_its_conditioning_half_through_and_starts_at_scale_sigmoid_2(split_type, up):
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=6)
    fresh = AffineCoupling(C, H, HIDDEN, HEADS, split_type, 0.0, up=up).to(DT).eval()
    eps, ld = fresh(z, mask, src, src_mask)
    # zero-initialised output layer: mu = 0, scale = sigmoid(0 + 2) on z_b, z_a unchanged
    s = torch.sigmoid(torch.tensor(2.0, dtype=DT))
    za = conditioning_part(split_type, up, z, mask)
    assert torch.equal(conditioning_part(split_type, up, eps, mask), za)
    real = mask.bool()
    torch.testing.assert_close(eps[real].sum() - za.sum(), s * (z[real].sum() - za.sum()))
    n_b = torch.tensor([z[i][real[i]].numel() for i in range(3)], dtype=DT) - torch.tensor(
        [conditioning_part(split_type, up, z[i : i + 1], mask[i : i + 1]).numel() for i in range(3)], dtype=DT
    )
    torch.testing.assert_close(ld, n_b * math.log(s))
    # a trained (perturbed) coupling still passes z_a through exactly
    trained = perturb_(fresh, torch.Generator().manual_seed(3))
    assert torch.equal(conditioning_part(split_type, up, trained(z, mask, src, src_mask)[0], mask), za)


def test_coupling_depends_on_the_source():
    layer = build("coupling_channel_halves_up")
    z, mask, src, src_mask = inputs(LENGTHS, T)
    a = layer(z, mask, src, src_mask)[0]
    b = layer(z, mask, src + 1.0, src_mask)[0]
    assert (a - b).abs().max() > 1e-3


def test_time_split_of_a_single_step_is_finite_and_invertible():
    # up: the only step conditions and nothing is transformed; down: nothing to condition on
    for up in (True, False):
        layer = AffineCoupling(C, H, HIDDEN, HEADS, "time_interleaved", up=up).to(DT).eval()
        perturb_(layer, torch.Generator().manual_seed(0))
        z, mask, src, src_mask = inputs([1, 1], 1)
        eps, ld = layer(z, mask, src, src_mask)
        assert torch.isfinite(eps).all() and torch.isfinite(ld).all()
        torch.testing.assert_close(layer.inverse(eps, mask, src, src_mask)[0], z, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# squeeze and split
# ------------------------------------------------------------------------------------------------


def test_squeeze_pairs_consecutive_steps_and_unsqueeze_inverts_it():
    z, mask, _, _ = inputs([8, 6, 3], 8)
    out, out_mask = squeeze(z, mask)
    assert out.shape == (3, 4, 2 * C) and out_mask.dtype == mask.dtype
    assert torch.equal(out[:, 1], torch.cat([z[:, 2], z[:, 3]], dim=-1))
    # a squeezed step is real iff both halves are: lengths 8, 6, 3 -> 4, 3, 1
    assert out_mask.sum(1).tolist() == [4, 3, 1]
    back, back_mask = unsqueeze(out, out_mask)
    assert torch.equal(back, z)
    assert back_mask.sum(1).tolist() == [8, 6, 2]  # an odd length loses its last step: lengths must be even
    with pytest.raises(AssertionError):
        squeeze(z[:, :7], mask[:, :7])


def test_split_factors_out_the_second_half_as_a_standard_normal():
    z, mask, _, _ = inputs(LENGTHS, T)
    keep, drop, log_prob = split(z, mask)
    assert torch.equal(merge(keep, drop), z) and keep.shape == drop.shape == (3, T, C // 2)
    expected = torch.stack(
        [torch.distributions.Normal(0.0, 1.0).log_prob(drop[i][mask[i].bool()]).sum() for i in range(3)]
    )
    torch.testing.assert_close(log_prob, expected)
    torch.testing.assert_close(standard_normal_log_prob(z, mask), log_prob + split(z.flip(-1), mask)[2])


# ------------------------------------------------------------------------------------------------
# the multi-scale prior
# ------------------------------------------------------------------------------------------------


def test_prior_length_unit_and_layout():
    assert MultiScalePrior(C, H, HIDDEN, HEADS, (1, 1, 1)).length_unit == 4
    assert MultiScalePrior(C, H, HIDDEN, HEADS, (1, 1)).length_unit == 2
    prior = MultiScalePrior(C, H, HIDDEN, HEADS, (2, 2, 1))
    assert [len(level) for level in prior.levels] == [2, 2, 1] and len(prior.prior_couplings) == 2
    # steps are numbered across levels: linear A/B, split type and up/down alternate
    layouts = [(s.linear.head_layout, s.coupling.split, s.coupling.up) for level in prior.levels for s in level]
    assert layouts == [step_layout(i) for i in range(5)]
    # full-width noise <-> per-level parts: T x C/2, T/2 x C/2, T/4 x C
    eps = torch.randn(2, 8, C)
    parts = prior.unpack_noise(eps)
    assert [p.shape for p in parts] == [(2, 8, C // 2), (2, 4, C // 2), (2, 2, C)]
    assert torch.equal(prior.pack_noise(parts), eps)


def test_prior_rejects_lengths_that_are_not_multiples_of_the_unit():
    prior = build("prior")
    z, mask, src, src_mask = inputs([8, 6], 8)
    with pytest.raises(ValueError):
        prior.log_prob(z, mask, src, src_mask)
    with pytest.raises(ValueError):
        prior.sample(z[:, :6], mask[:, :6], src, src_mask)


def test_prior_log_prob_is_eq_6_and_sample_agrees_with_it():
    prior = build("prior", seed=7)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=7)
    eps, logdet = prior(z, mask, src, src_mask)
    log_prob = prior.log_prob(z, mask, src, src_mask)
    manual = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(-1)  # B x T
    torch.testing.assert_close(log_prob, (manual * mask).sum(1) + logdet)
    # temperature 0 (argmax decoding): eps = 0
    z0, lp0 = prior.sample(torch.zeros_like(z), mask, src, src_mask)
    torch.testing.assert_close(prior.log_prob(z0, mask, src, src_mask), lp0, atol=1e-9, rtol=0)
    eps0 = prior(z0, mask, src, src_mask)[0] * mask.unsqueeze(-1)
    torch.testing.assert_close(eps0, torch.zeros_like(z), atol=1e-9, rtol=0)
    noise = torch.randn_like(z)
    zs, lps = prior.sample(noise, mask, src, src_mask)
    torch.testing.assert_close(prior.log_prob(zs, mask, src, src_mask), lps, atol=1e-9, rtol=0)


def test_prior_density_integrates_to_one():
    """exp(log_prob) is a normalised density: a 2-D prior (one level, T = 1, C = 2) integrated on a grid."""
    torch.manual_seed(0)
    prior = MultiScalePrior(2, H, HIDDEN, 1, steps_per_level=(3,)).to(DT).eval()
    perturb_(prior, torch.Generator().manual_seed(1))
    assert prior.length_unit == 1
    step = 0.04
    axis = torch.arange(-10, 10 + step / 2, step, dtype=DT)
    grid = torch.cartesian_prod(axis, axis).view(-1, 1, 2)  # N x 1 x 2
    src = torch.randn(1, 3, H, dtype=DT).expand(grid.size(0), -1, -1)
    with torch.no_grad():
        density = prior.log_prob(grid, torch.ones(grid.size(0), 1), src, None).exp()
    assert abs(density.sum().item() * step**2 - 1.0) < 1e-3


def test_prior_init_from_data_normalises_and_then_matches_forward():
    prior = build("prior", seed=9, perturb=False)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=9)
    z = 5.0 + 3.0 * z
    eps, ld = prior.init_from_data(z, mask, src, src_mask)
    eps2, ld2 = prior(z, mask, src, src_mask)
    torch.testing.assert_close(eps2, eps)
    torch.testing.assert_close(ld2, ld)
    first = prior.levels[0][0].actnorm(z, mask)[0][mask.bool()]
    torch.testing.assert_close(first.mean(0), torch.zeros(C, dtype=DT), atol=1e-9, rtol=0)
    torch.testing.assert_close(first.var(0, unbiased=False), torch.ones(C, dtype=DT), atol=1e-5, rtol=0)


def test_prior_gradients_are_finite_and_reach_the_coupling_outputs():
    prior = build("prior", seed=10, perturb=False).float().train()
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=10)
    prior.log_prob(z.float(), mask.float(), src.float(), src_mask).sum().backward()
    grads = {n: p.grad for n, p in prior.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the zero-initialised output layers learn first (everything inside the nets waits for them)
    outputs = [g for n, g in grads.items() if n.endswith("net.out_proj.weight")]
    assert len(outputs) == 6 and all(g.abs().sum() > 0 for g in outputs)


def test_prior_builds_and_runs_at_the_paper_width():
    torch.manual_seed(0)
    prior = MultiScalePrior(256, 256, 512, 8, steps_per_level=(1, 1, 1)).eval()
    z = torch.randn(2, 8, 256)
    mask = torch.tensor([[1.0] * 8, [1.0] * 4 + [0.0] * 4])
    src, src_mask = torch.randn(2, 5, 256), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        eps, ld = prior.init_from_data(z, mask, src, src_mask)
        back, ld_inv = prior.inverse(eps, mask, src, src_mask)
    assert eps.shape == z.shape and torch.isfinite(eps).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(back, z, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(2), atol=1e-2, rtol=0)


@pytest.mark.parametrize("split_type", SPLITS)
def test_degenerate_rows_stay_finite_an_all_padding_sentence_and_an_empty_source(split_type):
    # softmax over keys that are all masked is NaN in fairseq's attention; the layer must guard it
    layer = perturb_(AffineCoupling(C, H, HIDDEN, HEADS, split_type).to(DT).eval(), torch.Generator().manual_seed(0))
    z, mask, src, src_mask = inputs([4, 0, 4], 4)
    src_mask[2] = False
    eps, ld = layer(z, mask, src, src_mask)
    assert torch.isfinite(eps).all() and torch.isfinite(ld).all()
    assert torch.equal(eps[1], z[1]) and ld[1] == 0
    torch.testing.assert_close(layer.inverse(eps, mask, src, src_mask)[0], z, atol=1e-9, rtol=0)


def test_half_precision_prior_runs_with_float32_log_densities():
    # fairseq --fp16 / --bf16 casts the whole model; slogdet and inv have no half kernels
    prior = build("prior", seed=11).to(torch.bfloat16)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=11)
    z, src = z.to(torch.bfloat16), src.to(torch.bfloat16)
    with torch.no_grad():
        eps, ld = prior(z, mask, src, src_mask)
        back, _ = prior.inverse(eps, mask, src, src_mask)
        log_prob = prior.log_prob(z, mask, src, src_mask)
    assert eps.dtype == torch.bfloat16 and ld.dtype == log_prob.dtype == torch.float32
    assert torch.isfinite(log_prob).all() and (back.float() - z.float()).abs().max() < 0.5
