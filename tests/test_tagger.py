"""seq2seq_tagger (fixed monotone attention, zero initial decoder state) and the tagging generator."""
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.generators.tagging_generator import allowed_next_tokens, label_mask, source_word_counts
from fairseq_ext.modules.embedding_inputs import decode_from_embeddings, soft_embeddings
from fairseq_ext.testing import synthetic_tagging as st

SENTENCES = [
    (["w1", "w2", "w3"], ["B-PER", "I-PER", "O"]),
    (["w4"], ["O"]),
    (["w5", "w6", "w7", "w0", "w1"], ["O", "O", "B-LOC", "I-LOC", "O"]),
    (["w2", "w2"], ["B-LOC", "B-PER"]),
]
UNI = ["--encoder-bidirectional", "false"]


def build(*flags, **kwargs):
    task, model, criterion = st.build_tagger(flags=flags, **kwargs)
    model.eval()
    return task, model, criterion


def full_and_incremental(model, sample):
    net = sample["net_input"]
    enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    tokens = net["prev_output_tokens"]
    full, _ = model.decoder(tokens, encoder_out=enc)  # B x T x V
    state, steps = {}, []
    for t in range(1, tokens.size(1) + 1):
        steps.append(model.decoder(tokens[:, :t], encoder_out=enc, incremental_state=state)[0][:, -1])
    return full, torch.stack(steps, 1), tokens.ne(model.decoder.embed_tokens.padding_idx)


# -- decoding modes ---------------------------------------------------------------------------------
TWO_LAYERS = ["--decoder-layers", "2", "--encoder-layers", "2"]


@pytest.mark.parametrize("flags", [[], UNI, TWO_LAYERS], ids=["bi", "uni", "2-layer"])
def test_incremental_decoding_equals_full_decoding(flags):
    task, model, _ = build(*flags)
    full, incremental, real = full_and_incremental(model, st.tagging_batch(task, SENTENCES))
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-5, atol=1e-6)


def test_incremental_decoding_keeps_gradients_equal_to_full_decoding():
    task, model, _ = build()
    model.train()  # dropout is 0: train mode only matters for autograd bookkeeping
    sample = st.tagging_batch(task, SENTENCES)
    grads = []
    for mode in ("full", "incremental"):
        model.zero_grad()
        full, incremental, real = full_and_incremental(model, sample)
        out = full if mode == "full" else incremental
        F.cross_entropy(out[real], sample["target"][real], reduction="sum").backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert grads[1]["encoder.embed_tokens.weight"].abs().sum() > 0
    assert grads[1]["decoder.lstm.weight_hh_l0"].abs().sum() > 0  # through the cached (h, c)


def test_reorder_incremental_state_follows_beam_rows():
    task, model, _ = build()
    sample = st.tagging_batch(task, SENTENCES)
    net = sample["net_input"]
    enc = model.encoder(net["src_tokens"])
    tokens = net["prev_output_tokens"]
    order = torch.tensor([2, 0, 0, 3, 1])
    state, outs = {}, []
    model.decoder(tokens[:, :1], encoder_out=enc, incremental_state=state)
    model.decoder.reorder_incremental_state_scripting(state, order)
    enc_r = model.encoder.reorder_encoder_out(enc, order)
    step2 = model.decoder(tokens[order, :2], encoder_out=enc_r, incremental_state=state)[0][:, -1]
    full = model.decoder(tokens, encoder_out=enc)[0][:, 1]
    torch.testing.assert_close(step2, full[order], rtol=1e-5, atol=1e-6)


# -- what each output sees --------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True])
def test_output_i_depends_on_source_words_up_to_i_or_all_of_them(bidirectional):
    task, model, _ = build(*([] if bidirectional else UNI))
    words, tags = ["w1", "w2", "w3", "w4", "w5"], ["O"] * 5
    base = model(**st.tagging_batch(task, [(words, tags)])["net_input"])[0][0]  # T x V
    for j in range(len(words)):
        changed = list(words)
        changed[j] = "w7"
        out = model(**st.tagging_batch(task, [(changed, tags)])["net_input"])[0][0]
        for i in range(len(words) + 1):  # the last step reads the source's EOS
            same = torch.equal(out[i], base[i])
            if bidirectional or i >= j:
                assert not same, f"output {i} ignores word {j}"
            else:
                assert same, f"output {i} depends on later word {j} with a unidirectional encoder"


def test_decoder_reads_only_encoder_position_i_and_zeros_past_the_source():
    task, model, _ = build()
    decoder = model.decoder
    torch.manual_seed(0)
    states = torch.randn(2, 4, model.encoder.output_dim)  # B x S x C
    enc = {"states": [states], "padding_mask": [torch.zeros(2, 4, dtype=torch.bool)]}
    tokens = torch.tensor([[2, 4, 5, 6, 4, 7], [2, 7, 7, 4, 5, 6]])  # T = 6 > S = 4
    base = decoder(tokens, encoder_out=enc)[0]
    for j in range(4):
        moved = states.clone()
        moved[:, j] += 1.0
        out = decoder(tokens, encoder_out={"states": [moved], "padding_mask": enc["padding_mask"]})[0]
        assert torch.equal(out[:, :j], base[:, :j]) and not torch.equal(out[:, j], base[:, j])
    zero_padded = torch.cat([states, torch.zeros(2, 2, states.size(-1))], 1)  # B x T x C
    no_padding = torch.zeros(2, 6, dtype=torch.bool)
    same = decoder(tokens, encoder_out={"states": [zero_padded], "padding_mask": [no_padding]})[0]
    assert torch.equal(same, base)


def test_first_step_starts_from_a_zero_decoder_state():
    """Step 0 by hand: LSTM gates from [e(EOS); c_0] with h = c = 0, then tanh(W_c [h; c_0]) and W_o."""
    task, model, _ = build()
    decoder = model.decoder
    sample = st.tagging_batch(task, SENTENCES)
    enc = model.encoder(sample["net_input"]["src_tokens"])
    tokens = sample["net_input"]["prev_output_tokens"][:, :1]
    context = enc["states"][0][:, 0]  # B x C
    lstm = decoder.lstm
    x = torch.cat([decoder.embed_tokens(tokens[:, 0]), context], -1)
    gates = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0  # W_hh h_{-1} = 0
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(i) * torch.tanh(g)  # + sigmoid(f) * c_{-1} = 0
    h = torch.sigmoid(o) * torch.tanh(c)
    expected = decoder.fc_out(torch.tanh(decoder.combine(torch.cat([h, context], -1))))
    torch.testing.assert_close(decoder(tokens, encoder_out=enc)[0][:, 0], expected, rtol=1e-5, atol=1e-6)


def test_encoder_states_are_zero_at_padding_and_the_padding_side_does_not_matter():
    task, model, _ = build()
    left = st.tagging_batch(task, SENTENCES, left_pad_source=True)
    right = st.tagging_batch(task, SENTENCES, left_pad_source=False)
    assert not torch.equal(left["net_input"]["src_tokens"], right["net_input"]["src_tokens"])
    enc = model.encoder(left["net_input"]["src_tokens"])
    assert enc["states"][0][enc["padding_mask"][0]].abs().sum() == 0
    out_left, out_right = model(**left["net_input"])[0], model(**right["net_input"])[0]
    real = left["target"].ne(1)
    torch.testing.assert_close(out_left[real], out_right[real], rtol=1e-6, atol=1e-6)


def test_batch_order_and_batching_do_not_change_outputs():
    task, model, _ = build()
    sample = st.tagging_batch(task, SENTENCES, given_order=True)
    out = model(**sample["net_input"])[0]  # B x T x V
    flipped = st.tagging_batch(task, SENTENCES[::-1], given_order=True)
    out_flipped = model(**flipped["net_input"])[0]
    for k, (words, _) in enumerate(SENTENCES):
        n = len(words) + 1
        alone = model(**st.tagging_batch(task, [SENTENCES[k]])["net_input"])[0][0]  # T x V
        torch.testing.assert_close(out[k, :n], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_flipped[len(SENTENCES) - 1 - k, :n], alone, rtol=1e-5, atol=1e-6)


# -- architectures ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, flags, expected",
    [
        ("seq2seq_tagger_ner", [], dict(word=64, enc=64, label=8, dec=64, bi=True)),
        ("seq2seq_tagger_ner", ["--encoder-bidirectional", "false", "--encoder-hidden-size", "32"],
         dict(word=32, enc=32, label=8, dec=64, bi=False)),
        ("seq2seq_tagger_supertag", [], dict(word=512, enc=512, label=512, dec=512, bi=True)),
        ("seq2seq_tagger", [], dict(word=256, enc=256, label=64, dec=256, bi=True)),
    ],
)  # fmt: skip
def test_named_architectures(arch, flags, expected, monkeypatch):
    monkeypatch.setattr(st, "TINY_TAGGER_FLAGS", [])
    _, model, _ = st.build_tagger(arch, flags)
    enc, dec = model.encoder, model.decoder
    assert enc.embed_tokens.embedding_dim == expected["word"] and enc.lstm.hidden_size == expected["enc"]
    assert enc.lstm.bidirectional == expected["bi"] and enc.lstm.num_layers == 1
    assert dec.embed_tokens.embedding_dim == expected["label"] and dec.lstm.hidden_size == expected["dec"]
    assert model.max_positions() == (1024, 1024)


# -- generation -------------------------------------------------------------------------------------
FILLERS = ("madeupword0000", "madeupword0001")


def biased_towards_specials(model, task):
    """Output biases that make every special symbol (and dictionary filler) the favourite."""
    d = task.tgt_dict
    with torch.no_grad():
        for index in [d.bos(), d.pad(), d.eos(), d.unk()] + [d.index(s) for s in FILLERS]:
            model.decoder.fc_out.bias[index] += 20.0
    return model


def test_label_mask_and_allowed_tokens():
    task, _, _ = build(tags=st.NER_TAGS + FILLERS)
    d = task.tgt_dict
    labels = label_mask(d)
    assert [d[i] for i in labels.nonzero().flatten().tolist()] == list(st.NER_TAGS)
    words = torch.tensor([0, 1, 3])
    allowed = allowed_next_tokens(1, words, labels, d.eos())
    assert allowed[0].tolist() == allowed[1].tolist() == [i == d.eos() for i in range(len(d))]
    assert torch.equal(allowed[2], labels)
    src = torch.tensor([[1, 1, 5, 2], [4, 5, 6, 2]])
    assert source_word_counts(src, d.pad(), d.eos()).tolist() == [1, 3]


SEARCHES = {"greedy": dict(beam=1), "beam3": dict(beam=3), "sampling": dict(beam=2, sampling=True)}


@pytest.mark.parametrize("options", list(SEARCHES.values()), ids=list(SEARCHES))
def test_generator_emits_one_label_per_word_and_no_special_symbol(options):
    task, model, _ = build(tags=st.NER_TAGS + FILLERS)
    biased_towards_specials(model, task)
    sentences = SENTENCES + [([], []), (["w3"] * 9, ["O"] * 9)]
    sample = st.tagging_batch(task, sentences)
    torch.manual_seed(0)
    generator = task.build_generator([model], Namespace(**options))
    hypos = task.inference_step(generator, [model], sample)
    labels = set(st.NER_TAGS)
    for k, sentence_id in enumerate(sample["id"].tolist()):
        n = len(sentences[sentence_id][0])
        assert len(hypos[k]) == options["beam"] or n == 0  # an empty sentence has one labelling
        for hypo in hypos[k]:
            tokens = hypo["tokens"].tolist()
            assert len(tokens) == n + 1 and tokens[-1] == task.tgt_dict.eos()
            assert all(task.tgt_dict[t] in labels for t in tokens[:-1])
            assert torch.isfinite(hypo["score"])


def test_greedy_generation_is_the_masked_argmax_of_step_by_step_decoding():
    task, model, _ = build(tags=st.NER_TAGS + FILLERS)
    biased_towards_specials(model, task)
    sample = st.tagging_batch(task, SENTENCES)
    hypos = task.inference_step(task.build_generator([model], Namespace(beam=1)), [model], sample)
    net = sample["net_input"]
    enc = model.encoder(net["src_tokens"])
    words = source_word_counts(net["src_tokens"], 1, 2)
    labels = label_mask(task.tgt_dict)
    tokens, state = torch.full((len(SENTENCES), 1), task.tgt_dict.eos()), {}
    for step in range(int(words.max()) + 1):
        logits = model.decoder(tokens, encoder_out=enc, incremental_state=state)[0][:, -1]
        allowed = allowed_next_tokens(step, words, labels, task.tgt_dict.eos())
        tokens = torch.cat([tokens, logits.masked_fill(~allowed, float("-inf")).argmax(-1, keepdim=True)], 1)
    for k in range(len(SENTENCES)):
        assert hypos[k][0]["tokens"].tolist() == tokens[k, 1 : int(words[k]) + 2].tolist()


def test_beam_wider_than_the_number_of_labellings_finishes():
    """Two labels and one-word sentences: only two labellings exist for a beam of 4."""
    task, model, _ = build(tags=("O", "B-PER"))
    sample = st.tagging_batch(task, [(["w1"], ["O"]), (["w2", "w3"], ["O", "O"])], given_order=True)
    hypos = task.inference_step(task.build_generator([model], Namespace(beam=4, nbest=4)), [model], sample)
    assert [len(h) for h in hypos] == [2, 4]
    assert {tuple(h["tokens"].tolist()) for h in hypos[0]} == {(4, 2), (5, 2)}


def test_generator_refuses_options_it_replaces():
    task, model, _ = build()
    with pytest.raises(ValueError, match="match-source-len"):
        task.build_generator([model], Namespace(beam=1, match_source_len=True))


# -- the other components that drive this decoder ---------------------------------------------------
def test_one_hot_soft_embeddings_reproduce_the_token_path_bit_for_bit():
    task, model, _ = build("--dropout", "0.3")
    model.train()  # dropout on: it must act on the vectors exactly as on embeddings
    decoder = model.decoder
    sample = st.tagging_batch(task, SENTENCES)
    tokens = sample["net_input"]["prev_output_tokens"]
    torch.manual_seed(3)
    enc = model.encoder(sample["net_input"]["src_tokens"])
    vectors = soft_embeddings(F.one_hot(tokens, decoder.embed_tokens.num_embeddings).float(), decoder.embed_tokens)
    torch.manual_seed(7)
    by_token = decoder(tokens, encoder_out=enc)[0]
    torch.manual_seed(7)
    by_vector = decode_from_embeddings(decoder, vectors, tokens, encoder_out=enc)[0]
    assert torch.equal(by_token, by_vector)
    model.eval()
    token_state, vector_state = {}, {}
    for t in range(1, tokens.size(1) + 1):
        a = decoder(tokens[:, :t], encoder_out=enc, incremental_state=token_state)[0]
        b = decode_from_embeddings(decoder, vectors[:, :t], tokens[:, :t], enc, incremental_state=vector_state)[0]
        assert torch.equal(a, b)
    # soft (non one-hot) vectors: incremental equals full decoding
    weights = torch.softmax(3 * torch.randn(*tokens.shape, decoder.embed_tokens.num_embeddings), -1)
    soft = soft_embeddings(weights, decoder.embed_tokens)
    full = decode_from_embeddings(decoder, soft, tokens, encoder_out=enc)[0]
    state, steps = {}, []
    for t in range(1, tokens.size(1) + 1):
        out = decode_from_embeddings(decoder, soft[:, :t], tokens[:, :t], enc, incremental_state=state)[0]
        steps.append(out[:, -1])
    real = tokens.ne(1)
    torch.testing.assert_close(torch.stack(steps, 1)[real], full[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("criterion", ["parallel_ss", "sequential_ss"])
def test_scheduled_sampling_criteria_train_the_tagger(criterion):
    flags = ["--criterion", criterion, "--label-smoothing", "0.1", "--ss-prob", "0.5"]
    task, model, crit = st.build_tagger(criterion=flags)
    _, _, ce = st.build_tagger(criterion=["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"])
    sample = st.tagging_batch(task, SENTENCES)
    model.eval()
    crit.set_num_updates(0)
    with torch.no_grad():  # validation is teacher-forced: exactly label-smoothed cross-entropy
        assert torch.equal(crit(model, sample)[0], ce(model, sample)[0])
    model.train()
    torch.manual_seed(0)
    loss, sample_size, log = crit(model, sample)
    loss.backward()
    assert torch.isfinite(loss) and sample_size == sample["ntokens"] and log["ss_prob_sum"] == 0.5
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.lstm.weight_ih_l0.grad.abs().sum() > 0 and model.decoder.fc_out.weight.grad.abs().sum() > 0
