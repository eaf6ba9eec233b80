"""soft_beam_loss and the relaxed beam (Goyal's thesis, Continuous relaxation of beam search, Algorithm 3) against
slow loops written from the thesis, hard beam search, greedy decoding, finite differences, hand-computed hinge
values, and invariances; and its option checks.  The multi-step reference at finite alpha is in
test_soft_beam_reference.py."""
import math

import pytest
import torch

from fairseq import utils

from fairseq_ext.criterions.soft_beam_loss import parse_cost_weights
from fairseq_ext.generators.soft_beam_generator import SoftBeamGenerator
from fairseq_ext.modules.decoder_driver import UnsupportedModelError
from fairseq_ext.modules.schedules import ALPHA_CEILING
from fairseq_ext.modules.soft_beam_search import (
    SoftBeamSearch,
    SoftReorder,
    gold_padded_with_eos,
    hamming_step_costs,
    mix_beam_rows,
    soft_beam_step,
    soft_reorder_incremental_state,
    soft_select,
)
from fairseq_ext.modules.soft_top_k import continuous_top_k_argmax
from fairseq_ext.testing import synthetic_tagging, tiny

PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0]), ([4, 5], [5, 4, 5, 4, 1]), ([1, 1, 2], [2]), ([5, 0, 3, 2, 1], [1, 2])]


def sharpen(model, factor=8.0):
    """Scale the decoder's weights so that a fresh model's successor scores are far apart (a fresh
    model is nearly uniform, and the squared-distance relaxation needs gaps >> 1/sqrt(alpha))."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoder.") and param.dim() > 1:
                param.mul_(factor)


def build(arch, *flags, seed=1, num_symbols=6, sharp=True):
    torch.manual_seed(seed)
    task, model, criterion = tiny.build(arch, ["--criterion", "soft_beam_loss", *flags], num_symbols=num_symbols)
    if sharp:
        sharpen(model, 8.0 if arch == "lstm" else 3.0)
    model.eval()  # dropout is 0 anyway; train/eval does not change the criterion
    return task, model, criterion


# -- the state mixing ---------------------------------------------------------------------------
def run_two_steps(model, task, pairs, k):
    """An incremental state after two decoding steps of k copies of each sentence."""
    sample = tiny.translation_batch(task, pairs)
    bsz = len(pairs)
    enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    enc = model.encoder.reorder_encoder_out(enc, torch.arange(bsz).repeat_interleave(k))
    state = {}
    prefix = torch.randint(4, len(task.target_dictionary), (bsz * k, 2))
    prefix[:, 0] = task.target_dictionary.eos()
    model.decoder(prefix[:, :1], encoder_out=enc, incremental_state=state)
    model.decoder(prefix, encoder_out=enc, incremental_state=state)
    return state, enc, prefix


def cached_tensors(state):
    return {f"{key}/{name}": v for key, buf in state.items() for name, v in buf.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_one_hot_soft_backpointers_equal_fairseqs_index_select_reordering(arch):
    task, model, _ = build(arch)
    k, bsz = 3, 2
    parents = torch.tensor([[2, 0, 0], [1, 2, 1]])  # B x k
    weights = torch.nn.functional.one_hot(parents, k).double()  # B x k x K
    hard = (parents + torch.arange(bsz).unsqueeze(1) * k).flatten()

    soft_state, _, _ = run_two_steps(model, task, PAIRS[:bsz], k)
    torch.manual_seed(0)
    hard_state = {key: dict(buf) for key, buf in soft_state.items()}
    soft_reorder_incremental_state(model.decoder, soft_state, weights)
    model.decoder.reorder_incremental_state_scripting(hard_state, hard)
    soft, ref = cached_tensors(soft_state), cached_tensors(hard_state)
    assert soft.keys() == ref.keys() and len(soft) >= 2
    for name in ref:
        torch.testing.assert_close(soft[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_soft_backpointers_mix_every_cached_state_convexly(arch):
    task, model, _ = build(arch)
    k, bsz = 3, 2
    state, _, _ = run_two_steps(model, task, PAIRS[:bsz], k)
    before = cached_tensors(state)
    weights = torch.softmax(torch.randn(bsz, k, k), -1)
    soft_reorder_incremental_state(model.decoder, state, weights)
    after = cached_tensors(state)
    mixed = 0
    for name, old in before.items():
        if not old.is_floating_point():
            continue
        rows = old.reshape(bsz, k, -1)
        expected = torch.einsum("bij,bjf->bif", weights.to(old.dtype), rows).reshape(old.shape)
        torch.testing.assert_close(after[name], expected, msg=name)
        mixed += 1
    assert mixed >= 2  # LSTM: hidden and cell states (+ input feeding); transformer: keys and values


def test_soft_reorder_behaves_as_hard_indices_elsewhere_and_keeps_gradients():
    weights = torch.softmax(torch.randn(1, 2, 2, dtype=torch.float64), -1).requires_grad_()
    order = SoftReorder(torch.tensor([1, 0]), weights)
    assert order.size(0) == 2 and int(order.sum()) == 1
    mask = torch.tensor([[True, False], [False, False]])
    assert torch.equal(mask.index_select(0, order), mask[[1, 0]])  # booleans: hard selection
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w, x: SoftReorder(torch.tensor([1, 0]), w).select_rows(x, 0), (weights, x))
    torch.testing.assert_close(x.index_select(0, order), mix_beam_rows(x, weights))


# -- one step of Algorithm 3 against a loop ------------------------------------------------------
def slow_soft_beam_step(s, f, D, d, k, alpha, augmented):
    """Algorithm 3, lines 3-17, one sentence, written as loops (s: K, f: K x V, D: K, d: V)."""
    K, V = f.shape
    st = torch.empty(K, V, dtype=f.dtype)
    for i in range(K):
        for w in range(V):
            st[i, w] = s[i] + f[i, w] + (d[w] if augmented else 0.0)  # line 5 (+ d(w): section 4.4)
    m = torch.sort(st.flatten(), descending=True).values[:k]  # top-k-max
    new_s, new_D = torch.zeros(k, dtype=f.dtype), torch.zeros(k, dtype=f.dtype)
    for i in range(k):
        z = torch.zeros(K, V, dtype=f.dtype)
        for j in range(K):
            for w in range(V):
                z[j, w] = -alpha * (st[j, w] - m[i]) ** 2  # Algorithm 2, line 5
        p = torch.softmax(z.flatten(), 0).view(K, V)
        b = p.sum(1)  # row sums: soft backpointer (line 9)
        a = p.sum(0)  # column sums (line 10)
        new_D[i] = sum(a[w] * d[w] for w in range(V)) + sum(D[j] * b[j] for j in range(K))  # lines 12, 17
        new_s[i] = (st * p).sum()  # line 13
    return new_s, new_D


@pytest.mark.parametrize("augmented", [False, True])
def test_vectorised_step_equals_the_algorithm_written_as_loops(augmented):
    torch.manual_seed(3)
    bsz, K, V, k = 3, 2, 5, 2
    s, f, D = torch.randn(bsz, K, dtype=torch.float64), torch.randn(bsz, K, V, dtype=torch.float64), torch.rand(bsz, K, dtype=torch.float64)
    d = torch.rand(bsz, V, dtype=torch.float64)
    new_s, new_D, back, words, picks = soft_beam_step(s, f, D, d, k, 1.7, augmented)
    for b in range(bsz):
        ref_s, ref_D = slow_soft_beam_step(s[b], f[b], D[b], d[b], k, 1.7, augmented)
        torch.testing.assert_close(new_s[b], ref_s)
        torch.testing.assert_close(new_D[b], ref_D)
    torch.testing.assert_close(back.sum(-1), torch.ones(bsz, k, dtype=torch.float64))  # points of the simplex
    torch.testing.assert_close(words.sum(-1), torch.ones(bsz, k, dtype=torch.float64))


def test_hinge_against_a_hand_computed_case():
    # one element, vocabulary {0, 1, 2}, gold word 1: p = (.5, .3, .2), Hamming costs (1, 0, 1)
    logp = torch.tensor([[[math.log(0.5), math.log(0.3), math.log(0.2)]]], dtype=torch.float64)
    costs = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    scores, losses, *_ = soft_beam_step(zero, logp, zero, costs, 1, 1e6, cost_augmented=True)
    s_max = soft_select(scores, scores, 1e6)
    # cost-augmented successors: log .5 + 1 = 0.3069, log .3 = -1.2040, log .2 + 1 = -0.6094
    assert float(s_max) == pytest.approx(math.log(0.5) + 1.0, abs=1e-6)
    hinge = torch.relu(s_max - math.log(0.3))
    assert float(hinge) == pytest.approx(1.0 + math.log(0.5 / 0.3), abs=1e-6)  # 1.5108
    assert float(losses) == pytest.approx(1.0)  # the cost-augmented argmax is a wrong word
    # a model sure of the gold word by a margin larger than the cost has zero hinge
    sure = torch.tensor([[[-5.0, 0.0, -5.0]]], dtype=torch.float64)
    scores, *_ = soft_beam_step(zero, sure, zero, costs, 1, 1e6, cost_augmented=True)
    assert float(torch.relu(soft_select(scores, scores, 1e6) - 0.0)) == 0.0


def test_the_hinge_criterion_is_s_max_minus_the_teacher_forced_gold_score():
    task, model, crit = build("transformer", "--soft-beam-objective", "hinge", "--soft-beam-alpha", "3")
    sample = tiny.translation_batch(task, PAIRS)
    loss, _, _ = crit(model, sample, reduce=False)
    search = crit.search(model)
    target = sample["target"]
    horizons = target.ne(1).sum(-1) + 5
    gold = gold_padded_with_eos(target, 1, 2, int(horizons.max()))
    ones = torch.ones(len(task.target_dictionary))
    ni = sample["net_input"]
    result = search.run(ni["src_tokens"], ni["src_lengths"], horizons, 3.0,
                        step_costs=lambda t: hamming_step_costs(gold[:, t], ones), cost_augmented=True)  # fmt: skip
    lprobs = model.get_normalized_probs(model(**ni), log_probs=True)
    gold_score = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(target.eq(1), 0).sum(-1)
    expected = torch.relu(soft_select(result.scores, result.scores, 3.0) - gold_score)
    torch.testing.assert_close(loss, expected)
    assert (loss > 0).any()


# -- limits: hard beam search and greedy decoding --------------------------------------------------
def hard_beam_search(model, src_tokens, src_lengths, k, horizon, eos, banned, normalization="local"):
    """Algorithm 1 for one sentence by full re-decoding of every prefix (no incremental state): only the
    first element is expanded at step 0; finished elements extend with EOS at score 0 (absorbing)."""
    enc = model.encoder(src_tokens, src_lengths=src_lengths)
    beams = [([], 0.0)]  # (tokens, score)
    for _ in range(horizon):
        candidates = []
        for tokens, score in beams:
            if tokens and tokens[-1] == eos:
                candidates.append((tokens + [eos], score))
                continue
            prefix = torch.tensor([[eos] + tokens])
            out = model.decoder(prefix, encoder_out=enc)
            local = out[0][0, -1].double()
            if normalization == "local":
                local = torch.log_softmax(local, -1)
            for w in range(local.numel()):
                if w not in banned:
                    candidates.append((tokens + [w], score + float(local[w])))
        candidates.sort(key=lambda c: -c[1])
        beams = candidates[:k]
    return beams


@pytest.mark.parametrize("arch,normalization", [("transformer", "local"), ("lstm", "local"), ("transformer", "global")])
def test_large_alpha_reproduces_hard_beam_search_hypotheses_and_scores(arch, normalization):
    task, model, _ = build(arch)
    dictionary = task.target_dictionary
    k, horizon = 3, 6
    search = SoftBeamSearch(model, dictionary, k, normalization)
    for src, _ in PAIRS:
        sample = tiny.translation_batch(task, [(src, [0])])
        ni = sample["net_input"]
        with torch.no_grad():
            result = search.run(ni["src_tokens"], ni["src_lengths"], torch.tensor([horizon]), alpha=1e9)
            ref = hard_beam_search(model, ni["src_tokens"], ni["src_lengths"], k, horizon, dictionary.eos(),
                                   {dictionary.pad(), dictionary.bos()}, normalization)  # fmt: skip
        ref_scores = torch.tensor([score for _, score in ref], dtype=torch.float64)
        assert sorted(ref_scores.tolist()) != [ref_scores[0].item()] * k  # distinct hypotheses
        torch.testing.assert_close(result.scores[0].double(), ref_scores, rtol=1e-5, atol=1e-4)
        assert result.tokens[0].tolist() == [tokens for tokens, _ in ref]
        torch.testing.assert_close(result.positional_scores[0].sum(-1).double(), ref_scores, rtol=1e-5, atol=1e-4)


def greedy_hamming(model, sample, horizon, dictionary, weights):
    """Hamming cost of greedy decoding (absorbing EOS) against the EOS-padded gold, per sentence."""
    eos, out = dictionary.eos(), []
    for b in range(sample["target"].size(0)):
        src = sample["net_input"]["src_tokens"][b : b + 1]
        src = src[:, src.ne(1)[0]]  # the sentence alone, without the batch's left padding
        enc = model.encoder(src, src_lengths=torch.tensor([src.size(1)]))
        tokens = []
        for _ in range(int(horizon[b])):
            if tokens and tokens[-1] == eos:
                tokens.append(eos)
                continue
            logits = model.decoder(torch.tensor([[eos] + tokens]), encoder_out=enc)[0][0, -1]
            logits[[dictionary.pad(), dictionary.bos()]] = -math.inf
            tokens.append(int(logits.argmax()))
        gold = gold_padded_with_eos(sample["target"][b : b + 1], 1, eos, int(horizon[b]))[0]
        out.append(sum(float(weights[w]) for w, g in zip(tokens, gold.tolist()) if w != g))
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_k1_with_large_alpha_is_the_hamming_loss_of_greedy_decoding(arch):
    task, model, crit = build(arch, "--soft-beam-size", "1", "--soft-beam-alpha", "1e9",
                              "--soft-beam-cost-weights", "w1:2,w3:0.5")  # fmt: skip
    sample = tiny.translation_batch(task, PAIRS)
    with torch.no_grad():
        loss, _, _ = crit(model, sample, reduce=False)
        horizon = sample["target"].ne(1).sum(-1) + 5
        expected = greedy_hamming(model, sample, horizon, task.target_dictionary, crit.cost_weights)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-5)
    assert (expected > 0).all() and len(set(expected.tolist())) > 1


def test_direct_loss_is_the_soft_selection_of_the_running_losses_and_lies_between_their_extremes():
    task, model, crit = build("transformer", "--soft-beam-alpha", "0.5")
    sample = tiny.translation_batch(task, PAIRS)
    loss, _, log = crit(model, sample, reduce=False)
    assert loss.shape == (len(PAIRS),) and (loss > 0).all()
    assert log["map_errors"] >= 0 and log["sample_size"] == sample["ntokens"]


# -- gradients -----------------------------------------------------------------------------------
# the smallest tables that exercise every part: V = 7 (3 symbols), D = 4
GRADCHECK_DIMS = ["--encoder-embed-dim", "4", "--encoder-hidden-size", "4", "--decoder-embed-dim", "4",
                  "--decoder-hidden-size", "4", "--decoder-out-embed-dim", "4"]  # fmt: skip
GRADCHECK_PAIRS = [([0, 1, 2], [2, 1, 0]), ([1, 2], [2, 1, 2, 0])]


@pytest.mark.parametrize("objective,normalization,fast", [
    ("direct", "local", False), ("hinge", "local", True), ("direct", "global", True), ("hinge", "global", True),
])  # fmt: skip
def test_gradcheck_float64_through_the_whole_relaxed_beam(objective, normalization, fast):
    """Finite differences of the whole loss (soft picks, mixed LSTM states, soft embeddings, the final
    soft selection) in the output projection and the target embedding table.  One case checks the full
    Jacobian; the others a random projection of it (fast_mode), which a wrong gradient fails too."""
    # sharpened weights: a fresh model's loss is nearly flat, and the paths through earlier soft choices
    # (soft embeddings, mixed states) would then sit below gradcheck's tolerance
    task, model, crit = build("lstm", "--soft-beam-size", "2", "--soft-beam-alpha", "0.5",
                              "--soft-beam-objective", objective, "--soft-beam-normalization", normalization,
                              "--soft-beam-extra-steps", "1", "--decoder-attention", "0", *GRADCHECK_DIMS,
                              num_symbols=3)  # fmt: skip
    model.double()  # without attention: fairseq's LSTM attention softmax runs in float32
    sample = tiny.translation_batch(task, GRADCHECK_PAIRS)
    projection, embedding = model.decoder.fc_out, model.decoder.embed_tokens
    assert projection.weight.shape == embedding.weight.shape == (7, 4)
    w0 = projection.weight.detach().clone().requires_grad_()
    e0 = embedding.weight.detach().clone().requires_grad_()
    del projection.weight, embedding.weight  # plain tensors in their place, so that gradcheck can vary them

    def loss_of(w, e):
        projection.weight, embedding.weight = w, e
        return crit(model, sample)[0]

    assert float(loss_of(w0, e0).detach()) > 0
    assert torch.autograd.gradcheck(loss_of, (w0, e0), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


def test_later_losses_send_gradient_to_earlier_choices_through_the_soft_backpointers():
    task, model, crit = build("transformer", "--soft-beam-alpha", "1")
    model.train()
    loss, _, _ = crit(model, tiny.translation_batch(task, PAIRS))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("decoder.") and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# -- invariances --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--soft-beam-objective", "hinge"], ["--soft-beam-normalization", "global"]])
def test_padding_batch_order_and_reduction_invariance(flags):
    task, model, crit = build("transformer", "--soft-beam-alpha", "2", *flags)
    tiny.assert_batching_invariance(crit, model, task, PAIRS)


# -- tagging: gold length -----------------------------------------------------------------------------
SENTENCES = [
    (["w0", "w1", "w2", "w3"], ["B-PER", "O", "O", "B-LOC"]),
    (["w4", "w5"], ["B-PER", "I-PER"]),
    (["w6", "w7", "w1", "w2", "w0", "w3"], ["O", "B-LOC", "I-LOC", "O", "B-PER", "O"]),
]


def test_tagging_runs_exactly_the_gold_length_with_labels_only():
    task, model, crit = synthetic_tagging.build_tagger(criterion=("--criterion", "soft_beam_loss", "--soft-beam-alpha", "1e9"))
    sharpen(model, 8.0)
    assert crit.fixed_length and crit.extra_steps == 0
    sample = synthetic_tagging.tagging_batch(task, SENTENCES)
    search = crit.search(model)
    target = sample["target"]
    lengths = target.ne(1).sum(-1)
    ni = sample["net_input"]
    result = search.run(ni["src_tokens"], ni["src_lengths"], lengths, 1e9, fixed_length=True)
    labels = set(task.target_dictionary.index(t) for t in synthetic_tagging.NER_TAGS if t in task.target_dictionary.indices)
    for b in range(len(SENTENCES)):
        n = int(lengths[b])
        for path in result.tokens[b].tolist():
            assert path[n - 1] == task.target_dictionary.eos() and all(t in labels for t in path[: n - 1])
            assert all(t == task.target_dictionary.pad() for t in path[n:])
    loss, _, _ = crit(model, sample, reduce=False)
    assert loss.shape == (len(SENTENCES),)


# -- configuration errors -----------------------------------------------------------------------------
def test_cost_weights_parsing_and_errors():
    from fairseq.data import Dictionary

    d = Dictionary()
    for s in ("O", "B-PER", "I-PER"):
        d.add_symbol(s)
    w = parse_cost_weights("O:2, B-PER:0.5", d)
    assert w[d.index("O")] == 2 and w[d.index("B-PER")] == 0.5 and w[d.index("I-PER")] == 1
    for bad, words in (("X:2", "not in the target dictionary"), ("O", "LABEL:WEIGHT"), ("O:abc", "not a number"),
                       ("O:-1", ">= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            parse_cost_weights(bad, d)


@pytest.mark.parametrize("flags,words", [
    (["--soft-beam-size", "0"], "--soft-beam-size"),
    # 6 symbols and EOS and unknown: 8 first tokens (not padding, not BOS)
    (["--soft-beam-size", "9"], "--soft-beam-size 9 exceeds the 8 tokens of the target dictionary"),
    (["--left-pad-target"], "right-padded targets .*: drop --left-pad-target"),
    (["--soft-beam-alpha", "4", "--soft-beam-alpha-schedule", "exponential", "--soft-beam-alpha-growth", "2",
      "--soft-beam-alpha-period-updates", "10", "--soft-beam-alpha-max", "3"],
     "--soft-beam-alpha-max 3.0 is below the starting --soft-beam-alpha 4.0"),
    (["--soft-beam-alpha-growth", "2"], "--soft-beam-alpha-growth"),
    (["--soft-beam-alpha-schedule", "exponential"], "--soft-beam-alpha-growth"),
    (["--soft-beam-length", "gold", "--soft-beam-extra-steps", "3"], "--soft-beam-extra-steps"),
    (["--soft-beam-extra-steps", "-1"], "--soft-beam-extra-steps"),
    (["--soft-beam-cost-weights", "nosuchlabel:2"], "--soft-beam-cost-weights"),
])  # fmt: skip
def test_impossible_flags_are_refused_naming_the_flag(flags, words):
    with pytest.raises(ValueError, match=words):
        build("transformer", *flags)


@pytest.mark.parametrize("arch,words", [
    ("fconv", "fconv"), ("transformer_lm", "encoder-decoder"), ("cmlm_transformer", "non-autoregressive"),
])  # fmt: skip
def test_models_it_cannot_drive_are_refused_naming_the_criterion_once(arch, words):
    torch.manual_seed(0)
    task, model, crit = tiny.build(arch, ["--criterion", "soft_beam_loss"])
    sample = tiny.lm_batch(task, [[4, 5, 6]]) if arch.endswith("_lm") else tiny.translation_batch(task, PAIRS[:1])
    with pytest.raises(UnsupportedModelError, match=words) as error:
        crit(model, sample)
    message = str(error.value)
    assert message.count("--criterion soft_beam_loss") == 1 and "--criterion --criterion" not in message, message


def test_left_padded_targets_are_refused_at_the_first_batch():
    """A task that left-pads its targets without the flag: the gold would be read from its padding."""
    task, model, crit = build("transformer")
    sample = tiny.translation_batch(task, PAIRS)
    sample["target"] = utils.convert_padding_direction(sample["target"], 1, right_to_left=True)
    assert bool(sample["target"][:, 0].eq(1).any())
    with pytest.raises(ValueError, match="--left-pad-target"):
        crit(model, sample)


def test_the_largest_beam_the_vocabulary_allows_runs_and_one_more_is_refused_for_decoding_too():
    task, model, crit = build("transformer", "--soft-beam-size", "8")  # 8 = the tokens a hypothesis can start with
    loss, _, _ = crit(model, tiny.translation_batch(task, PAIRS), reduce=False)
    assert torch.isfinite(loss).all()
    SoftBeamGenerator([model], task.target_dictionary, beam_size=8, alpha=1.0)
    with pytest.raises(ValueError, match="--beam 9 with --soft-beam-decoding exceeds the 8 tokens"):
        SoftBeamGenerator([model], task.target_dictionary, beam_size=9, alpha=1.0)


def test_tagging_beam_larger_than_the_label_set_is_refused_before_training():
    labels = len(synthetic_tagging.NER_TAGS)  # the tiny tagging dictionary holds exactly these labels
    with pytest.raises(ValueError, match=f"--soft-beam-size {labels + 1} exceeds the {labels} labels"):
        synthetic_tagging.build_tagger(criterion=("--criterion", "soft_beam_loss", "--soft-beam-size", str(labels + 1)))


@pytest.mark.parametrize("objective", ["direct", "hinge"])
def test_loss_and_gradient_stay_finite_after_ten_million_updates_of_uncapped_annealing(objective):
    """An exponential alpha without --soft-beam-alpha-max: alpha would pass float32's range (3.4e38) after
    128 doublings; the schedule holds it at the ceiling, where the float32 loss and gradients stay finite."""
    task, model, crit = build("transformer", "--soft-beam-objective", objective,
                              "--soft-beam-alpha-schedule", "exponential", "--soft-beam-alpha-growth", "2",
                              "--soft-beam-alpha-period-updates", "1")  # fmt: skip
    crit.set_num_updates(10**7)
    assert crit.current_alpha() == ALPHA_CEILING
    model.train()
    loss, _, log = crit(model, tiny.translation_batch(task, PAIRS))
    loss.backward()
    assert torch.isfinite(loss) and log["sb_alpha_sum"] == ALPHA_CEILING
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_alpha_schedule_follows_the_update_count():
    _, _, crit = build("transformer", "--soft-beam-alpha-schedule", "exponential", "--soft-beam-alpha-growth", "2",
                       "--soft-beam-alpha-period-updates", "10", "--soft-beam-alpha-max", "5")  # fmt: skip
    for updates, alpha in ((0, 1.0), (10, 2.0), (20, 4.0), (30, 5.0)):
        crit.set_num_updates(updates)
        assert crit.current_alpha() == pytest.approx(alpha)


def test_top_k_relaxation_picks_distinct_entries_when_scores_are_apart():
    scores = torch.tensor([[[0.0, -1.0, -3.0], [-0.5, -2.0, -4.0]]])
    p = continuous_top_k_argmax(scores, 3, 1e4)
    flat = p.flatten(2).argmax(-1)[0].tolist()
    assert flat == [0, 3, 1]


def test_tagger_states_mix_like_fairseqs_reordering_with_one_hot_backpointers():
    task, model, _ = synthetic_tagging.build_tagger()
    model.eval()
    k, bsz = 2, 2
    sample = synthetic_tagging.tagging_batch(task, SENTENCES[:bsz])
    ni = sample["net_input"]
    enc = model.encoder(ni["src_tokens"], src_lengths=ni["src_lengths"])
    enc = model.encoder.reorder_encoder_out(enc, torch.arange(bsz).repeat_interleave(k))
    state = {}
    prefix = torch.full((bsz * k, 2), task.target_dictionary.eos())
    prefix[:, 1] = torch.tensor([4, 5, 6, 7])
    model.decoder(prefix[:, :1], encoder_out=enc, incremental_state=state)
    model.decoder(prefix, encoder_out=enc, incremental_state=state)
    parents = torch.tensor([[1, 1], [0, 1]])
    hard_state = {key: dict(buf) for key, buf in state.items()}
    soft_reorder_incremental_state(model.decoder, state, torch.nn.functional.one_hot(parents, k).float())
    model.decoder.reorder_incremental_state_scripting(hard_state, (parents + torch.tensor([[0], [k]])).flatten())
    soft, ref = cached_tensors(state), cached_tensors(hard_state)
    assert soft.keys() == ref.keys() and len(soft) >= 2
    for name in ref:
        assert torch.equal(soft[name], ref[name]), name
