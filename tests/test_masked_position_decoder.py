"""The positions-only decoder path (source keys and values once per sentence, the last layer at the read
positions only) equals fairseq's ``extract_features`` gathered at those positions, and refuses what it
does not reproduce."""
import pytest
import torch

from fairseq_ext.modules import masked_position_decoder as mpd
from fairseq_ext.modules.mlm_energy import CMLMMaskedLM, PassCounter
from fairseq_ext.testing import tiny

PAD, EOS, UNK = 1, 2, 3
SOURCES = [[4, 5, 6, 7, 8, 9, EOS], [9, 4, EOS], [6, EOS]]  # three sentences, left-padded when batched


def build(extra=()):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        _, model, _ = tiny.build("cmlm_transformer", ["--criterion", "nat_loss"], num_symbols=10,
                                 extra=["--decoder-layers", "3", *extra])  # fmt: skip
    return model.double().eval()


def encode(model, sources):
    src = torch.full((len(sources), max(map(len, sources))), PAD)
    for i, s in enumerate(sources):
        src[i, src.size(1) - len(s) :] = torch.tensor(s)
    return model.encoder(src, src_lengths=torch.tensor([len(s) for s in sources]))


def rows():
    """Five rows of different lengths (right padding), their sentences and two read positions each."""
    tokens = torch.tensor([
        [0, 4, UNK, 6, 7, EOS, PAD],
        [0, UNK, 5, EOS, PAD, PAD, PAD],
        [0, 8, 9, 4, 5, UNK, EOS],
        [0, UNK, EOS, PAD, PAD, PAD, PAD],
        [0, 6, 6, UNK, EOS, PAD, PAD],
    ])  # fmt: skip
    contexts = torch.tensor([0, 2, 1, 0, 1])
    positions = torch.tensor([[2, 4], [1, 2], [5, 1], [1, 1], [3, 0]])
    return tokens, contexts, positions


@torch.no_grad()
@pytest.mark.parametrize("extra", [(), ("--decoder-normalize-before", "--encoder-normalize-before")],
                         ids=["post-norm", "pre-norm"])  # fmt: skip
def test_features_at_equal_extract_features_gathered(extra):
    model = build(extra)
    assert mpd.unsupported_reason(model.decoder) is None
    enc = encode(model, SOURCES)
    tokens, contexts, positions = rows()
    full, _ = model.decoder.extract_features(tokens, encoder_out=model.encoder.reorder_encoder_out(enc, contexts))
    want = full.gather(1, positions.unsqueeze(-1).expand(-1, -1, full.size(-1)))  # R x K x D
    cache = mpd.SourceCache(model.decoder, enc)
    key_values, source_pad = cache.rows(contexts)
    assert bool(source_pad.any())  # the left padding of the shorter sources is exercised
    got = mpd.features_at(model.decoder, tokens, positions, key_values, source_pad)
    # float64 model, but fairseq's encoder attention takes its softmax in float32 (utils.softmax): 1e-7 apart
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_the_masked_lm_gives_the_same_logits_with_and_without_the_positions_only_path():
    model = build()
    enc = encode(model, SOURCES)
    tokens, contexts, positions = rows()
    fast, slow = PassCounter(), PassCounter()
    a = CMLMMaskedLM(model, enc, max_tokens_per_pass=14, counter=fast)
    b = CMLMMaskedLM(model, enc, max_tokens_per_pass=14, counter=slow, positions_only=False)
    assert a.source is not None and b.source is None
    torch.testing.assert_close(a(tokens, contexts, positions), b(tokens, contexts, positions), rtol=1e-5, atol=1e-6)
    assert (fast.calls, fast.rows, fast.tokens) == (slow.calls, slow.rows, slow.tokens)


def test_what_the_path_does_not_reproduce_is_named_and_falls_back():
    model = build()
    model.train()
    assert "training mode" in mpd.unsupported_reason(model.decoder)
    enc_model = build()
    enc = encode(enc_model, SOURCES)
    enc_model.train()
    assert CMLMMaskedLM(enc_model, enc).source is None  # dropout on: fairseq's own forward
    scaled = build()
    scaled.decoder.layers[2].c_attn = torch.nn.Parameter(torch.ones(scaled.decoder.layers[2].nh))  # --scale-heads
    assert "decoder layer 2 uses scale_heads" in mpd.unsupported_reason(scaled.decoder)
    assert CMLMMaskedLM(scaled, encode(scaled, SOURCES)).source is None
    model.eval()
    model.decoder.layers[1].encoder_attn = None
    assert "no encoder attention" in mpd.unsupported_reason(model.decoder)

