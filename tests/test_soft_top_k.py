"""The continuous top-k-argmax (thesis Algorithm 2): convergence to hard top-k, normalisation,
backpointers, and float64 gradients (groundwork for the soft beam search loss, issue 4)."""
import pytest
import torch

from fairseq_ext.modules.soft_top_k import continuous_top_k_argmax, hard_top_k, soft_backpointers_and_words


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
