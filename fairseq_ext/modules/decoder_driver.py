"""Driving a fairseq autoregressive model on decoder inputs chosen by a training method.

Scheduled-sampling style methods run the decoder on inputs other than the gold prefix.  This module
hides what differs between the model families they support:

* encoder-decoder models (``FairseqEncoderDecoderModel``: transformer, lstm, fconv, ...): decoder
  inputs are ``net_input["prev_output_tokens"]`` and the encoder output can be computed once and
  reused by every pass;
* decoder-only language models (``FairseqLanguageModel``: transformer_lm, lstm_lm, ...): decoder
  inputs are ``net_input["src_tokens"]`` and there is no encoder.

In both, the decoder output at position ``i`` predicts the token fed at position ``i + 1`` (the
teacher-forcing shift); :func:`check_teacher_forcing_shift` verifies it on each batch.

Distributed wrappers: fairseq's ``legacy_ddp`` all-reduces gradients explicitly, so submodules may be
called directly (encoder reuse).  Under torch's DDP (``--ddp-backend pytorch_ddp``/``c10d``) or FSDP,
gradient synchronisation (or parameter gathering) hooks into the wrapper's ``forward``; there the
driver runs every pass through ``model(**net_input)`` instead, recomputing the encoder.
"""
import logging
from typing import Any, Dict, Optional

import torch
from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
from fairseq.modules import LinearizedConvolution
from fairseq.models.transformer import TransformerDecoderBase
from fairseq_ext.modules.embedding_inputs import embeddings_as_inputs
from fairseq.models import (
    BaseFairseqModel,
    FairseqDecoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
)

logger = logging.getLogger(__name__)

ENCODER_DECODER = "encoder_decoder"
LANGUAGE_MODEL = "language_model"


# Both errors also derive from RuntimeError: fairseq's Trainer.train_step re-raises a RuntimeError
# as it is, whereas any other exception first makes it write crash.pt into the user's --save-dir.
# These are configuration errors raised on the first batch, before any update: nothing is saved.
class UnsupportedModelError(TypeError, RuntimeError):
    """The model cannot be driven by a scheduled-sampling style criterion."""


class TargetsNotShiftedError(ValueError, RuntimeError):
    """The task's targets are not the decoder inputs shifted by one position."""


def unwrap_model(model):
    """Peels fairseq's ModuleProxyWrapper and any ``.module`` distributed wrappers."""
    inner = model
    while isinstance(inner, ModuleProxyWrapper) or (
        hasattr(inner, "module") and isinstance(getattr(inner, "module"), torch.nn.Module)
    ):
        inner = inner.module
    return inner


def submodules_callable_directly(model) -> bool:
    """True when calling the model's encoder/decoder directly keeps distributed training correct."""
    outer = model.module if isinstance(model, ModuleProxyWrapper) else model
    if outer is unwrap_model(model):
        return True
    return isinstance(outer, LegacyDistributedDataParallel)


def _overrides(obj, name: str, base) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name)


def _same_method(obj, name: str, base) -> bool:
    return not _overrides(obj, name, base)


class DecoderDriver:
    """Runs one model's decoder on arbitrary decoder inputs; built once per model by a criterion.

    Args:
        model: the model the criterion was called with (possibly wrapped for distributed training).
        criterion_name: used in error messages.
    """

    def __init__(self, model, criterion_name: str):
        self.model = model
        self.inner = unwrap_model(model)
        self.criterion_name = criterion_name
        self.kind = model_kind(self.inner, criterion_name)
        self.decoder = self.inner.decoder
        self.direct = submodules_callable_directly(model)
        # extract_features + output_layer lets a pass project only the positions it needs
        self.can_project_subset = _overrides(self.decoder, "extract_features", FairseqDecoder) and _overrides(
            self.decoder, "output_layer", FairseqDecoder
        )
        # fairseq's LinearizedConvolution (fconv) caches a re-laid-out copy of its weight for
        # incremental inference, which cuts the gradient to the weight: step-by-step training
        # re-runs the causal decoder on the whole prefix instead.
        self.incremental_has_gradient = not any(
            isinstance(m, LinearizedConvolution) for m in self.decoder.modules()
        )
        self.plain_softmax_output = (
            getattr(self.decoder, "adaptive_softmax", None) is None
            and _same_method(self.inner, "get_normalized_probs", BaseFairseqModel)
            and _same_method(self.decoder, "get_normalized_probs", FairseqDecoder)
            and _same_method(self.decoder, "get_normalized_probs_scriptable", FairseqDecoder)
        )
        if not self.direct:
            logger.warning(
                f"{criterion_name}: the model is wrapped by {type(model.module if isinstance(model, ModuleProxyWrapper) else model).__name__}, "
                "whose gradient hooks run only through forward(); every pass goes through model(...) and the "
                "encoder is recomputed per pass. --ddp-backend legacy_ddp avoids that cost."
            )

    # -- inputs ---------------------------------------------------------------------------------
    def decoder_inputs(self, sample) -> torch.Tensor:
        """B x T decoder input tokens of the sample."""
        net_input = sample["net_input"]
        return net_input["prev_output_tokens"] if self.kind == ENCODER_DECODER else net_input["src_tokens"]

    def with_decoder_inputs(self, sample, tokens) -> Dict[str, Any]:
        """The sample's net_input with the decoder inputs replaced by ``tokens``."""
        net_input = dict(sample["net_input"])
        net_input["prev_output_tokens" if self.kind == ENCODER_DECODER else "src_tokens"] = tokens
        return net_input

    # -- passes ---------------------------------------------------------------------------------
    def encode(self, sample) -> Optional[Any]:
        """Encoder output to reuse across passes, or None (language model, or wrapped model)."""
        if self.kind != ENCODER_DECODER or not self.direct:
            return None
        net_input = sample["net_input"]
        return self.inner.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])

    def forward(self, sample, tokens, encoder_out=None):
        """Full decoder output (net_output tuple) for decoder inputs ``tokens``: B x T x V logits."""
        if encoder_out is not None:
            return self.decoder(tokens, encoder_out=encoder_out)
        return self.model(**self.with_decoder_inputs(sample, tokens))

    def selected_scores(self, sample, tokens, select, encoder_out=None) -> torch.Tensor:
        """N x V scores at the decoder outputs ``select`` (B x T bool) whose softmax is the model's
        distribution there: the raw logits for a plain softmax output layer (softmax is invariant
        to the per-row log-normaliser, which saves a log_softmax pass), else log-probabilities.

        When the decoder separates features from its output layer, only the selected positions are
        projected onto the vocabulary (the projection and softmax dominate a pass's cost), and the
        causal decoder runs only up to the last selected position.
        """
        if self.direct and self.can_project_subset and (encoder_out is not None or self.kind == LANGUAGE_MODEL):
            width = int(select.any(0).nonzero()[-1]) + 1  # outputs past the last selected one are unused
            features, extra = self.decoder.extract_features(tokens[:, :width], encoder_out=encoder_out)  # B x W x D
            logits = self.decoder.output_layer(features[select[:, :width]])  # N x V
        else:
            logits, extra = self.forward(sample, tokens, encoder_out)  # B x T x V
            logits = logits[select]
        if self.plain_softmax_output:
            return logits
        return self.inner.get_normalized_probs((logits, extra), log_probs=True)

    def step(self, prefix, encoder_out, incremental_state):
        """One decoder step on ``prefix`` (B x t): B x C output for the last position, with gradient.

        Incremental (cached) decoding where it keeps gradients; otherwise the full causal prefix.
        """
        if self.incremental_has_gradient:
            out, _ = self.decoder(prefix, encoder_out=encoder_out, incremental_state=incremental_state)
        else:
            out, _ = self.decoder(prefix, encoder_out=encoder_out)
        return out[:, -1]

    def log_probs(self, net_output) -> torch.Tensor:
        return self.inner.get_normalized_probs(net_output, log_probs=True)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """N x V scores whose softmax is the model's distribution, from N x C decoder outputs, with
        gradient: the outputs themselves for a plain softmax layer, else log-probabilities."""
        if self.plain_softmax_output:
            return outputs
        return self.inner.get_normalized_probs((outputs.unsqueeze(1), None), log_probs=True).squeeze(1)

    # -- inputs given as embedding vectors (relaxations) ----------------------------------------
    def input_embedding_matrix(self) -> torch.Tensor:
        """The V x D matrix whose rows the decoder embeds tokens with: soft embeddings mix its rows.

        Raises UnsupportedModelError for decoders without a plain embedding table (adaptive input,
        character embeddings), where a mixture of token embeddings is not defined.
        """
        embed = getattr(self.decoder, "embed_tokens", None)
        weight = getattr(embed, "weight", None)
        if not isinstance(embed, torch.nn.Embedding) or weight is None or weight.dim() != 2:
            raise UnsupportedModelError(
                f"--criterion {self.criterion_name} feeds the decoder mixtures of its token embeddings, so the "
                f"decoder needs a plain embedding table (torch.nn.Embedding as decoder.embed_tokens); "
                f"{type(self.decoder).__name__} has {type(embed).__name__}. Drop --adaptive-input / character "
                "embeddings or choose another --arch."
            )
        return weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x T x D embeddings of ``tokens``, the decoder's own lookup (with gradient)."""
        return self.decoder.embed_tokens(tokens)

    def forward_from_embeddings(self, sample, tokens, vectors, encoder_out=None):
        """:meth:`forward` with the decoder fed ``vectors`` (B x T x D) in place of the embeddings of ``tokens``."""
        with embeddings_as_inputs(self.decoder, vectors):
            return self.forward(sample, tokens, encoder_out)

    def selected_scores_from_embeddings(self, sample, tokens, vectors, select, encoder_out=None) -> torch.Tensor:
        """:meth:`selected_scores` with the decoder fed ``vectors``, keeping the graph."""
        width = tokens.size(1)
        if self.direct and self.can_project_subset and (encoder_out is not None or self.kind == LANGUAGE_MODEL):
            width = int(select.any(0).nonzero()[-1]) + 1  # the causal decoder needs no later inputs
        with embeddings_as_inputs(self.decoder, vectors[:, :width]):
            return self.selected_scores(sample, tokens[:, :width], select[:, :width], encoder_out)

    def selected_candidate_scores_from_embeddings(
        self, sample, tokens, vectors, select, rank, top_k: int, encoder_out=None
    ):
        """Scores of ``top_k`` candidates per selected output, for a relaxation restricted to them.

        ``rank(scores)`` maps the N x V scores (no gradient) to the values whose top ``top_k`` are the
        candidates (e.g. scores plus Gumbel noise, padding at -inf).  Returns (N x k scores with
        gradient, N x k candidate ids).  When the decoder's output layer is a known linear map, only
        the candidates' rows of it enter the graph, so the backward pass skips the N x V x D
        projection gradient; otherwise the full scores are computed with gradient and gathered.
        """
        linear = self.output_linear()
        width = int(select.any(0).nonzero()[-1]) + 1
        if linear is not None and self.direct and self.can_project_subset and (
            encoder_out is not None or self.kind == LANGUAGE_MODEL
        ):
            with embeddings_as_inputs(self.decoder, vectors[:, :width]):
                features, _ = self.decoder.extract_features(tokens[:, :width], encoder_out=encoder_out)
            features = features[select[:, :width]]  # N x D
            weight, bias = linear
            with torch.no_grad():
                candidates = rank(torch.nn.functional.linear(features, weight, bias)).topk(top_k, dim=-1).indices
            scores = torch.einsum("nd,nkd->nk", features, weight[candidates])  # N x k
            if bias is not None:
                scores = scores + bias[candidates]
            return scores, candidates
        scores = self.selected_scores_from_embeddings(sample, tokens, vectors, select, encoder_out)  # N x V
        with torch.no_grad():
            candidates = rank(scores.detach()).topk(top_k, dim=-1).indices
        return scores.gather(-1, candidates), candidates

    def output_linear(self):
        """(weight V x D, bias or None) when the decoder's output layer is ``features @ weight.T + bias``
        and its softmax is the model's distribution; else None."""
        if not self.plain_softmax_output or getattr(self.decoder, "adaptive_softmax", None) is not None:
            return None
        projection = getattr(self.decoder, "output_projection", None)
        # fairseq's transformer decoders project with output_projection; another decoder can declare
        # that its output_layer is exactly its output_projection (LINEAR_OUTPUT_PROJECTION = True)
        linear_output = (
            isinstance(self.decoder, TransformerDecoderBase) and _same_method(self.decoder, "output_layer", TransformerDecoderBase)
        ) or getattr(self.decoder, "LINEAR_OUTPUT_PROJECTION", False)
        if linear_output and isinstance(projection, torch.nn.Linear):
            return projection.weight, projection.bias
        return None

    def step_from_embeddings(self, prefix, prefix_vectors, encoder_out, incremental_state):
        """:meth:`step` with the decoder fed ``prefix_vectors`` (B x t x D): B x C output, with gradient."""
        with embeddings_as_inputs(self.decoder, prefix_vectors):
            return self.step(prefix, encoder_out, incremental_state)


def model_kind(model, criterion_name: str) -> str:
    """ENCODER_DECODER or LANGUAGE_MODEL; raises UnsupportedModelError naming what to do otherwise."""
    name = type(model).__name__
    try:
        from fairseq.models.nat import FairseqNATModel
    except ImportError:  # pragma: no cover - fairseq without NAT models
        FairseqNATModel = ()
    if isinstance(model, FairseqNATModel):
        raise UnsupportedModelError(
            f"--criterion {criterion_name} feeds an autoregressive decoder its own predictions, but "
            f"{name} is non-autoregressive (it predicts all target tokens at once). Use an autoregressive "
            "--arch (transformer, lstm, fconv, or transformer_lm on --task language_modeling)."
        )
    if isinstance(model, FairseqEncoderDecoderModel):
        kind = ENCODER_DECODER
    elif isinstance(model, FairseqLanguageModel):
        kind = LANGUAGE_MODEL
    else:
        raise UnsupportedModelError(
            f"--criterion {criterion_name} needs an encoder-decoder model whose decoder takes "
            f"prev_output_tokens (FairseqEncoderDecoderModel) or a decoder-only language model "
            f"(FairseqLanguageModel); got {name}. Choose an --arch such as transformer, lstm, fconv or transformer_lm."
        )
    if not isinstance(model.decoder, FairseqIncrementalDecoder):
        raise UnsupportedModelError(
            f"--criterion {criterion_name} needs a causal, step-by-step decoder (FairseqIncrementalDecoder); "
            f"{name}'s decoder is {type(model.decoder).__name__}. Choose an autoregressive --arch "
            "(transformer, lstm, fconv, transformer_lm)."
        )
    return kind


def check_teacher_forcing_shift(inputs, target, pad: int, criterion_name: str):
    """Raises unless target[:, i] == inputs[:, i + 1] wherever both are tokens (the teacher-forcing shift).

    The methods replace input ``i + 1`` by a prediction made at position ``i``; a task whose targets
    are not the inputs shifted left (e.g. language_modeling with --self-target) breaks that.
    """
    nxt = inputs[:, 1:]  # B x (T-1)
    tgt = target[:, : nxt.size(1)]
    both = nxt.ne(pad) & tgt.ne(pad)
    if not torch.equal(nxt[both], tgt[both]):
        raise TargetsNotShiftedError(
            f"--criterion {criterion_name}: the targets are not the decoder inputs shifted by one position, "
            "so a prediction cannot be fed back as the next input. Use a task whose targets follow the inputs "
            "(translation; language_modeling with its default future targets, not --self-target or --past-target)."
        )
