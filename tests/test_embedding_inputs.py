"""Decoding from embedding vectors: one-hot soft embeddings reproduce the token path bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.modules.embedding_inputs import decode_from_embeddings, soft_embeddings
from fairseq_ext.testing import tiny

PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0, 4]), ([4, 5], [5, 4, 1]), ([1, 1, 2], [2, 2])]
ARCHS = {
    "transformer": [],
    "transformer+layernorm_embedding": ["--layernorm-embedding", "--no-scale-embedding"],
    "lstm": [],
    "fconv": [],
    "transformer_lm": [],
    "transformer_lm+input_projection": ["--decoder-input-dim", "12", "--layernorm-embedding"],
}


def setup(name, pairs=PAIRS):
    arch = name.split("+")[0]
    extra = ARCHS[name] + ["--dropout", "0.3"]  # dropout on: it must act on the vectors exactly as on embeddings
    torch.manual_seed(0)
    task, model, _ = tiny.build(arch, ["--criterion", "cross_entropy"], extra=extra)
    if arch.endswith("_lm"):
        sample = tiny.lm_batch(task, [s + t for s, t in pairs])
        tokens, encoder_out = sample["net_input"]["src_tokens"], None
    else:
        sample = tiny.translation_batch(task, pairs)
        net = sample["net_input"]
        tokens = net["prev_output_tokens"]
        encoder_out = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    return model, tokens, encoder_out


def run(fn, seed=7):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("name", list(ARCHS))
def test_one_hot_soft_embeddings_reproduce_the_token_path_bit_for_bit(name):
    model, tokens, enc = setup(name)
    model.train()
    decoder = model.decoder
    one_hot = F.one_hot(tokens, decoder.embed_tokens.num_embeddings).float()  # B x T x V
    vectors = soft_embeddings(one_hot, decoder.embed_tokens)
    assert torch.equal(vectors, decoder.embed_tokens(tokens))
    by_token = run(lambda: decoder(tokens, encoder_out=enc)[0])
    by_vector = run(lambda: decode_from_embeddings(decoder, vectors, tokens, encoder_out=enc)[0])
    assert torch.equal(by_token, by_vector)
    assert decoder.embed_tokens.__class__.__name__ != "GivenEmbeddings"  # restored
    assert torch.equal(vectors, decoder.embed_tokens(tokens))  # the caller's vectors are left untouched


@pytest.mark.parametrize("name", list(ARCHS))
def test_incremental_decoding_from_vectors_equals_full_and_token_paths(name):
    model, tokens, enc = setup(name)
    model.eval()
    decoder = model.decoder
    torch.manual_seed(1)
    weights = torch.softmax(3 * torch.randn(*tokens.shape, decoder.embed_tokens.num_embeddings), -1)
    vectors = soft_embeddings(weights, decoder.embed_tokens)
    full = decode_from_embeddings(decoder, vectors, tokens, encoder_out=enc)[0]  # B x T x V
    state, steps = {}, []
    one_hot_state, one_hot_steps = {}, []
    one_hot = soft_embeddings(F.one_hot(tokens, weights.size(-1)).float(), decoder.embed_tokens)
    for t in range(1, tokens.size(1) + 1):
        steps.append(decode_from_embeddings(decoder, vectors[:, :t], tokens[:, :t], enc, incremental_state=state)[0][:, -1])
        one_hot_steps.append(decode_from_embeddings(decoder, one_hot[:, :t], tokens[:, :t], enc, incremental_state=one_hot_state)[0][:, -1])
    real = tokens.ne(decoder.embed_tokens.padding_idx)
    torch.testing.assert_close(torch.stack(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)
    token_state, token_steps = {}, []
    for t in range(1, tokens.size(1) + 1):
        token_steps.append(decoder(tokens[:, :t], encoder_out=enc, incremental_state=token_state)[0][:, -1])
    assert torch.equal(torch.stack(one_hot_steps, 1), torch.stack(token_steps, 1))


# gradcheck needs float64 throughout: fairseq's transformer attention computes its softmax in float32
# (utils.softmax casts), so the transformer gets a gradient-reaches-earlier-inputs check instead.
@pytest.mark.parametrize("name, exact", [("lstm", True), ("transformer", False)])
def test_gradcheck_through_the_decoder_into_the_mixing_scores(name, exact):
    """float64 gradcheck of decoder outputs w.r.t. the scores whose softmax mixes the embeddings."""
    model, tokens, enc = setup(name)
    model.double().eval()
    tokens = tokens[:2, :3]
    if enc is not None:  # re-encode in float64 for the first two sentences
        sample = tiny.translation_batch(tiny.build(name.split("+")[0], ["--criterion", "cross_entropy"])[0], PAIRS)
        net = sample["net_input"]
        enc = model.encoder(net["src_tokens"][:2], src_lengths=net["src_lengths"][:2])
    decoder = model.decoder
    torch.manual_seed(0)
    scores = torch.randn(*tokens.shape, decoder.embed_tokens.num_embeddings, dtype=torch.float64, requires_grad=True)

    def outputs(s):
        vectors = soft_embeddings(torch.softmax(s, -1), decoder.embed_tokens)
        return decode_from_embeddings(decoder, vectors, tokens, encoder_out=enc)[0]

    if exact:
        assert torch.autograd.gradcheck(outputs, (scores,), eps=1e-6, atol=1e-6)
    outputs(scores)[:, -1].sum().backward()  # the last step depends on every earlier input
    assert scores.grad[:, 0].abs().sum() > 0


def test_mismatched_shapes_are_refused():
    model, tokens, enc = setup("lstm")
    vectors = torch.zeros(tokens.size(0), tokens.size(1) + 1, model.decoder.embed_tokens.embedding_dim)
    with pytest.raises(ValueError, match="do not match"):
        decode_from_embeddings(model.decoder, vectors, tokens, encoder_out=enc)
