"""The MGS mathematics (fairseq_ext/modules/parameter_search.py) against independent references.

Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence
Modeling" (AAAI 2021): proposal eq. 4, weights eq. 3 / Algorithm 1 / Appendix A.1 eq. 9,
noise scales Appendix A.4, regeneration from seeds Appendix A.3.
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from fairseq_ext.modules.parameter_search import (
    CandidateNorms,
    CandidateSampler,
    ParameterSnapshot,
    apply_candidate_,
    assign_components,
    clip_global_norm_,
    gaussian_log_normalizer,
    importance_weights,
    log_importance_weights,
    mixture_log_density,
    noise_scales,
    proposal_log_density,
    stream_seed,
    weight_statistics,
)


def reference_weights(current, costs, log_q, alpha):
    """Algorithm 1 in float64 with Python floats: w_k = exp(alpha (C - C_k)) / q_k, normalised (shifted by the
    max log-weight, which cancels, so that no term overflows)."""
    logs = [alpha * (current - c) - lq for c, lq in zip(costs, log_q)]
    top = max(logs)
    unnormalised = [math.exp(x - top) for x in logs]
    total = math.fsum(unnormalised)
    return [u / total for u in unnormalised]


@pytest.mark.parametrize("alpha", [0.0, 1.0, 100.0, 1e6])
def test_normalised_weights_equal_a_float64_reference(alpha):
    g = torch.Generator().manual_seed(0)
    costs = torch.rand(6, generator=g, dtype=torch.float64)
    log_q = torch.randn(6, generator=g, dtype=torch.float64) * 3
    current = 0.4
    expected = reference_weights(current, costs.tolist(), log_q.tolist(), alpha)
    weights = importance_weights(current, costs, log_q, alpha)
    assert weights.dtype == torch.float64
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(log_importance_weights(current, costs, log_q, alpha).exp().numpy(), expected, rtol=1e-12)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-12)
    if alpha == 1e6:  # no overflow: all weight on the best candidate (log_q spread is tiny next to 1e6 x cost gaps)
        assert int(weights.argmax()) == int(costs.argmin()) and float(weights.max()) == pytest.approx(1.0)


def test_current_cost_cancels_and_ties_give_exact_uniform_weights():
    costs = torch.tensor([0.3, 0.1, 0.7], dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    a = importance_weights(0.0, costs, zeros, 10.0)
    b = importance_weights(5.0, costs, zeros, 10.0)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    tied = importance_weights(0.2, torch.full((4,), 0.5, dtype=torch.float64), zeros[:1].repeat(4), 100.0)
    assert tied.tolist() == [0.25] * 4


def split(x, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(torch.tensor(x[start : start + n], dtype=torch.float32))
        start += n
    return out


@pytest.mark.parametrize("mix_prob", [0.0, 0.3, 0.5, 1.0])
def test_exact_mixture_log_density_matches_scipy(mix_prob):
    rng = np.random.default_rng(1)
    sizes, sigmas = [2, 3], [0.3, 1.7]
    mean = rng.normal(size=5)
    cov = np.diag(np.repeat(np.square(sigmas), sizes))
    for point in (rng.normal(size=5) * 0.5, mean + rng.normal(size=5) * 0.2):
        norms = CandidateNorms()
        for delta, m, s in zip(split(point, sizes), split(mean, sizes), sigmas):
            norms.add(delta, m, s)
        ours = mixture_log_density(
            torch.tensor([norms.scaled_zero], dtype=torch.float64), torch.tensor([norms.scaled_mle], dtype=torch.float64),
            mix_prob,
            gaussian_log_normalizer(sizes, sigmas),
        )  # fmt: skip
        point32 = np.concatenate([t.numpy() for t in split(point, sizes)]).astype(np.float64)
        mean32 = np.concatenate([t.numpy() for t in split(mean, sizes)]).astype(np.float64)
        with np.errstate(divide="ignore"):
            expected = logsumexp(
                [np.log(mix_prob) + multivariate_normal(np.zeros(5), cov).logpdf(point32),
                 np.log1p(-mix_prob) + multivariate_normal(mean32, cov).logpdf(point32)]
            )  # fmt: skip
        assert float(ours[0]) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_unit_variance_density_is_the_mixture_with_identity_covariance():
    rng = np.random.default_rng(2)
    mean, point = rng.normal(size=4) * 0.1, rng.normal(size=4) * 0.1
    norms = CandidateNorms()
    norms.add(torch.tensor(point, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64), 0.01)
    ours = proposal_log_density([norms], 0.5, "unit")
    expected = logsumexp(
        [np.log(0.5) + multivariate_normal(np.zeros(4), np.eye(4)).logpdf(point),
         np.log(0.5) + multivariate_normal(mean, np.eye(4)).logpdf(point)]
    ) + 2 * np.log(2 * np.pi)  # the omitted constant D/2 log(2 pi)
    assert float(ours[0]) == pytest.approx(expected, rel=1e-12)
    assert proposal_log_density([norms, norms], 0.5, "none").tolist() == [0.0, 0.0]


def test_zero_noise_density_is_the_limit_of_the_component_probabilities():
    m = [torch.tensor([0.5, -1.0])]
    zero, mle = CandidateNorms(), CandidateNorms()
    zero.add(torch.zeros(2), m[0], 0.0)
    mle.add(m[0].clone(), m[0], 0.0)
    log_q = proposal_log_density([zero, mle], 0.3, "exact")
    assert log_q.tolist() == pytest.approx([math.log(0.3), math.log(0.7)])


def make_step(seed=0, shapes=((3, 4), (5,), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_noise_scales_per_tensor_global_and_constant():
    step = make_step()
    per_tensor = noise_scales(step, 0.5, "tensor")
    assert per_tensor == pytest.approx([0.5 * float(t.abs().mean()) for t in step], rel=1e-6)
    everything = torch.cat([t.flatten() for t in step])
    assert noise_scales(step, 0.5, "global") == pytest.approx([0.5 * float(everything.abs().mean())] * 3, rel=1e-6)
    assert noise_scales(step, 0.5, "constant") == [0.5] * 3
    assert noise_scales(step, 0.0, "tensor") == [0.0] * 3


def test_clip_global_norm():
    step = make_step()
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in step))
    before = clip_global_norm_(step, 1.0)
    assert before == pytest.approx(norm)
    assert math.sqrt(sum(float((t.double() ** 2).sum()) for t in step)) == pytest.approx(1.0, rel=1e-5)
    small = [t * 1e-3 for t in make_step()]
    copy = [t.clone() for t in small]
    clip_global_norm_(small, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(small, copy))


def test_component_assignment():
    assert assign_components(4, 0.5, "alternate", 0) == [True, False, True, False]  # the authors' 2 + 2
    assert assign_components(4, 1.0, "alternate", 0) == [False] * 4
    assert assign_components(4, 0.0, "alternate", 0) == [True] * 4
    assert assign_components(5, 0.0, "sample", 3) == [True] * 5
    assert assign_components(5, 1.0, "sample", 3) == [False] * 5
    draws = [c for s in range(400) for c in assign_components(4, 0.25, "sample", s)]
    assert sum(not c for c in draws) / len(draws) == pytest.approx(0.25, abs=0.04)
    assert assign_components(8, 0.5, "sample", 7) == assign_components(8, 0.5, "sample", 7)


def test_stream_seeds_are_distinct_and_stable():
    seeds = {stream_seed(1, u, m, k, p) for u in range(3) for m in range(2) for k in range(4) for p in range(5)}
    assert len(seeds) == 3 * 2 * 4 * 5
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3) and 0 <= stream_seed(1, 2, 3) < 2**63


def test_regenerated_candidates_equal_stored_ones_in_any_order():
    step, sigmas = make_step(), [0.1, 0.2, 0.0]
    sampler = CandidateSampler(step, sigmas, [True, False, True], (1, 7, 0))
    stored = [[t.clone() for t in sampler.tensors(k)] for k in range(3)]
    for k in (2, 0, 1):  # another order, and a fresh sampler
        again = CandidateSampler(step, sigmas, [True, False, True], (1, 7, 0))
        for p in reversed(range(3)):
            assert torch.equal(again.tensor(k, p), stored[k][p])
    # Delta = [from_mle] m + sigma eps; a sigma of 0 gives exactly the component mean
    assert torch.equal(stored[1][2], torch.zeros_like(step[2])) and torch.equal(stored[0][2], step[2])
    other = CandidateSampler(step, sigmas, [True, False, True], (1, 8, 0))  # another update: other noise
    assert not torch.equal(other.tensor(0, 0), stored[0][0])


def test_direction_is_the_weighted_sum_of_the_candidates():
    step, sigmas = make_step(), [0.1, 0.2, 0.05]
    sampler = CandidateSampler(step, sigmas, [True, False, False, True], (3, 1, 0))
    weights = [0.1, 0.2, 0.3, 0.4]
    direction = sampler.direction(weights)
    for p in range(3):
        expected = sum(w * sampler.tensor(k, p).double() for k, w in enumerate(weights))
        torch.testing.assert_close(direction[p].double(), expected, rtol=1e-6, atol=1e-7)


def test_single_candidate_update_equals_the_candidate_exactly():
    step, sigmas = make_step(), [0.1, 0.2, 0.05]
    for from_mle in (True, False):
        sampler = CandidateSampler(step, sigmas, [from_mle], (0, 0, 0))
        direction = sampler.direction([1.0])
        assert all(torch.equal(d, sampler.tensor(0, p)) for p, d in enumerate(direction))


def test_mle_only_without_noise_gives_exactly_the_mle_step():
    step = make_step()
    for k in (1, 2, 3, 4, 7):
        sampler = CandidateSampler(step, [0.0] * 3, [True] * k, (0, 0, 0))
        weights = importance_weights(0.0, torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 1.0)
        direction = sampler.direction(weights.tolist())
        assert all(torch.equal(d, m) for d, m in zip(direction, step)), k


def test_parameters_are_restored_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    # large and tiny magnitudes: theta + Delta - Delta != theta in float32 for many entries
    params = [
        torch.nn.Parameter(torch.randn(50, generator=g) * 1e3),
        torch.nn.Parameter(torch.randn(7, 3, generator=g) * 1e-4),
    ]
    original = [p.detach().clone() for p in params]
    step = [torch.randn(p.shape, generator=g) for p in params]
    sampler = CandidateSampler(step, [0.7, 0.01], [True, False, True], (0, 1, 0))
    with torch.no_grad():
        p0 = params[0].detach().clone()
        d = sampler.tensor(0, 0)
        assert not torch.equal((p0 + d) - d, p0)  # why a snapshot is needed
    snapshot = ParameterSnapshot(params)
    for k in range(3):
        norms = apply_candidate_(params, sampler, k)
        assert not torch.equal(params[0].detach(), original[0])
        assert norms.plain_zero > 0
        snapshot.restore()
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, original))


def test_weight_statistics():
    std, mle, won = weight_statistics(torch.tensor([0.1, 0.6, 0.2, 0.1], dtype=torch.float64), [True, False, True, False])
    assert std == pytest.approx(float(np.std([0.1, 0.6, 0.2, 0.1])))
    assert mle == pytest.approx(0.3) and won == 0.0
    assert weight_statistics(torch.tensor([1.0], dtype=torch.float64), [True]) == (0.0, 1.0, 1.0)


def test_squared_distances_are_float64_and_chunk_independent(monkeypatch):
    import fairseq_ext.modules.parameter_search as parameter_search

    g = torch.Generator().manual_seed(9)
    delta, mean = torch.randn(4, 250, generator=g), torch.randn(4, 250, generator=g)
    expected_zero = float((delta.double() ** 2).sum())
    expected_mle = float(((delta.double() - mean.double()) ** 2).sum())
    for chunk in (1 << 20, 7):
        monkeypatch.setattr(parameter_search, "NORM_CHUNK", chunk)
        norms = CandidateNorms()
        norms.add(delta, mean, 0.5)
        assert norms.plain_zero == pytest.approx(expected_zero, rel=1e-13)
        assert norms.plain_mle == pytest.approx(expected_mle, rel=1e-13)
        assert norms.scaled_mle == pytest.approx(expected_mle / 0.25, rel=1e-13)
