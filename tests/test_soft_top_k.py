"""The continuous top-k-argmax (Goyal's thesis, Continuous relaxation of beam search, Algorithm 2): convergence
to hard top-k, normalisation, backpointers, float64 gradients, and finite values and gradients at any alpha."""
import pytest
import torch

from fairseq_ext.modules.schedules import ALPHA_CEILING
from fairseq_ext.modules.soft_beam_search import BANNED_SCORE, soft_select
from fairseq_ext.modules.soft_top_k import continuous_top_k_argmax, hard_top_k, soft_backpointers_and_words

# finite alphas past the ceiling: in float32's range, and past it (a double the old uncapped schedule reached)
HUGE_ALPHAS = [1e30, float(torch.finfo(torch.float32).max) / 10, 1e300]


@pytest.mark.parametrize("seed", range(20))
def test_large_alpha_converges_to_the_hard_top_k_over_random_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    bsz, width, vocab = 3, 1 + seed % 4, 2 + seed % 7
    k = 1 + seed % min(4, width * vocab)
    scores = torch.randn(bsz, width, vocab, generator=generator, dtype=torch.float64) * 3
    back, words = hard_top_k(scores, k)
    previous = None
    for alpha in (1.0, 1e2, 1e4, 1e6):
        p = continuous_top_k_argmax(scores, k, alpha)
        hard = torch.zeros_like(p)
        for b in range(bsz):
            for i in range(k):
                hard[b, i, back[b, i], words[b, i]] = 1.0
        error = (p - hard).abs().max().item()
        assert previous is None or error <= previous + 1e-12  # monotone approach
        previous = error
    # the gap between distinct random scores is > 1e-3 with overwhelming probability: alpha 1e6 is hard
    assert previous < 1e-6


def test_each_pick_is_a_distribution_and_sums_give_backpointers_and_words():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5)
    p = continuous_top_k_argmax(scores, 3, alpha=2.0)
    assert p.shape == (2, 3, 3, 5)
    torch.testing.assert_close(p.sum(dim=(-1, -2)), torch.ones(2, 3))
    back, words = soft_backpointers_and_words(p)
    torch.testing.assert_close(back.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(words.sum(-1), torch.ones(2, 3))
    # k = 1, one beam element: the pick is peaked-softmax of -(s - max)^2, whose mode is the argmax
    single = continuous_top_k_argmax(scores[:, :1], 1, alpha=5.0)[:, 0, 0]  # B x V
    assert torch.equal(single.argmax(-1), scores[:, 0].argmax(-1))
    expected = torch.softmax(-5.0 * (scores[:, 0] - scores[:, 0].max(-1, keepdim=True).values) ** 2, -1)
    torch.testing.assert_close(single, expected)


def test_gradcheck_float64():
    torch.manual_seed(1)
    scores = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: continuous_top_k_argmax(s, 3, alpha=1.7), (scores,))


def float32_scores_with_ties_and_banned_entries(requires_grad=True):
    """B x K x V float32 scores as the soft beam meets them: distinct values, exact ties (finished elements
    absorbing with the same score) and banned tokens at -1e9, also added up over steps (-2e9)."""
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 3, 5, generator=generator) * 3
    scores[0, 1, 2] = scores[0, 0, 4]  # a tie between two elements' successors
    scores[1, 2] = scores[1, 1]  # two identical elements
    scores[:, :, 0] = BANNED_SCORE
    scores[1, 0, 1] = 2 * BANNED_SCORE
    return scores.requires_grad_(requires_grad)


@pytest.mark.parametrize("alpha", HUGE_ALPHAS)
def test_any_finite_alpha_gives_finite_values_and_gradients_in_float32(alpha):
    scores = float32_scores_with_ties_and_banned_entries()
    p = continuous_top_k_argmax(scores, 4, alpha)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(dim=(-1, -2)), torch.ones(2, 4))
    # the downstream uses of the picks in the soft beam: running scores (line 13) and a soft selection (line 19)
    new_scores = torch.einsum("bjv,bijv->bi", scores, p)  # B x k
    # a large random projection of the picks: at a tie, alpha times its gradient difference would overflow
    projection = torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 100
    loss = soft_select(new_scores, new_scores, alpha).sum() + (p * projection).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    # beyond the ceiling alpha acts as the ceiling, where the picks are already hard: one-hot away from ties
    torch.testing.assert_close(p, continuous_top_k_argmax(scores.detach(), 4, ALPHA_CEILING), rtol=0, atol=0)
    back, words = hard_top_k(scores.detach(), 4)
    for b in range(2):
        for i in range(4):
            peak = p[b, i].max().item()
            assert peak in (1.0, 0.5), (b, i, peak)  # hard, or split evenly between two exactly tied entries
            assert p[b, i, back[b, i], words[b, i]].item() == peak


def test_soft_select_is_finite_at_any_alpha_and_hard_there():
    scores = torch.tensor([[0.0, -1.0, -3.0, 2 * BANNED_SCORE], [1.0, 1.0, -2.0, 0.5]], requires_grad=True)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 7.0, 1.0, 1.0]], requires_grad=True)
    for alpha in HUGE_ALPHAS:
        out = soft_select(scores, values, alpha)
        torch.testing.assert_close(out, torch.tensor([1.0, 6.0]))  # the best element's value; a tie averages
        scores.grad = values.grad = None
        (out.sum() + soft_select(scores, scores, alpha).sum()).backward()
        assert torch.isfinite(scores.grad).all() and torch.isfinite(values.grad).all()
