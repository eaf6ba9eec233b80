"""Feeding a fairseq decoder embedding vectors instead of token ids.

Differentiable scheduled sampling (Goyal et al. 2017, sections 3.1-3.2) and the soft beam search
loss (Goyal's thesis, chapter 4) feed the decoder *soft* embeddings ``sum_y e(y) w(y)``, mixtures of
token embeddings.  The decoder must treat such a vector exactly as it treats the embedding of a
token: scale it (``embed_scale``), project it (``project_in_dim``), add positions, apply its
embedding layer norm, quant-noise and dropout.  Rather than re-implementing each decoder's input
pipeline, :func:`decode_from_embeddings` runs the decoder's own ``forward`` with its
``embed_tokens`` module swapped, for that call only, for one that returns the given vectors.  The
token ids still passed alongside serve what they serve in fairseq: positions and the padding mask
(any non-padding id at a real position gives the same result).

Because ``one_hot(y) @ E`` equals ``E[y]`` exactly (the other terms are exact zeros), one-hot
weights reproduce the token path bit for bit, in full and in incremental decoding (tested).
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor, nn


def soft_embeddings(weights: Tensor, table) -> Tensor:
    """``sum_y e(y) * weights[..., y]``: ... x V weights (e.g. a softmax) -> ... x D vectors.

    ``table`` is the V x D embedding matrix or the embedding module holding it.  One-hot weights
    give exactly the rows of the embedding matrix.
    """
    matrix = getattr(table, "weight", table)  # V x D
    return torch.matmul(weights.to(matrix.dtype), matrix)


class GivenEmbeddings(nn.Module):
    """Stands in for a decoder's ``embed_tokens`` and returns precomputed B x T x D vectors.

    In incremental decoding fairseq decoders embed only the last ``t`` inputs; the last ``t`` vectors
    are returned then.  It keeps the original module's ``weight`` and attributes visible, since some
    decoders read them (e.g. ``embedding_dim``, ``padding_idx``).
    """

    def __init__(self, original: nn.Module, vectors: Tensor):
        super().__init__()
        self.original = original
        self.vectors = vectors  # B x T x D

    def forward(self, tokens: Tensor) -> Tensor:
        bsz, steps = tokens.shape
        if bsz != self.vectors.size(0) or steps > self.vectors.size(1):
            raise ValueError(
                f"decoder asked for embeddings of {bsz} x {steps} tokens, but {tuple(self.vectors.shape[:2])} vectors were given"
            )
        # a fresh tensor, as an embedding lookup returns: decoders add positions in place (fconv)
        return self.vectors[:, self.vectors.size(1) - steps :].clone()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)


@contextlib.contextmanager
def embeddings_as_inputs(decoder: nn.Module, vectors: Tensor):
    """Within the block, ``decoder.embed_tokens(tokens)`` returns ``vectors`` (see GivenEmbeddings)."""
    if not hasattr(decoder, "embed_tokens"):
        raise TypeError(
            f"{type(decoder).__name__} has no embed_tokens module: it cannot be fed embedding vectors"
        )
    original = decoder.embed_tokens
    decoder.embed_tokens = GivenEmbeddings(original, vectors)
    try:
        yield
    finally:
        decoder.embed_tokens = original


def decode_from_embeddings(
    decoder: nn.Module,
    vectors: Tensor,
    tokens: Tensor,
    encoder_out=None,
    incremental_state: Optional[dict] = None,
    **kwargs,
):
    """Runs ``decoder`` on input vectors (B x T x D) in place of the embeddings of ``tokens`` (B x T).

    ``tokens`` give positions and padding (pass the gold inputs, or any non-padding id at real
    positions).  With ``incremental_state`` this is one incremental step: ``tokens`` and ``vectors``
    hold the prefix (or at least its last position), as with token inputs.  Returns the decoder's
    usual output tuple.
    """
    if vectors.shape[:2] != tokens.shape:
        raise ValueError(f"vectors {tuple(vectors.shape)} do not match tokens {tuple(tokens.shape)}")
    with embeddings_as_inputs(decoder, vectors):
        return decoder(tokens, encoder_out=encoder_out, incremental_state=incremental_state, **kwargs)
