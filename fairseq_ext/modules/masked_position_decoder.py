"""A fairseq non-autoregressive decoder evaluated only where a masked LM's answer is read.

The Metropolis-Hastings sampler over a CMLM (Goyal's thesis, CMU 2021, chapter 6) decodes many copies of
a sequence with one position masked each and reads the output at that position only.  fairseq's
``NATransformerDecoder.extract_features`` computes every position of every layer and projects the
source's keys and values again in every row and layer.  Two savings are exact:

* **source keys and values once per sentence.**  Cross-attention's K = W_k h_src and V = W_v h_src
  depend on the sentence only; they are projected once per layer for the encoded batch and gathered
  per row (the rows of one sentence share them).
* **the last layer at the read positions only.**  In a bidirectional decoder the last layer's output at
  position t needs every position's input to that layer (the keys and values of its self-attention)
  but no other position's output: the last layer runs its queries, cross-attention and feed-forward
  block at the K read positions instead of all L.

Everything else is fairseq's own modules (embedding, self-attention, layer norms, feed-forward, output
layer), called with fairseq's eval-mode arithmetic; :func:`unsupported_reason` lists the layer options
this path does not reproduce (then callers use ``extract_features``).  Tested equal to
``extract_features`` gathered at the positions, pre- and post-norm, with padding on both sides.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

KeyValues = Tuple[Tensor, Tensor]  # (K, V), each N x H x S x head_dim


def unsupported_reason(decoder) -> Optional[str]:
    """Why ``decoder`` cannot take the positions-only path (None when it can).  The path reproduces the
    eval-mode forward of fairseq's ``TransformerDecoderLayerBase`` without its optional extras."""
    if decoder.training:
        return "the decoder is in training mode (dropout)"
    if not hasattr(decoder, "forward_embedding") or not len(decoder.layers):
        return "not a fairseq NAT decoder with layers"
    if any(getattr(m, "apply_during_inference", False) for m in decoder.modules()):
        return "dropout is kept at inference (--retain-dropout)"
    for i, layer in enumerate(decoder.layers):
        extras = {
            "cross_self_attention": getattr(layer, "cross_self_attention", True),
            "scale_heads": getattr(layer, "c_attn", None) is not None,
            "scale_attn": getattr(layer, "attn_ln", None) is not None,
            "scale_fc": getattr(layer, "ffn_layernorm", None) is not None,
            "scale_resids": getattr(layer, "w_resid", None) is not None,
            "no encoder attention": getattr(layer, "encoder_attn", None) is None,
        }
        attn = getattr(layer, "encoder_attn", None)
        if attn is not None:
            extras["encoder attention bias_k / zero attention"] = attn.bias_k is not None or attn.add_zero_attn
        named = [name for name, present in extras.items() if present]
        if named:
            return f"decoder layer {i} uses {', '.join(named)}"
    return None


def source_key_values(decoder, encoder_out: dict) -> List[KeyValues]:
    """Every layer's cross-attention keys and values of the encoded batch, projected once.

    Returns one (K, V) per decoder layer, each B x H x S x head_dim (fairseq's ``k_proj`` / ``v_proj``)."""
    src = encoder_out["encoder_out"][0]  # S x B x D
    out = []
    for layer in decoder.layers:
        attn = layer.encoder_attn
        s, b, _ = src.shape
        heads = attn.num_heads

        def split(t: Tensor) -> Tensor:  # S x B x D -> B x H x S x hd
            return t.view(s, b, heads, attn.head_dim).permute(1, 2, 0, 3)

        out.append((split(attn.k_proj(src)), split(attn.v_proj(src))))
    return out


def source_padding(encoder_out: dict, batch: int, length: int, device) -> Tensor:
    """B x S bool, True at source padding (fairseq's convention; all False when the encoder gives none)."""
    masks = encoder_out.get("encoder_padding_mask") or []
    if len(masks) and masks[0] is not None:
        return masks[0]
    return torch.zeros(batch, length, dtype=torch.bool, device=device)


def cross_attention(attn, query: Tensor, key_values: KeyValues, source_pad: Tensor) -> Tensor:
    """fairseq's encoder attention with precomputed keys and values.

    Args:
        attn: the layer's ``MultiheadAttention`` (its q_proj, out_proj, heads, scaling 1/sqrt(hd)).
        query: Q x R x D.  key_values: R x H x S x hd each.  source_pad: R x S, True at padding.
    Returns: Q x R x D.
    """
    q_len, rows, dim = query.shape
    q = attn.q_proj(query).view(q_len, rows, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)  # R x H x Q x hd
    keep = ~source_pad[:, None, None, :]  # R x 1 x 1 x S, True = attend
    out = F.scaled_dot_product_attention(q, key_values[0], key_values[1], attn_mask=keep)  # R x H x Q x hd
    return attn.out_proj(out.permute(2, 0, 1, 3).reshape(q_len, rows, dim))


def layer_forward(layer, query: Tensor, context: Tensor, self_pad: Tensor, key_values: KeyValues,
                  source_pad: Tensor) -> Tensor:  # fmt: skip
    """One decoder layer in eval mode, its output at the ``query`` positions only.

    Args:
        query: Q x R x D, the layer inputs at the positions whose outputs are wanted.
        context: L x R x D, the layer inputs at every position (self-attention's keys and values); pass
            ``query`` itself for every position.
        self_pad: R x L, True at target padding.  key_values, source_pad: as :func:`cross_attention`.
    Returns: Q x R x D (``TransformerDecoderLayerBase.forward`` restricted to the query positions).
    """
    pre = layer.normalize_before
    residual = query
    if pre:
        query = layer.self_attn_layer_norm(query)
        context = query if context is residual else layer.self_attn_layer_norm(context)
    x, _ = layer.self_attn(query=query, key=context, value=context, key_padding_mask=self_pad, need_weights=False)
    x = layer.residual_connection(x, residual)
    if not pre:
        x = layer.self_attn_layer_norm(x)
    residual = x
    x = cross_attention(layer.encoder_attn, layer.encoder_attn_layer_norm(x) if pre else x, key_values, source_pad)
    x = layer.residual_connection(x, residual)
    if not pre:
        x = layer.encoder_attn_layer_norm(x)
    residual = x
    if pre:
        x = layer.final_layer_norm(x)
    x = layer.fc2(layer.activation_fn(layer.fc1(x)))
    x = layer.residual_connection(x, residual)
    if not pre:
        x = layer.final_layer_norm(x)
    return x


def features_at(decoder, tokens: Tensor, positions: Tensor, key_values: List[KeyValues],
                source_pad: Tensor) -> Tensor:  # fmt: skip
    """The decoder's features at K positions of each row (``extract_features(tokens)`` gathered there).

    Args:
        tokens: R x L decoder inputs.  positions: R x K columns to read.
        key_values: per layer, the rows' source keys and values (R x H x S x hd each, e.g.
            :func:`source_key_values` indexed by each row's sentence).  source_pad: R x S.
    Returns: R x K x D' (after the decoder's final layer norm and output projection, if any).
    """
    x, self_pad = decoder.forward_embedding(tokens)  # R x L x D, R x L
    x = x.transpose(0, 1)  # L x R x D
    layers = list(decoder.layers)
    for layer, kv in zip(layers[:-1], key_values[:-1]):
        x = layer_forward(layer, x, x, self_pad, kv, source_pad)
    picked = x.gather(0, positions.t().unsqueeze(-1).expand(-1, -1, x.size(-1)))  # K x R x D
    x = layer_forward(layers[-1], picked, x, self_pad, key_values[-1], source_pad)  # K x R x D
    if decoder.layer_norm is not None:
        x = decoder.layer_norm(x)
    x = x.transpose(0, 1)  # R x K x D
    if decoder.project_out_dim is not None:
        x = decoder.project_out_dim(x)
    return x


class SourceCache:
    """The encoded batch's per-layer source keys and values and padding, gathered per row on demand."""

    def __init__(self, decoder, encoder_out: dict):
        self.key_values = source_key_values(decoder, encoder_out)
        src = encoder_out["encoder_out"][0]  # S x B x D
        self.padding = source_padding(encoder_out, src.size(1), src.size(0), src.device)  # B x S

    def rows(self, contexts: Tensor) -> Tuple[List[KeyValues], Tensor]:
        """contexts R (each row's sentence) -> per-layer (K, V) R x H x S x hd and padding R x S."""
        kv = [(k.index_select(0, contexts), v.index_select(0, contexts)) for k, v in self.key_values]
        return kv, self.padding.index_select(0, contexts)
