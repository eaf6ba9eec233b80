"""FlowSeq's flow layers and multi-scale prior (Ma et al., FlowSeq, section 3.4), in the reference
implementation's layout: the usual flow invariants for every layer and composite (inverse(forward(z)) = z,
forward + inverse log-det = 0, log-det = slogdet of the brute-force Jacobian, padding untouched and
invisible, no NaN/inf), actnorm's init over real positions, the couplings' zero-init start and widths,
time-split couplings on T/2 steps, the multi-head linear's shared matrix and never-stale cached inverse,
the layout and parameter count of the prior, per-sentence source keys and values, and Eq. (6)."""
import math

import pytest
import torch

from fairseq_ext.modules import flows
from fairseq_ext.modules.flow_prior import MultiScalePrior, prior_parameter_count
from fairseq_ext.modules.flows import (
    SPLITS,
    ActNorm,
    AffineCoupling,
    CouplingNet,
    FlowStep,
    FlowUnit,
    InvertibleMultiHeadLinear,
    LevelContext,
    PosAttnUnit,
    SourceMemory,
    inverse_cache,
    merge,
    split,
    squeeze,
    standard_normal_log_prob,
    unsqueeze,
)

# latent width (the channel couplings' networks attend at C/2 = 4: LayerNorm over 2 channels would make them
# sign functions), source width, feed-forward width, attention heads
C, H, HIDDEN, HEADS = 8, 6, 8, 2
DT = torch.float64

LAYERS = (
    ["actnorm", "linear_contiguous", "linear_strided"]
    + [f"coupling_{s}_{'up' if up else 'down'}" for s in SPLITS for up in (True, False)]
    + ["coupling_pos_attn", "unit_time", "unit", "step_time", "step", "pos_attn_unit", "prior"]
)


def perturb_(module, generator):
    """Move every parameter off its init so that no layer is (near) the identity."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ActNorm):
                m.log_scale.add_(0.3 * torch.randn(m.log_scale.shape, generator=generator, dtype=m.log_scale.dtype))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=generator, dtype=m.bias.dtype))
            elif isinstance(m, InvertibleMultiHeadLinear):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype))
            elif isinstance(m, CouplingNet):
                for p in (m.out_proj.weight, m.out_proj.bias):
                    p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def build(name, seed=0, perturb=True):
    torch.manual_seed(seed)
    if name == "actnorm":
        layer = ActNorm(C)
    elif name.startswith("linear_"):
        layer = InvertibleMultiHeadLinear(C, name[len("linear_"):], head_size=4)
    elif name == "coupling_pos_attn":
        layer = AffineCoupling(C, H, HIDDEN, HEADS, "channel_halves", True, pos_attn=True)
    elif name.startswith("coupling_"):
        split_type, direction = name[len("coupling_"):].rsplit("_", 1)
        layer = AffineCoupling(C, H, HIDDEN, HEADS, split_type, up=direction == "up")
    elif name.startswith("unit"):
        layer = FlowUnit(C, H, HIDDEN, HEADS, split_time=name.endswith("_time"))
    elif name.startswith("step"):
        layer = FlowStep(C, H, HIDDEN, HEADS, split_time=name.endswith("_time"))
    elif name == "pos_attn_unit":
        layer = PosAttnUnit(C, H, HIDDEN, HEADS)
    else:
        layer = MultiScalePrior(C, H, HIDDEN, HEADS, steps_per_level=(1, 1, 1))
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


@pytest.mark.parametrize("name", LAYERS)
def test_forward_logdet_is_the_slogdet_of_the_brute_force_jacobian(name):
    layer = build(name, seed=1)
    z, mask, src, src_mask = inputs([4], 8, seed=1)  # B = 1, 4 real steps of C = 8: a 32 x 32 Jacobian
    expected = brute_force_logdet(lambda x: layer.forward(x, mask, src, src_mask), z, mask)
    _, ld = layer.forward(z, mask, src, src_mask)
    # the prior composes ~50 perturbed couplings: its float64 Jacobian is good to ~1e-10 relative
    torch.testing.assert_close(ld[0], expected, atol=1e-9, rtol=1e-9)
    eps = layer.forward(z, mask, src, src_mask)[0]
    expected_inv = brute_force_logdet(lambda x: layer.inverse(x, mask, src, src_mask), eps, mask)
    torch.testing.assert_close(layer.inverse(eps, mask, src, src_mask)[1][0], expected_inv, atol=1e-9, rtol=1e-9)


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
        out1, ld1 = getattr(layer, direction)(*alone)  # equal up to summation order
        torch.testing.assert_close(out1, out[1:, :4], atol=1e-10, rtol=1e-12)
        torch.testing.assert_close(ld1, ld[1:], atol=1e-10, rtol=1e-12)
    if name == "prior":
        together = layer.log_prob(z, mask, src, src_mask)[1:]
        torch.testing.assert_close(layer.log_prob(*alone), together, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("name", LAYERS)
def test_no_nan_or_inf_with_inputs_of_scale_10(name):
    layer = build(name, seed=4)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=4, scale=10.0)
    src = 10 * src
    for direction in (layer.forward, layer.inverse, layer.init_from_data):
        out, ld = direction(z, mask, src, src_mask)
        assert out.shape == z.shape and ld.shape == (3,)
        assert torch.isfinite(out).all() and torch.isfinite(ld).all()


@pytest.mark.parametrize("name", ["coupling_channel_halves_up", "coupling_time_interleaved_down", "step_time", "prior"])
def test_candidates_attend_to_their_sentences_source_without_copies(name):
    """z rows b*n .. b*n+n-1 with ONE source row b: the same as the source repeated per candidate."""
    layer = build(name, seed=5)
    z, mask, src, src_mask = inputs([8, 4, 8, 8, 4, 4], T, src_lengths=[5, 3, 4], seed=5)
    src, src_mask = src[:3], src_mask[:3]  # 3 sentences x 2 candidates, sentence-major
    for direction in ("forward", "inverse"):
        grouped = getattr(layer, direction)(z, mask, src, src_mask)
        copied = getattr(layer, direction)(z, mask, src.repeat_interleave(2, 0), src_mask.repeat_interleave(2, 0))
        for a, b in zip(grouped, copied):  # equal up to summation order
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12)
    with pytest.raises(ValueError, match="sentence-major"):
        layer.forward(z[:5], mask[:5], src, src_mask)


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
def test_linear_heads_mix_only_their_channel_group_with_one_shared_matrix(layout, groups):
    layer = perturb_(InvertibleMultiHeadLinear(6, layout, head_size=3).to(DT), torch.Generator().manual_seed(0))
    assert layer.weight.shape == (3, 3) and layer.heads == 2
    mask = torch.ones(1, 1)
    outputs = []
    for group in groups:
        for channel in group:
            z = torch.zeros(1, 1, 6, dtype=DT)
            z[0, 0, channel] = 1.0
            out = layer(z, mask)[0][0, 0]
            touched = set(torch.nonzero(out.abs() > 1e-12).flatten().tolist())
            assert touched and touched <= set(group)
            outputs.append(out[group])
    # every head applies the same matrix: the i-th channel of each group maps alike
    for i in range(3):
        torch.testing.assert_close(outputs[i], outputs[3 + i])


def test_linear_head_size_is_the_references():
    assert [InvertibleMultiHeadLinear(c).head_size for c in (256, 512, 48, 8, 4)] == [32, 32, 16, 8, 4]
    with pytest.raises(ValueError):
        flows.linear_head_size(12)


def test_linear_starts_orthogonal_with_zero_logdet():
    layer = InvertibleMultiHeadLinear(8, "strided", head_size=4).to(DT)
    w = layer.weight
    torch.testing.assert_close(w @ w.t(), torch.eye(4, dtype=DT), atol=1e-6, rtol=0)
    z, mask, _, _ = inputs(LENGTHS, T)
    assert layer(z.new_zeros(3, T, 8), mask)[1].abs().max() < 1e-5  # float32 init: orthogonal to ~1e-7


def test_linear_inverse_cache_survives_mode_switches_but_never_goes_stale():
    layer = perturb_(InvertibleMultiHeadLinear(C, "contiguous", head_size=4).to(DT), torch.Generator().manual_seed(0))
    layer.eval()
    z, mask, _, _ = inputs(LENGTHS, T)

    def inverts():
        with torch.no_grad():
            back = layer.inverse(layer(z, mask)[0], mask)[0]
        return (back - z).abs().max().item() < 1e-9

    with torch.no_grad():
        assert inverts()
        cached = layer.inverse_weight()
        assert layer.inverse_weight() is cached  # no grad: cached, not recomputed
        layer.train()
        layer.eval()
        assert layer.inverse_weight() is cached  # train()/eval() (the generator's toggle) keep it
        layer.weight.add_(0.2)  # e.g. an optimiser step taken while the model stays in eval mode
        assert inverts()
        # loading a checkpoint
        other = InvertibleMultiHeadLinear(C, "contiguous", head_size=4).to(DT)
        perturb_(other, torch.Generator().manual_seed(9))
        layer.load_state_dict(other.state_dict())
        assert inverts()
        # a write through .data bypasses the autograd version counter: the content check still sees it
        layer.weight.data.mul_(1.5)
        assert inverts()
    # an optimiser step (fairseq's optimisers write through .data)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer.inverse(z, mask)[0].sum().backward()  # a gradient through the inverse uses the live weight
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    optimizer.step()
    layer.eval()
    assert inverts()
    # the cached log-determinant follows the weight too
    with torch.no_grad():
        expected = torch.linalg.slogdet(layer.weight).logabsdet * layer.heads * mask.sum(1)
        torch.testing.assert_close(layer(z, mask)[1], expected)


def test_decoding_with_the_inverse_cache_equals_decoding_without():
    prior = build("prior", seed=6)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=6)
    with torch.no_grad():
        with inverse_cache(False):
            expected = prior.sample(z, mask, src, src_mask)
        first = prior.sample(z, mask, src, src_mask)  # fills the cache
        second = prior.sample(z, mask, src, src_mask)  # reads it
    for a, b, c in zip(expected, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# affine coupling
# ------------------------------------------------------------------------------------------------


def conditioning_part(split_type, up, x, mask):
    """The entries z_a that a coupling must pass through unchanged (the other entries are z_b)."""
    real = mask.bool()
    if split_type == "time_interleaved":
        steps = torch.arange(x.size(1))[None, :].expand_as(real)
        keep = real & ((steps % 2 == 0) == up)
        return x[keep]
    half = C // 2
    first, second = (x[..., :half], x[..., half:]) if split_type == "channel_halves" else (x[..., 0::2], x[..., 1::2])
    return (first if up else second)[real]


@pytest.mark.parametrize("split_type", SPLITS)
@pytest.mark.parametrize("up", [True, False])
def test_coupling_passes_its_conditioning_half_through_and_starts_at_scale_sigmoid_2(split_type, up):
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=6)
    fresh = AffineCoupling(C, H, HIDDEN, HEADS, split_type, up).to(DT).eval()
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


@pytest.mark.parametrize("split_type,width,steps", [("channel_halves", C // 2, T), ("channel_interleaved", C // 2, T),
                                                    ("time_interleaved", C, T // 2)])  # fmt: skip
def test_coupling_network_works_at_the_width_of_z_a_and_time_splits_on_half_the_steps(split_type, width, steps):
    layer = AffineCoupling(C, H, 64, HEADS, split_type).to(DT).eval()
    net = layer.net
    # attention at the width of z_a; the hidden width only inside the feed-forward block
    assert net.self_attn.in_proj_weight.shape == net.enc_attn.in_proj_weight.shape == (3 * width, width)
    assert net.ffn.linear1.weight.shape == (64, width) and net.out_proj.weight.shape == (2 * width, width)
    assert net.src_proj.weight.shape == (width, H)
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    z, mask, src, src_mask = inputs(LENGTHS, T)
    layer(z, mask, src, src_mask)
    assert seen == [(3, steps, width)]


def test_time_split_needs_even_lengths():
    layer = build("coupling_time_interleaved_up")
    z, mask, src, src_mask = inputs([6, 3], 6)
    with pytest.raises(ValueError, match="even"):
        layer(z, mask, src, src_mask)
    z, mask, src, src_mask = inputs([1], 1)
    with pytest.raises(ValueError, match="even"):
        layer(z, mask, src, src_mask)


def test_coupling_depends_on_the_source():
    layer = build("coupling_channel_halves_up")
    z, mask, src, src_mask = inputs(LENGTHS, T)
    a = layer(z, mask, src, src_mask)[0]
    b = layer(z, mask, src + 1.0, src_mask)[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", [f"coupling_{s}_up" for s in SPLITS] + ["coupling_pos_attn"])
def test_degenerate_rows_stay_finite_an_all_padding_sentence_and_an_empty_source(name):
    # a softmax over keys that are all masked is NaN; the layer must guard it
    layer = build(name)
    z, mask, src, src_mask = inputs([4, 0, 4], 4)
    src_mask[2] = False
    eps, ld = layer(z, mask, src, src_mask)
    assert torch.isfinite(eps).all() and torch.isfinite(ld).all()
    assert torch.equal(eps[1], z[1]) and ld[1] == 0
    torch.testing.assert_close(layer.inverse(eps, mask, src, src_mask)[0], z, atol=1e-9, rtol=0)


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


def test_prior_has_the_reference_layout():
    assert MultiScalePrior(C, H, HIDDEN, HEADS, (1, 1, 1)).length_unit == 4
    assert MultiScalePrior(C, H, HIDDEN, HEADS, (1, 1)).length_unit == 2
    prior = MultiScalePrior(C, H, HIDDEN, HEADS, (4, 4, 2))
    assert [len(b.steps) for b in prior.blocks] == [4, 4, 2]
    # a positional-attention unit opens every level; a prior coupling closes each level that splits
    assert all(isinstance(b.pos_attn, PosAttnUnit) and b.pos_attn.coupling_up.net.pos_attn is not None
               for b in prior.blocks)  # fmt: skip
    assert [b.prior is not None for b in prior.blocks] == [True, True, False]
    # time-split couplings only in the levels that split: 48, 48, 16 couplings in the steps (the paper's)
    for block, expected, time in zip(prior.blocks, (48, 48, 16), (16, 16, 0)):
        couplings = [m for s in block.steps for m in s.modules() if isinstance(m, AffineCoupling)]
        assert len(couplings) == expected
        assert sum(c.split == "time_interleaved" for c in couplings) == time
        for step in block.steps:  # linear A, unit, linear B, unit
            assert (step.linear1.head_layout, step.linear2.head_layout) == ("contiguous", "strided")
    # full-width noise <-> per-level parts: T x C/2, T/2 x C/2, T/4 x C
    eps = torch.randn(2, 8, C)
    parts = prior.unpack_noise(eps)
    assert [p.shape for p in parts] == [(2, 8, C // 2), (2, 4, C // 2), (2, 2, C)]
    assert torch.equal(prior.pack_noise(parts), eps)


@pytest.mark.parametrize("shape", [(C, H, HIDDEN, HEADS, (1, 1, 1)), (16, 12, 32, 2, (2, 1)),
                                   (64, 64, 96, 4, (1, 2, 1)), (256, 256, 512, 8, (1,))])  # fmt: skip
def test_prior_parameter_count_is_the_layouts_formula(shape):
    prior = MultiScalePrior(*shape)
    assert sum(p.numel() for p in prior.parameters()) == prior_parameter_count(*shape)


def test_reference_parameter_counts_at_the_papers_sizes():
    """The formula with the reference's weight-norm gains gives the reference's own counts (measured by
    instantiating its NMTFlow: 51,710,336 base, 205,931,264 large); ours lacks only those gains."""
    assert prior_parameter_count(256, 256, 512, 8, (4, 4, 2), weight_norm_gains=True) == 51_710_336
    assert prior_parameter_count(512, 512, 1024, 8, (4, 4, 2), weight_norm_gains=True) == 205_931_264
    assert 51.6e6 < prior_parameter_count(256, 256, 512, 8, (4, 4, 2)) < 51.71e6


def test_prior_rejects_lengths_that_are_not_multiples_of_the_unit():
    prior = build("prior")
    z, mask, src, src_mask = inputs([8, 6], 8)
    with pytest.raises(ValueError):
        prior.log_prob(z, mask, src, src_mask)
    with pytest.raises(ValueError):
        prior.sample(z[:, :6], mask[:, :6], src, src_mask)


def test_prior_builds_level_contexts_once_and_projects_the_source_once_per_sentence(monkeypatch):
    prior = build("prior", seed=8)
    z, mask, src, src_mask = inputs([8, 4, 8, 8, 4, 4], T, src_lengths=[5, 3, 4], seed=8)
    src, src_mask = src[:3], src_mask[:3]  # 3 sentences x 2 candidates
    dims, rows = [], []
    original = flows.sinusoidal_encoding
    monkeypatch.setattr(flows, "sinusoidal_encoding", lambda *a: dims.append(a[1]) or original(*a))
    original_kv = flows.Attention.project_kv

    def counting_kv(self, x):
        rows.append(x.size(0))
        return original_kv(self, x)

    monkeypatch.setattr(flows.Attention, "project_kv", counting_kv)
    nets = [m for m in prior.modules() if isinstance(m, CouplingNet)]
    pos_attn = sum(n.pos_attn is not None for n in nets)  # positional attention projects z (6 rows)
    with torch.no_grad():
        prior.sample(z, mask, src, src_mask)
    # per level: C/2-wide sinusoids, and C-wide ones for the T/2 steps of the levels that split
    assert sorted(dims) == sorted([C // 2, C, C // 2, C, C // 2])
    # every coupling projects the 3 sentences' source once, not the 6 candidates'
    assert rows.count(3) == len(nets) and rows.count(6) == pos_attn and len(rows) == len(nets) + pos_attn
    # a shared source memory keeps them across calls (the generator's IWD: one sample + K log-probs)
    memory = prior.source_memory(src, src_mask)
    rows.clear()
    with torch.no_grad():
        prior.sample(z, mask, memory)
        prior.log_prob(z, mask, memory)
    assert rows.count(3) == len(nets) and rows.count(6) == 2 * pos_attn


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
    """exp(log_prob) is a normalised density: a 2-D prior (one level, T = 1, C = 2) integrated on a grid
    that covers where its samples fall."""
    torch.manual_seed(0)
    prior = MultiScalePrior(2, H, HIDDEN, 1, steps_per_level=(1,)).to(DT).eval()
    perturb_(prior, torch.Generator().manual_seed(1))
    assert prior.length_unit == 1
    src = torch.randn(1, 3, H, dtype=DT)  # one sentence, N candidates
    with torch.no_grad():
        samples = prior.sample(torch.randn(4000, 1, 2, dtype=DT), torch.ones(4000, 1), src, None)[0]
        lo, hi = samples.min(0).values.min() - 3, samples.max(0).values.max() + 3
        step = float(hi - lo) / 500
        axis = torch.arange(float(lo), float(hi), step, dtype=DT)
        grid = torch.cartesian_prod(axis, axis).view(-1, 1, 2)  # N x 1 x 2
        density = prior.log_prob(grid, torch.ones(grid.size(0), 1), src, None).exp()
    assert abs(density.sum().item() * step**2 - 1.0) < 2e-3


def test_prior_init_from_data_normalises_and_then_matches_forward():
    prior = build("prior", seed=9, perturb=False)
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=9)
    z = 5.0 + 3.0 * z
    eps, ld = prior.init_from_data(z, mask, src, src_mask)
    eps2, ld2 = prior(z, mask, src, src_mask)
    torch.testing.assert_close(eps2, eps)
    torch.testing.assert_close(ld2, ld)
    first = prior.blocks[0].pos_attn.actnorm(z, mask)[0][mask.bool()]
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
    couplings = sum(isinstance(m, AffineCoupling) for m in prior.modules())
    assert len(outputs) == couplings == 3 * 2 + 12 + 12 + 8 + 2 and all(g.abs().sum() > 0 for g in outputs)


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


def test_half_precision_prior_runs_with_float32_log_densities():
    # fairseq --fp16 / --bf16 casts the whole model; slogdet and inv have no half kernels
    prior = build("prior", seed=11, perturb=False).to(torch.bfloat16)  # bf16 round trips through ~50 couplings
    z, mask, src, src_mask = inputs(LENGTHS, T, seed=11)
    z, src = z.to(torch.bfloat16), src.to(torch.bfloat16)
    with torch.no_grad():
        eps, ld = prior(z, mask, src, src_mask)
        back, _ = prior.inverse(eps, mask, src, src_mask)
        log_prob = prior.log_prob(z, mask, src, src_mask)
    assert eps.dtype == torch.bfloat16 and ld.dtype == log_prob.dtype == torch.float32
    assert torch.isfinite(log_prob).all() and (back.float() - z.float()).abs().max() < 0.5


def test_level_context_and_source_memory_are_reusable_objects():
    z, mask, src, src_mask = inputs(LENGTHS, T)
    memory = SourceMemory(src, src_mask)
    ctx = LevelContext(mask, memory)
    layer = build("step_time")
    out_ctx = layer(z, ctx)
    out_plain = layer(z, mask, src, src_mask)
    for a, b in zip(out_ctx, out_plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert ctx.half().mask.shape == (3, T // 2) and ctx.half() is ctx.half()
