"""soft_beam_loss at finite alpha against Algorithm 3 of Goyal's thesis (Continuous relaxation of beam search,
chapter 4; hinge variant, section 4.4) written as plain loops over steps, beam elements and successors.

The reference keeps, for every beam element, the explicit sequence of its input embeddings and re-runs the
decoder on it from scratch at every step.  The thesis mixes the decoder states h of the parents by the soft
backpointers (lines 14-16).  For a one-layer post-norm transformer decoder that state is the cache of keys
and values of the previous inputs, which are affine in those inputs, so mixing the states is exactly running
the decoder on the backpointer-weighted mixture of the parents' input sequences, followed by the element's own
soft embedding a_i^T E (line 11).  The reference therefore shares no code with the vectorised search: not the
top-k relaxation, not the state reordering, not the final soft selection.

The package's choices where the thesis is silent are followed: only the first element is expanded at step 0;
padding and BOS score -1e9; an element whose hard path (the joint argmax of its p_i) has emitted EOS extends
only with EOS at local score 0; a sentence whose elements have all finished stops and pays d_t(EOS) per
remaining step; the horizon is the gold length plus the extra steps, the gold padded with EOS.
"""
import pytest
import torch

from fairseq_ext.modules.embedding_inputs import decode_from_embeddings
from fairseq_ext.testing import tiny

BANNED = -1e9
EXTRA_STEPS = 2
K = 3
# targets of 4-6 tokens (EOS included): long enough for hypotheses to stop before the gold length
PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0, 4]), ([4, 5], [5, 4, 5]), ([1, 1, 2], [2, 0, 1, 3, 5])]


def build(objective, normalization="local", seed=0):
    torch.manual_seed(seed)
    task, model, crit = tiny.build(
        "transformer",
        ["--criterion", "soft_beam_loss", "--soft-beam-size", str(K), "--soft-beam-extra-steps", str(EXTRA_STEPS),
         "--soft-beam-objective", objective, "--soft-beam-normalization", normalization],
        extra=["--decoder-layers", "1"],  # one layer: the key/value cache is affine in the inputs (see above)
    )  # fmt: skip
    model.double().eval()
    eos = task.target_dictionary.eos()
    with torch.no_grad():
        # spread a fresh model's nearly uniform scores, and turn the EOS output row towards the embedding of
        # EOS (the first input): EOS then ranks high early and several hypotheses stop before the gold length
        projection = model.decoder.output_projection.weight
        projection.mul_(4.0)
        projection[eos].add_(0.625 * model.decoder.embed_tokens.weight[eos])
    return task, model, crit


def peaked_softmax(values, alpha):
    """[scalar] -> [scalar]: exp(alpha v) / sum exp(alpha v), shifted by the maximum for stability."""
    top = max(v.item() for v in values)
    exps = [torch.exp(alpha * (v - top)) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def local_scores(model, encoder_out, inputs, normalization, eos):
    """Successor scores f(h, w) of one element from its explicit input embedding sequence (list of D vectors)."""
    vectors = torch.stack(inputs).unsqueeze(0)  # 1 x t x D
    tokens = torch.full((1, len(inputs)), eos, dtype=torch.long)  # any non-padding ids: they give positions
    logits = decode_from_embeddings(model.decoder, vectors, tokens, encoder_out)[0][0, -1]  # V
    return torch.log_softmax(logits, -1) if normalization == "local" else logits


def reference_losses(model, dictionary, src, gold, alpha, objective, normalization):
    """Algorithm 3 for one sentence: src and gold are token lists (gold EOS-terminated)."""
    eos, pad, bos, V = dictionary.eos(), dictionary.pad(), dictionary.bos(), len(dictionary)
    E = model.decoder.embed_tokens.weight  # V x D
    src_tokens = torch.tensor([src])
    encoder_out = model.encoder(src_tokens, src_lengths=torch.tensor([len(src)]))
    horizon = len(gold) + EXTRA_STEPS
    padded_gold = gold + [eos] * EXTRA_STEPS

    def d(t, w):  # Hamming cost of emitting w at step t
        return 0.0 if w == padded_gold[t] else 1.0

    zero = torch.zeros((), dtype=E.dtype)
    # line 1: one element to start (the others would be identical copies of it)
    elements = [dict(score=zero, loss=zero, inputs=[E[eos]], tokens=[], finished=False)]
    stopped_early = False
    for t in range(horizon):
        if all(el["finished"] for el in elements):  # every hard path has emitted EOS: pay d_t(EOS) and stop
            stopped_early = True
            for el in elements:
                el["loss"] = el["loss"] + d(t, eos)
                if objective == "hinge":
                    el["score"] = el["score"] + d(t, eos)
            continue
        # lines 3-6: candidate scores s~_t[j, w] = s_{t,j} + f(h_{t,j}, w) (+ d(w) for the hinge, section 4.4)
        candidates = []  # (j, w, score)
        for j, el in enumerate(elements):
            f = local_scores(model, encoder_out, el["inputs"], normalization, eos)
            for w in range(V):
                if el["finished"]:
                    local = f[w] * 0.0 if w == eos else f[w] * 0.0 + BANNED
                elif w in (pad, bos):
                    local = f[w] * 0.0 + BANNED
                else:
                    local = f[w]
                score = el["score"] + local + (d(t, w) if objective == "hinge" else 0.0)
                candidates.append((j, w, score))
        # Algorithm 2: m = top-k-max, p_i = peaked-softmax(-(s~ - m_i)^2)
        ranked = sorted((c[2] for c in candidates), key=lambda v: v.item(), reverse=True)[:K]
        new_elements = []
        for i in range(K):
            p = peaked_softmax([-((c[2] - ranked[i]) ** 2) for c in candidates], alpha)
            b = [sum(pv for (j, _, _), pv in zip(candidates, p) if j == jj) for jj in range(len(elements))]  # line 9
            a = [sum(pv for (_, w, _), pv in zip(candidates, p) if w == ww) for ww in range(V)]  # line 10
            loss = sum(a[w] * d(t, w) for w in range(V)) + sum(b[j] * elements[j]["loss"] for j in range(len(elements)))
            score = sum(c[2] * pv for c, pv in zip(candidates, p))  # line 13
            # lines 11 and 14-16: the element's inputs are its parents' mixed by b, then a^T E
            inputs = [sum(b[j] * elements[j]["inputs"][pos] for j in range(len(elements))) for pos in range(t + 1)]
            inputs.append(sum(a[w] * E[w] for w in range(V)))
            # the hard path: the joint argmax of p_i (section 4.3.4's MAP backpointer and word)
            best = max(range(len(candidates)), key=lambda n: p[n].item())
            parent, word = candidates[best][0], candidates[best][1]
            new_elements.append(dict(
                score=score, loss=loss, inputs=inputs, tokens=elements[parent]["tokens"] + [word],
                finished=elements[parent]["finished"] or word == eos,
            ))  # fmt: skip
        elements = new_elements
    scores = [el["score"] for el in elements]
    weights = peaked_softmax(scores, alpha)  # line 19
    if objective == "direct":
        value = sum(wt * el["loss"] for wt, el in zip(weights, elements))
    else:
        s_max = sum(wt * s for wt, s in zip(weights, scores))
        net_output = model(src_tokens, torch.tensor([len(src)]), torch.tensor([[eos] + gold[:-1]]))
        f = net_output[0][0]
        f = torch.log_softmax(f, -1) if normalization == "local" else f
        gold_score = sum(f[t, w] for t, w in enumerate(gold))  # teacher-forced s(y*)
        value = torch.relu(s_max - gold_score)
    stops = [el["tokens"].index(eos) + 1 for el in elements if eos in el["tokens"]]
    return value, dict(stopped_before_gold=any(n < len(gold) for n in stops), stopped_early=stopped_early)


def gradients(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("alpha", [0.5, 2.0])
@pytest.mark.parametrize("objective", ["direct", "hinge"])
def test_loss_and_gradient_equal_algorithm_3_written_as_loops(alpha, objective):
    task, model, crit = build(objective)
    dictionary = task.target_dictionary
    crit.alpha_schedule = type(crit.alpha_schedule)(name="fixed", alpha=alpha, flag_prefix="--soft-beam-alpha")
    sample = tiny.translation_batch(task, PAIRS, given_order=True)
    losses, _, _ = crit(model, sample, reduce=False)  # B
    expected, coverage = [], []
    for src, tgt in PAIRS:
        src_ids = tiny.ids(task.src_dict, src).tolist()
        gold = tiny.ids(dictionary, tgt).tolist()
        value, seen = reference_losses(model, dictionary, src_ids, gold, alpha, objective, "local")
        expected.append(value)
        coverage.append(seen)
    # float64 throughout except fairseq's attention softmax, which runs in float32 (and in another order in
    # incremental and full decoding): the two agree to ~1e-8 relative in the loss, ~1e-5 of the largest
    # gradient entry; the mutations this guards against change both by more than 1e-2 relative
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-6, atol=1e-6)
    got, ref = gradients(model, losses.sum()), gradients(model, sum(expected))
    scale = max(float(r.abs().max()) for r in ref)
    assert scale > 0
    for (name, _), g, r in zip(model.named_parameters(), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * scale, msg=name)
    # the comparison covers hypotheses that stop before the gold length and (direct) a sentence whose
    # elements have all stopped before its horizon
    assert any(c["stopped_before_gold"] for c in coverage), coverage
    assert any(c["stopped_early"] for c in coverage) or objective == "hinge", coverage
